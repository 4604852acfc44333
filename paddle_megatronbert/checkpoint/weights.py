"""Reading and writing weight files: safetensors (the default) and Paddle's ``.pdparams`` pickles.

safetensors goes through the ``safetensors`` package (``serialize_file`` writes straight from each array's
memory; ``safe_open(..., backend="pread")`` reads one tensor at a time, without mapping the file, so a
loaded tensor is the only copy in host memory). ``.pdparams`` is read only through the restricted
unpickler of ``safe_pickle``. Tensors come back as :class:`LazyTensor` (safetensors) or numpy arrays;
``np.asarray`` gives the array either way.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import struct
from collections.abc import Mapping
from typing import Any, Callable, Dict, Iterator, List, Optional

import numpy as np

from .files import (CONFIG_NAME, PADDLE_WEIGHTS_INDEX_NAME, PADDLE_WEIGHTS_NAME, SAFE_WEIGHTS_INDEX_NAME, WEIGHTS_NAME,
                    atomic_path, is_weights_file, shard_rank, shard_weights_name)
from .safe_pickle import load_paddle_pickle

# numpy has no bfloat16: such tensors are carried as their uint16 bits and widened to float32 on read.
BF16_BITS = np.uint16


def bfloat16_bits_to_float32(bits: np.ndarray) -> np.ndarray:
    """bfloat16 stored as uint16 bits -> float32 (exact: bf16 is the top half of an fp32)."""
    return (np.asarray(bits).astype(np.uint32) << 16).view(np.float32)


def float32_to_bfloat16_bits(values: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bits (uint16), rounding to nearest even as torch and Paddle do."""
    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
    rounding = ((bits >> 16) & 1) + np.uint32(0x7FFF)
    return ((bits + rounding) >> 16).astype(np.uint16)


class LazyTensor:
    """A tensor in a file, read when ``np.asarray`` asks for it (and not kept).

    Args:
        load: returns the numpy array.
        shape: its shape (known from the file header without reading).
        dtype: its numpy dtype as read (bfloat16 reads as float32).
    """

    def __init__(self, load: Callable[[], np.ndarray], shape, dtype):
        self._load, self.shape, self.dtype = load, tuple(shape), np.dtype(dtype)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def __array__(self, dtype=None, copy=None):
        array = self._load()
        return array if dtype is None else array.astype(dtype, copy=False)

    def __repr__(self):
        return f"LazyTensor(shape={list(self.shape)}, dtype={self.dtype})"


# ---- safetensors -----------------------------------------------------------------------------------------
def _read_bf16(path: str, name: str) -> np.ndarray:
    # safetensors 0.8 refuses BF16 with framework="np" (and "paddle"): "data type 'bfloat16' not
    # understood"; the bytes are read here from the offsets in the file's header instead.
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        info = json.loads(f.read(length))[name]
        begin, end = info["data_offsets"]
        f.seek(8 + length + begin)
        bits = np.frombuffer(f.read(end - begin), dtype=BF16_BITS).reshape(info["shape"])
    return bfloat16_bits_to_float32(bits)


def read_safetensors(path: str) -> Dict[str, LazyTensor]:
    """Every tensor of a ``.safetensors`` file as a :class:`LazyTensor` (bfloat16 widened to float32).
    Raises ValueError with one line for a file that is not safetensors."""
    from safetensors import SafetensorError, safe_open

    def reader(name):
        def load():
            with safe_open(path, framework="np", backend="pread") as f:
                return f.get_tensor(name)
        return load

    try:
        with safe_open(path, framework="np", backend="pread") as f:
            tensors = {}
            for name in f.keys():
                part = f.get_slice(name)
                dtype = part.get_dtype()
                if dtype == "BF16":
                    tensors[name] = LazyTensor(lambda n=name: _read_bf16(path, n), part.get_shape(), np.float32)
                elif dtype == "U16":  # bfloat16 bits written from numpy; no parameter is uint16
                    load = reader(name)
                    tensors[name] = LazyTensor(lambda load=load: bfloat16_bits_to_float32(load()), part.get_shape(),
                                               np.float32)
                else:
                    tensors[name] = LazyTensor(reader(name), part.get_shape(), _SAFETENSORS_NUMPY[dtype])
    except (SafetensorError, OSError, KeyError) as err:
        if isinstance(err, FileNotFoundError):
            raise
        raise unreadable_safetensors(path, err) from None
    return tensors


def unreadable_safetensors(path: str, err: BaseException) -> ValueError:
    """The one-line error for a file ``safe_open`` refuses."""
    detail = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    if "not fully covered" in detail:  # the header is fine, the data stops short
        return ValueError(f"cannot read {path}: it is truncated ({detail})")
    return ValueError(f"{path} is not a safetensors file, or is cut short inside its header ({detail})")


def read_safetensors_metadata(path: str) -> Dict[str, str]:
    """The ``__metadata__`` of a ``.safetensors`` file (one-line ValueError for an unreadable file)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(path, framework="np", backend="pread") as f:
            return dict(f.metadata() or {})
    except (SafetensorError, OSError) as err:
        if isinstance(err, FileNotFoundError):
            raise
        raise unreadable_safetensors(path, err) from None


_SAFETENSORS_NUMPY = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "I64": np.int64, "I32": np.int32,
                      "I16": np.int16, "I8": np.int8, "U8": np.uint8, "U16": np.uint16, "U32": np.uint32,
                      "U64": np.uint64, "BOOL": np.bool_}


def _tensor_spec(name: str, value, dtype: Optional[str], keep_alive: List):
    """A ``safetensors.TensorSpec`` pointing at the array's own memory (no copy is made for writing)."""
    from safetensors import TensorSpec

    spec_dtype = None
    if hasattr(value, "place") and hasattr(value, "numpy"):  # a Paddle tensor: its dtype says bfloat16
        spec_dtype = "bfloat16" if "bfloat16" in str(value.dtype) else None
        value = value.numpy()
    array = np.asarray(value)
    if np.issubdtype(array.dtype, np.floating) and dtype is not None:
        if dtype == "bfloat16":
            array, spec_dtype = float32_to_bfloat16_bits(array), "bfloat16"
        else:
            array = array.astype(dtype, copy=False)
    array = np.ascontiguousarray(array)
    if array.dtype.byteorder == ">":
        array = array.byteswap().view(array.dtype.newbyteorder("<"))
    keep_alive.append(array)
    return TensorSpec(dtype=spec_dtype or array.dtype.name, shape=array.shape, data_ptr=array.ctypes.data,
                      data_len=array.nbytes)


def write_safetensors(tensors: Dict[str, Any], path: str, metadata: Optional[Dict[str, str]] = None,
                      dtype: Optional[str] = None) -> None:
    """numpy arrays (or Paddle tensors) -> ``.safetensors`` at ``path``, atomically.

    ``dtype`` (``float32``/``float16``/``bfloat16``) casts float tensors as they are written; ``None``
    keeps each tensor's dtype (a Paddle bfloat16 tensor stays bfloat16). ``metadata`` defaults to
    ``{"format": "np"}``, what PaddleNLP writes and accepts (transformers wants ``{"format": "pt"}``).
    """
    from safetensors import SafetensorError, serialize_file

    keep_alive: List = []
    specs = {name: _tensor_spec(name, value, dtype, keep_alive) for name, value in tensors.items()}
    with atomic_path(path) as tmp:
        try:
            serialize_file(specs, tmp, metadata=dict(metadata or {"format": "np"}))
        except SafetensorError as err:  # its I/O errors (a full disk) are no OSError: make them one, naming the file
            code = re.search(r"os error (\d+)", str(err))
            if code is None:
                raise
            raise OSError(int(code.group(1)), os.strerror(int(code.group(1))), path) from None


# ---- .pdparams ---------------------------------------------------------------------------------------------
def read_pdparams(path: str) -> Dict[str, np.ndarray]:
    """A ``.pdparams`` state dict through the restricted unpickler; bfloat16 (stored as uint16 bits, as
    ``paddle.save`` writes it) widened to float32: no parameter of the model is uint16."""
    state = load_paddle_pickle(path)
    if not isinstance(state, dict):
        raise ValueError(f"{path} holds a {type(state).__name__}, not a state dict")
    return {k: bfloat16_bits_to_float32(v) if isinstance(v, np.ndarray) and v.dtype == BF16_BITS else v
            for k, v in state.items()}


def write_pdparams(state: Dict[str, Any], path: str) -> None:
    """A ``model_state.pdparams`` that ``paddle.load`` reads, atomically and without a second copy.

    ``paddle.save`` pickles with protocol 4, where each array is first copied into a bytes object that the
    pickler's memo keeps alive until the end: two copies of the model at the peak. Protocol 5 writes each
    array's memory as it is; ``paddle.load`` and :func:`read_pdparams` read it. Paddle tensors (bfloat16)
    go through ``paddle.save``, the only writer that records their dtype.
    """
    with atomic_path(path) as tmp:
        if any(not isinstance(v, np.ndarray) for v in state.values()):
            import paddle

            paddle.save(state, tmp)
        else:
            with open(tmp, "wb") as f:
                pickle.Pickler(f, protocol=5).dump(state)


def read_weights_file(path: str) -> Mapping:
    """One weight file by its extension: ``.safetensors`` or a Paddle pickle."""
    return read_safetensors(path) if path.endswith(".safetensors") else read_pdparams(path)


def write_weights_file(state: Dict[str, Any], path: str, metadata: Optional[Dict[str, str]] = None) -> None:
    if path.endswith(".safetensors"):
        write_safetensors(state, path, metadata)
    else:
        write_pdparams(state, path)


# ---- model directories ---------------------------------------------------------------------------------
def _read_index(directory: str, index_name: str) -> Dict[str, Any]:
    """An HF-style sharded checkpoint: ``{"weight_map": {tensor: file}}`` -> every tensor, lazily."""
    index = os.path.join(directory, index_name)
    try:
        with open(index, encoding="utf-8") as f:
            weight_map = json.load(f)["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise ValueError(f"{index} is not a valid checkpoint index ({type(err).__name__}: {err})") from None
    files = sorted(set(weight_map.values()))
    missing = [f for f in files if not os.path.isfile(os.path.join(directory, f))]
    if missing:
        raise FileNotFoundError(f"{index} names shards that are not in {directory}: {missing[:5]}")
    state: Dict[str, Any] = {}
    for name in files:
        state.update(read_weights_file(os.path.join(directory, name)))
    return state


def weight_files(directory: str) -> List[str]:
    """The weight files of a model directory, in the order they are preferred."""
    names = set(os.listdir(directory)) if os.path.isdir(directory) else set()
    for single in (WEIGHTS_NAME, SAFE_WEIGHTS_INDEX_NAME, PADDLE_WEIGHTS_NAME, PADDLE_WEIGHTS_INDEX_NAME):
        if single in names:
            return [single]
    shards = sorted(n for n in names if shard_rank(n) is not None)
    safe = [n for n in shards if n.endswith(".safetensors")]
    return safe or shards


def _safetensors_format(path: str) -> Optional[str]:
    try:
        return read_safetensors_metadata(path).get("format")
    except (ValueError, OSError):  # not readable as safetensors: the reader says why when it is read
        return None


def is_paddle_layout(directory: str) -> bool:
    """Whether a directory's weights are in Paddle's layout (ours or PaddleNLP's) rather than transformers'.

    ``model.safetensors`` is both ecosystems' file name; the file says which wrote it: transformers writes
    (and requires) ``{"format": "pt"}``, PaddleNLP and this package write ``{"format": "np"}``. A config.json
    with ``transformers_version`` is transformers' too.
    """
    files = weight_files(directory)
    if not files:
        return False
    try:
        with open(os.path.join(directory, CONFIG_NAME), encoding="utf-8") as f:
            if "transformers_version" in json.load(f):
                return False
    except (OSError, ValueError):
        pass  # no or broken config.json: the config reader says what is wrong
    first = files[0]
    if first.endswith(".index.json"):
        with open(os.path.join(directory, first), encoding="utf-8") as f:
            first = sorted(set(json.load(f).get("weight_map", {}).values()) or [""])[0]
    if first.endswith(".safetensors"):
        return _safetensors_format(os.path.join(directory, first)) != "pt"
    return True


class _MergedShards(Mapping):
    """Per-rank shards seen as full tensors, each merged when read (one tensor in memory at a time)."""

    def __init__(self, parts: List[Mapping], vocab_size: int):
        self._parts, self._vocab_size = parts, vocab_size

    def __getitem__(self, name):
        from .. import tp_plan

        parts = [p[name] for p in self._parts]
        return LazyTensor(lambda: tp_plan.merge_param(name, [np.asarray(p) for p in parts], self._vocab_size),
                          tp_plan.full_shape(tp_plan.split_kind(name), parts[0].shape, len(parts), self._vocab_size),
                          parts[0].dtype)

    def __iter__(self) -> Iterator[str]:
        return iter(self._parts[0])

    def __len__(self):
        return len(self._parts[0])


def read_model_weights(directory: str, tensor_parallel_degree: int = 1, vocab_size: Optional[int] = None) -> Dict:
    """Every full tensor of a model directory (``{name: LazyTensor or array}``): ``model.safetensors``
    first, then an HF-style ``model.safetensors.index.json``, then ``model_state.pdparams``, then per-rank
    shards (``model.tpNN.safetensors`` / ``model_state.tpNN.pdparams``, as many as ``tensor_parallel_degree``
    of ``config.json`` says), merged tensor by tensor."""
    files = weight_files(directory)
    if not files:
        raise FileNotFoundError(f"{directory} has no {WEIGHTS_NAME} (nor {SAFE_WEIGHTS_INDEX_NAME}, "
                                f"{PADDLE_WEIGHTS_NAME} or per-rank model.tpNN.safetensors shards)")
    if len(files) == 1 and shard_rank(files[0]) is None:
        name = files[0]
        if name.endswith(".index.json"):
            return _read_index(directory, name)
        return dict(read_weights_file(os.path.join(directory, name)))
    ext = os.path.splitext(files[0])[1]
    expected = [n for r in range(tensor_parallel_degree)
                for n in [shard_weights_name(r, ext == ".safetensors")]]
    if files != expected:
        raise ValueError(f"{directory}: config.json says tensor_parallel_degree {tensor_parallel_degree}, "
                         f"so the shards {expected} are expected, found {files}")
    parts = [read_weights_file(os.path.join(directory, n)) for n in files]
    if vocab_size is None:
        raise ValueError(f"{directory}: merging tensor-parallel shards needs the config's vocab_size")
    merged = _MergedShards(parts, vocab_size)
    return {name: merged[name] for name in merged}


def remove_stale_weights(directory: str, keep: List[str]) -> None:
    """Delete weight files of another layout or format left by an earlier save (a reader would
    prefer them over the new ones)."""
    for name in os.listdir(directory):
        if is_weights_file(name) and name not in keep:
            os.remove(os.path.join(directory, name))


def load_model_state(directory: str) -> Dict:
    """The full state dict of a model directory (see ``weights.read_model_weights``); the TP degree and
    vocab size that per-rank shards need come from its config.json."""
    files = weight_files(directory)
    if files and shard_rank(files[0]) is not None:
        with open(os.path.join(directory, CONFIG_NAME), encoding="utf-8") as f:
            saved = json.load(f)
        return read_model_weights(directory, int(saved.get("tensor_parallel_degree", 1)), saved.get("vocab_size"))
    return read_model_weights(directory)
