"""Build the custom CPU kernels once, cache them, load them; fall back (one warning) when that fails.

The only module that knows about compilers. ``cpu_kernels.cc`` is compiled with
``paddle.utils.cpp_extension`` into ``~/.cache/paddle_megatronbert/kernels/<key>/`` (or
``$PADDLE_MEGATRONBERT_KERNEL_CACHE/<key>/``), where ``key`` hashes the source, the flags, the Paddle and
Python versions and the CPU's instruction sets, so a later process (or a changed source) finds the right
library or builds a new one. Concurrent first builds are serialised by a file lock.

OpenMP: the kernels are compiled with ``-fopenmp`` but linked against Paddle's own ``libiomp5.so`` instead
of GNU libgomp. Paddle's MKL already runs Intel OpenMP; a second runtime's threads would fight it for the
cores and slow every GEMM (measured: 2.05 s -> 2.5-2.8 s per base-size step).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import platform
import shutil
import sys
from typing import Optional

logger = logging.getLogger("paddle_megatronbert.kernels")

KERNEL_DIR = os.path.dirname(os.path.abspath(__file__))
SOURCES = ("cpu_kernels.cc",)
LIBRARY_NAME = "pmb_cpu_kernels"
CACHE_ENV = "PADDLE_MEGATRONBERT_KERNEL_CACHE"
CXX_FLAGS = ["-O3", "-march=native", "-fopenmp", "-std=c++17"]

_STATE = {"library": None, "tried": False, "error": None}
_REGISTERED = set()  # libraries whose ops this process has registered (registering twice fails)


class KernelLibrary:
    """The loaded kernels: ``run(op_name, *inputs_then_attrs)`` returns the op's outputs as a list."""

    def __init__(self, path: str):
        from paddle import _C_ops

        self.path = path
        self._run_custom_op = _C_ops._run_custom_op

    def run(self, op_name: str, *args):
        return self._run_custom_op(op_name, *args)


def cache_root() -> str:
    return os.environ.get(CACHE_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "paddle_megatronbert", "kernels")


def _paddle_libs() -> str:
    import paddle

    return os.path.join(os.path.dirname(paddle.__file__), "libs")


def _link_flags():
    libs = _paddle_libs()
    return [f"-L{libs}", "-liomp5", f"-Wl,-rpath,{libs}"]


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return line
    except OSError:
        pass
    return platform.processor()


def build_key() -> str:
    """Hash of everything the compiled library depends on."""
    import paddle

    digest = hashlib.sha256()
    for name in SOURCES:
        with open(os.path.join(KERNEL_DIR, name), "rb") as f:
            digest.update(f.read())
    for part in (CXX_FLAGS, _link_flags(), paddle.__version__, sys.version, platform.machine(), _cpu_flags()):
        digest.update(repr(part).encode())
    return digest.hexdigest()[:16]


def find_compiler() -> Optional[str]:
    """The C++ compiler setuptools will use (``$CXX``, else ``c++``), or None when there is none."""
    return shutil.which(os.environ.get("CXX", "c++"))


@contextlib.contextmanager
def _file_lock(path: str):
    import fcntl

    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _library_path(build_dir: str) -> str:
    return os.path.join(build_dir, LIBRARY_NAME, LIBRARY_NAME + ".so")


BUILD_LOG = "build.log"


@contextlib.contextmanager
def _output_to(path: str):
    """Send everything written to file descriptors 1 and 2 into ``path``: the compiler's own lines and
    setuptools' log come from subprocesses and handlers that Python-level redirection never sees."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    try:
        with open(path, "ab") as sink:
            os.dup2(sink.fileno(), 1)
            os.dup2(sink.fileno(), 2)
            try:
                yield
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os.dup2(saved[0], 1)
                os.dup2(saved[1], 2)
    finally:
        for fd in saved:
            os.close(fd)


def _build(build_dir: str) -> None:
    """Compile into ``build_dir`` (registers the ops in this process as a side effect). The compiler's output
    goes to ``build_dir/build.log``, shown only when the build fails."""
    from paddle.utils import cpp_extension

    logger.info("building the custom CPU kernels once into %s (about 30 s)", build_dir)
    os.makedirs(build_dir, exist_ok=True)
    log_path = os.path.join(build_dir, BUILD_LOG)
    try:
        with _output_to(log_path):
            cpp_extension.load(
                name=LIBRARY_NAME,
                sources=[os.path.join(KERNEL_DIR, s) for s in SOURCES],
                extra_cxx_cflags=CXX_FLAGS,
                extra_ldflags=_link_flags(),
                build_directory=build_dir,
                verbose=False,
            )
    except Exception as err:
        with open(log_path, encoding="utf-8", errors="replace") as f:
            tail = f.read()[-2000:]
        raise RuntimeError(f"{err} (build log {log_path}): {tail}") from None


def _load_or_build() -> KernelLibrary:
    build_dir = os.path.join(cache_root(), build_key())
    library = _library_path(build_dir)
    if not os.path.isfile(library):
        if find_compiler() is None:
            raise RuntimeError(f"no C++ compiler found (CXX={os.environ.get('CXX', 'c++')!r})")
        os.makedirs(cache_root(), exist_ok=True)
        with _file_lock(build_dir + ".lock"):
            if not os.path.isfile(library):  # another process may have built it while we waited
                # Build beside, then rename: a build killed half-way never leaves a library to load.
                staging = f"{build_dir}.building{os.getpid()}"
                shutil.rmtree(staging, ignore_errors=True)
                _build(staging)
                shutil.rmtree(build_dir, ignore_errors=True)
                os.replace(staging, build_dir)
                _REGISTERED.add(library)  # registered from the staging path by the build
    if library not in _REGISTERED:
        from paddle.utils.cpp_extension.extension_utils import load_op_meta_info_and_register_op

        load_op_meta_info_and_register_op(library)
        _REGISTERED.add(library)
    return KernelLibrary(library)


def load_cpu_kernels() -> Optional[KernelLibrary]:
    """The custom kernels, built on first use; None (after one warning line) when they cannot be built."""
    if not _STATE["tried"]:
        _STATE["tried"] = True
        try:
            _STATE["library"] = _load_or_build()
        except Exception as err:  # any build or load failure means: run the plain Paddle ops
            _STATE["error"] = f"{type(err).__name__}: {err}"
            first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            logger.warning("paddle_megatronbert: custom CPU kernels unavailable (%s); using plain Paddle ops",
                           first_line[:300])
    return _STATE["library"]


def reset_for_tests() -> None:
    """Forget the loaded state so the next :func:`load_cpu_kernels` tries again (tests only: the ops
    stay registered in this process)."""
    _STATE.update(library=None, tried=False, error=None)
