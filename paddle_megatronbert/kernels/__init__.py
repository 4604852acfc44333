"""Custom C++ CPU kernels (LayerNorm, bias+GELU, masked softmax+dropout, bias+dropout+residual, head
split/merge) and their loader. ``ops.py`` decides when they run; the plain Paddle ops stay the fallback."""

from .loader import KernelLibrary, load_cpu_kernels  # noqa: F401
