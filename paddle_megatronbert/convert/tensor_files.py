"""Reading torch pickles safely (safetensors files are ``checkpoint.weights``'s, through the ``safetensors`` package).

torch pickles are read with ``torch.load(weights_only=True)`` when the file allows it. A Megatron-LM
``model_optim_rng.pt`` usually does not (its ``args`` is an ``argparse.Namespace``, its RNG state holds
numpy arrays, newer ones pickle ``megatron.*`` enums and ``signal.SIGTERM``): those go through
:class:`RestrictedUnpickler`, which rebuilds tensors, containers, plain values and what megatron-core's
``safe_globals.py`` lists, turns every ``megatron.*`` class into an inert stub that keeps its name and
value, and refuses every other global, so no code from the file runs and no Megatron-LM checkout is needed.
"""

from __future__ import annotations

import io
import logging
import os
import pickle
import re
from typing import Any, Dict, Iterator, Tuple

import numpy as np

logger = logging.getLogger(__name__)


# ---- torch pickles --------------------------------------------------------------------------------
def _import_torch(path: str):
    try:
        import torch
    except ImportError:
        raise ImportError(f"reading {path} needs torch (`pip install torch`); safetensors files do not") from None
    return torch


class InertStub:
    """Stands in for a class of Megatron-LM that is not installed (or, like torch's RNG generator, one
    that must not come alive): keeps the name and whatever the pickle passed (an enum's value, an
    object's state); has no behaviour."""

    _qualname = "?"

    def __new__(cls, *args, **kwargs):
        obj = object.__new__(cls)
        obj.args, obj.kwargs, obj.state = args, kwargs, None
        return obj

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        self.state = state

    @property
    def value(self):
        return self.args[0] if len(self.args) == 1 else (self.args or self.state)

    def __repr__(self):
        return f"<stub {self._qualname} {self.value!r}>"


_STUBS: Dict[Tuple[str, str], type] = {}


def _stub_class(module: str, name: str) -> type:
    key = (module, name)
    if key not in _STUBS:
        _STUBS[key] = type(name.split(".")[-1], (InertStub,), {"_qualname": f"{module}.{name}", "__module__": module})
    return _STUBS[key]


def _allowed_globals():
    """(module, name) -> what the restricted unpickler may build. Besides torch's tensors and plain
    containers, this is what megatron-core's own ``megatron/core/safe_globals.py`` registers as the
    globals its checkpoints legitimately pickle (0.19: ``SimpleNamespace``, ``PosixPath``, numpy arrays,
    dtypes and ``UInt32DType``, ``Namespace``, ``BytesIO``, ``signal.Signals``, ``torch._C.Generator``
    and megatron's own enums/configs): each is either a plain value type whose construction runs no code
    of the file's choosing, or (the torch RNG generator) an inert stub."""
    import argparse
    import codecs
    import collections
    import copyreg
    import pathlib
    import signal
    import types

    torch = _import_torch("a torch pickle")
    allowed = {
        ("collections", "OrderedDict"): collections.OrderedDict,
        ("collections", "defaultdict"): collections.defaultdict,
        ("argparse", "Namespace"): argparse.Namespace,
        ("types", "SimpleNamespace"): types.SimpleNamespace,
        # Megatron-LM's args.exit_signal (signal.SIGTERM): an IntEnum, Signals(15) only looks the member up.
        ("signal", "Signals"): signal.Signals,
        # args.save / args.load given as paths; PurePosixPath builds the path without touching the disk.
        ("pathlib", "PosixPath"): pathlib.PurePosixPath,
        ("pathlib", "PurePosixPath"): pathlib.PurePosixPath,
        # the RNG state's torch generator: kept as its pickled state, never made a live generator
        ("torch._C", "Generator"): _stub_class("torch._C", "Generator"),
        ("torch", "Generator"): _stub_class("torch", "Generator"),
        ("_codecs", "encode"): codecs.encode,
        ("copyreg", "_reconstructor"): copyreg._reconstructor,
        ("io", "BytesIO"): io.BytesIO,  # Transformer Engine's _extra_state
        ("torch", "Size"): torch.Size,
        ("torch", "Tensor"): torch.Tensor,
        ("torch", "device"): torch.device,
        ("torch.nn.parameter", "Parameter"): torch.nn.Parameter,
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
    }
    for name in ("set", "frozenset", "slice", "complex", "range", "bytearray", "object", "int", "float", "str",
                 "bytes", "list", "dict", "tuple", "bool"):
        allowed[("builtins", name)] = getattr(__import__("builtins"), name)
    for name in ("_rebuild_tensor", "_rebuild_tensor_v2", "_rebuild_tensor_v3", "_rebuild_parameter",
                 "_rebuild_parameter_with_state", "_rebuild_device_tensor_from_numpy"):
        if hasattr(torch._utils, name):
            allowed[("torch._utils", name)] = getattr(torch._utils, name)
    allowed[("torch._tensor", "_rebuild_from_type_v2")] = torch._tensor._rebuild_from_type_v2
    dtype_classes = getattr(np, "dtypes", None)  # numpy >= 1.25
    for name in dir(dtype_classes) if dtype_classes else ():  # UInt32DType ...: the type objects themselves
        if name.endswith("DType"):
            allowed[("numpy.dtypes", name)] = getattr(dtype_classes, name)
    multiarray = np.core.multiarray
    for module in ("numpy.core.multiarray", "numpy._core.multiarray"):  # numpy 2 pickles say numpy._core
        allowed[(module, "_reconstruct")] = multiarray._reconstruct
        allowed[(module, "scalar")] = multiarray.scalar
    return allowed


class RestrictedUnpickler(pickle.Unpickler):
    """A pickle reader that builds data only: the allowed globals above, ``torch.<dtype>`` names,
    ``megatron.*`` classes as :class:`InertStub` subclasses; any other global raises
    ``pickle.UnpicklingError`` naming it, before anything is called."""

    _allowed = None

    def find_class(self, module, name):
        if RestrictedUnpickler._allowed is None:
            RestrictedUnpickler._allowed = _allowed_globals()
        if (module, name) in self._allowed:
            return self._allowed[(module, name)]
        if module == "torch":
            import torch

            if isinstance(getattr(torch, name, None), torch.dtype):
                return getattr(torch, name)
        if module == "megatron" or module.startswith("megatron."):
            return _stub_class(module, name)
        raise pickle.UnpicklingError(f"refused to load global {module}.{name}")


class _RestrictedPickleModule:
    """What ``torch.load(pickle_module=...)`` needs: ``Unpickler`` and ``load``."""

    __name__ = "restricted_pickle"
    Unpickler = RestrictedUnpickler

    @staticmethod
    def load(file, **kwargs):
        return RestrictedUnpickler(file, **kwargs).load()


def _torch_load(torch, path, **kwargs):
    """``torch.load`` memory-mapped where the file format allows it (zip format), so the tensors are
    read from disk when converted instead of all at once. ``path`` may be an in-memory file."""
    if not isinstance(path, (str, os.PathLike)):
        path.seek(0)
        return torch.load(path, map_location="cpu", **kwargs)
    try:
        return torch.load(path, map_location="cpu", mmap=True, **kwargs)
    except RuntimeError as err:
        if "mmap" not in str(err):
            raise
    return torch.load(path, map_location="cpu", **kwargs)


def load_torch_pickle(source, label: str = None) -> Tuple[Any, str]:
    """The object stored in a ``torch.save`` file (a path, or an in-memory file such as a
    ``torch_dist`` checkpoint's ``common_state``) and how it was read: ``"weights_only"`` or
    ``"restricted"`` (see the module docstring). Raises ValueError with one line for a truncated,
    foreign or refused file; ``label`` names an in-memory one in messages."""
    path = label or source
    torch = _import_torch(path)
    try:
        return _torch_load(torch, source, weights_only=True), "weights_only"
    except pickle.UnpicklingError as err:
        if "Weights only load failed" not in str(err):  # not a refused global: a broken or foreign file
            raise ValueError(f"cannot read {path} as a PyTorch checkpoint, truncated or not a torch file "
                             f"({_first_line(err)})") from None
        match = re.search(r"GLOBAL (\S+) was not an allowed global", str(err))
        # torch's message is a paragraph; its reason is the line after "WeightsUnpickler error:"
        reason = re.search(r"WeightsUnpickler error:\s*(\S[^\n]*)", str(err))
        why = f"it pickles {match.group(1)}" if match else reason.group(1) if reason else _first_line(err)
    except Exception as err:  # torch raises RuntimeError/EOFError/... for a truncated or foreign file
        raise ValueError(f"cannot read {path} as a PyTorch checkpoint, truncated or not a torch file "
                         f"({type(err).__name__}: {_first_line(err)})") from None
    try:
        loaded = _torch_load(torch, source, weights_only=False, pickle_module=_RestrictedPickleModule)
        # Said only once the restricted read worked: for a broken file the error below is the one line.
        logger.info("%s cannot be read with torch.load(weights_only=True) (%s); read it with the restricted "
                    "unpickler", path, why)
        return loaded, "restricted"
    except pickle.UnpicklingError as err:
        if "refused to load global" in str(err):
            raise ValueError(f"{path}: {err} (only tensors, containers, plain values, numpy arrays, what "
                             "megatron-core's safe_globals lists, and megatron.* classes as inert stubs are "
                             "rebuilt; nothing in the file is run)") from None
        raise ValueError(f"cannot read {path} as a PyTorch checkpoint, truncated or not a torch file "
                         f"({_first_line(err)})") from None
    except Exception as err:
        raise ValueError(f"cannot read {path} as a PyTorch checkpoint, truncated or not a torch file "
                         f"({type(err).__name__}: {_first_line(err)})") from None


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0][:300] if text else type(err).__name__


def tensor_to_numpy(value) -> np.ndarray:
    """A torch tensor (any float dtype, bfloat16 included) or numpy array -> numpy, without a copy
    where the dtype allows it."""
    if isinstance(value, np.ndarray):
        return value
    if hasattr(value, "detach"):
        value = value.detach()
        if str(value.dtype) == "torch.bfloat16":
            value = value.float()
        return value.cpu().numpy()
    raise TypeError(f"expected a tensor, got {type(value).__name__}")


def flatten_state(tree: Any, prefix: str = "") -> Iterator[Tuple[str, Any]]:
    """Nested dicts of tensors (Megatron's ``model`` -> ``language_model`` -> ...) -> dotted names."""
    if isinstance(tree, dict):
        for key, value in tree.items():
            yield from flatten_state(value, f"{prefix}{key}.")
    else:
        yield prefix[:-1], tree
