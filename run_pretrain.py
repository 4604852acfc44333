"""Pretrain MegatronBERT (masked LM + next-sentence prediction) on HDF5 shards in NVIDIA
DeepLearningExamples' format (make them with ``tools/create_pretraining_data.py``).

    python -m paddle.distributed.launch --gpus 0,1,2,3,4,5,6,7 run_pretrain.py --model_type bert \
        --model_name_or_path megatronbert-uncased --max_predictions_per_seq 20 --batch_size 32 \
        --learning_rate 1e-4 --weight_decay 1e-2 --adam_epsilon 1e-6 --warmup_steps 10000 \
        --num_train_epochs 1e5 --input_dir data/shards --output_dir output/pretrain --logging_steps 1 \
        --save_steps 20000 --max_steps 1000000 --tensor_parallel_degree 2 --amp fp16

A registered name (``megatronbert-uncased``/``-cased``) or ``--config_file`` builds the model from scratch;
a directory with ``model.safetensors`` continues from its weights. ``--max_steps`` steps (else
``--num_train_epochs``, the shards cycled as often as needed). Each data-parallel rank reads its own shard
files; tensor-parallel peers read the same. Logs every ``--logging_steps`` (and appends the same record to
``OUTPUT_DIR/metrics.jsonl``); checkpoints every ``--save_steps`` and at the end into
``OUTPUT_DIR/checkpoint-STEP`` (atomic; ``OUTPUT_DIR/latest`` names the newest) and resumes from the newest
automatically. A NaN or infinite loss stops the run with an error before it is logged or saved, so the newest
checkpoint is the last good one. See docs/pretraining.md.
"""

from __future__ import annotations

from paddle_megatronbert.training import setup_cpu_threads

setup_cpu_threads()  # before paddle is imported (it pins OMP to 1 thread otherwise)

from paddle_megatronbert.arguments import RunnerArgumentParser, add_training_arguments, finish_arguments  # noqa: E402
from paddle_megatronbert.loop import run_cli, setup_device, setup_run, train  # noqa: E402


def parse_args(argv=None):
    parser = RunnerArgumentParser("pretrain", description=__doc__)
    task = parser.add_argument_group("pretraining")
    task.add_argument("--config_file", default=None,
                      help="JSON of MegatronBertConfig fields: a model from scratch (configs/tiny.json, "
                           "configs/megatronbert-345m.json); a key that is no field (a typo) is refused")
    task.add_argument("--tokenizer_name_or_path", "--vocab-file", default=None,
                      help="the vocab the shards were made with (None: the model's, else the registered vocab of "
                           "the config's casing when it fits; pretraining needs none)")
    task.add_argument("--input_dir", required=True, help="directory of .hdf5 shards")
    task.add_argument("--max_predictions_per_seq", type=int, default=20,
                      help="masked positions per sequence in the shards (checked)")
    add_training_arguments(parser)
    args = parser.parse_args(argv)
    from paddle_megatronbert.vocab_resolution import split_model_argument

    try:
        args.model_name_or_path, args.config_file = split_model_argument(args.model_name_or_path, args.config_file)
    except ValueError as err:
        parser.error(str(err))
    if args.model_name_or_path is None and args.config_file is None:
        args.model_name_or_path = "megatronbert-uncased"
    problems = [f"--max_predictions_per_seq must be >= 1, got {args.max_predictions_per_seq}"
                ] if args.max_predictions_per_seq < 1 else []
    return finish_arguments(parser, args, problems)


def main(argv=None) -> dict:
    args = parse_args(argv)
    from paddle_megatronbert.data.pretraining import PretrainingDataLoader, list_shards
    from paddle_megatronbert.distributed import validate_tp_config
    from paddle_megatronbert.pretrain import (build_config, build_model, check_output_dir, check_positions_fit,
                                              describe_run)
    from paddle_megatronbert.training import pretraining_flops_per_sequence
    from paddle_megatronbert.vocab_resolution import resolve_run_vocab

    setup_device(args)
    # Checks that need no process group come first, so a bad input fails at once on every rank.
    check_output_dir(args.output_dir)
    files = list_shards(args.input_dir)
    config, config_source = build_config(args)
    validate_tp_config(config, args.tensor_parallel_degree)
    vocab = resolve_run_vocab(args.tokenizer_name_or_path, args.model_name_or_path, config, config_source,
                              args.config_file)
    topo = setup_run(args)
    if vocab.note and topo.is_main:
        print(vocab.note, flush=True)
    loader = PretrainingDataLoader(files, args.batch_size, args.max_predictions_per_seq, rank=topo.dataset_rank,
                                   world_size=topo.dataset_world_size, seed=args.seed, vocab_size=config.vocab_size,
                                   tokenizer_vocab_size=vocab.tokens)
    check_positions_fit(loader.shards[0].path, loader.seq_length, config, config_source)
    model, origin = build_model(args, config)
    result = train(model, loader, args, topo, loss_fields=("loss", "mlm_loss", "nsp_loss"),
                   run_summary=describe_run(config, model, loader, topo, len(files), args.batch_size),
                   model_origin=origin, checkpoint_files={"vocab.txt": vocab.path} if vocab.path else None,
                   tokens_per_sample=loader.seq_length,
                   flops_per_sample=pretraining_flops_per_sequence(config, loader.seq_length,
                                                                   args.max_predictions_per_seq, args.recompute))
    return {"step": result.state.global_step, "last_step": result.state.max_steps, "checkpoint": result.checkpoint,
            "metrics_file": result.metrics_file, "last_record": result.last_record}


if __name__ == "__main__":
    run_cli(main)
