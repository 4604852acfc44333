"""Reading and writing the files that hold tensors: safetensors (numpy only, no torch) and torch pickles.

torch pickles are read with ``torch.load(weights_only=True)`` when the file allows it. A Megatron-LM
``model_optim_rng.pt`` usually does not (its ``args`` is an ``argparse.Namespace``, its RNG state holds
numpy arrays, newer ones pickle ``megatron.*`` enums): those go through :class:`RestrictedUnpickler`,
which rebuilds tensors, containers, ``Namespace``, numpy arrays and plain values, turns every ``megatron.*``
class into an inert stub that keeps its name and value, and refuses every other global, so no code from
the file runs and no Megatron-LM checkout is needed.
"""

from __future__ import annotations

import io
import json
import logging
import os
import pickle
import re
import struct
from typing import Any, Dict, Iterator, Tuple

import numpy as np

logger = logging.getLogger(__name__)


# ---- safetensors ---------------------------------------------------------------------------------
# https://github.com/huggingface/safetensors: u64 little-endian header length, JSON header, raw data.
_SAFETENSORS_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": np.uint16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}
_NUMPY_TO_SAFETENSORS = {np.dtype(v): k for k, v in _SAFETENSORS_DTYPES.items() if k != "BF16"}


def bfloat16_bits_to_float32(bits: np.ndarray) -> np.ndarray:
    """bfloat16 stored as uint16 bits -> float32 (exact: bf16 is the top half of an fp32)."""
    return (bits.astype(np.uint32) << 16).view(np.float32)


def float32_to_bfloat16_bits(values: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bits (uint16), rounding to nearest even as torch and Paddle do."""
    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
    rounding = ((bits >> 16) & 1) + np.uint32(0x7FFF)
    return ((bits + rounding) >> 16).astype(np.uint16)


def read_safetensors(path: str) -> Dict[str, np.ndarray]:
    """Every tensor of a ``.safetensors`` file as a numpy array, memory-mapped (nothing is read until
    used); bfloat16 tensors come back as float32. Needs neither torch nor the safetensors package."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ValueError(f"{path} is not a safetensors file: {size} bytes, too short for a header")
        (header_len,) = struct.unpack("<Q", head)
        if header_len > size - 8:
            raise ValueError(f"{path} is truncated or not a safetensors file: header of {header_len} bytes, "
                             f"file of {size}")
        try:
            header = json.loads(f.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ValueError(f"{path} is not a safetensors file: unreadable header ({err})") from None
    data_start = 8 + header_len
    header.pop("__metadata__", None)
    tensors = {}
    if not header:
        return tensors
    end = max(int(info["data_offsets"][1]) for info in header.values())
    if data_start + end > size:
        raise ValueError(f"{path} is truncated: its header needs {data_start + end} bytes, the file has {size}")
    mapped = np.memmap(path, dtype=np.uint8, mode="r", offset=data_start, shape=(end,)) if end else None
    for name, info in header.items():
        if info["dtype"] not in _SAFETENSORS_DTYPES:
            raise ValueError(f"{path}: tensor {name} has dtype {info['dtype']}, which this reader does not know")
        begin, stop = (int(x) for x in info["data_offsets"])
        raw = mapped[begin:stop] if stop > begin else np.zeros(0, np.uint8)
        array = raw.view(_SAFETENSORS_DTYPES[info["dtype"]]).reshape(info["shape"])
        tensors[name] = bfloat16_bits_to_float32(array) if info["dtype"] == "BF16" else array
    return tensors


def write_safetensors(tensors: Dict[str, np.ndarray], path: str, metadata: Dict[str, str] = None,
                      dtype: str = None) -> None:
    """numpy arrays -> ``.safetensors``, one tensor at a time so no second copy of the model is made.
    ``dtype`` (``float32``/``float16``/``bfloat16``) casts the float arrays as they are written;
    ``None`` keeps each array's dtype."""
    def stored(array):
        if dtype is None or not np.issubdtype(array.dtype, np.floating):
            return array
        if dtype == "bfloat16":
            return float32_to_bfloat16_bits(array)
        return array.astype(dtype, copy=False)

    header: Dict[str, Any] = {"__metadata__": dict(metadata or {"format": "pt"})}
    offset = 0
    for name, array in tensors.items():
        is_bf16 = dtype == "bfloat16" and np.issubdtype(array.dtype, np.floating)
        out_dtype = np.dtype(np.uint16 if is_bf16 else stored(array[:0]).dtype)
        if not is_bf16 and out_dtype not in _NUMPY_TO_SAFETENSORS:
            raise ValueError(f"cannot write tensor {name} of dtype {out_dtype} to safetensors")
        nbytes = int(np.prod(array.shape)) * out_dtype.itemsize
        header[name] = {"dtype": "BF16" if is_bf16 else _NUMPY_TO_SAFETENSORS[out_dtype], "shape": list(array.shape),
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode("utf-8")
    encoded += b" " * (-len(encoded) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(encoded)))
        f.write(encoded)
        for array in tensors.values():
            f.write(np.ascontiguousarray(stored(array)).tobytes())


# ---- torch pickles --------------------------------------------------------------------------------
def _import_torch(path: str):
    try:
        import torch
    except ImportError:
        raise ImportError(f"reading {path} needs torch (`pip install torch`); safetensors files do not") from None
    return torch


class InertStub:
    """Stands in for a class of Megatron-LM that is not installed: keeps the name and whatever the
    pickle passed (an enum's value, an object's state); has no behaviour."""

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
    import argparse
    import codecs
    import collections
    import copyreg

    torch = _import_torch("a torch pickle")
    allowed = {
        ("collections", "OrderedDict"): collections.OrderedDict,
        ("collections", "defaultdict"): collections.defaultdict,
        ("argparse", "Namespace"): argparse.Namespace,
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
    read from disk when converted instead of all at once."""
    try:
        return torch.load(path, map_location="cpu", mmap=True, **kwargs)
    except RuntimeError as err:
        if "mmap" not in str(err):
            raise
    return torch.load(path, map_location="cpu", **kwargs)


def load_torch_pickle(path: str) -> Tuple[Any, str]:
    """The object stored in a ``torch.save`` file and how it was read: ``"weights_only"`` or
    ``"restricted"`` (see the module docstring). Raises ValueError with one line for a truncated,
    foreign or refused file."""
    torch = _import_torch(path)
    try:
        return _torch_load(torch, path, weights_only=True), "weights_only"
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
        loaded = _torch_load(torch, path, weights_only=False, pickle_module=_RestrictedPickleModule)
        # Said only once the restricted read worked: for a broken file the error below is the one line.
        logger.info("%s cannot be read with torch.load(weights_only=True) (%s); read it with the restricted "
                    "unpickler", path, why)
        return loaded, "restricted"
    except pickle.UnpicklingError as err:
        if "refused to load global" in str(err):
            raise ValueError(f"{path}: {err} (only tensors, containers, argparse.Namespace, numpy arrays and "
                             "megatron.* classes, as inert stubs, are rebuilt; nothing in the file is run)") from None
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
