"""The tensor-parallel plan: how each of our parameters is split over tensor-parallel ranks.

The one table (:data:`SPLIT_RULES`) and the one set of functions that init, load, save, the
parallel layers and every converter use. numpy only (no paddle), so converters import it freely.

Kinds (Megatron's ``tensor_parallel/layers.py``):

- ``column``: the output dim of a Linear (axis 1 of our ``[in, out]`` weight, axis 0 of its bias):
  Q, K, V and h->4h. Each rank computes a slice of the output.
- ``row``: the input dim of a Linear (axis 0 of our weight; the bias is replicated): attention output
  and 4h->h. Partial products are all-reduced.
- ``vocab``: rows of the vocabulary (axis 0): the word embeddings and, untied, the LM decoder and its
  bias. The vocabulary need not divide: each rank holds ``ceil(V / degree)`` rows and the last rank's
  slice is padded with rows no id reaches.
- ``None``: replicated (LayerNorms, position/token-type embeddings, pooler, heads, row biases).

``layout="torch"`` gives the axes for torch's ``[out, in]`` Linear weights (Megatron and HF files).
"""

from __future__ import annotations

import math
import re
from typing import List, Optional, Sequence

import numpy as np

COLUMN, ROW, VOCAB = "column", "row", "vocab"
KINDS = (COLUMN, ROW, VOCAB)

SPLIT_RULES = (  # (regex searched in our parameter name, kind); the first match wins, no match = replicated
    (r"\.attention\.self\.(query|key|value)\.(weight|bias)$", COLUMN),
    (r"\.intermediate\.dense\.(weight|bias)$", COLUMN),
    (r"\.attention\.output\.dense\.weight$", ROW),
    (r"\.layer\.\d+\.output\.dense\.weight$", ROW),
    (r"(^|\.)embeddings\.word_embeddings\.weight$", VOCAB),
    (r"^cls\.predictions\.(bias|decoder_weight)$", VOCAB),
)
_COMPILED = tuple((re.compile(pattern), kind) for pattern, kind in SPLIT_RULES)

# The sizes that tensor parallelism divides (the vocabulary is padded instead).
DIVIDED_CONFIG_FIELDS = ("num_attention_heads", "hidden_size", "intermediate_size")


def split_kind(name: str) -> Optional[str]:
    """How tensor parallelism splits parameter ``name``: ``column``, ``row``, ``vocab`` or None."""
    for pattern, kind in _COMPILED:
        if pattern.search(name):
            return kind
    return None


def split_axis(kind: Optional[str], ndim: int, layout: str = "paddle") -> Optional[int]:
    """The axis a tensor of ``kind`` and ``ndim`` dims is split on (None = replicated)."""
    if kind is None:
        return None
    if kind not in KINDS:
        raise ValueError(f"unknown tensor-parallel split kind {kind!r}; expected one of {KINDS} or None")
    if layout not in ("paddle", "torch"):
        raise ValueError(f"layout must be 'paddle' ([in, out] weights) or 'torch' ([out, in]), got {layout!r}")
    if kind == VOCAB or ndim == 1:
        return 0
    column_axis, row_axis = (1, 0) if layout == "paddle" else (0, 1)
    return column_axis if kind == COLUMN else row_axis


def rows_per_rank(size: int, degree: int, kind: Optional[str]) -> int:
    """Length of one rank's slice of a split axis of ``size`` (vocab: padded up; others: must divide)."""
    if kind == VOCAB:
        return int(math.ceil(size / degree))
    if size % degree != 0:
        raise ValueError(f"a {kind} split of size {size} is not divisible by tensor_parallel_degree {degree}")
    return size // degree


def full_shape(kind: Optional[str], local_shape: Sequence[int], degree: int, vocab_size: Optional[int] = None,
               layout: str = "paddle") -> List[int]:
    """The full (TP=1) shape of a tensor whose shard on one rank has ``local_shape``.

    ``vocab`` tensors need ``vocab_size``: their shards are padded, so the local shape alone cannot say it.
    """
    shape = [int(s) for s in local_shape]
    axis = split_axis(kind, len(shape), layout)
    if axis is None:
        return shape
    if kind == VOCAB:
        if vocab_size is None:
            raise ValueError("full_shape of a vocab-split tensor needs vocab_size")
        shape[axis] = int(vocab_size)
    else:
        shape[axis] *= degree
    return shape


def local_shape(kind: Optional[str], shape: Sequence[int], degree: int, layout: str = "paddle") -> List[int]:
    """The shape of one rank's shard of a full tensor of ``shape``."""
    out = [int(s) for s in shape]
    axis = split_axis(kind, len(out), layout)
    if axis is not None and degree > 1:
        out[axis] = rows_per_rank(out[axis], degree, kind)
    return out


def shard(array, kind: Optional[str], degree: int, rank: int, layout: str = "paddle") -> np.ndarray:
    """Rank ``rank``'s shard of a full numpy array (itself when replicated or ``degree == 1``)."""
    array = np.asarray(array)
    if not 0 <= rank < degree:
        raise ValueError(f"rank {rank} is outside tensor_parallel_degree {degree}")
    axis = split_axis(kind, array.ndim, layout)
    if axis is None or degree == 1:
        return array
    size = array.shape[axis]
    per = rows_per_rank(size, degree, kind)
    if per * degree != size:  # vocab only: pad the tail so every rank holds the same number of rows
        pad = [(0, 0)] * array.ndim
        pad[axis] = (0, per * degree - size)
        array = np.pad(array, pad)
    return np.take(array, np.arange(rank * per, (rank + 1) * per), axis=axis)


def merge(shards: Sequence, kind: Optional[str], full_size: Optional[int] = None, layout: str = "paddle") -> np.ndarray:
    """The full numpy array from every rank's shard, in rank order (vocab padding trimmed to ``full_size``)."""
    shards = [np.asarray(s) for s in shards]
    axis = split_axis(kind, shards[0].ndim, layout)
    if axis is None:
        return shards[0]
    merged = np.concatenate(shards, axis=axis)
    if kind == VOCAB and full_size is not None:
        merged = np.take(merged, np.arange(full_size), axis=axis)
    return merged


def shard_param(name: str, array, degree: int, rank: int, layout: str = "paddle") -> np.ndarray:
    """:func:`shard` with the kind looked up from the parameter name."""
    return shard(array, split_kind(name), degree, rank, layout)


def merge_param(name: str, shards: Sequence, vocab_size: Optional[int] = None, layout: str = "paddle") -> np.ndarray:
    """:func:`merge` with the kind looked up from the parameter name."""
    return merge(shards, split_kind(name), vocab_size, layout)


def divisibility_problems(config, degree: int) -> List[str]:
    """What in ``config`` (any object with the :data:`DIVIDED_CONFIG_FIELDS`) does not split over ``degree``.

    The one divisibility check: the config's validation, ``distributed`` and the converters all call it.
    """
    if isinstance(degree, bool) or not isinstance(degree, int) or degree < 1:
        return [f"tensor_parallel_degree must be an integer >= 1, got {degree!r}"]
    return [
        f"{field} ({getattr(config, field)}) is not divisible by tensor_parallel_degree ({degree})"
        for field in DIVIDED_CONFIG_FIELDS
        if getattr(config, field, None) is not None and getattr(config, field) % degree != 0
    ]


def check_divisible(config, degree: int) -> None:
    """ValueError (one line, every problem listed) unless ``config`` splits evenly over ``degree`` ranks."""
    problems = divisibility_problems(config, degree)
    if problems:
        raise ValueError("; ".join(problems))
