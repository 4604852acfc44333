"""The fine-tuning loop that ``run_squad.py`` and ``run_glue.py`` share.

A runner builds its features, model and an ``evaluate`` function, then calls :func:`finetune`, which
trains (AdamW + linear warm-up/decay, gradient clipping, accumulation, AMP on GPU), logs
``global step, epoch, batch, loss, lr, speed`` lines as PaddleNLP's examples do, evaluates at every
``--save_steps`` and at the end, and keeps the best checkpoint in ``OUTPUT_DIR/best_model``.

Parallelism comes from :mod:`paddle_megatronbert.distributed`: tensor-parallel peers read the same
batches; data-parallel replicas read disjoint slices. Evaluation runs on the first replica only (all its
tensor-parallel ranks, which the forward needs) and only global rank 0 writes files and logs.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterator, List, Optional, Sequence

import numpy as np

BEST_MODEL_DIR = "best_model"
LAST_MODEL_DIR = "last_model"  # when there is nothing to evaluate, the latest weights are kept instead
STATE_FILE = "trainer_state.json"


def str_to_bool(value) -> bool:
    if isinstance(value, bool):
        return value
    lowered = str(value).strip().lower()
    if lowered in ("1", "true", "yes", "y", "on"):
        return True
    if lowered in ("0", "false", "no", "n", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean, got {value!r}")


def add_finetune_arguments(parser: argparse.ArgumentParser, batch_size: int, max_seq_length: int,
                           learning_rate: float, warmup_proportion: float, adam_epsilon: float) -> None:
    """The flags both runners share (PaddleNLP example names; defaults differ per runner as in the seeds)."""
    parser.add_argument("--model_name_or_path", default="megatronbert-cased",
                        help="registered name (megatronbert-cased / megatronbert-uncased) or a directory with "
                             "config.json, model_state.pdparams and vocab.txt")
    parser.add_argument("--model_type", default=None,
                        help="accepted for compatibility with PaddleNLP's examples and ignored: the model is "
                             "always MegatronBERT")
    parser.add_argument("--output_dir", default="output", help="where checkpoints, predictions and results go")
    parser.add_argument("--max_seq_length", type=int, default=max_seq_length,
                        help="longest input in tokens; longer inputs are truncated (SQuAD: split into windows)")
    parser.add_argument("--batch_size", type=int, default=batch_size, help="examples per step per data-parallel rank")
    parser.add_argument("--eval_batch_size", type=int, default=None, help="evaluation batch size (default: --batch_size)")
    parser.add_argument("--learning_rate", type=float, default=learning_rate, help="peak learning rate of AdamW")
    parser.add_argument("--weight_decay", type=float, default=0.01, help="AdamW decoupled weight decay")
    parser.add_argument("--adam_epsilon", type=float, default=adam_epsilon)
    parser.add_argument("--max_grad_norm", type=float, default=1.0, help="global-norm clipping; <= 0 disables it")
    parser.add_argument("--num_train_epochs", type=float, default=2, help="epochs (fractions allowed)")
    parser.add_argument("--max_steps", type=int, default=-1, help="if > 0: total optimizer steps, overrides epochs")
    parser.add_argument("--warmup_proportion", type=float, default=warmup_proportion,
                        help="fraction of the steps with linear warm-up")
    parser.add_argument("--warmup_steps", type=int, default=0, help="if > 0: warm-up steps, overrides the proportion")
    parser.add_argument("--gradient_accumulation_steps", type=int, default=1, help="micro-batches per optimizer step")
    parser.add_argument("--logging_steps", type=int, default=100, help="log every N optimizer steps")
    parser.add_argument("--save_steps", type=int, default=5000,
                        help="evaluate (and keep the checkpoint if it is the best so far) every N optimizer steps")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--device", default=None, choices=["cpu", "gpu", "xpu"],
                        help="default: gpu when this Paddle build has CUDA, else cpu")
    parser.add_argument("--n_gpu", type=int, default=None,
                        help="PaddleNLP's older flag: 0 means CPU, 1 one GPU (more: use paddle.distributed.launch)")
    parser.add_argument("--use_amp", type=str_to_bool, nargs="?", const=True, default=False,
                        help="automatic mixed precision on GPU (`--use_amp` or `--use_amp true`)")
    parser.add_argument("--amp_dtype", default="float16", choices=["float16", "bfloat16"])
    parser.add_argument("--scale_loss", type=float, default=2.0**15, help="initial float16 loss scale")
    parser.add_argument("--tensor_parallel_degree", type=int, default=1,
                        help="ranks each layer is split over (launch world size must be a multiple)")
    parser.add_argument("--no_progress", action="store_true", help="no progress bars")


# ---- device and process set-up ------------------------------------------------------------------------
def resolve_device(device: Optional[str], n_gpu: Optional[int]) -> str:
    """The Paddle device from ``--device`` / ``--n_gpu`` (0 = CPU), checked against this Paddle build."""
    import paddle

    if n_gpu is not None:
        if n_gpu < 0:
            raise ValueError(f"--n_gpu must be >= 0, got {n_gpu}")
        wanted = "cpu" if n_gpu == 0 else "gpu"
        if device is not None and device != wanted:
            raise ValueError(f"--device {device} contradicts --n_gpu {n_gpu}")
        if n_gpu > 1 and int(os.environ.get("PADDLE_TRAINERS_NUM", "1")) == 1:
            raise ValueError(
                f"--n_gpu {n_gpu}: start one process per GPU with `python -m paddle.distributed.launch "
                f"--gpus {','.join(map(str, range(n_gpu)))} ...` instead"
            )
        device = wanted
    if device is None:
        device = "gpu" if paddle.is_compiled_with_cuda() and paddle.device.cuda.device_count() > 0 else "cpu"
    if device == "gpu" and not paddle.is_compiled_with_cuda():
        raise ValueError("--device gpu, but this Paddle build has no CUDA (paddlepaddle, not paddlepaddle-gpu); "
                         "use --device cpu (or --n_gpu 0)")
    if device == "xpu" and not paddle.is_compiled_with_xpu():
        raise ValueError("--device xpu, but this Paddle build has no XPU support")
    return device


def setup_run(args):
    """Device, process groups and seeds; returns the :class:`~paddle_megatronbert.distributed.Topology`."""
    import paddle

    from .distributed import init_distributed
    from .training import training_argument_problems

    problems = training_argument_problems(args)  # before any set-up: a NaN learning rate, a zero batch ...
    if problems:
        raise ValueError("; ".join(problems))
    device = resolve_device(args.device, args.n_gpu)
    paddle.set_device(device)
    args.device = device
    topo = init_distributed(tensor_parallel_degree=args.tensor_parallel_degree, seed=args.seed)
    if args.model_type and args.model_type.lower() not in ("megatronbert", "megatron-bert", "megatron_bert") \
            and topo.is_main:
        print(f"note: --model_type {args.model_type} is ignored; the model is MegatronBERT "
              f"({args.model_name_or_path})", flush=True)
    if args.use_amp and device == "cpu":
        if topo.is_main:
            print("note: --use_amp is ignored on CPU (Paddle has no low-precision CPU matmul kernels)", flush=True)
        args.use_amp = False
    return topo


def check_model_fits(config, tokenizer, max_seq_length: int) -> None:
    """ValueError before any feature is built when the inputs could not go through the model."""
    if max_seq_length > config.max_position_embeddings:
        raise ValueError(f"--max_seq_length {max_seq_length} exceeds the model's max_position_embeddings "
                         f"({config.max_position_embeddings})")
    if len(tokenizer.vocab) > config.vocab_size:
        raise ValueError(f"the tokenizer has {len(tokenizer.vocab)} tokens but the model's vocab_size is "
                         f"{config.vocab_size}: the vocab.txt does not belong to this model")


# ---- batches ------------------------------------------------------------------------------------
def shard_batches(num_examples: int, batch_size: int, epoch: int, seed: int, rank: int = 0, world_size: int = 1,
                  shuffle: bool = True) -> List[List[int]]:
    """This rank's batches of one epoch: one permutation drawn from (seed, epoch) on every rank, dealt out
    round-robin, padded by wrapping so every rank runs the same number of steps."""
    order = np.random.RandomState(seed + epoch).permutation(num_examples) if shuffle else np.arange(num_examples)
    per_rank = int(math.ceil(num_examples / world_size))
    padded = np.resize(order, per_rank * world_size)  # wraps around: the first examples fill the last ranks
    mine = padded[rank::world_size]
    return [mine[i : i + batch_size].tolist() for i in range(0, len(mine), batch_size)]


def pad_batch(features: Sequence[Dict], pad_token_id: int, label_keys: Sequence[str] = (),
              label_dtype: str = "int64") -> Dict[str, "object"]:
    """Tensors of a list of features: ``input_ids``/``token_type_ids`` right-padded to the longest, an
    ``attention_mask``, and the ``label_keys`` stacked."""
    import paddle

    length = max(len(f["input_ids"]) for f in features)
    input_ids = np.full((len(features), length), pad_token_id, dtype="int64")
    token_type_ids = np.zeros((len(features), length), dtype="int64")
    attention_mask = np.zeros((len(features), length), dtype="int64")
    for row, feature in enumerate(features):
        n = len(feature["input_ids"])
        input_ids[row, :n] = feature["input_ids"]
        token_type_ids[row, :n] = feature["token_type_ids"]
        attention_mask[row, :n] = 1
    batch = {"input_ids": paddle.to_tensor(input_ids), "token_type_ids": paddle.to_tensor(token_type_ids),
             "attention_mask": paddle.to_tensor(attention_mask)}
    for key in label_keys:
        batch[key] = paddle.to_tensor(np.asarray([f[key] for f in features], dtype=label_dtype))
    return batch


def progress(iterable, desc: str, enabled: bool, total: Optional[int] = None):
    from tqdm import tqdm

    return tqdm(iterable, desc=desc, disable=not enabled, total=total)


# ---- the loop -----------------------------------------------------------------------------------
@dataclass
class TrainerState:
    """What :func:`finetune` did: steps, the best evaluation and every evaluation, written as
    ``trainer_state.json``."""

    global_step: int = 0
    total_steps: int = 0
    best_step: Optional[int] = None
    best_metric: Optional[float] = None
    metric_name: Optional[str] = None
    history: List[Dict] = field(default_factory=list)

    def to_dict(self) -> Dict:
        return dict(self.__dict__)


def _all_ranks_agree(flag: bool, topo) -> bool:
    """Rank 0's ``flag`` on every rank (whether to save must be decided once)."""
    if topo.world_size == 1:
        return flag
    import paddle
    import paddle.distributed as dist

    value = paddle.to_tensor([1 if flag else 0], dtype="int64")
    dist.broadcast(value, src=0)
    return bool(int(value.item()))


def _mean_over_ranks(value: float, topo) -> float:
    """The mean of ``value`` over all ranks (tensor-parallel peers hold equal values, so this is the mean
    over the data-parallel replicas): the logged loss is the whole global batch's."""
    if topo.world_size == 1:
        return value
    import paddle
    import paddle.distributed as dist

    tensor = paddle.to_tensor([value], dtype="float64")
    dist.all_reduce(tensor)
    return float(tensor.item()) / topo.world_size


def _barrier(topo) -> None:
    if topo.world_size > 1:
        import paddle.distributed as dist

        dist.barrier()


def save_checkpoint(model, tokenizer, directory: str, topo) -> None:
    """Weights (gathered over the TP group), config and vocab. Called on the first replica's ranks."""
    model.save_pretrained(directory)
    if topo.is_main:
        tokenizer.save_pretrained(directory)


def finetune(
    model,
    tokenizer,
    train_features: Sequence[Dict],
    collate: Callable[[Sequence[Dict]], Dict],
    args,
    topo,
    evaluate: Optional[Callable[[], Optional[Dict[str, float]]]] = None,
    metric_name: Optional[str] = None,
    on_new_best: Optional[Callable[[Dict[str, float]], None]] = None,
) -> TrainerState:
    """Train ``model`` on ``train_features``; evaluate at every ``save_steps`` and at the end.

    Args:
        model: the unwrapped model; its forward returns ``loss`` given the label keys ``collate`` adds.
        tokenizer: saved beside the weights.
        train_features: one dict per training feature; ``collate`` turns a list of them into tensors.
        args: the namespace of :func:`add_finetune_arguments`.
        topo: the run's topology (:func:`setup_run`).
        evaluate: runs the model over the dev set; called on the first replica's ranks, returns the
            metrics on global rank 0 (None elsewhere). None: no evaluation, the latest weights are kept.
        metric_name: the key of ``evaluate``'s result to maximise.
        on_new_best: called on rank 0 with the results of each new best evaluation (writes predictions).
    """
    import paddle

    from .distributed import wrap_model, wrap_optimizer
    from .training import autocast, build_optimizer, check_finite_loss, linear_warmup_decay, optimizer_step

    if not train_features:
        raise ValueError("no training features (every training example was skipped?)")
    accumulation = args.gradient_accumulation_steps
    batches_per_epoch = len(shard_batches(len(train_features), args.batch_size, 0, args.seed, topo.dataset_rank,
                                          topo.dataset_world_size))
    if batches_per_epoch < accumulation:
        raise ValueError(f"{batches_per_epoch} batches per epoch cannot make one step of "
                         f"--gradient_accumulation_steps {accumulation}")
    steps_per_epoch = batches_per_epoch // accumulation
    total_steps = args.max_steps if args.max_steps > 0 else int(math.ceil(steps_per_epoch * args.num_train_epochs))
    if total_steps < 1:
        raise ValueError(f"nothing to train: {args.num_train_epochs} epochs of {steps_per_epoch} steps")
    warmup = args.warmup_steps if args.warmup_steps > 0 else args.warmup_proportion
    lr_scheduler = linear_warmup_decay(args.learning_rate, total_steps, warmup)
    optimizer = wrap_optimizer(
        build_optimizer(model, lr_scheduler, args.weight_decay, args.adam_epsilon, args.max_grad_norm), topo
    )
    train_model = wrap_model(model, topo)
    scaler = None
    if args.use_amp and args.amp_dtype == "float16":
        scaler = paddle.amp.GradScaler(init_loss_scaling=args.scale_loss)
        if topo.world_size > 1:
            from paddle.distributed import fleet

            scaler = fleet.distributed_scaler(scaler)

    state = TrainerState(total_steps=total_steps, metric_name=metric_name)
    evaluates_here = evaluate is not None and topo.dataset_rank == 0
    keep_dir = os.path.join(args.output_dir, BEST_MODEL_DIR if evaluate is not None else LAST_MODEL_DIR)
    if topo.is_main:
        os.makedirs(args.output_dir, exist_ok=True)
        print(f"training: {len(train_features)} features, {batches_per_epoch} batches of {args.batch_size} per epoch "
              f"per replica x {topo.dataset_world_size} replica(s), {total_steps} optimizer steps", flush=True)

    def checkpoint_and_evaluate():
        results = evaluate() if evaluates_here else None
        improved = False
        if topo.is_main and results is not None:
            value = results[metric_name]
            state.history.append({"step": state.global_step, **results})
            improved = state.best_metric is None or value > state.best_metric
            if improved:
                state.best_metric, state.best_step = value, state.global_step
            print(f"evaluation at step {state.global_step}: {metric_name} = {value:.6f}"
                  f"{' (new best)' if improved else f' (best {state.best_metric:.6f} at step {state.best_step})'}",
                  flush=True)
        if evaluate is None:
            improved = True
        improved = _all_ranks_agree(improved, topo)
        if improved and topo.dataset_rank == 0:
            save_checkpoint(model, tokenizer, keep_dir, topo)
            if topo.is_main and results is not None and on_new_best is not None:
                on_new_best(results)
        if topo.is_main:
            with open(os.path.join(args.output_dir, STATE_FILE), "w", encoding="utf-8") as f:
                json.dump(state.to_dict(), f, indent=2)
        _barrier(topo)
        train_model.train()

    amp = {"float16": "fp16", "bfloat16": "bf16"}[args.amp_dtype] if args.use_amp else "none"
    train_model.train()
    # Losses are summed as tensors and read once per log line: reading one per step syncs a GPU each step.
    epoch, loss_sum, loss_count, tic = 0, 0.0, 0, time.time()
    while state.global_step < total_steps:
        batches = shard_batches(len(train_features), args.batch_size, epoch, args.seed, topo.dataset_rank,
                                topo.dataset_world_size)
        usable = len(batches) - len(batches) % accumulation
        for batch_index, indices in enumerate(batches[:usable]):
            final_micro = (batch_index + 1) % accumulation == 0
            no_sync = getattr(train_model, "no_sync", None) if not final_micro else None
            with (no_sync() if no_sync is not None else contextlib.nullcontext()):
                with autocast(amp):
                    loss = train_model(**collate([train_features[i] for i in indices]), return_dict=True)["loss"]
                loss = loss / accumulation
                (scaler.scale(loss) if scaler is not None else loss).backward()
            loss_sum, loss_count = loss_sum + loss.detach() * accumulation, loss_count + 1
            if not final_micro:
                continue
            optimizer_step(optimizer, scaler)
            lr_scheduler.step()
            state.global_step += 1
            if state.global_step % args.logging_steps == 0:
                loss_value = _mean_over_ranks(float(loss_sum) / loss_count, topo)
                check_finite_loss(loss_value, state.global_step - args.logging_steps + 1, state.global_step)
                if topo.is_main:
                    print(f"global step {state.global_step}/{total_steps}, epoch: {epoch + 1}, "
                          f"batch: {batch_index + 1}, loss: {loss_value:.6f}, lr: {optimizer.get_lr():.10f}, "
                          f"speed: {args.logging_steps / (time.time() - tic):.4f} step/s", flush=True)
                loss_sum, loss_count, tic = 0.0, 0, time.time()
            if state.global_step % args.save_steps == 0 or state.global_step == total_steps:
                checkpoint_and_evaluate()
                tic = time.time()
            if state.global_step >= total_steps:
                break
        epoch += 1
    return state


def iterate_batches(features: Sequence, batch_size: int) -> Iterator[List]:
    """Consecutive batches in order (evaluation)."""
    for start in range(0, len(features), batch_size):
        yield features[start : start + batch_size]
