"""What a run prints: the project's lines and real problems, not the libraries' start-up chatter.

The sources of noise, each handled here once:

* warnings that Paddle and setuptools raise on every start (``No ccache found`` when ``paddle`` is imported,
  ``Setuptools is replacing distutils`` when ``paddle.utils.cpp_extension`` imports setuptools): filtered by
  message, before paddle is imported (:func:`quiet_third_party_output`, called by the package's
  ``__init__``), so they never appear and a user's own warnings are untouched; Paddle's C++ INFO lines
  (glog) likewise;
* PaddleNLP's coloured log lines (``colorlog``): plain when stderr is not a terminal, so log files under
  ``paddle.distributed.launch`` hold no ANSI escape codes (``colorlog`` honours ``NO_COLOR``);
* progress bars: a bar on a terminal, at most one plain line per ``interval`` seconds elsewhere, because
  tqdm writes a carriage-return update per refresh that becomes one line per update in a log file
  (:func:`progress`).
"""

from __future__ import annotations

import os
import sys
import time
import warnings
from typing import Iterable, Iterator, Optional, TypeVar

T = TypeVar("T")

# (message regex, category): warnings about the libraries' own build tooling, never about the user's run.
THIRD_PARTY_NOISE = (
    # paddle.utils.cpp_extension at import: recompilation caching; the kernel loader caches builds by hash.
    (r"No ccache found", UserWarning),
    # setuptools' distutils shim when paddle's cpp_extension imports setuptools after distutils.
    (r"Setuptools is replacing distutils", UserWarning),
)
PROGRESS_INTERVAL_S = 30.0


def quiet_third_party_output() -> None:
    """Ignore the warnings in :data:`THIRD_PARTY_NOISE`, keep Paddle's C++ INFO lines out (its warnings and
    errors stay), and drop colour codes from log lines when stderr is not a terminal. Idempotent; call before
    ``import paddle``. Settings the user made in the environment win."""
    for message, category in THIRD_PARTY_NOISE:
        warnings.filterwarnings("ignore", message=message, category=category)
    # glog INFO: "I1202 ... tcp_store.cc] create libuv server", "Successfully connected to ..." on every start
    # of a distributed run. glog reads the variable when Paddle's core library loads.
    os.environ.setdefault("GLOG_minloglevel", "1")
    if not _is_terminal(sys.stderr):
        os.environ.setdefault("NO_COLOR", "1")  # colorlog (PaddleNLP's logger) reads it at every record


def _is_terminal(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # replaced or closed streams
        return False


def progress(iterable: Iterable[T], desc: str, total: Optional[int] = None, enabled: bool = True,
             interval: float = PROGRESS_INTERVAL_S) -> Iterator[T]:
    """``iterable`` with progress shown on stderr: a tqdm bar on a terminal; otherwise a plain
    ``desc: n/total (p%), elapsed Ns`` line at most every ``interval`` seconds (none for a loop shorter than
    that); nothing when not ``enabled`` (e.g. ranks other than 0)."""
    if not enabled:
        yield from iterable
        return
    if total is None and hasattr(iterable, "__len__"):
        total = len(iterable)
    if _is_terminal(sys.stderr):
        from tqdm import tqdm

        yield from tqdm(iterable, desc=desc, total=total)
        return
    started = last = time.time()
    for count, item in enumerate(iterable, 1):
        yield item
        now = time.time()
        if now - last >= interval:
            last = now
            done = f"{count}/{total} ({100.0 * count / total:.0f}%)" if total else f"{count}"
            print(f"{desc}: {done}, elapsed {now - started:.0f}s", file=sys.stderr, flush=True)
