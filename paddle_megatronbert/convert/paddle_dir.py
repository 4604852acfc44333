"""Our own Paddle model directories as a conversion source (for export to HF or Megatron-LM).

A directory holds ``config.json`` and ``model_state.pdparams``, or per-rank ``model_state.tpNN.pdparams``
shards (``save_pretrained(merge_tensor_parallel=False)``), which are merged; PaddleNLP-named states are
renamed to ours.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Iterator, List, Tuple

import numpy as np

from ..configuration import MegatronBertConfig
from .paddlenlp import from_paddlenlp_names, is_paddlenlp_state


def is_paddle_directory(path: str) -> bool:
    if not os.path.isdir(path) or not os.path.isfile(os.path.join(path, "config.json")):
        return False
    return any(n == "model_state.pdparams" or re.fullmatch(r"model_state\.tp\d+\.pdparams", n)
               for n in os.listdir(path))


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
    read_with = ["paddle.load"]

    def __post_init__(self):
        from ..modeling import load_state_file

        self.config = MegatronBertConfig.from_pretrained(self.directory)
        shards = [n for n in os.listdir(self.directory) if re.fullmatch(r"model_state\.tp\d+\.pdparams", n)]
        single = os.path.isfile(os.path.join(self.directory, "model_state.pdparams"))
        self.tensor_parallel_degree = 1 if single else len(shards)
        state = load_state_file(self.directory)
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
