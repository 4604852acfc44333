"""Our own Paddle model directories as a conversion source (for export to HF or Megatron-LM).

A directory holds ``config.json`` and ``model.safetensors`` (or ``model_state.pdparams``, or per-rank
shards of either, from ``save_pretrained(merge_tensor_parallel=False)``, which are merged); it is read by
``checkpoint.weights``, the one reader of model directories. PaddleNLP-named states are renamed to ours.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Iterator, List, Tuple

import numpy as np

from ..checkpoint.files import CONFIG_NAME, shard_rank
from ..checkpoint.weights import is_paddle_layout, load_model_state, weight_files
from ..configuration import MegatronBertConfig
from .paddlenlp import from_paddlenlp_names, is_paddlenlp_state


def is_paddle_directory(path: str) -> bool:
    if not os.path.isdir(path) or not os.path.isfile(os.path.join(path, CONFIG_NAME)):
        return False
    return is_paddle_layout(path)


@dataclass
class PaddleCheckpoint:
    """A Paddle model directory of this package, read whole (one copy of the model).

    Args:
        directory: the directory written by ``save_pretrained`` or by the converter.
    """

    directory: str
    notes: List[str] = field(default_factory=list)

    kind = "paddle"
    naming = "paddle"
    checkpoint_version = None

    def __post_init__(self):
        self.config = MegatronBertConfig.from_pretrained(self.directory)
        files = weight_files(self.directory)
        self.tensor_parallel_degree = len(files) if shard_rank(files[0]) is not None else 1
        self.read_with = ["safetensors" if files[0].endswith((".safetensors", ".index.json")) else
                          "restricted unpickler (.pdparams)"]
        state = load_model_state(self.directory)
        if is_paddlenlp_state(state):
            state = from_paddlenlp_names(state)
            self.notes.append("PaddleNLP parameter names renamed to ours")
        self.state = state
        self.config.tensor_parallel_degree = 1
        if self.tensor_parallel_degree > 1:
            self.notes.append(f"merged {self.tensor_parallel_degree} tensor-parallel shards")

    def iter_tensors(self) -> Iterator[Tuple[str, np.ndarray, str]]:
        for name in list(self.state):
            yield name, np.asarray(self.state.pop(name)), name
