"""Pieces every runner's training loop shares: threads, seeds, the AdamW optimizer and its LR schedule,
mixed precision, the metrics log, the FLOPs estimate, and atomic checkpoints that resume exactly.

Checkpoint layout (``<output_dir>/checkpoint-<step>/``, written as ``checkpoint-<step>.tmp`` and renamed;
``<output_dir>/latest`` names the newest complete one and is written last)::

    config.json, model_state.pdparams        # or model_state.tpNN.pdparams per tensor-parallel rank:
                                             # the directory is also a from_pretrained() directory
    optimizer.tpNN.sdNN.pdopt                # AdamW state per (tensor-parallel, sharding) rank
    rng_state.rankNNNN.pkl                   # python / numpy / paddle (+ tensor-parallel) generators
    trainer_state.json                       # step, LR schedule, loss scaler, data position, run settings
"""

from __future__ import annotations

import json
import math
import os
import pickle
import random
import re
import shutil
import sys
import time
from typing import Any, Dict, List, Optional

CHECKPOINT_PREFIX = "checkpoint-"
LATEST_FILE = "latest"
TRAINER_STATE_FILE = "trainer_state.json"
METRICS_FILE = "metrics.jsonl"
# Test hook: "STEP:SECONDS" sleeps inside the save of checkpoint STEP, after its files are written and
# before the rename, so a test can SIGKILL the process mid-save.
PAUSE_IN_SAVE_ENV = "MEGATRONBERT_TEST_PAUSE_IN_SAVE"


def setup_cpu_threads() -> int:
    """Paddle forces OMP_NUM_THREADS=1 at import unless it is set: use every core. Call before importing paddle."""
    if "OMP_NUM_THREADS" not in os.environ:
        os.environ["OMP_NUM_THREADS"] = str(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count())
    return int(os.environ["OMP_NUM_THREADS"])


def set_seed(seed: int) -> None:
    import numpy as np
    import paddle

    random.seed(seed)
    np.random.seed(seed)
    paddle.seed(seed)


# ---- argument checks ----------------------------------------------------------------------------------
_AT_LEAST_1 = ("batch_size", "eval_batch_size", "gradient_accumulation_steps", "logging_steps", "save_steps",
               "save_total_limit", "exit_interval", "tensor_parallel_degree", "data_parallel_degree",
               "sharding_degree")
# flag: (lowest, highest, lowest allowed itself, highest allowed itself); every bound is finite
_NUMBER_RANGES = {
    "learning_rate": (0.0, math.inf, True, False),
    "weight_decay": (0.0, math.inf, True, False),
    "adam_epsilon": (0.0, math.inf, False, False),
    "adam_beta1": (0.0, 1.0, True, False),
    "adam_beta2": (0.0, 1.0, True, False),
    "max_grad_norm": (-math.inf, math.inf, False, False),  # <= 0 disables clipping; NaN/inf is a mistake
    "warmup_proportion": (0.0, 1.0, True, True),
    "num_train_epochs": (0.0, math.inf, False, False),
    "scale_loss": (0.0, math.inf, False, False),
    "exit_duration_in_mins": (0.0, math.inf, False, False),
    "hidden_dropout_prob": (0.0, 1.0, True, False),
    "attention_probs_dropout_prob": (0.0, 1.0, True, False),
}


def training_argument_problems(args) -> List[str]:
    """One message per optimisation flag whose value no run can use (a NaN or negative learning rate, a
    zero batch, a warm-up proportion above 1, ...), for the runners to refuse before any work; empty when
    all is well. Flags the runner does not have, or left at None, are skipped.

    ``--max_steps`` is -1 (the epochs decide) or >= 1: 0 would silently mean "use the epochs".
    ``--seed`` must fit numpy's seed range, [0, 2**32).
    """
    problems = []
    for name in _AT_LEAST_1:
        value = getattr(args, name, None)
        if value is not None and value < 1:
            problems.append(f"--{name} must be >= 1, got {value}")
    for name, (low, high, low_ok, high_ok) in _NUMBER_RANGES.items():
        value = getattr(args, name, None)
        if value is None:
            continue
        inside = math.isfinite(value) and (low < value or (low_ok and value == low)) and (
            value < high or (high_ok and value == high))
        if not inside:
            left, right = "[" if low_ok else "(", "]" if high_ok else ")"
            if low == -math.inf and high == math.inf:
                what = "a finite number"
            elif high == math.inf:
                what = f"a finite number {'>=' if low_ok else '>'} {low:g}"
            else:
                what = f"in {left}{low:g}, {high:g}{right}"
            problems.append(f"--{name} must be {what}, got {value}")
    max_steps = getattr(args, "max_steps", None)
    if max_steps is not None and max_steps != -1 and max_steps < 1:
        problems.append(f"--max_steps must be >= 1, or -1 to train for --num_train_epochs; got {max_steps}")
    warmup_steps = getattr(args, "warmup_steps", None)
    if warmup_steps is not None and warmup_steps < 0:
        problems.append(f"--warmup_steps must be >= 0, got {warmup_steps}")
    seed = getattr(args, "seed", None)
    if seed is not None and not 0 <= seed < 2**32:
        problems.append(f"--seed must be in [0, 2**32), got {seed}")
    return problems


class NonFiniteLossError(ValueError):
    """The training loss became NaN or infinite. Raised before that step is logged or checkpointed, so the
    newest checkpoint stays the last good one (Megatron-LM's ``check_for_nan_in_loss_and_grad`` stops a
    run the same way: resuming into the same divergence would only repeat it)."""


def check_finite_loss(loss: float, first_step: int, last_step: int, output_dir: Optional[str] = None) -> None:
    """:class:`NonFiniteLossError` when ``loss`` (the mean over steps ``first_step``..``last_step``, a value
    the runner already read for its log line: no extra device sync) is NaN or infinite. With ``output_dir``
    (a run with ``latest``), the message names the checkpoint a rerun would resume from."""
    if math.isfinite(loss):
        return
    steps = f"step {last_step}" if first_step == last_step else f"steps {first_step}-{last_step}"
    keep = ""
    if output_dir is not None:  # a pretraining run: say where it would resume from
        try:
            newest = latest_checkpoint(output_dir)
        except (OSError, ValueError):
            newest = None
        keep = f": the newest checkpoint, {newest}, is the last good one" if newest else ": no checkpoint was written"
    raise NonFiniteLossError(f"the training loss became {loss} (mean over {steps}); stopped without saving{keep}. "
                             "Lower --learning_rate, lengthen the warm-up or check the data")


def no_decay_parameter(name: str, param) -> bool:
    """Biases and LayerNorm parameters take no weight decay (BERT / Megatron)."""
    return name.endswith("bias") or ".ln." in name or "LayerNorm" in name or param.ndim == 1


def linear_warmup_decay(learning_rate: float, total_steps: int, warmup):
    """Linear warm-up to ``learning_rate`` then linear decay to 0 at ``total_steps``.
    ``warmup`` is a step count (int) or a proportion of ``total_steps`` (any float, 1.0 = all of them).

    The same schedule as PaddleNLP's ``LinearDecayWithWarmup`` (and its state dict), built on Paddle's
    ``LambdaDecay`` so a runner does not import paddlenlp (seconds of start-up) for it.
    """
    import paddle

    warmup_steps = warmup if isinstance(warmup, int) else int(math.floor(warmup * total_steps))

    def factor(step: int) -> float:
        if step < warmup_steps:
            return float(step) / float(max(1, warmup_steps))
        return max(0.0, float(total_steps - step) / float(max(1, total_steps - warmup_steps)))

    return paddle.optimizer.lr.LambdaDecay(learning_rate, factor)


def build_optimizer(model, lr_scheduler, weight_decay: float = 0.01, adam_epsilon: float = 1e-6,
                    max_grad_norm: float = 1.0, beta1: float = 0.9, beta2: float = 0.999):
    """AdamW with decoupled weight decay (not on biases/LayerNorm) and global-norm gradient clipping."""
    import paddle

    decay_names = {p.name for n, p in model.named_parameters() if not no_decay_parameter(n, p)}
    clip = paddle.nn.ClipGradByGlobalNorm(max_grad_norm) if max_grad_norm and max_grad_norm > 0 else None
    return paddle.optimizer.AdamW(
        learning_rate=lr_scheduler,
        beta1=beta1,
        beta2=beta2,
        epsilon=adam_epsilon,
        parameters=model.parameters(),
        weight_decay=weight_decay,
        apply_decay_param_fun=lambda name: name in decay_names,
        grad_clip=clip,
    )


# ---- mixed precision ------------------------------------------------------------------------------
AMP_CHOICES = ("none", "fp16", "bf16")


def resolve_amp(amp: str, device: str) -> str:
    """The precision a run uses: ``amp`` itself on an accelerator; ``none`` on CPU, where Paddle 3.3's
    ``auto_cast`` and ``GradScaler`` are silent no-ops (fp32), so the run says so instead of pretending."""
    if amp not in AMP_CHOICES:
        raise ValueError(f"--amp must be one of {', '.join(AMP_CHOICES)}, got {amp!r}")
    return "none" if device == "cpu" else amp


def autocast(amp: str):
    """The forward-pass context: O1 auto-cast to fp16/bf16 (matmuls in low precision, reductions and
    the losses in fp32), or nothing."""
    import contextlib

    import paddle

    if amp == "none":
        return contextlib.nullcontext()
    return paddle.amp.auto_cast(enable=True, dtype="float16" if amp == "fp16" else "bfloat16", level="O1")


def build_grad_scaler(amp: str, init_loss_scaling: float = 2.0**15, topo=None):
    """Dynamic loss scaling for fp16 (halve on overflow and skip the step, double after 1000 clean
    steps); None for fp32/bf16, whose range needs none."""
    if amp != "fp16":
        return None
    import paddle

    scaler = paddle.amp.GradScaler(init_loss_scaling=init_loss_scaling, incr_every_n_steps=1000,
                                   decr_every_n_nan_or_inf=1, use_dynamic_loss_scaling=True)
    if topo is not None and topo.world_size > 1:
        from paddle.distributed import fleet

        scaler = fleet.distributed_scaler(scaler)  # agree on overflow across ranks
    return scaler


def optimizer_step(optimizer, scaler=None) -> None:
    """Apply the accumulated gradients (through the loss scaler under fp16: it skips the step on overflow)
    and clear them."""
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    optimizer.clear_grad()


# ---- FLOPs -----------------------------------------------------------------------------------------
def pretraining_flops_per_sequence(config, seq_length: int, num_predictions: int, recompute: bool = False) -> float:
    """FLOPs to train on one sequence: matmuls only (2 per multiply-add), backward = 2x forward, plus
    one more forward with activation recompute (Megatron-LM's convention for its reported TFLOP/s).

    Per layer: QKV + attention output ``8 S H^2``, MLP ``4 S H I``, scores and context ``4 S^2 H``;
    the MLM head runs on the ``num_predictions`` masked rows: ``2 P H^2 + 2 P H V``; pooler + NSP ``2 H^2``.
    """
    s, h, i = seq_length, config.hidden_size, config.intermediate_size
    forward = config.num_hidden_layers * (8 * s * h * h + 4 * s * h * i + 4 * s * s * h)
    forward += 2 * num_predictions * h * h + 2 * num_predictions * h * config.vocab_size + 2 * h * h + 4 * h
    return float(forward * (4 if recompute else 3))


# ---- metrics log ---------------------------------------------------------------------------------------
class MetricsLogger:
    """One log line per record on stdout, the same record as a JSON line in ``<output_dir>/metrics.jsonl``,
    and scalars in VisualDL (``<output_dir>/visualdl``) when it is installed.

    Args:
        output_dir: where ``metrics.jsonl`` (and the VisualDL logs) go.
        enabled: False on every rank but the main one (they log nothing).
        use_visualdl: True / False, or None for "when installed".
        resume_step: when resuming, records after this step (written by the run that was interrupted)
            are dropped from ``metrics.jsonl`` so it holds one record per step.
    """

    def __init__(self, output_dir: str, enabled: bool = True, use_visualdl: Optional[bool] = None,
                 resume_step: Optional[int] = None):
        self.enabled = enabled
        self.path = os.path.join(output_dir, METRICS_FILE)
        self._writer = None
        if not enabled:
            return
        os.makedirs(output_dir, exist_ok=True)
        if resume_step is None:
            open(self.path, "w").close()
        elif os.path.isfile(self.path):
            self._truncate_after(resume_step)
        if use_visualdl is not False:
            try:
                from visualdl import LogWriter

                self._writer = LogWriter(logdir=os.path.join(output_dir, "visualdl"))
            except ImportError:
                if use_visualdl:
                    raise

    def _truncate_after(self, step: int) -> None:
        kept = []
        try:
            with open(self.path, encoding="utf-8") as f:
                for line in f:
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError:
                        continue  # a line cut by a kill
                    if isinstance(record, dict) and record.get("step", 0) <= step:
                        kept.append(json.dumps(record))
        except UnicodeDecodeError as err:
            raise ValueError(f"{self.path} is not UTF-8 text ({err.reason} at byte {err.start}), so the records "
                             "of the run being resumed cannot be kept: move it away to resume") from None
        _atomic_write_text(self.path, "".join(k + "\n" for k in kept))

    def log(self, step: int, metrics: Dict[str, Any], tag: str = "train") -> Optional[str]:
        if not self.enabled:
            return None
        record = {"step": int(step), **{k: _jsonable(v) for k, v in metrics.items()}}
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        if self._writer is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self._writer.add_scalar(tag=f"{tag}/{key}", step=int(step), value=float(value))
        line = format_metrics(step, metrics)
        print(line, flush=True)
        return line

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


_LINE_FORMATS = (("loss", "loss {:.4f}"), ("mlm_loss", "mlm_loss {:.4f}"), ("nsp_loss", "nsp_loss {:.4f}"),
                 ("lr", "lr {:.3e}"), ("loss_scale", "loss_scale {:.0f}"), ("sequences_per_sec", "{:.1f} seq/s"),
                 ("tokens_per_sec", "{:.0f} tok/s"), ("tflops", "{:.3f} TFLOP/s"))


def format_metrics(step: int, metrics: Dict[str, Any]) -> str:
    parts = [f"step {step}" + (f"/{metrics['max_steps']}" if "max_steps" in metrics else "")]
    parts += [fmt.format(metrics[key]) for key, fmt in _LINE_FORMATS if metrics.get(key) is not None]
    return " | ".join(parts)


def _jsonable(value):
    if hasattr(value, "item"):
        value = value.item()
    return value


# ---- RNG state -----------------------------------------------------------------------------------------
def capture_rng_state() -> Dict[str, Any]:
    """Every generator a training step draws from: python, numpy, paddle's (CPU, and the current
    accelerator's), and the tensor-parallel dropout stream."""
    import numpy as np
    import paddle

    from .parallel import get_tensor_parallel_degree

    state = {"python": random.getstate(), "numpy": np.random.get_state(), "paddle_cpu": paddle.get_rng_state("cpu")}
    if paddle.get_device() != "cpu":
        state["paddle_device"] = paddle.get_rng_state()
    if get_tensor_parallel_degree() > 1:
        from paddle.distributed.fleet.meta_parallel import get_rng_state_tracker

        state["tensor_parallel"] = get_rng_state_tracker().get_states_tracker()
    return state


def restore_rng_state(state: Dict[str, Any]) -> None:
    import numpy as np
    import paddle

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    paddle.set_rng_state(state["paddle_cpu"], "cpu")
    if "paddle_device" in state and paddle.get_device() != "cpu":
        paddle.set_rng_state(state["paddle_device"])
    if "tensor_parallel" in state:
        from paddle.distributed.fleet.meta_parallel import get_rng_state_tracker

        get_rng_state_tracker().set_states_tracker(state["tensor_parallel"])


# ---- optimizer state under stable names ----------------------------------------------------------------
# Paddle keys AdamW's accumulators by auto-generated parameter names ("linear_12.w_0_moment1_0"), which
# depend on how many layers the process built before; a checkpoint stores them under the model's
# structured names ("bert.encoder.layer.0.output.dense.weight/moment1_0") and maps them back on load.
def _name_maps(model):
    auto_to_structured = {p.name: n for n, p in model.named_parameters()}
    return auto_to_structured, {v: k for k, v in auto_to_structured.items()}


def _rename_keys(state: Dict[str, Any], prefixes: Dict[str, str], separator_in: str, separator_out: str):
    ordered = sorted(prefixes, key=len, reverse=True)
    renamed = {}
    for key, value in state.items():
        if key == "master_weights" and isinstance(value, dict):
            renamed[key] = {prefixes.get(k, k): v for k, v in value.items()}
            continue
        for prefix in ordered:
            if key.startswith(prefix + separator_in):
                key = prefixes[prefix] + separator_out + key[len(prefix) + len(separator_in):]
                break
        renamed[key] = value
    return renamed


def optimizer_state_to_structured(state: Dict[str, Any], model) -> Dict[str, Any]:
    auto_to_structured, _ = _name_maps(model)
    return _rename_keys(state, auto_to_structured, "_", "/")


def optimizer_state_from_structured(state: Dict[str, Any], model) -> Dict[str, Any]:
    _, structured_to_auto = _name_maps(model)
    return _rename_keys(state, structured_to_auto, "/", "_")


# ---- checkpoints ---------------------------------------------------------------------------------------
def checkpoint_path(output_dir: str, step: int) -> str:
    return os.path.join(output_dir, f"{CHECKPOINT_PREFIX}{step}")


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _atomic_write_text(path: str, text: str) -> None:
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(os.path.dirname(os.path.abspath(path)))


def _barrier(topo) -> None:
    if topo is not None and topo.world_size > 1:
        import paddle.distributed as dist

        dist.barrier()


def _optimizer_file(topo) -> str:
    tp_rank = topo.tp_rank if topo is not None else 0
    sharding_rank = topo.sharding_rank if topo is not None else 0
    return f"optimizer.tp{tp_rank:02d}.sd{sharding_rank:02d}.pdopt"


def _rng_file(topo) -> str:
    return f"rng_state.rank{(topo.rank if topo is not None else 0):04d}.pkl"


def _pause_for_test(step: int) -> None:
    hook = os.environ.get(PAUSE_IN_SAVE_ENV)
    if hook:
        hook_step, seconds = hook.split(":")
        if int(hook_step) == step:
            print(f"[test hook] pausing {seconds}s inside the save of step {step}", flush=True)
            time.sleep(float(seconds))


def save_checkpoint(output_dir: str, step: int, model, optimizer, lr_scheduler=None, scaler=None,
                    trainer_state: Optional[Dict[str, Any]] = None, topo=None,
                    extra_files: Optional[Dict[str, str]] = None, save_total_limit: Optional[int] = None) -> str:
    """Write ``checkpoint-<step>`` atomically; every rank calls it. Returns the checkpoint directory.

    Args:
        model: the unwrapped model (``save_pretrained`` writes its weights and config.json).
        optimizer: the (possibly fleet-wrapped) optimizer; its state is stored under structured names.
        lr_scheduler, scaler: their state dicts go into trainer_state.json (scaler may be None).
        trainer_state: JSON-able run state (step, data position, settings) stored as trainer_state.json.
        topo: the run's :class:`~paddle_megatronbert.distributed.Topology` (None: one process).
        extra_files: ``{name in the checkpoint: source path}`` copied in (e.g. the tokenizer's vocab.txt).
        save_total_limit: keep at most this many checkpoints (oldest removed after ``latest`` moved on).

    All files go to ``checkpoint-<step>.tmp``; the main rank renames it to ``checkpoint-<step>`` and then
    rewrites ``latest``. A crash at any point leaves ``latest`` naming a complete checkpoint.
    """
    import paddle

    is_main = topo is None or topo.is_main
    final = checkpoint_path(output_dir, step)
    tmp = final + ".tmp"
    if is_main:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp)  # left by a run killed mid-save
        os.makedirs(tmp)
    _barrier(topo)
    model.save_pretrained(tmp, merge_tensor_parallel=False)
    if topo is None or topo.dp_rank == 0:  # dp replicas hold identical optimizer states
        state = optimizer_state_to_structured(optimizer.state_dict(), model)
        paddle.save(state, os.path.join(tmp, _optimizer_file(topo)))
    with open(os.path.join(tmp, _rng_file(topo)), "wb") as f:
        pickle.dump(capture_rng_state(), f)
    _barrier(topo)
    if is_main:
        state = dict(trainer_state or {})
        state["global_step"] = step
        state["world_size"] = topo.world_size if topo is not None else 1
        state["tensor_parallel_degree"] = topo.tp_degree if topo is not None else 1
        state["sharding_degree"] = topo.sharding_degree if topo is not None else 1
        if lr_scheduler is not None:
            state["lr_scheduler"] = lr_scheduler.state_dict()
        if scaler is not None:
            state["scaler"] = {k: _jsonable(v) for k, v in scaler.state_dict().items()}
        for name, source in (extra_files or {}).items():
            shutil.copyfile(source, os.path.join(tmp, name))
        _atomic_write_text(os.path.join(tmp, TRAINER_STATE_FILE), json.dumps(state, indent=2, sort_keys=True))
        for name in os.listdir(tmp):
            with open(os.path.join(tmp, name), "rb") as f:
                os.fsync(f.fileno())
        _fsync_dir(tmp)
        _pause_for_test(step)
        if os.path.isdir(final):
            shutil.rmtree(final)  # a complete checkpoint of a run that died before moving `latest` to it
        os.rename(tmp, final)
        _fsync_dir(output_dir)
        _atomic_write_text(os.path.join(output_dir, LATEST_FILE), os.path.basename(final) + "\n")
        if save_total_limit:
            _prune_checkpoints(output_dir, save_total_limit, keep=os.path.basename(final))
    _barrier(topo)
    return final


def _checkpoint_step(name: str) -> Optional[int]:
    match = re.fullmatch(re.escape(CHECKPOINT_PREFIX) + r"(\d+)", name)
    return int(match.group(1)) if match else None


def _prune_checkpoints(output_dir: str, limit: int, keep: str) -> None:
    names = sorted((n for n in os.listdir(output_dir) if _checkpoint_step(n) is not None), key=_checkpoint_step)
    for name in names[:-limit] if limit > 0 else []:
        if name != keep:
            shutil.rmtree(os.path.join(output_dir, name), ignore_errors=True)


def latest_checkpoint(output_dir: str) -> Optional[str]:
    """The checkpoint ``<output_dir>/latest`` names, or None when there is none. Unfinished
    ``*.tmp`` directories are never returned."""
    pointer = os.path.join(output_dir, LATEST_FILE)
    if not os.path.isfile(pointer):
        return None
    with open(pointer, encoding="utf-8") as f:
        name = f.read().strip()
    path = os.path.join(output_dir, name)
    if _checkpoint_step(name) is None or not os.path.isfile(os.path.join(path, TRAINER_STATE_FILE)):
        raise ValueError(f"{pointer} names {name!r}, which is not a complete checkpoint in {output_dir}")
    return path


def read_trainer_state(checkpoint_dir: str) -> Dict[str, Any]:
    path = os.path.join(checkpoint_dir, TRAINER_STATE_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{checkpoint_dir} is not a checkpoint (no {TRAINER_STATE_FILE})")
    try:
        with open(path, encoding="utf-8") as f:
            state = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not valid JSON (corrupt checkpoint?): {err}") from None
    if not isinstance(state, dict) or "global_step" not in state:
        raise ValueError(f"{path} is not a trainer state (a JSON object with global_step)")
    return state


def load_checkpoint(checkpoint_dir: str, model, optimizer, lr_scheduler=None, scaler=None, topo=None,
                    restore_rng: bool = True) -> Dict[str, Any]:
    """Restore what :func:`save_checkpoint` wrote; returns the trainer state. Call after building the
    model and optimizer (their construction draws random numbers; the generators are restored last)."""
    import paddle

    from .modeling import load_state_file

    state = read_trainer_state(checkpoint_dir)
    world = topo.world_size if topo is not None else 1
    tp = topo.tp_degree if topo is not None else 1
    sharding = topo.sharding_degree if topo is not None else 1
    if (state.get("tensor_parallel_degree", 1), state.get("sharding_degree", 1)) != (tp, sharding):
        raise ValueError(f"{checkpoint_dir} was written with tensor_parallel_degree "
                         f"{state.get('tensor_parallel_degree', 1)} and sharding_degree {state.get('sharding_degree', 1)}; "
                         f"this run has {tp} and {sharding}: the optimizer state cannot be resharded, resume with the "
                         "same degrees (or start a new run from its weights with --model_name_or_path)")
    model.load_full_state_dict(load_state_file(checkpoint_dir), strict=True, source=checkpoint_dir)
    optimizer_path = os.path.join(checkpoint_dir, _optimizer_file(topo))
    if not os.path.isfile(optimizer_path):
        raise FileNotFoundError(f"{checkpoint_dir} has no {os.path.basename(optimizer_path)}")
    optimizer.set_state_dict(optimizer_state_from_structured(paddle.load(optimizer_path), model))
    if lr_scheduler is not None and "lr_scheduler" in state:
        lr_scheduler.set_state_dict(state["lr_scheduler"])
    if scaler is not None and "scaler" in state:
        scaler.load_state_dict(state["scaler"])
    if restore_rng:
        rng_path = os.path.join(checkpoint_dir, _rng_file(topo))
        if state.get("world_size", 1) == world and os.path.isfile(rng_path):
            try:
                with open(rng_path, "rb") as f:
                    rng_state = pickle.load(f)
                restore_rng_state(rng_state)
            except Exception as err:  # unpickling a damaged file raises any of a dozen types
                detail = str(err).strip().splitlines()[0] if str(err).strip() else "no detail"
                raise ValueError(f"cannot read {rng_path} (corrupt or truncated?): {type(err).__name__}: "
                                 f"{detail}") from None
        else:
            print(f"warning: {checkpoint_dir} was written by {state.get('world_size', 1)} process(es), this run has "
                  f"{world}: random streams start fresh (dropout masks differ from an uninterrupted run)",
                  file=sys.stderr)
    return state
