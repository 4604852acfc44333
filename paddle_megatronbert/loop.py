"""The one training loop of all three runners: set-up, resume, micro-batches, the optimizer step, logging,
checkpoints and the evaluation hook.

A runner parses its flags (:mod:`~paddle_megatronbert.arguments`), calls :func:`setup_run`, builds its task's
model and a *batch source*, and calls :func:`train`. A batch source is any object with

- ``next_batch()``: the next micro-batch, a dict of model inputs (numpy arrays or tensors) with the labels,
  moving on to the next epoch by itself after ``steps_per_epoch`` batches;
- ``steps_per_epoch`` (micro-batches in one epoch on this rank), ``epoch`` (0-based, of the latest batch),
  ``batches_in_epoch`` (batches taken from that epoch);
- ``state_dict()`` / ``load_state_dict(state)``: the position of the next batch (stored in checkpoints);
- ``close()``.

``data.pretraining.PretrainingDataLoader`` (pretraining) and ``finetune.FeatureBatches`` (fine-tuning) are the two.

Per optimizer step: ``--gradient_accumulation_steps`` micro-batches, each under ``no_sync`` (data-parallel
gradients are all-reduced on the last one only) and the autocast of ``--amp``, loss scaled for fp16; then
the step through the GradScaler (:func:`training.optimizer_step`) and the LR schedule. Losses stay on the
device, summed as tensors, and are read once per log line or save (the only host sync): a NaN stops the run
there (:func:`training.check_finite_loss`), before it is logged or saved. Every ``--save_steps`` and at the
end: ``evaluate`` (fine-tuning: the best result's weights go to ``best_model/``), then a resumable checkpoint
``checkpoint-STEP`` (weights, optimizer, RNG, :class:`TrainerState`); a rerun resumes from the newest.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence

from . import faults
from .checkpoint.training_state import TRAINER_STATE_FILE

BEST_MODEL_DIR = "best_model"
LAST_MODEL_DIR = "last_model"  # when there is nothing to evaluate, the latest weights are kept instead


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


def setup_device(args) -> str:
    """Set the Paddle device of ``--device``/``--n_gpu`` and the precision the run really uses
    (``args.amp`` becomes ``none`` on CPU; ``args.amp_requested`` keeps what was asked). Returns the device."""
    import paddle

    from .training import resolve_amp

    device = resolve_device(args.device, args.n_gpu)
    paddle.set_device(device)
    args.device = device
    args.amp_requested = args.amp
    args.amp = resolve_amp(args.amp, device)
    return device


def setup_run(args):
    """Process groups (the dp x tp x sharding grid) and seeds, after :func:`setup_device`; prints the notes
    about ignored flags once. Returns the :class:`~paddle_megatronbert.distributed.Topology`."""
    from .arguments import model_type_note
    from .distributed import init_distributed

    if not hasattr(args, "amp_requested"):
        setup_device(args)
    topo = init_distributed(tensor_parallel_degree=args.tensor_parallel_degree,
                            data_parallel_degree=args.data_parallel_degree, sharding_degree=args.sharding_degree,
                            seed=args.seed)
    if topo.is_main:
        note = model_type_note(args)
        if note:
            print(note, flush=True)
        if args.amp != args.amp_requested:
            print(f"note: --amp {args.amp_requested} is ignored on CPU (Paddle runs auto_cast there as fp32)",
                  flush=True)
    return topo


def run_cli(main: Callable[[], Any]) -> None:
    """A runner's ``__main__``: a refused input or an I/O error (a missing file, a full disk) is one line on
    stderr, ``error: ...``, and exit code 2; a stop by SIGTERM/SIGINT after its checkpoint is one line and
    ``faults.EXIT_PREEMPTED`` (75); anything else is a bug and keeps its traceback."""
    try:
        main()
    except faults.Preempted as stop:  # a checkpoint was written: not an error, but not a finished run either
        print(stop, flush=True)
        sys.exit(stop.exit_code)
    except (ValueError, OSError) as err:  # OSError: FileNotFoundError, PermissionError, a full disk ...
        print(f"error: {err}", file=sys.stderr, flush=True)
        sys.exit(2)


# ---- across ranks ------------------------------------------------------------------------------------
def _any_rank(flag: bool, topo) -> bool:
    if topo.world_size == 1:
        return flag
    import paddle
    import paddle.distributed as dist

    value = paddle.to_tensor([1 if flag else 0], dtype="int64")
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def _rank0_decides(flag: bool, topo) -> bool:
    if topo.world_size == 1:
        return flag
    import paddle
    import paddle.distributed as dist

    value = paddle.to_tensor([1 if flag else 0], dtype="int64")
    dist.broadcast(value, src=0)
    return bool(int(value.item()))


def _mean_over_ranks(values, topo) -> List[float]:
    """Mean of a few scalars over every rank (TP peers hold equal values, so this is the replica mean)."""
    import paddle
    import paddle.distributed as dist

    stacked = paddle.stack([v.astype("float32").reshape([]) for v in values])
    if topo.world_size > 1:
        dist.all_reduce(stacked)
        stacked = stacked / topo.world_size
    return [float(x) for x in stacked.numpy()]


def _barrier(topo) -> None:
    if topo.world_size > 1:
        import paddle.distributed as dist

        dist.barrier()


# ---- state ------------------------------------------------------------------------------------------
@dataclass
class TrainerState:
    """What a run did and where it is: ``trainer_state.json`` in every checkpoint (plus the LR schedule,
    loss scaler and grid degrees the checkpoint writer adds) and, for a run that evaluates, in ``--output_dir``.

    Args:
        global_step: optimizer steps done.
        max_steps: optimizer steps of the run (the LR schedule ends there).
        data_position: the batch source's ``state_dict()`` after ``global_step``.
        consumed_samples: training examples (sequences, features) read by all replicas.
        batch_size, gradient_accumulation_steps, seed: the run's settings a resume must keep.
        metric_name: the evaluation metric maximised (None: no evaluation).
        best_metric, best_step: the best evaluation so far and its step.
        history: every evaluation, ``{"step": N, metric: value, ...}``.
        fingerprint: what decides the data order and the model (:func:`faults.run_fingerprint`); a resume
            compares it and names what changed.
    """

    global_step: int = 0
    max_steps: int = 0
    data_position: Dict[str, Any] = field(default_factory=dict)
    consumed_samples: int = 0
    batch_size: int = 0
    gradient_accumulation_steps: int = 1
    seed: Optional[int] = None
    metric_name: Optional[str] = None
    best_metric: Optional[float] = None
    best_step: Optional[int] = None
    history: List[Dict[str, Any]] = field(default_factory=list)
    fingerprint: Dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> Dict[str, Any]:
        return dict(self.__dict__)

    def best_results(self) -> Optional[Dict[str, Any]]:
        """The metrics of the best evaluation (``history``'s entry at ``best_step``), or None."""
        for entry in self.history:
            if entry["step"] == self.best_step:
                return {k: v for k, v in entry.items() if k != "step"}
        return None

    def restore_evaluations(self, saved: Dict[str, Any]) -> None:
        """The evaluation record of the run being resumed (the settings stay this run's: a resume checks them)."""
        for key in ("best_metric", "best_step", "history"):
            if key in saved:
                setattr(self, key, saved[key])


@dataclass
class TrainResult:
    """What :func:`train` returns.

    Args:
        state: the final :class:`TrainerState`.
        checkpoint: the directory of the last checkpoint written (or resumed from).
        metrics_file: ``OUTPUT_DIR/metrics.jsonl``.
        last_record: the last logged metrics record (empty when nothing was logged).
        stopped_early: True when ``--exit_interval``/``--exit_duration_in_mins``/a signal ended the run.
    """

    state: TrainerState
    checkpoint: str
    metrics_file: str
    last_record: Dict[str, Any]
    stopped_early: bool


def _write_state_summary(path: str, state: TrainerState) -> None:
    from .checkpoint.files import atomic_write_text

    atomic_write_text(path, json.dumps(state.to_dict(), indent=2) + "\n")


# ---- the loop ---------------------------------------------------------------------------------------
@faults.releasing_output_dir_locks
def train(model, batches, args, topo, *, loss_fields: Sequence[str] = ("loss",),
          line_format: Optional[Callable[[int, Dict[str, Any]], str]] = None, run_summary: str = "",
          model_origin: str = "", evaluate: Optional[Callable[[], Optional[Dict[str, float]]]] = None,
          metric_name: Optional[str] = None, on_new_best: Optional[Callable[[Dict[str, float]], None]] = None,
          keep_model: Optional[Callable[[str], None]] = None, checkpoint_files: Optional[Dict[str, str]] = None,
          tokens_per_sample: Optional[int] = None, flops_per_sample: Optional[float] = None) -> TrainResult:
    """Train ``model`` on ``batches`` for ``--max_steps`` (else ``--num_train_epochs``) optimizer steps.

    Args:
        model: the unwrapped model; ``model(**batch, return_dict=True)`` returns the ``loss_fields``.
        batches: the batch source (see the module docstring).
        args: the runner's namespace (:func:`arguments.add_training_arguments`), after :func:`setup_run`.
        topo: the run's topology.
        loss_fields: output fields averaged into each log record (the first is the training loss).
        line_format: ``(step, record) -> str`` of the log line (default: ``training.format_metrics``).
        run_summary: the start-up line's description of the model and data.
        model_origin: where the weights come from ("from scratch: CONFIG", "weights from DIR"); a resumed run
            says what it resumed from instead.
        evaluate: called at every save on the first replica's ranks; returns the metrics on global rank 0
            (None elsewhere). The best result (``metric_name``, maximised) is kept by ``keep_model`` in
            ``OUTPUT_DIR/best_model`` and handed to ``on_new_best`` (rank 0).
        keep_model: ``(directory) -> None`` writing a loadable model directory (merged weights, config, vocab);
            without ``evaluate`` it keeps the latest weights in ``OUTPUT_DIR/last_model`` at every save.
        checkpoint_files: ``{name: source path}`` copied into every checkpoint (the vocab).
        tokens_per_sample, flops_per_sample: for tokens/s and TFLOP/s in the records (pretraining).
    """
    import numpy as np
    import paddle

    from .arguments import total_optimizer_steps
    from .checkpoint.training_state import (LATEST_FILE, latest_checkpoint, load_checkpoint, read_trainer_state,
                                            save_checkpoint)
    from .distributed import wrap_model, wrap_optimizer
    from .training import (MetricsLogger, autocast, build_grad_scaler, build_optimizer, check_finite_loss,
                           format_metrics, linear_warmup_decay, optimizer_step)

    accumulation = args.gradient_accumulation_steps
    steps_per_epoch = batches.steps_per_epoch // accumulation
    if steps_per_epoch < 1:
        raise ValueError(f"an epoch has {batches.steps_per_epoch} batches per rank, fewer than "
                         f"--gradient_accumulation_steps {accumulation}")
    last_step = total_optimizer_steps(args.max_steps, args.num_train_epochs, steps_per_epoch)
    warmup = args.warmup_steps if args.warmup_steps > 0 else args.warmup_proportion
    lr_scheduler = linear_warmup_decay(args.learning_rate, last_step, warmup)
    optimizer = wrap_optimizer(build_optimizer(model, lr_scheduler, args.weight_decay, args.adam_epsilon,
                                               args.max_grad_norm, args.adam_beta1, args.adam_beta2), topo,
                               sharding_stage=getattr(args, "sharding_stage", 1))
    train_model = wrap_model(model, topo)
    scaler = build_grad_scaler(args.amp, args.scale_loss, topo)
    samples_per_step = args.batch_size * accumulation * topo.dataset_world_size
    state = TrainerState(max_steps=last_step, batch_size=args.batch_size, gradient_accumulation_steps=accumulation,
                         seed=args.seed, metric_name=metric_name)
    output_dir = args.output_dir

    faults.hold_output_dir(output_dir, topo)  # one run per directory; a killed run's temporaries removed
    config = getattr(model, "config", None)
    state.fingerprint = faults.run_fingerprint(
        batches.fingerprint() if hasattr(batches, "fingerprint") else None, seed=args.seed, topo=topo,
        config=config.to_dict() if config is not None else None, batch_size=args.batch_size,
        gradient_accumulation_steps=accumulation)
    checkpoint = None
    if args.resume and args.resume != "auto":
        checkpoint = args.resume
    elif args.resume == "auto" and not args.overwrite_output_dir and os.path.isdir(output_dir):
        checkpoint = latest_checkpoint(output_dir)
    elif args.overwrite_output_dir and topo.is_main and os.path.isfile(os.path.join(output_dir, LATEST_FILE)):
        # A new run: if it dies before its first save, a rerun must not resume the old one.
        os.remove(os.path.join(output_dir, LATEST_FILE))
    if checkpoint is not None:
        faults.check_resume_fingerprint(read_trainer_state(checkpoint).get("fingerprint"), state.fingerprint,
                                        checkpoint)
        saved = load_checkpoint(checkpoint, model, optimizer, lr_scheduler, scaler, topo)
        batches.load_state_dict(saved["data_position"])
        state.restore_evaluations(saved)
        state.global_step = int(saved["global_step"])
        model_origin = (f"resumed from {checkpoint} at step {state.global_step} (data: epoch "
                        f"{batches.state_dict()['epoch']}, batch {batches.state_dict()['batches_in_epoch']})")
    if topo.is_main:
        os.makedirs(output_dir, exist_ok=True)
        print(f"{run_summary}; {model_origin}; {samples_per_step} samples per step on {topo.world_size} process(es) "
              f"(tp {topo.tp_degree}, dp {topo.dp_degree}, sharding {topo.sharding_degree}); "
              f"steps {state.global_step} -> {last_step}, amp {args.amp}", flush=True)
        if state.global_step >= last_step:
            print(f"note: {checkpoint} is the end of this run ({last_step} steps): nothing to train; "
                  "--overwrite_output_dir starts over, --max_steps continues further", flush=True)
    logger = MetricsLogger(output_dir, enabled=topo.is_main, use_visualdl=args.visualdl,
                           resume_step=state.global_step if checkpoint is not None else None,
                           line_format=line_format or format_metrics)
    keep_dir = os.path.join(output_dir, BEST_MODEL_DIR if evaluate is not None else LAST_MODEL_DIR)
    evaluates_here = evaluate is not None and topo.dataset_rank == 0

    def evaluate_and_keep():
        results = evaluate() if evaluates_here else None
        improved = evaluate is None
        if topo.is_main and results is not None:
            value = results[metric_name]
            state.history.append({"step": state.global_step, **results})
            improved = state.best_metric is None or value > state.best_metric
            if improved:
                state.best_metric, state.best_step = value, state.global_step
            print(f"evaluation at step {state.global_step}: {metric_name} = {value:.6f}"
                  f"{' (new best)' if improved else f' (best {state.best_metric:.6f} at step {state.best_step})'}",
                  flush=True)
        if _rank0_decides(improved, topo) and topo.dataset_rank == 0:
            faults.guarded_save(lambda: keep_model(keep_dir), output_dir, state.global_step, checkpoint_dir=keep_dir,
                                last_good=last_good)
            if topo.is_main and results is not None and on_new_best is not None:
                on_new_best(results)
        if topo.is_main and evaluate is not None:
            _write_state_summary(os.path.join(output_dir, TRAINER_STATE_FILE), state)
        _barrier(topo)
        train_model.train()

    def save():
        return save_checkpoint(output_dir, state.global_step, model, optimizer, lr_scheduler, scaler, state.to_dict(),
                               topo, extra_files=checkpoint_files, save_total_limit=args.save_total_limit)

    stop = faults.PreemptionHandler(announce=topo.is_main).install()
    started, session_start_step = time.time(), state.global_step
    window_start, window_steps, window_sums = time.time(), 0, None  # loss sums: tensors, no sync per step
    last_record, stopped_early = {}, False
    final = checkpoint or os.path.join(output_dir, f"checkpoint-{state.global_step}")
    last_good, preempted = checkpoint, False  # the newest complete checkpoint; stopped by a signal
    train_model.train()
    try:
        while state.global_step < last_step:
            lr = optimizer.get_lr()
            for micro in range(accumulation):
                batch = {k: paddle.to_tensor(v) if isinstance(v, np.ndarray) else v
                         for k, v in batches.next_batch().items()}
                no_sync = micro < accumulation - 1 and hasattr(train_model, "no_sync")
                with train_model.no_sync() if no_sync else contextlib.nullcontext():
                    with autocast(args.amp):
                        out = train_model(**batch, return_dict=True)
                    loss = out[loss_fields[0]] / accumulation
                    (scaler.scale(loss) if scaler is not None else loss).backward()
                parts = [out[name].detach().astype("float32") / accumulation for name in loss_fields]
                window_sums = parts if window_sums is None else [a + b for a, b in zip(window_sums, parts)]
            optimizer_step(optimizer, scaler)
            lr_scheduler.step()
            state.global_step += 1
            window_steps += 1
            step = state.global_step

            exit_now = bool(args.exit_interval and step % args.exit_interval == 0)
            if args.exit_duration_in_mins is not None:
                exit_now |= (time.time() - started) / 60.0 >= args.exit_duration_in_mins
            exit_now = _any_rank(exit_now or stop.requested, topo)  # every rank stops at the same step
            log_now = step % args.logging_steps == 0 or step == last_step or exit_now
            regular_save = step % args.save_steps == 0 or step == last_step
            if log_now or regular_save or exit_now:
                # The losses are read (the one host sync) when they are logged or a checkpoint is due, so a
                # NaN stops the run before it reaches metrics.jsonl or a checkpoint.
                means = [v / window_steps for v in _mean_over_ranks(window_sums, topo)]
                check_finite_loss(means[0], step - window_steps + 1, step, output_dir)
            if log_now:
                now = time.time()
                samples_per_sec = samples_per_step * window_steps / max(now - window_start, 1e-9)
                elapsed = now - started
                last_record = {
                    "max_steps": last_step, "epoch": batches.epoch, "batch": batches.batches_in_epoch,
                    **dict(zip(loss_fields, means)), "lr": float(lr),
                    "loss_scale": float(scaler._scale.item()) if scaler is not None else None,  # no public getter
                    "steps_per_sec": window_steps / max(now - window_start, 1e-9),
                    "sequences_per_sec": samples_per_sec,
                    "tokens_per_sec": samples_per_sec * tokens_per_sample if tokens_per_sample else None,
                    "tflops": (samples_per_sec * flops_per_sample / 1e12 / topo.world_size
                               if flops_per_sample else None),
                    "elapsed_s": elapsed,
                    "eta_s": elapsed / (step - session_start_step) * (last_step - step),
                }
                logger.log(step, {k: v for k, v in last_record.items() if v is not None})
                window_start, window_steps, window_sums = time.time(), 0, None
            if regular_save or exit_now:
                state.data_position = batches.state_dict()
                state.consumed_samples = step * samples_per_step
                # The loss checked above came before this step's update: the updated weights are checked too.
                faults.check_finite_parameters(model, step, topo, last_good=last_good)
            if regular_save and (evaluate is not None or keep_model is not None):
                evaluate_and_keep()
            if regular_save or exit_now:
                final = last_good = faults.guarded_save(save, output_dir, step, last_good=last_good)
            if exit_now:
                stopped_early = step < last_step
                preempted = _any_rank(stop.requested, topo)
                if topo.is_main and not preempted:
                    print(f"exiting at step {step} as asked; rerun the same command to resume", flush=True)
                break
    finally:
        stop.restore()
        batches.close()
        logger.close()
    if preempted:
        raise faults.Preempted(state.global_step, final, stop.signal_name or "SIGTERM")
    if topo.is_main:
        loss_text = f"loss {last_record['loss']:.4f}, " if "loss" in last_record else ""
        print(f"done: step {state.global_step}/{last_step}, {loss_text}checkpoint {final} (from_pretrained-loadable), "
              f"metrics {logger.path}", flush=True)
    return TrainResult(state, final, logger.path, last_record, stopped_early)
