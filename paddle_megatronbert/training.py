"""The pieces of the one training loop (``loop.py``): CPU threads, argument checks, the AdamW optimizer and its
LR schedule, mixed precision (one loss scaler), the NaN stop, the metrics log and its lines, the FLOPs estimate.
Checkpoints (layout, atomic writes, exact resume) live in ``checkpoint/training_state.py``; their names are
re-exported at the end of this module.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any, Callable, Dict, List, Optional

METRICS_FILE = "metrics.jsonl"


def setup_cpu_threads() -> int:
    """Paddle forces OMP_NUM_THREADS=1 at import unless it is set: use every core. Call before importing paddle."""
    if "OMP_NUM_THREADS" not in os.environ:
        os.environ["OMP_NUM_THREADS"] = str(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count())
    return int(os.environ["OMP_NUM_THREADS"])


# ---- argument checks ----------------------------------------------------------------------------------
_AT_LEAST_1 = ("batch_size", "eval_batch_size", "gradient_accumulation_steps", "logging_steps", "save_steps",
               "save_total_limit", "exit_interval", "tensor_parallel_degree", "data_parallel_degree",
               "sharding_degree")
# flag: (lowest, highest, lowest allowed itself, highest allowed itself); every bound is finite
_NUMBER_RANGES = {
    # Paddle holds the LR in float32: above its largest value (3.4e38) it becomes inf
    "learning_rate": (0.0, 3.4028234663852886e38, True, True),
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
    """The one loss scaler of every runner: dynamic loss scaling for fp16 (a step whose gradients overflow is
    skipped; the scale halves after 2 such steps in a row and doubles after 1000 clean ones); None for
    fp32/bf16, whose range needs none.

    2, not 1: Megatron-LM's default ``--hysteresis 2`` and Paddle's own default. A lone overflow (one
    unlucky batch) then costs one skipped step instead of half the scale, which takes 1000 steps to regrow.
    """
    if amp != "fp16":
        return None
    import paddle

    scaler = paddle.amp.GradScaler(init_loss_scaling=init_loss_scaling, incr_every_n_steps=1000,
                                   decr_every_n_nan_or_inf=2, use_dynamic_loss_scaling=True)
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
        line_format: ``(step, record) -> str`` of the stdout line (default :func:`format_metrics`).
    """

    def __init__(self, output_dir: str, enabled: bool = True, use_visualdl: Optional[bool] = None,
                 resume_step: Optional[int] = None, line_format: Optional[Callable[[int, Dict[str, Any]], str]] = None):
        self.enabled = enabled
        self.line_format = line_format or format_metrics
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
        line = self.line_format(step, metrics)
        print(line, flush=True)
        return line

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


_LINE_FORMATS = (("loss", "loss {:.4f}"), ("mlm_loss", "mlm_loss {:.4f}"), ("nsp_loss", "nsp_loss {:.4f}"),
                 ("lr", "lr {:.3e}"), ("loss_scale", "loss_scale {:.0f}"), ("sequences_per_sec", "{:.1f} seq/s"),
                 ("tokens_per_sec", "{:.0f} tok/s"), ("tflops", "{:.3f} TFLOP/s"))


def format_duration(seconds: float) -> str:
    """``H:MM:SS``."""
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def format_metrics(step: int, metrics: Dict[str, Any]) -> str:
    """``step 3/20 | loss 6.1234 | ... | 12.0 seq/s | elapsed 0:00:04 | eta 0:00:21``: the pretraining line."""
    parts = [f"step {step}" + (f"/{metrics['max_steps']}" if "max_steps" in metrics else "")]
    parts += [fmt.format(metrics[key]) for key, fmt in _LINE_FORMATS if metrics.get(key) is not None]
    parts += [f"{label} {format_duration(metrics[key])}" for key, label in (("elapsed_s", "elapsed"), ("eta_s", "eta"))
              if metrics.get(key) is not None]
    return " | ".join(parts)


def _jsonable(value):
    if hasattr(value, "item"):
        value = value.item()
    return value


# ---- checkpoints: their home is checkpoint/training_state.py (re-exported for the runners) ----------
from .checkpoint.files import atomic_write_text as _atomic_write_text  # noqa: E402,F401
from .checkpoint.files import fsync_dir as _fsync_dir  # noqa: E402,F401
from .checkpoint.training_state import (  # noqa: E402,F401
    CHECKPOINT_PREFIX, LATEST_FILE, PAUSE_IN_SAVE_ENV, TRAINER_STATE_FILE, capture_rng_state, checkpoint_path,
    latest_checkpoint, load_checkpoint, optimizer_state_from_structured, optimizer_state_to_structured,
    read_trainer_state, restore_rng_state, save_checkpoint)
