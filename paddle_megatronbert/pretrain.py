"""What ``run_pretrain.py`` needs around the one training loop (:func:`paddle_megatronbert.loop.train`):
the model's config and weights from the flags, and the checks of the inputs against the model that need
no process group (so a bad input fails at once, on every rank, before any work)."""

from __future__ import annotations

import os


def check_output_dir(output_dir: str) -> None:
    """Before any work: an existing --output_dir must be a directory (a resume reads it, the run writes it)."""
    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        raise ValueError(f"--output_dir {output_dir} exists and is not a directory")


def build_config(args):
    """``(config, where it came from)``: --config_file (read strictly: it is written by hand) or
    --model_name_or_path's, with the run's overrides (:func:`arguments.config_overrides`)."""
    from .arguments import config_overrides
    from .configuration import MegatronBertConfig

    source = args.config_file or args.model_name_or_path
    if args.config_file and os.path.isfile(args.config_file):
        # Written by hand: a key that is no config field is a typo, and would silently be ignored.
        config = MegatronBertConfig.from_json_file(args.config_file, strict=True)
    else:  # a registered name, or a model directory whose config.json may carry HF/PaddleNLP keys
        config = MegatronBertConfig.from_pretrained(source)
    overrides = {"tensor_parallel_degree": args.tensor_parallel_degree, **config_overrides(args)}
    return MegatronBertConfig.from_dict(config.to_dict(), **overrides), source


def check_positions_fit(shard: str, seq_length: int, config, config_source: str) -> None:
    """Sequences longer than the position table would index past it inside the first forward."""
    if seq_length > config.max_position_embeddings:
        raise ValueError(f"shard {shard} holds sequences of {seq_length} tokens but the model's "
                         f"max_position_embeddings is {config.max_position_embeddings} ({config_source}): remake "
                         "the shards with a smaller --max_seq_length or use a config with more positions")


def build_model(args, config):
    """``(MegatronBertForPreTraining, where its weights come from)``: a model directory's weights, or a
    fresh initialisation (from scratch) for a registered name or --config_file."""
    from .modeling import MegatronBertForPreTraining

    weights = args.model_name_or_path
    if weights and os.path.isdir(weights) and not args.config_file:
        return MegatronBertForPreTraining.from_pretrained(weights, config=config), f"weights from {weights}"
    return MegatronBertForPreTraining(config), f"from scratch: {args.config_file or args.model_name_or_path}"


def describe_run(config, model, loader, topo, num_files: int, batch_size: int) -> str:
    """The start-up line's description of the model and the data."""
    params = sum(int(p.size) * (topo.tp_degree if p.is_distributed else 1) for p in model.parameters())
    return (f"model: {config.num_hidden_layers} layers, hidden {config.hidden_size}, ~{params / 1e6:.1f}M parameters; "
            f"data: {num_files} shard(s), seq {loader.seq_length}, {loader.steps_per_epoch} batches of {batch_size} "
            "per epoch per rank")
