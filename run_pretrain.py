"""Pretrain MegatronBERT (masked LM + next-sentence prediction) on HDF5 shards in NVIDIA
DeepLearningExamples' format (make them with ``tools/create_pretraining_data.py``).

    python -m paddle.distributed.launch --gpus 0,1,2,3,4,5,6,7 run_pretrain.py --model_type bert \
        --model_name_or_path megatronbert-uncased --max_predictions_per_seq 20 --batch_size 32 \
        --learning_rate 1e-4 --weight_decay 1e-2 --adam_epsilon 1e-6 --warmup_steps 10000 \
        --num_train_epochs 1e5 --input_dir data/shards --output_dir output/pretrain --logging_steps 1 \
        --save_steps 20000 --max_steps 1000000 --tensor_parallel_degree 2 --amp fp16

A registered name (``megatronbert-uncased``/``-cased``) or ``--config_file`` builds the model from scratch;
a directory with ``model_state.pdparams`` continues from its weights. Each data-parallel rank reads its own
shard files; tensor-parallel peers read the same. Logs every ``--logging_steps`` (and appends the same record
to ``OUTPUT_DIR/metrics.jsonl``); checkpoints every ``--save_steps`` and at the end into
``OUTPUT_DIR/checkpoint-STEP`` (atomic; ``OUTPUT_DIR/latest`` names the newest) and resumes from the newest
automatically. A NaN or infinite loss stops the run with an error before it is logged or saved, so the newest
checkpoint is the last good one. See docs/pretraining.md.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import time

from paddle_megatronbert.training import setup_cpu_threads

setup_cpu_threads()  # before paddle is imported (it pins OMP to 1 thread otherwise)

from paddle_megatronbert.finetune import str_to_bool  # noqa: E402
from paddle_megatronbert.training import AMP_CHOICES, training_argument_problems  # noqa: E402

MODEL_TYPES = ("bert", "megatronbert", "megatron-bert", "megatron_bert")
PACKAGE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "paddle_megatronbert")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    model = parser.add_argument_group("model")
    model.add_argument("--model_type", default="megatronbert", type=str.lower, choices=MODEL_TYPES,
                       help="accepted for PaddleNLP's BERT command lines; the model is always MegatronBERT")
    model.add_argument("--model_name_or_path", default=None,
                       help="registered name (config only: trains from scratch) or a directory with config.json "
                            "and weights (continues from them). Default: megatronbert-uncased")
    model.add_argument("--config_file", default=None,
                       help="JSON of MegatronBertConfig fields: a model from scratch (configs/tiny.json, "
                            "configs/megatronbert-345m.json); a key that is no field (a typo) is refused")
    model.add_argument("--tokenizer_name_or_path", default=None,
                       help="the vocab the shards were made with (default: the model's, else by do_lower_case)")
    model.add_argument("--hidden_dropout_prob", type=float, default=None, help="override the config's")
    model.add_argument("--attention_probs_dropout_prob", type=float, default=None, help="override the config's")
    model.add_argument("--recompute", action="store_true", help="recompute each layer's activations in backward")

    data = parser.add_argument_group("data")
    data.add_argument("--input_dir", required=True, help="directory of .hdf5 shards")
    data.add_argument("--max_predictions_per_seq", type=int, default=20, help="masked positions per sequence "
                                                                               "in the shards (checked)")
    data.add_argument("--batch_size", type=int, default=8, help="sequences per micro-batch per data-parallel rank")

    train = parser.add_argument_group("training")
    train.add_argument("--output_dir", required=True, help="checkpoints, metrics.jsonl and logs go here")
    train.add_argument("--learning_rate", type=float, default=1e-4)
    train.add_argument("--weight_decay", type=float, default=0.01, help="AdamW decay (not on biases/LayerNorm)")
    train.add_argument("--adam_epsilon", type=float, default=1e-6)
    train.add_argument("--adam_beta1", type=float, default=0.9)
    train.add_argument("--adam_beta2", type=float, default=0.999)
    train.add_argument("--max_grad_norm", type=float, default=1.0, help="global-norm clipping; <= 0 disables it")
    train.add_argument("--warmup_steps", type=int, default=0, help="linear warm-up steps (> 0 overrides the proportion)")
    train.add_argument("--warmup_proportion", type=float, default=0.01, help="warm-up as a fraction of the steps")
    train.add_argument("--num_train_epochs", type=float, default=3, help="passes over the shards (fractions allowed)")
    train.add_argument("--max_steps", type=int, default=-1, help="if > 0: optimizer steps of the LR schedule and "
                                                                  "of the run (the epoch limit may stop it first)")
    train.add_argument("--gradient_accumulation_steps", type=int, default=1, help="micro-batches per optimizer step")
    train.add_argument("--logging_steps", type=int, default=100)
    train.add_argument("--save_steps", type=int, default=5000, help="checkpoint every N optimizer steps (and at the end)")
    train.add_argument("--save_total_limit", type=int, default=None, help="keep only the newest N checkpoints")
    train.add_argument("--seed", type=int, default=42)
    train.add_argument("--device", default=None, choices=["cpu", "gpu", "xpu"], help="default: gpu if available")
    train.add_argument("--amp", default="none", choices=AMP_CHOICES,
                       help="mixed precision: fp16 (dynamic loss scaling) or bf16; GPU only")
    train.add_argument("--use_amp", type=str_to_bool, nargs="?", const=True, default=False,
                       help="PaddleNLP's flag: the same as --amp fp16")
    train.add_argument("--scale_loss", type=float, default=2.0**15, help="initial fp16 loss scale")
    train.add_argument("--resume", nargs="?", const="auto", default="auto",
                       help="a checkpoint directory, or 'auto' (default): the newest in --output_dir if any")
    train.add_argument("--overwrite_output_dir", action="store_true",
                       help="start from scratch even if --output_dir has checkpoints")
    train.add_argument("--exit_interval", type=int, default=None,
                       help="checkpoint and exit once the step is a multiple of N (Megatron-LM's flag)")
    train.add_argument("--exit_duration_in_mins", type=float, default=None,
                       help="checkpoint and exit after this many minutes (a scheduler's time limit)")
    train.add_argument("--visualdl", type=str_to_bool, default=None, help="VisualDL logs (default: when installed)")

    parallel = parser.add_argument_group("parallelism (under python -m paddle.distributed.launch)")
    parallel.add_argument("--tensor_parallel_degree", type=int, default=1)
    parallel.add_argument("--data_parallel_degree", type=int, default=None, help="default: world / (tp x sharding)")
    parallel.add_argument("--sharding_degree", type=int, default=1, help="ZeRO-1: optimizer state split over N ranks")
    parallel.add_argument("--sharding_stage", type=int, default=1, choices=[1, 2, 3],
                          help="ZeRO stage of --sharding_degree: 1 (optimizer state); 2/3 are refused (GPU-only in "
                               "Paddle, not wired into tensor parallelism here)")

    args = parser.parse_args(argv)
    if args.use_amp and args.amp == "none":
        args.amp = "fp16"
    if args.model_name_or_path is None and args.config_file is None:
        args.model_name_or_path = "megatronbert-uncased"
    problems = training_argument_problems(args)
    if args.max_predictions_per_seq < 1:
        problems.append(f"--max_predictions_per_seq must be >= 1, got {args.max_predictions_per_seq}")
    from paddle_megatronbert.distributed import sharding_stage_problem

    if sharding_stage_problem(args.sharding_stage):
        problems.append(f"--sharding_stage: {sharding_stage_problem(args.sharding_stage)}")
    if problems:
        parser.error("; ".join(problems))
    return args


# ---- model, vocab -------------------------------------------------------------------------------------
def build_config(args, tp_degree: int):
    """The config from --config_file or --model_name_or_path, with the run's overrides."""
    from paddle_megatronbert import MegatronBertConfig

    source = args.config_file or args.model_name_or_path
    if args.config_file and os.path.isfile(args.config_file):
        # Written by hand: a key that is no config field is a typo, and would silently be ignored.
        config = MegatronBertConfig.from_json_file(args.config_file, strict=True)
    else:  # a registered name, or a model directory whose config.json may carry HF/PaddleNLP keys
        config = MegatronBertConfig.from_pretrained(source)
    overrides = {"tensor_parallel_degree": tp_degree, "recompute": args.recompute}
    for name in ("hidden_dropout_prob", "attention_probs_dropout_prob"):
        if getattr(args, name) is not None:
            overrides[name] = getattr(args, name)
    return MegatronBertConfig.from_dict(config.to_dict(), **overrides), source


def resolve_vocab_file(args, config) -> str:
    """The vocab.txt the shards are expected to come from. Registered names ship theirs in
    ``paddle_megatronbert/vocab`` (read here without importing the tokenizer, i.e. paddlenlp)."""
    name = args.tokenizer_name_or_path
    if name is None:
        model = args.model_name_or_path
        if model and os.path.isfile(os.path.join(model, "vocab.txt")):
            name = model
        elif model and not os.path.isdir(model) and not args.config_file:
            name = model
        else:
            name = "megatronbert-uncased" if config.do_lower_case else "megatronbert-cased"
    if os.path.isdir(name):
        path = os.path.join(name, "vocab.txt")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no vocab file for {name!r} (no {path}); pass --tokenizer_name_or_path")
        return path
    if os.path.isfile(name):
        return name
    shipped = os.path.join(PACKAGE_DIR, "vocab", f"{name}-vocab.txt")
    if os.path.isfile(shipped):
        return shipped
    registered = sorted(n[:-len("-vocab.txt")] for n in os.listdir(os.path.join(PACKAGE_DIR, "vocab"))
                        if n.endswith("-vocab.txt"))
    raise FileNotFoundError(f"no vocab file for {name!r}: it is neither a vocab file, a directory with vocab.txt, "
                            f"nor a registered name ({', '.join(registered)}); pass --tokenizer_name_or_path")


def count_vocab(path: str) -> int:
    with open(path, encoding="utf-8") as f:
        return sum(1 for _ in f)


def check_output_dir(output_dir: str) -> None:
    """Before any work: an existing --output_dir must be a directory (a resume reads it, the run writes it)."""
    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        raise ValueError(f"--output_dir {output_dir} exists and is not a directory")


def check_positions_fit(shard: str, seq_length: int, config, config_source: str) -> None:
    """Sequences longer than the position table would index past it inside the first forward."""
    if seq_length > config.max_position_embeddings:
        raise ValueError(f"shard {shard} holds sequences of {seq_length} tokens but the model's "
                         f"max_position_embeddings is {config.max_position_embeddings} ({config_source}): remake "
                         "the shards with a smaller --max_seq_length or use a config with more positions")


def check_vocab_fits(vocab_file: str, vocab_lines: int, config, config_source: str) -> None:
    if vocab_lines > config.vocab_size:
        raise ValueError(f"the vocab {vocab_file} has {vocab_lines} tokens but the model's vocab_size is "
                         f"{config.vocab_size} ({config_source}): the vocab does not match the config")


def build_model(args, config):
    from paddle_megatronbert import MegatronBertForPreTraining

    weights = args.model_name_or_path
    if weights and os.path.isdir(weights) and not args.config_file:
        return MegatronBertForPreTraining.from_pretrained(weights, config=config), weights
    return MegatronBertForPreTraining(config), None


# ---- the loop ---------------------------------------------------------------------------------------------
class _StopRequest:
    """SIGTERM/SIGINT (a scheduler's pre-emption, Ctrl-C) -> checkpoint at the next step boundary, then exit."""

    def __init__(self):
        self.requested = False
        self._previous = {}
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. called from a test thread)
                pass

    def _handle(self, signum, frame):
        if self.requested:  # a second signal: stop now
            raise KeyboardInterrupt
        self.requested = True
        print(f"signal {signum}: checkpointing at the end of this step, then exiting", flush=True)

    def restore(self):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _all_ranks_any(flag: bool, topo) -> bool:
    if topo.world_size == 1:
        return flag
    import paddle
    import paddle.distributed as dist

    value = paddle.to_tensor([1 if flag else 0], dtype="int64")
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def _mean_over_ranks(values, topo):
    """Mean of a few scalars over every rank (TP peers hold equal values, so this is the replica mean)."""
    import paddle
    import paddle.distributed as dist

    stacked = paddle.stack([v.astype("float32").reshape([]) for v in values])
    if topo.world_size > 1:
        dist.all_reduce(stacked)
        stacked = stacked / topo.world_size
    return [float(x) for x in stacked.numpy()]


def main(argv=None) -> dict:
    args = parse_args(argv)
    import paddle

    from paddle_megatronbert.data.pretraining import PretrainingDataLoader, list_shards
    from paddle_megatronbert.distributed import init_distributed, validate_tp_config, wrap_model, wrap_optimizer
    from paddle_megatronbert.finetune import resolve_device
    from paddle_megatronbert.training import (
        LATEST_FILE,
        MetricsLogger,
        autocast,
        build_grad_scaler,
        build_optimizer,
        check_finite_loss,
        latest_checkpoint,
        linear_warmup_decay,
        load_checkpoint,
        optimizer_step,
        pretraining_flops_per_sequence,
        resolve_amp,
        save_checkpoint,
    )

    device = resolve_device(args.device, None)
    paddle.set_device(device)
    amp = resolve_amp(args.amp, device)
    # Checks that need no process group come first, so a bad input fails at once on every rank.
    check_output_dir(args.output_dir)
    files = list_shards(args.input_dir)
    config, config_source = build_config(args, args.tensor_parallel_degree)
    validate_tp_config(config, args.tensor_parallel_degree)
    vocab_file = resolve_vocab_file(args, config)
    vocab_lines = count_vocab(vocab_file)
    check_vocab_fits(vocab_file, vocab_lines, config, config_source)

    topo = init_distributed(tensor_parallel_degree=args.tensor_parallel_degree,
                            data_parallel_degree=args.data_parallel_degree, sharding_degree=args.sharding_degree,
                            seed=args.seed)
    if amp != args.amp and topo.is_main:
        print(f"note: --amp {args.amp} is ignored on CPU (Paddle runs auto_cast there as fp32)", flush=True)
    loader = PretrainingDataLoader(files, args.batch_size, args.max_predictions_per_seq, rank=topo.dataset_rank,
                                   world_size=topo.dataset_world_size, seed=args.seed, vocab_size=config.vocab_size,
                                   tokenizer_vocab_size=vocab_lines)
    check_positions_fit(loader.shards[0].path, loader.seq_length, config, config_source)
    accumulation = args.gradient_accumulation_steps
    steps_per_epoch = loader.steps_per_epoch // accumulation
    if steps_per_epoch < 1:
        raise ValueError(f"an epoch has {loader.steps_per_epoch} batches per rank, fewer than "
                         f"--gradient_accumulation_steps {accumulation}")
    epoch_limit = max(1, int(args.num_train_epochs * steps_per_epoch))
    total_steps = args.max_steps if args.max_steps > 0 else epoch_limit
    last_step = min(total_steps, epoch_limit)
    warmup = args.warmup_steps if args.warmup_steps > 0 else args.warmup_proportion

    model, weights_source = build_model(args, config)
    lr_scheduler = linear_warmup_decay(args.learning_rate, total_steps, warmup)
    optimizer = wrap_optimizer(build_optimizer(model, lr_scheduler, args.weight_decay, args.adam_epsilon,
                                               args.max_grad_norm, args.adam_beta1, args.adam_beta2), topo,
                               sharding_stage=args.sharding_stage)
    train_model = wrap_model(model, topo)
    scaler = build_grad_scaler(amp, args.scale_loss, topo)

    checkpoint = None
    if args.resume and args.resume != "auto":
        checkpoint = args.resume
    elif args.resume == "auto" and not args.overwrite_output_dir and os.path.isdir(args.output_dir):
        checkpoint = latest_checkpoint(args.output_dir)
    elif args.overwrite_output_dir and topo.is_main and os.path.isfile(os.path.join(args.output_dir, LATEST_FILE)):
        # A new run: if it dies before its first save, a rerun must not resume the old one.
        os.remove(os.path.join(args.output_dir, LATEST_FILE))
    step = 0
    if checkpoint is not None:
        state = load_checkpoint(checkpoint, model, optimizer, lr_scheduler, scaler, topo)
        loader.load_state_dict(state["data_position"])
        step = int(state["global_step"])
        if topo.is_main:
            print(f"resumed from {checkpoint} at step {step} (data: epoch {state['data_position']['epoch']}, "
                  f"shard {state['data_position']['shard']}, offset {state['data_position']['offset']})", flush=True)
    logger = MetricsLogger(args.output_dir, enabled=topo.is_main, use_visualdl=args.visualdl,
                           resume_step=step if checkpoint is not None else None)

    sequences_per_step = args.batch_size * accumulation * topo.dataset_world_size
    flops_per_sequence = pretraining_flops_per_sequence(config, loader.seq_length, args.max_predictions_per_seq,
                                                        args.recompute)
    if topo.is_main:
        params = sum(int(p.size) * (topo.tp_degree if p.is_distributed else 1) for p in model.parameters())
        print(f"model: {config.num_hidden_layers} layers, hidden {config.hidden_size}, ~{params / 1e6:.1f}M parameters "
              f"({weights_source or 'from scratch: ' + config_source}); data: {len(files)} shard(s), "
              f"seq {loader.seq_length}, {loader.steps_per_epoch} batches of {args.batch_size} per epoch per rank; "
              f"{sequences_per_step} sequences per step on {topo.world_size} process(es) (tp {topo.tp_degree}, "
              f"dp {topo.dp_degree}, sharding {topo.sharding_degree}); steps {step} -> {last_step}, amp {amp}",
              flush=True)

    def run_state():
        return {"data_position": loader.state_dict(), "consumed_sequences": step * sequences_per_step,
                "batch_size": args.batch_size, "gradient_accumulation_steps": accumulation, "seed": args.seed}

    def save():
        return save_checkpoint(args.output_dir, step, model, optimizer, lr_scheduler, scaler, run_state(), topo,
                               extra_files={"vocab.txt": vocab_file}, save_total_limit=args.save_total_limit)

    stop = _StopRequest()
    started = time.time()
    window_start, window_steps = time.time(), 0
    window_sums = None  # loss, mlm_loss, nsp_loss summed over the window (tensors: no sync per step)
    last_record = {}
    model.train()
    try:
        while step < last_step:
            lr = optimizer.get_lr()
            for micro in range(accumulation):
                batch = {k: paddle.to_tensor(v) for k, v in loader.next_batch().items()}
                no_sync = micro < accumulation - 1 and hasattr(train_model, "no_sync")
                with train_model.no_sync() if no_sync else contextlib.nullcontext():
                    with autocast(amp):
                        out = train_model(**batch, return_dict=True)
                    loss = out.loss / accumulation
                    (scaler.scale(loss) if scaler is not None else loss).backward()
                parts = [out.loss.detach(), out.mlm_loss.detach(), out.nsp_loss.detach()]
                parts = [p.astype("float32") / accumulation for p in parts]
                window_sums = parts if window_sums is None else [a + b for a, b in zip(window_sums, parts)]
            optimizer_step(optimizer, scaler)
            lr_scheduler.step()
            step += 1
            window_steps += 1

            exit_now = bool(args.exit_interval and step % args.exit_interval == 0)
            if args.exit_duration_in_mins is not None:
                exit_now |= (time.time() - started) / 60.0 >= args.exit_duration_in_mins
            exit_now = _all_ranks_any(exit_now or stop.requested, topo)
            log_now = step % args.logging_steps == 0 or step == last_step or exit_now
            save_now = step % args.save_steps == 0 or step == last_step or exit_now
            if log_now or save_now:
                # The losses are read (the one host sync) when they are logged or a checkpoint is due, so a
                # NaN stops the run before it reaches metrics.jsonl or a checkpoint.
                loss_value, mlm_value, nsp_value = _mean_over_ranks(window_sums, topo)
                check_finite_loss(loss_value / window_steps, step - window_steps + 1, step, args.output_dir)
            if log_now:
                elapsed = max(time.time() - window_start, 1e-9)
                sequences_per_sec = sequences_per_step * window_steps / elapsed
                last_record = {
                    "max_steps": last_step, "epoch": loader.epoch,
                    "loss": loss_value / window_steps, "mlm_loss": mlm_value / window_steps,
                    "nsp_loss": nsp_value / window_steps, "lr": float(lr),
                    "loss_scale": float(scaler._scale.item()) if scaler is not None else None,  # no public getter
                    "sequences_per_sec": sequences_per_sec,
                    "tokens_per_sec": sequences_per_sec * loader.seq_length,
                    "tflops": sequences_per_sec * flops_per_sequence / 1e12 / topo.world_size,
                }
                logger.log(step, {k: v for k, v in last_record.items() if v is not None})
                window_start, window_steps, window_sums = time.time(), 0, None

            if save_now:
                save()
            if exit_now:
                if topo.is_main:
                    print(f"exiting at step {step} as asked; rerun the same command to resume", flush=True)
                break
    finally:
        stop.restore()
        loader.close()
        logger.close()
    final = os.path.join(args.output_dir, f"checkpoint-{step}")
    if topo.is_main:
        loss_text = f"loss {last_record['loss']:.4f}, " if last_record else ""
        print(f"done: step {step}/{last_step}, {loss_text}checkpoint {final} (from_pretrained-loadable), "
              f"metrics {logger.path}", flush=True)
    return {"step": step, "last_step": last_step, "checkpoint": final, "metrics_file": logger.path,
            "last_record": last_record}


if __name__ == "__main__":
    try:
        main()
    except (ValueError, OSError) as err:  # OSError: FileNotFoundError, PermissionError, a full disk ...
        print(f"error: {err}", file=sys.stderr, flush=True)
        sys.exit(2)
