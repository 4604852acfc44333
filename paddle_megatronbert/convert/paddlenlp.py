"""Names of PaddleNLP 2.8's own MegatronBert checkpoints mapped to ours.

PaddleNLP says ``megatronbert.`` for the body, ``layer_norm`` for the LayerNorms, and keeps an untied
``cls.predictions.decoder_weight`` / ``decoder_bias``; the tensors themselves have our layout.
"""

from __future__ import annotations

import logging
import re
from typing import Dict

import numpy as np

logger = logging.getLogger(__name__)

_RENAMES = [  # (PaddleNLP regex, ours), applied in order to each name
    (r"^megatronbert\.", "bert."),
    (r"\.attention\.layer_norm\.", ".attention.ln."),
    (r"(\.layer\.\d+)\.layer_norm\.", r"\1.ln."),
    (r"^bert\.encoder\.layer_norm\.", "bert.encoder.ln."),
    (r"\.transform\.layer_norm\.", ".transform.LayerNorm."),
    (r"^cls\.predictions\.decoder_bias$", "cls.predictions.bias"),
]


_TO_PADDLENLP = [  # (ours regex, PaddleNLP): the inverse of _RENAMES, kept beside it so the two stay in step
    (r"^bert\.", "megatronbert."),
    (r"\.attention\.ln\.", ".attention.layer_norm."),
    (r"(\.layer\.\d+)\.ln\.", r"\1.layer_norm."),
    (r"^megatronbert\.encoder\.ln\.", "megatronbert.encoder.layer_norm."),
    (r"\.transform\.LayerNorm\.", ".transform.layer_norm."),
    (r"^cls\.predictions\.bias$", "cls.predictions.decoder_bias"),
]


def to_paddlenlp_names(state: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
    """Rename every key of one of our state dicts (a head's: ``bert.`` prefix) to PaddleNLP's names (values
    untouched). A tied model has no ``decoder_weight``: PaddleNLP's separate decoder must be given the word
    embeddings by the caller."""
    out = {}
    for name, value in state.items():
        for pattern, repl in _TO_PADDLENLP:
            name = re.sub(pattern, repl, name)
        out[name] = value
    return out


def is_paddlenlp_state(state: Dict[str, np.ndarray]) -> bool:
    """A head saved by PaddleNLP says ``megatronbert.``; its bare ``MegatronBertModel`` has no prefix but
    PaddleNLP's ``layer_norm`` (ours is ``ln``)."""
    return any(name.startswith("megatronbert.") or ".layer_norm." in name for name in state)


def from_paddlenlp_names(state: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
    """Rename every key of a PaddleNLP MegatronBert state dict to ours (values untouched, not read)."""
    out = {}
    for name, value in state.items():
        if name.startswith(("embeddings.", "encoder.", "pooler.")):  # a bare PaddleNLP MegatronBertModel
            name = "megatronbert." + name
        for pattern, repl in _RENAMES:
            name = re.sub(pattern, repl, name)
        out[name] = value
    return out


def maybe_from_paddlenlp_names(state: Dict[str, np.ndarray], model) -> Dict[str, np.ndarray]:
    """PaddleNLP-named states are renamed for ``model``; any other state is returned as it is.

    PaddleNLP's decoder is a separate matrix: a model with ``tie_word_embeddings=False`` takes it as
    ``cls.predictions.decoder_weight``; a tied model drops it (with a warning when it differs from the
    word embeddings, since the outputs then differ from PaddleNLP's).
    """
    if not is_paddlenlp_state(state):
        return state
    state = from_paddlenlp_names(state)
    decoder = state.get("cls.predictions.decoder_weight")
    if decoder is not None and model.config.tie_word_embeddings:
        state = dict(state)
        state.pop("cls.predictions.decoder_weight")
        embedding = state.get("bert.embeddings.word_embeddings.weight")
        if embedding is not None and not np.array_equal(np.asarray(decoder), np.asarray(embedding)):
            logger.warning(
                "the checkpoint's LM decoder differs from its word embeddings; the model ties them "
                "(tie_word_embeddings=True) and uses the embeddings: load with tie_word_embeddings=False "
                "to keep the separate decoder"
            )
    return state
