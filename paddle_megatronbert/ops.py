"""The operations the model is built from, one function each.

``modeling.py`` calls only these. Each has a plain Paddle implementation; where Paddle is slow, a fast one
sits beside it and :func:`use_fast_kernels` (the one switch, set from ``config.use_fast_kernels`` when a
model is built) decides which runs, so the plain path always exists and can be compared with the fast one.

Fast paths (why each pays, with measurements: ``docs/benchmarks.md``):

* CPU, float32: custom C++ kernels (``kernels/``) for LayerNorm, bias + GELU, masked softmax + dropout,
  bias + dropout + residual, bias + head split and head merge, and a bias add whose gradient is a fast
  column sum. Paddle 3.3's own CPU kernels for these are single-threaded and unvectorised, and its column
  reductions (every bias gradient) are ~30x slower than a GEMV. Without a compiler the kernels are
  unavailable and the plain ops run (one warning line). The process-wide settings this path needs
  (stride kernels off, MKL's AVX2 path on AMD, malloc thresholds) live in one function,
  :func:`apply_cpu_process_settings`, which runs once, the first time a fast CPU kernel runs (not when
  a model is built), and says so in one INFO line.
* GPU, float16/bfloat16: attention through ``F.scaled_dot_product_attention`` (flash attention).
  UNTESTED here (no GPU on the development machines); fp32 GPU runs take the plain path.

Linear layers are passed in whole (``linear_activation(layer, x, act)``): the fast path runs the layer's
matmul, with its tensor-parallel communication, and fuses the bias into the next kernel, so the bias
gradient comes out of that kernel. Tensor-parallel results are the same as the plain path's.
"""

from __future__ import annotations

import logging
import math
import os

import paddle
import paddle.nn as nn
import paddle.nn.functional as F

_FAST = {"enabled": False}
_STRIDE_FLAG = "FLAGS_use_stride_kernel"
_STRIDE_DEFAULT = {}  # the flag's value before apply_cpu_process_settings changed it (empty: unchanged)
_PROCESS = {"tuned": False}  # whether the kept-until-exit settings (MKL, malloc) were applied

logger = logging.getLogger(__name__)


def use_fast_kernels(enabled: bool) -> bool:
    """Choose, for the whole process, the fast implementations where they apply or the plain ones;
    returns whether the fast paths are on. Models call it with ``config.use_fast_kernels`` when built.

    It changes no other process setting: :func:`apply_cpu_process_settings` does, when a fast CPU kernel
    first runs. Turning the fast paths off restores ``FLAGS_use_stride_kernel``. The kernels are built
    (once, cached) on first use, so GPU runs never build them.
    """
    _FAST["enabled"] = bool(enabled)
    if not _FAST["enabled"] and _STRIDE_DEFAULT:
        paddle.set_flags(dict(_STRIDE_DEFAULT))
        _STRIDE_DEFAULT.clear()
    return _FAST["enabled"]


def apply_cpu_process_settings() -> None:
    """The process-wide settings of the CPU fast path, all here:

    - ``FLAGS_use_stride_kernel=False``: view ops return copies (with strided views, whatever consumes a
      transposed view goes through a slow single-threaded copy; the model never writes through a view).
      ``use_fast_kernels(False)`` restores it; the next fast kernel sets it again.
    - glibc's malloc thresholds (:func:`_keep_freed_memory_in_the_heap`): speed, not the math; applied once
      and kept until exit.
    - on AMD CPUs ``MKL_DEBUG_CPU_TYPE=5`` (:func:`_use_fast_mkl_path_on_amd`) is the exception: MKL reads it
      at its first call, and building a model already calls MKL (the weight initialisation), so waiting for
      the first kernel left Paddle's GEMMs on MKL's slow generic path (measured: a base-size training step
      2.4x slower). It is set when this module is imported, once per process, and reported here.

    Runs by itself the first time a fast CPU kernel runs; building a model or running the plain path changes
    nothing.
    Call it yourself to give code that never calls these ops the same settings (the benchmarks do, for
    the peers' models). Idempotent; logs one INFO line the first time.
    """
    if not _STRIDE_DEFAULT:
        _STRIDE_DEFAULT[_STRIDE_FLAG] = paddle.get_flags([_STRIDE_FLAG])[_STRIDE_FLAG]
        paddle.set_flags({_STRIDE_FLAG: False})
    if _PROCESS["tuned"]:
        return
    _PROCESS["tuned"] = True
    amd = _MKL_PATH_SET_AT_IMPORT
    malloc = _keep_freed_memory_in_the_heap()
    logger.info("fast CPU kernels: process settings applied: %s=False%s%s (see ops.apply_cpu_process_settings)",
                _STRIDE_FLAG, ", MKL_DEBUG_CPU_TYPE=5 (AMD CPU)" if amd else "",
                ", malloc keeps freed blocks up to 32 MiB" if malloc else "")


def _keep_freed_memory_in_the_heap() -> bool:
    """Paddle allocates every CPU tensor with ``posix_memalign`` and frees it at once; glibc serves blocks
    over 128 KiB with fresh ``mmap`` pages and returns them on free, so each op's output page-faults and
    zero-fills its memory again (a 2 MiB bias add: 1.9 ms instead of 0.06 ms; a 12 MiB one 28 ms instead
    of 1.5 ms). Raising the mmap threshold to glibc's maximum (32 MiB) and the trim threshold keeps freed
    blocks in the heap for reuse. Peak memory is unchanged; freed memory is not returned to the OS.
    Returns whether it applied (glibc only)."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if not name or not hasattr(ctypes.CDLL(name), "mallopt"):
        return False  # not glibc (macOS, musl): nothing to tune
    libc = ctypes.CDLL(name)
    m_trim_threshold, m_mmap_threshold = -1, -3  # from glibc's malloc.h
    libc.mallopt(m_mmap_threshold, 32 * 1024 * 1024)
    libc.mallopt(m_trim_threshold, 1 << 30)
    return True


def _use_fast_mkl_path_on_amd() -> bool:
    """Paddle bundles MKL 2019, which runs its slow generic code path on AMD CPUs (sgemm 2-3x slower
    than torch's newer MKL on the same cores); ``MKL_DEBUG_CPU_TYPE=5`` makes it take the AVX2 path.
    MKL reads it at its first call, so it helps only when set before the first GEMM. Intel CPUs are left
    alone (there it would downgrade AVX-512 to AVX2); a user's own setting wins. Returns whether it set it."""
    if "MKL_DEBUG_CPU_TYPE" in os.environ:
        return False
    try:
        with open("/proc/cpuinfo") as f:
            amd = any(line.startswith("vendor_id") and "AuthenticAMD" in line for line in f)
    except OSError:
        return False
    if amd:
        os.environ["MKL_DEBUG_CPU_TYPE"] = "5"
    return amd


# The one setting that cannot wait for the first fast kernel (see apply_cpu_process_settings): made at import,
# before any model exists, so every process runs its GEMMs on the same MKL path whatever it did first.
_MKL_PATH_SET_AT_IMPORT = _use_fast_mkl_path_on_amd()


def fast_kernels_enabled() -> bool:
    return _FAST["enabled"]


def _cpu_kernels(*tensors):
    """The custom kernel library when the fast path applies to these tensors (CPU, float32), else None."""
    if not _FAST["enabled"]:
        return None
    for t in tensors:
        if t is None or t.dtype != paddle.float32 or not t.place.is_cpu_place():
            return None
    from .kernels import load_cpu_kernels

    library = load_cpu_kernels()
    if library is not None and not _STRIDE_DEFAULT:
        apply_cpu_process_settings()
    return library


def _dense(x):
    """The kernels read raw memory: hand them a contiguous tensor (a no-op unless strided views are on)."""
    return x if x.is_contiguous() else x.contiguous()


def _dropout_seed(p: float, training: bool) -> int:
    """A seed for a kernel's dropout mask, drawn from Paddle's generator (so ``paddle.seed`` and the
    tensor-parallel RNG tracker govern it like ``F.dropout``); 0 when there is no dropout."""
    if not training or p <= 0.0:
        return 0
    return int(paddle.randint(0, 2**31 - 1, shape=[1]).item())


def _effective_p(p: float, training: bool) -> float:
    return float(p) if training else 0.0


# ---- linear layers without their bias (the bias goes into the next fused kernel) -------------------
def _matmul_without_bias(layer, x):
    """``layer(x)`` minus the bias, with the layer's tensor-parallel communication; None when the layer
    cannot do that (the caller then runs the plain path). The parallel layers own this half of their
    forward (``matmul_without_bias``), so the communication is written once, in ``parallel.py``."""
    if hasattr(layer, "matmul_without_bias"):
        return layer.matmul_without_bias(x)
    if type(layer) is nn.Linear and layer.bias is not None:
        return paddle.matmul(x, layer.weight)
    return None


# ---- activations ------------------------------------------------------------------------------------
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


_GELU_APPROXIMATE = {"gelu": False, "gelu_new": True, "gelu_tanh": True}


def linear_activation(layer, x, name: str):
    """``activation(layer(x), name)``; fast: matmul, then one bias + GELU kernel (bias grad included)."""
    kernels = _cpu_kernels(x, layer.weight) if name in _GELU_APPROXIMATE else None
    if kernels is not None:
        y = _matmul_without_bias(layer, x)
        if y is not None:
            return kernels.run("pmb_bias_gelu", _dense(y), layer.bias, _GELU_APPROXIMATE[name])[0]
    return activation(layer(x), name)


# ---- normalisation, residuals --------------------------------------------------------------------
def layer_norm(x, weight, bias, eps: float):
    kernels = _cpu_kernels(x, weight)
    if kernels is not None:
        return kernels.run("pmb_layer_norm", _dense(x), weight, bias, float(eps))[0]
    return F.layer_norm(x, x.shape[-1:], weight, bias, eps)


def dropout_add(x, residual, p: float, training: bool):
    """``residual + dropout(x)``: the end of each residual branch."""
    return residual + F.dropout(x, p, training=training)


def linear_dropout_add(layer, x, residual, p: float, training: bool):
    """``residual + dropout(layer(x))``; fast: matmul, then one bias + dropout + residual kernel."""
    kernels = _cpu_kernels(x, layer.weight, residual)
    if kernels is not None:
        y = _matmul_without_bias(layer, x)
        if y is not None:
            p = _effective_p(p, training)
            return kernels.run("pmb_bias_dropout_add", _dense(y), layer.bias, _dense(residual), p,
                               _dropout_seed(p, training))[0]
    return dropout_add(layer(x), residual, p, training)


def bias_add(x, bias):
    """``x + bias`` over the last dim; fast: the bias gradient is a parallel column sum, not Paddle's
    slow reduction (the LM decoder's bias: a [tokens, vocab] gradient)."""
    kernels = _cpu_kernels(x, bias)
    if kernels is not None:
        return kernels.run("pmb_bias_add", _dense(x), bias)[0]
    return x + bias


# ---- attention ---------------------------------------------------------------------------------------
def linear_split_heads(layer, x, num_heads: int):
    """``layer(x)`` (B, S, nh * hd) as heads (B, nh, S, hd); fast: matmul, then one bias + transpose kernel."""
    kernels = _cpu_kernels(x, layer.weight)
    if kernels is not None:
        y = _matmul_without_bias(layer, x)
        if y is not None:
            return kernels.run("pmb_bias_split_heads", _dense(y), layer.bias, int(num_heads))[0]
    y = layer(x)
    batch, seq = y.shape[0], y.shape[1]
    return y.reshape([batch, seq, num_heads, y.shape[-1] // num_heads]).transpose([0, 2, 1, 3])


def merge_heads(context):
    """(B, nh, S, hd) -> (B, S, nh * hd)."""
    kernels = _cpu_kernels(context)
    if kernels is not None:
        return kernels.run("pmb_merge_heads", _dense(context))[0]
    batch, heads, seq, head_dim = context.shape
    return context.transpose([0, 2, 1, 3]).reshape([batch, seq, heads * head_dim])


def attention(query, key, value, additive_mask, dropout_p: float, training: bool, return_probs: bool = False):
    """Scaled dot-product attention over (B, nh, S, hd) tensors; ``additive_mask`` broadcasts to
    (B, nh, S, S) with 0 for kept and a large negative number for masked keys.

    Returns the context (B, nh, S, hd) or, with ``return_probs``, ``(context, probs)``: the probabilities
    (B, nh, S, S) after dropout (HF's ``attentions``). The CPU kernel returns them as it computes them;
    GPU flash attention never materialises them, so asking for them takes the plain path there."""
    scale = 1.0 / math.sqrt(query.shape[-1])
    mask_ok = additive_mask is None or (additive_mask.ndim == 4 and additive_mask.dtype == query.dtype)
    kernels = _cpu_kernels(query, key, value) if mask_ok else None
    if kernels is not None:
        scores = paddle.matmul(query, key, transpose_y=True)  # (B, nh, S, S), scaled inside the kernel
        mask = additive_mask if additive_mask is not None else paddle.zeros([1, 1, 1, 1], dtype=scores.dtype)
        p = _effective_p(dropout_p, training)
        if p > 0.0:
            probs = kernels.run("pmb_masked_softmax_dropout", scores, _dense(mask), scale, p,
                                _dropout_seed(p, training))[0]
        else:
            probs = kernels.run("pmb_masked_softmax", scores, _dense(mask), scale)[0]
        context = paddle.matmul(probs, value)  # (B, nh, S, hd)
        return (context, probs) if return_probs else context
    if _FAST["enabled"] and not return_probs and _flash_attention_applies(query, additive_mask):
        return _gpu_flash_attention(query, key, value, additive_mask, dropout_p, training)
    scores = paddle.matmul(query, key, transpose_y=True) * scale  # (B, nh, S, S)
    if additive_mask is not None:
        scores = scores + additive_mask
    probs = F.softmax(scores, axis=-1)
    probs = F.dropout(probs, dropout_p, training=training)
    context = paddle.matmul(probs, value)  # (B, nh, S, hd)
    return (context, probs) if return_probs else context


def _flash_attention_applies(query, additive_mask) -> bool:
    return query.place.is_gpu_place() and query.dtype in (paddle.float16, paddle.bfloat16) and (
        additive_mask is None or additive_mask.ndim == 4)


def _gpu_flash_attention(query, key, value, additive_mask, dropout_p, training):
    """UNTESTED (no GPU on the development machines): Paddle's fused attention on GPU in fp16/bf16.
    ``scaled_dot_product_attention`` takes (B, S, nh, hd) and an additive mask."""
    def to_bsnh(t):
        return t.transpose([0, 2, 1, 3])

    mask = None if additive_mask is None else additive_mask.astype(query.dtype)
    out = F.scaled_dot_product_attention(to_bsnh(query), to_bsnh(key), to_bsnh(value), attn_mask=mask,
                                         dropout_p=dropout_p if training else 0.0, training=training)
    return to_bsnh(out)  # back to (B, nh, S, hd)


# ---- losses ------------------------------------------------------------------------------------------
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
