"""``from_pretrained`` / ``save_pretrained`` of the models: which directory, which files, which layout.

The model classes call these (``modeling.py`` holds no file names); the model is passed in, never
imported, so data flows one way: modeling -> checkpoint -> convert (for foreign layouts).
"""

from __future__ import annotations

import logging
import os
from typing import Dict, Optional

import numpy as np

from ..configuration import PRETRAINED_INIT_CONFIGURATION, MegatronBertConfig
from .files import CONFIG_NAME, PADDLE_WEIGHTS_NAME, WEIGHTS_NAME, atomic_write_text, shard_weights_name
from .weights import load_model_state, remove_stale_weights, write_weights_file

logger = logging.getLogger(__name__)


def resolve_weights_dir(name_or_path: str) -> str:
    """A model directory, or a registered name (``$MEGATRONBERT_WEIGHTS_DIR/<name>``, else a download)."""
    if os.path.isdir(name_or_path):
        return name_or_path
    if name_or_path in PRETRAINED_INIT_CONFIGURATION:
        root = os.environ.get("MEGATRONBERT_WEIGHTS_DIR")
        if root and os.path.isdir(os.path.join(root, name_or_path)):
            return os.path.join(root, name_or_path)
        from ..download import download_pretrained_weights

        return download_pretrained_weights(name_or_path)
    raise ValueError(f"{name_or_path!r} is neither a registered name nor a directory")


def torch_checkpoint_kind(directory: str) -> Optional[str]:
    """``"hf"`` or ``"megatron"`` for a directory holding a PyTorch checkpoint (transformers' layout:
    ``format: pt`` safetensors or ``pytorch_model.bin``; Megatron-LM's ``release/``, ``iter_*`` ...), else None."""
    from ..convert.torch_checkpoints import detect_source_kind

    try:
        kind = detect_source_kind(directory)
    except (ValueError, OSError):
        return None
    return kind if kind in ("hf", "megatron") else None


def _untie_for_separate_decoder(config: MegatronBertConfig, state, source: str) -> MegatronBertConfig:
    """PaddleNLP's own MegatronBert keeps an LM decoder separate from the word embeddings: a checkpoint whose
    decoder differs from its embeddings loads untied, so the model computes what that checkpoint computed."""
    from ..convert.paddlenlp import from_paddlenlp_names, is_paddlenlp_state

    if not config.tie_word_embeddings or not is_paddlenlp_state(state):
        return config
    renamed = from_paddlenlp_names({k: v for k, v in state.items() if "decoder" in k or "word_embeddings" in k})
    decoder = renamed.get("cls.predictions.decoder_weight")
    embedding = renamed.get("bert.embeddings.word_embeddings.weight")
    if decoder is None or embedding is None or np.array_equal(np.asarray(decoder), np.asarray(embedding)):
        return config
    logger.info("%s: PaddleNLP checkpoint with a separate LM decoder: tie_word_embeddings=False", source)
    return MegatronBertConfig.from_dict(config.to_dict(), tie_word_embeddings=False)


def from_pretrained(cls, name_or_path: str, config: Optional[MegatronBertConfig] = None, **config_overrides):
    """See ``MegatronBertPretrainedModel.from_pretrained``."""
    convert_from_torch = config_overrides.pop("convert_from_torch", False)
    if config is None:  # the TP degree belongs to this run (its process group), not to the checkpoint
        from ..parallel import get_tensor_parallel_degree

        config_overrides.setdefault("tensor_parallel_degree", get_tensor_parallel_degree())
    torch_kind = None if convert_from_torch or not os.path.isdir(name_or_path) else torch_checkpoint_kind(name_or_path)
    if torch_kind:
        logger.info("%s is a %s checkpoint: converting it on load (as convert_from_torch=True does)", name_or_path,
                    "transformers" if torch_kind == "hf" else "Megatron-LM")
        convert_from_torch = True
    if convert_from_torch:
        from ..convert.torch_checkpoints import load_torch_checkpoint

        converted_config, state = load_torch_checkpoint(name_or_path)
        config = config or MegatronBertConfig.from_dict(converted_config.to_dict(), **config_overrides)
        model = cls(config)
        model.load_full_state_dict(state, strict=False, source=name_or_path)
        return model
    explicit_tie = config is not None or "tie_word_embeddings" in config_overrides
    if config is None:
        config = MegatronBertConfig.from_pretrained(name_or_path, **config_overrides)
    elif config_overrides:
        config = MegatronBertConfig.from_dict(config.to_dict(), **config_overrides)
    weights_dir = resolve_weights_dir(name_or_path)  # before building: a missing file fails fast
    state = load_model_state(weights_dir)
    if not explicit_tie:
        config = _untie_for_separate_decoder(config, state, weights_dir)
    model = cls(config)
    missing, _ = model.load_full_state_dict(state, strict=False, source=weights_dir)
    # Heads that the checkpoint does not have (a classifier on a pretrained body) start from init.
    body_missing = [k for k in missing if k.startswith(cls.base_model_prefix + ".")]
    if body_missing:
        raise KeyError(f"{weights_dir} lacks {len(body_missing)} parameters of the encoder: {body_missing[:8]}")
    if missing:
        logger.warning("%s: newly initialised (not in the checkpoint): %s", type(model).__name__, ", ".join(missing))
    return model


def gather_full_state_dict(model) -> Dict[str, np.ndarray]:
    """Every parameter of ``model`` as its full tensor, gathered from the tensor-parallel ranks (a
    collective: every rank of the group calls it)."""
    from .. import tp_plan
    from ..parallel import gather_full_array

    degree = model.config.tensor_parallel_degree
    state = model.full_state_dict()
    if degree == 1:
        return state
    full = {}
    for name, value in state.items():
        kind = tp_plan.split_kind(name)
        full[name] = value if kind is None else gather_full_array(value, kind, model.config.vocab_size)
    return full


def _tensors_to_write(model) -> Dict:
    """This rank's parameters, as Paddle tensors where their dtype has no numpy equivalent (bfloat16)."""
    return {name: (value if "bfloat16" in str(value.dtype) else value.numpy())
            for name, value in model.state_dict().items()}


def save_pretrained(model, save_directory: str, merge_tensor_parallel: bool = True,
                    safe_serialization: bool = True) -> None:
    """See ``MegatronBertPretrainedModel.save_pretrained``."""
    from ..parallel import get_replica_rank, get_tensor_parallel_group, get_tensor_parallel_rank

    degree = model.config.tensor_parallel_degree
    rank = get_tensor_parallel_rank() if degree > 1 else 0
    merged = degree == 1 or merge_tensor_parallel
    if degree > 1 and merge_tensor_parallel:
        state = gather_full_state_dict(model)  # a collective: before any rank returns
    else:
        state = _tensors_to_write(model)
    if get_replica_rank() != 0:
        return
    os.makedirs(save_directory, exist_ok=True)
    if merged:
        filename = WEIGHTS_NAME if safe_serialization else PADDLE_WEIGHTS_NAME
        written = [filename]
    else:
        filename = shard_weights_name(rank, safe_serialization)
        written = [shard_weights_name(r, safe_serialization) for r in range(degree)]
    if rank == 0:
        config_dict = model.config.to_dict()
        config_dict["architectures"] = [type(model).__name__]
        if degree > 1 and merge_tensor_parallel:
            config_dict["tensor_parallel_degree"] = 1
        atomic_write_text(os.path.join(save_directory, CONFIG_NAME),
                          MegatronBertConfig.from_dict(config_dict).to_json_string())
        remove_stale_weights(save_directory, keep=written)
    if rank == 0 or not merged:
        write_weights_file(state, os.path.join(save_directory, filename))
    if degree > 1:  # the TP peers may read the checkpoint next
        import paddle.distributed as dist

        dist.barrier(group=get_tensor_parallel_group())
