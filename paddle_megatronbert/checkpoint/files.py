"""File names of model directories and training checkpoints, and atomic writes.

A file is written under a temporary name in its directory, flushed to disk and renamed: a crash leaves
the old file or the new one, never half of one.
"""

from __future__ import annotations

import contextlib
import os
import re
from typing import Iterator, Optional

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"  # the default, as in HF and PaddleNLP 2.8 (safe_serialization=True)
SAFE_WEIGHTS_INDEX_NAME = "model.safetensors.index.json"  # HF's sharded layout: {"weight_map": {name: file}}
PADDLE_WEIGHTS_NAME = "model_state.pdparams"  # PaddleNLP's classic pickle (safe_serialization=False)
PADDLE_WEIGHTS_INDEX_NAME = "model_state.pdparams.index.json"
# Per-rank tensor-parallel shards (save_pretrained(merge_tensor_parallel=False)).
_SHARD = re.compile(r"model(?:_state)?\.tp(\d+)\.(safetensors|pdparams)")
TEMPORARY_MARK = ".tmp."  # every temporary file is "<final name>.tmp.<pid>"


def shard_weights_name(rank: int, safe_serialization: bool = True) -> str:
    """The weight file of tensor-parallel rank ``rank``."""
    return f"model.tp{rank:02d}.safetensors" if safe_serialization else f"model_state.tp{rank:02d}.pdparams"


def shard_rank(filename: str) -> Optional[int]:
    """The rank of a per-rank shard file name, None for any other name."""
    match = _SHARD.fullmatch(filename)
    return int(match.group(1)) if match else None


def is_weights_file(filename: str) -> bool:
    """Any weight file a model directory can hold (merged, HF-sharded, per rank, either format)."""
    return (filename in (WEIGHTS_NAME, SAFE_WEIGHTS_INDEX_NAME, PADDLE_WEIGHTS_NAME, PADDLE_WEIGHTS_INDEX_NAME)
            or shard_rank(filename) is not None
            or bool(re.fullmatch(r"model-\d+-of-\d+\.safetensors", filename)))


def temporary_path(path: str) -> str:
    return f"{path}{TEMPORARY_MARK}{os.getpid()}"


def fsync_dir(path: str) -> None:
    """Make a rename inside ``path`` durable (best effort: some filesystems refuse to fsync a directory)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str) -> Iterator[str]:
    """Yield a temporary path to write ``path`` through; on success it is fsynced and renamed onto
    ``path``, on an exception removed."""
    tmp = temporary_path(path)
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        if isinstance(err, OSError) and err.errno and not err.filename:  # a full disk names no file: name it
            raise OSError(err.errno, err.strerror or os.strerror(err.errno), path) from None
        raise
    fsync_dir(os.path.dirname(os.path.abspath(path)))


def atomic_write_bytes(path: str, data: bytes) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(data)


def atomic_write_text(path: str, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))
