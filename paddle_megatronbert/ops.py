"""The operations the model is built from, one function each.

``modeling.py`` calls only these; each has a plain Paddle implementation here. Fast implementations
(custom CPU kernels, fused GPU ops) are registered beside them and chosen in one place,
:func:`use_fast_kernels`, so the plain path always exists and can be compared with the fast one.
"""

from __future__ import annotations

import math

import paddle
import paddle.nn.functional as F

_FAST = {"enabled": False}


def use_fast_kernels(enabled: bool) -> bool:
    """Turn the fast paths on or off for the whole process; returns whether they are on."""
    _FAST["enabled"] = bool(enabled)
    return _FAST["enabled"]


def fast_kernels_enabled() -> bool:
    return _FAST["enabled"]


def activation(x, name: str):
    """The MLP / LM-head nonlinearity. ``gelu`` is the exact (erf) GELU; ``gelu_new``/``gelu_tanh``
    the tanh approximation that Megatron's fused bias-gelu and ``--openai-gelu`` compute."""
    if name == "gelu":
        return F.gelu(x)
    if name in ("gelu_new", "gelu_tanh"):
        return F.gelu(x, approximate=True)
    if name == "relu":
        return F.relu(x)
    if name == "tanh":
        return paddle.tanh(x)
    raise ValueError(f"unknown activation {name!r}")


def layer_norm(x, weight, bias, eps: float):
    return F.layer_norm(x, x.shape[-1:], weight, bias, eps)


def linear(x, weight, bias=None):
    return F.linear(x, weight, bias)


def dropout_add(x, residual, p: float, training: bool):
    """``residual + dropout(x)``: the end of each residual branch."""
    return residual + F.dropout(x, p, training=training)


def attention(query, key, value, additive_mask, dropout_p: float, training: bool):
    """Scaled dot-product attention over (B, nh, S, hd) tensors; ``additive_mask`` broadcasts to
    (B, nh, S, S) with 0 for kept and a large negative number for masked keys."""
    scores = paddle.matmul(query, key, transpose_y=True) * (1.0 / math.sqrt(query.shape[-1]))  # (B, nh, S, S)
    if additive_mask is not None:
        scores = scores + additive_mask
    probs = F.softmax(scores, axis=-1)
    probs = F.dropout(probs, dropout_p, training=training)
    return paddle.matmul(probs, value)  # (B, nh, S, hd)


def masked_mean_cross_entropy(logits, labels, ignore_index: int = -100):
    """Mean cross entropy over the positions whose label is not ``ignore_index``.

    Paddle 3.3's ``cross_entropy(ignore_index=-100, reduction="mean")`` divides by all positions,
    so the sum is divided by the count of kept labels here.
    """
    logits = logits.reshape([-1, logits.shape[-1]])
    labels = labels.reshape([-1]).astype("int64")
    keep = labels != ignore_index
    safe = paddle.where(keep, labels, paddle.zeros_like(labels))
    loss = F.cross_entropy(logits.astype("float32"), safe.unsqueeze(-1), reduction="none").squeeze(-1)
    kept = keep.astype(loss.dtype)
    return (loss * kept).sum() / kept.sum().clip(min=1.0)
