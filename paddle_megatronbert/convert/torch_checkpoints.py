"""Which kind of PyTorch checkpoint a path is, and reading it into our config and full state dict.

Kinds: ``hf`` (a transformers ``MegatronBert*`` directory or one of its weight files), ``megatron``
(an NGC zip, a Megatron-LM checkpoint directory with ``latest_checkpointed_iteration.txt``, ``release/``
or ``iter_XXXXXXX/`` — ``torch`` or ``torch_dist`` format —, the NEW_DIR of Megatron-LM's checkpoint
conversion holding ``torch/``, an ``mp_rank_XX`` directory, or one ``model_optim_rng.pt``) and, as a source for
export, ``paddle`` (a model directory of this package, at any tensor-parallel degree).
"""

from __future__ import annotations

import os
import re
import tempfile
from typing import Dict, Optional, Tuple, Union

import numpy as np

from ..configuration import MegatronBertConfig
from .hf import HFCheckpoint, is_hf_directory, read_hf_checkpoint
from .megatron import (CHECKPOINT_FILES, CONVERTED_SUBDIRS, MegatronCheckpoint, is_distributed_checkpoint,
                       read_megatron_checkpoint)
from .paddle_dir import PaddleCheckpoint, is_paddle_directory

SOURCE_KINDS = ("hf", "megatron", "paddle")
Checkpoint = Union[HFCheckpoint, MegatronCheckpoint, PaddleCheckpoint]


def detect_source_kind(path: str) -> str:
    """``hf``, ``megatron`` or ``paddle`` from what ``path`` holds; a clear error when it is none."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"no such checkpoint: {path}")
    if os.path.isfile(path):
        name = os.path.basename(path)
        if name.endswith((".zip", ".pt")):
            return "megatron"
        if name.endswith((".safetensors", ".bin")):
            return "hf"
        raise ValueError(f"cannot tell what kind of checkpoint {path} is (expected an HF .bin/.safetensors, "
                         "a Megatron .pt or an NGC .zip); pass --from hf or --from megatron")
    if is_hf_directory(path):
        return "hf"
    if is_paddle_directory(path):
        return "paddle"
    names = os.listdir(path)
    if ("latest_checkpointed_iteration.txt" in names or "release" in names or is_distributed_checkpoint(path)
            or any(re.fullmatch(r"iter_\d+|mp_rank_\d+(_\d+)?", n) for n in names)
            or any(n in CHECKPOINT_FILES for n in names)
            or any(n in CONVERTED_SUBDIRS and os.path.isdir(os.path.join(path, n)) for n in names)
            or re.fullmatch(r"mp_rank_\d+(_\d+)?", os.path.basename(os.path.normpath(path)))):
        return "megatron"
    raise ValueError(f"{path} is not a checkpoint: it has neither config.json with pytorch_model.bin/model.safetensors "
                     "(HF) nor latest_checkpointed_iteration.txt, release/, iter_XXXXXXX/, mp_rank_XX/, torch/ or "
                     "model_optim_rng.pt (Megatron-LM)")


def open_checkpoint(path: str, kind: Optional[str] = None, workdir: Optional[str] = None,
                    num_attention_heads: Optional[int] = None) -> Checkpoint:
    """Read (memory-mapped where possible) and check a checkpoint; nothing is converted yet.

    ``kind`` forces ``hf`` or ``megatron`` instead of detecting it; ``workdir`` receives the shards of a
    zipped checkpoint; ``num_attention_heads`` is needed only for a Megatron checkpoint without ``args``
    whose heads are not of size 64.
    """
    kind = kind or detect_source_kind(path)
    if kind == "hf":
        return read_hf_checkpoint(path)
    if kind == "megatron":
        return read_megatron_checkpoint(path, workdir, num_attention_heads=num_attention_heads)
    if kind == "paddle":
        if not is_paddle_directory(path):
            raise ValueError(f"{path} is not a Paddle model directory (config.json + model_state.pdparams)")
        return PaddleCheckpoint(path)
    raise ValueError(f"unknown source kind {kind!r}; choose one of {SOURCE_KINDS}")


def load_torch_checkpoint(path: str, kind: Optional[str] = None, num_attention_heads: Optional[int] = None
                          ) -> Tuple[MegatronBertConfig, Dict[str, np.ndarray]]:
    """(config, full state dict of numpy arrays with our names and layout) from an HF or Megatron-LM
    checkpoint; TP shards are merged. What ``from_pretrained(path, convert_from_torch=True)`` loads."""
    with tempfile.TemporaryDirectory(prefix="megatronbert-convert-") as workdir:
        checkpoint = open_checkpoint(path, kind, workdir, num_attention_heads)
        state = {name: value for name, value, _ in checkpoint.iter_tensors()}
    return checkpoint.config, state
