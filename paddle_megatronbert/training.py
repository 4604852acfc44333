"""Pieces every runner's training loop shares: threads, seeds, the AdamW optimizer and its LR schedule."""

from __future__ import annotations

import os
import random


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


def no_decay_parameter(name: str, param) -> bool:
    """Biases and LayerNorm parameters take no weight decay (BERT / Megatron)."""
    return name.endswith("bias") or ".ln." in name or "LayerNorm" in name or param.ndim == 1


def linear_warmup_decay(learning_rate: float, total_steps: int, warmup):
    """Linear warm-up to ``learning_rate`` then linear decay to 0 at ``total_steps``.
    ``warmup`` is a step count (int) or a proportion of ``total_steps`` (float < 1)."""
    from paddlenlp.transformers import LinearDecayWithWarmup

    return LinearDecayWithWarmup(learning_rate, total_steps, warmup)


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
