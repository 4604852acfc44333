"""Reading Paddle pickles (``.pdparams``, ``.pdopt``, old ``rng_state`` files) without running their code.

``paddle.load`` is plain pickle: a file whose pickle calls ``os.system`` runs it. This reader rebuilds only
the globals that ``paddle.save`` of a state dict really writes, measured with ``pickle.Unpickler.find_class``
on files written by Paddle 3.3.1 (``paddle.save`` of a model and of an AdamW state, float32/float16/bfloat16/
int64 tensors) and by PaddleNLP 2.8.1 (``MegatronBert*.save_pretrained(safe_serialization=False)``):
``numpy.core.multiarray._reconstruct``, ``numpy.ndarray`` and ``numpy.dtype`` (and, for the protocol-5 pickles
this package writes without a second copy, ``numpy.core.numeric._frombuffer``). Tensors nested below the top
level are pickled as ``(name, ndarray)`` tuples (``builtins.tuple``); old RNG files of this project pickle
``paddle.base.libpaddle.GeneratorState`` through ``copyreg.__newobj__``. Any other global is refused with
one line naming the file and the global, before anything is called.
"""

from __future__ import annotations

import collections
import copyreg
import pickle
from typing import Any, Dict, Tuple

import numpy as np

STRUCTURED_NAMES_KEY = "StructuredToParameterName@@"  # paddle.save's table of parameter names
_BIG_PARAMS_KEY = "UnpackBigParamInfor@@"  # paddle.save (protocol 2/3) splits arrays > 4 GB into slices


def _allowed_globals() -> Dict[Tuple[str, str], Any]:
    multiarray = np.core.multiarray
    allowed = {
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("builtins", "tuple"): tuple,
        ("collections", "OrderedDict"): collections.OrderedDict,
    }
    for module in ("numpy.core.multiarray", "numpy._core.multiarray"):  # numpy 2 writes numpy._core
        allowed[(module, "_reconstruct")] = multiarray._reconstruct
        allowed[(module, "scalar")] = multiarray.scalar  # numpy scalars (np.float32(...)) in a state
    for module in ("numpy.core.numeric", "numpy._core.numeric"):  # pickle protocol 5 (our .pdparams writer)
        allowed[(module, "_frombuffer")] = np.core.numeric._frombuffer
    return allowed


def _generator_state_globals() -> Dict[Tuple[str, str], Any]:
    """The two more globals of RNG files written by this project's earlier ``pickle.dump`` of
    ``paddle.get_rng_state()``. ``__newobj__`` only calls ``cls.__new__`` of a class this reader allowed."""
    from paddle.base.libpaddle import GeneratorState

    return {("paddle.base.libpaddle", "GeneratorState"): GeneratorState, ("copyreg", "__newobj__"): copyreg.__newobj__}


class RefusedGlobalError(pickle.UnpicklingError):
    """A pickle names a global outside the allowed set."""


class PaddleStateUnpickler(pickle.Unpickler):
    """Rebuilds numpy arrays, dtypes and plain containers; any other global raises
    :class:`RefusedGlobalError` naming it.

    Args:
        file: a binary file object.
        generator_states: also allow ``GeneratorState`` (old RNG files of training checkpoints).
    """

    def __init__(self, file, generator_states: bool = False):
        super().__init__(file, encoding="latin1")  # as paddle.load: Python 2 era pickles hold byte strings
        self._allowed = _allowed_globals()
        if generator_states:
            self._allowed.update(_generator_state_globals())

    def find_class(self, module, name):
        try:
            return self._allowed[(module, name)]
        except KeyError:
            raise RefusedGlobalError(f"{module}.{name}") from None


def _as_arrays(value):
    """Nested tensors come back as ``(name, ndarray)`` tuples, as paddle.load's own post-processing sees them."""
    if isinstance(value, tuple) and len(value) == 2 and isinstance(value[0], str) and isinstance(value[1], np.ndarray):
        return value[1]
    if isinstance(value, dict):
        return type(value)((k, _as_arrays(v)) for k, v in value.items())
    if isinstance(value, list):
        return [_as_arrays(v) for v in value]
    return value


def load_paddle_pickle(path: str, generator_states: bool = False) -> Any:
    """The object in a file written by ``paddle.save`` (or ``pickle.dump`` of plain data), rebuilt with
    :class:`PaddleStateUnpickler`: numpy arrays (bfloat16 as its uint16 bits, as ``paddle.load`` returns
    it with ``return_numpy=True``), dicts, lists, scalars. Raises ValueError with one line for a refused
    global or an unreadable file; nothing in the file is run."""
    try:
        with open(path, "rb") as f:
            obj = PaddleStateUnpickler(f, generator_states=generator_states).load()
    except RefusedGlobalError as err:
        raise ValueError(f"{path}: refused to load global {err} (a Paddle state pickles only numpy arrays, "
                         "dtypes and plain containers; nothing in the file was run)") from None
    except FileNotFoundError:
        raise
    except Exception as err:  # pickle raises a dozen kinds for a truncated or foreign file
        detail = str(err).strip().splitlines()[0][:200] if str(err).strip() else "no detail"
        raise ValueError(f"cannot read {path} as a Paddle state file, truncated or not a Paddle pickle "
                         f"({type(err).__name__}: {detail})") from None
    if isinstance(obj, dict):
        obj = dict(obj)
        obj.pop(STRUCTURED_NAMES_KEY, None)
        for key, info in obj.pop(_BIG_PARAMS_KEY, {}).items():
            parts = [obj.pop(part) for part in info["slices"]]
            obj[key] = np.concatenate([p.reshape(-1) for p in parts]).reshape(info["OriginShape"])
    return _as_arrays(obj)
