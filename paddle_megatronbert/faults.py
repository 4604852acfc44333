"""What a cluster throws at a training run, and how a run survives it: preemption, a second job on the same
``--output_dir``, a resume into different inputs, a divergent update, a full disk, and temporaries left by a crash.

Every runner's loop uses the same pieces, in this order::

    @releasing_output_dir_locks                        # released when the loop returns or raises
    def train(...):
        hold_output_dir(output_dir, topo)              # one run per directory; a killed run's leftovers removed
        fingerprint = run_fingerprint(batches.fingerprint(), seed=..., topo=topo, config=config.to_dict())
        check_resume_fingerprint(saved_state.get("fingerprint"), fingerprint, checkpoint_dir)
        with PreemptionHandler() as preemption:
            ...step...
            stop = any_rank(preemption.requested)      # the loop's own all-reduce of its stop flags
            if save_now or stop:
                check_finite_parameters(model, step, topo, last_good=...)
                guarded_save(save, output_dir, step)
            if stop:
                raise Preempted(step, checkpoint)       # the runner exits with EXIT_PREEMPTED

Nothing here imports the model, the training loop or the checkpoint writer: the loop calls in, not out.
"""

from __future__ import annotations

import atexit
import functools
import hashlib
import json
import os
import re
import shutil
import signal
import socket
import sys
import time
from typing import Any, Callable, Dict, List, Optional, Sequence

# sysexits.h's EX_TEMPFAIL ("a temporary failure; the user is invited to retry"): the run was stopped by
# SIGTERM/SIGINT, wrote a checkpoint at the step it was in, and the same command resumes it. Distinct from 0
# (finished), 1 (a crash with a traceback) and 2 (a refused input or an I/O error, one line on stderr).
EXIT_PREEMPTED = 75
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
LOCK_FILE = "run.lock"
# How much of each input file the fingerprint hashes: an HDF5 shard's superblock and object headers (its
# layout: keys, shapes, dtypes) and the start of its data; hashing whole shards would read the data set twice.
HEADER_BYTES = 64 * 1024
# Config fields that do not decide the numbers, or that the grid fields already name.
_CONFIG_KEYS_NOT_FINGERPRINTED = ("tensor_parallel_degree", "recompute", "architectures")
# Temporaries the checkpoint writers and atomic text writes leave when killed: `checkpoint-12.tmp`,
# `latest.tmp.4711`, `metrics.jsonl.tmp.4711`: any `NAME.tmp` or `NAME.tmp.PID` entry.
_TEMPORARY = re.compile(r".+\.tmp(\.\d+)?")


# ---- preemption -----------------------------------------------------------------------------------
class Preempted(Exception):
    """Raised by a loop after it wrote the checkpoint of a signal-requested stop; the runner catches it and
    exits with :data:`EXIT_PREEMPTED` (no traceback).

    Args:
        step: the step the checkpoint holds.
        checkpoint: its directory.
        signal_name: the signal that asked for the stop (``SIGTERM``, ``SIGINT``).
    """

    exit_code = EXIT_PREEMPTED

    def __init__(self, step: int, checkpoint: str, signal_name: str = "SIGTERM"):
        self.step, self.checkpoint, self.signal_name = step, checkpoint, signal_name
        super().__init__(f"stopped by {signal_name}: checkpoint {checkpoint} holds step {step}; rerun the same "
                         f"command to resume (exit code {EXIT_PREEMPTED})")


class PreemptionHandler:
    """Turns SIGTERM/SIGINT into a request to stop at the next step boundary, with a checkpoint.

    The first signal sets :attr:`requested` and prints one line; every later one (Paddle's launcher sends
    SIGTERM up to three times 0.2 s apart, a user presses Ctrl-C twice) is absorbed, so the checkpoint
    being written is never abandoned half-way. The loop reads :attr:`requested` once per step and agrees on
    it over all ranks (one all-reduce, which it already does for its other stop conditions), so every rank
    takes part in the same save. A context manager: the previous handlers come back on exit (unless a stop
    was requested: see :meth:`restore`).

    Args:
        signals: the signals that ask for a stop.
        announce: print the one line on the first signal (the main rank).
    """

    def __init__(self, signals: Sequence[int] = STOP_SIGNALS, announce: bool = True):
        self.signals = tuple(signals)
        self.announce = announce
        self.requested = False
        self.signal_name: Optional[str] = None
        self.count = 0
        self._previous: Dict[int, Any] = {}

    def install(self) -> "PreemptionHandler":
        for sig in self.signals:
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (a loop run from a test thread): no signals reach it anyway
                pass
        return self

    def _handle(self, signum, frame) -> None:
        self.count += 1
        if self.requested:
            return  # absorbed: the stop is already under way
        self.requested = True
        self.signal_name = signal.Signals(signum).name
        if self.announce:
            # os.write, not print: a print inside a signal handler can interrupt another print of this thread
            # and raise "reentrant call" on the buffered stdout.
            os.write(sys.stdout.fileno() if _has_fileno(sys.stdout) else 1,
                     f"{self.signal_name}: finishing this step, writing a checkpoint, then exiting with code "
                     f"{EXIT_PREEMPTED} (further signals are ignored)\n".encode())

    def restore(self) -> None:
        """The previous handlers back, unless a stop was requested: then the signals are ignored from here
        on, so the launcher's later ones cannot kill the process on its way to exiting with
        :data:`EXIT_PREEMPTED` (Python resets its own handlers to the default, "terminate", while it shuts
        down; an ignored signal it leaves alone)."""
        for sig, previous in self._previous.items():
            signal.signal(sig, signal.SIG_IGN if self.requested else previous)
        self._previous = {}

    def __enter__(self) -> "PreemptionHandler":
        return self.install()

    def __exit__(self, *exc) -> None:
        self.restore()


def _has_fileno(stream) -> bool:
    try:
        stream.fileno()
        return True
    except (AttributeError, OSError, ValueError):  # pytest's captured stdout has none
        return False


# ---- the output-directory lock ------------------------------------------------------------------------
class OutputDirInUseError(OSError):
    """Another live run holds ``--output_dir``'s lock."""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        return True
    return True


# Locks this process holds, by directory: a run that ended in an exception without releasing its lock (a test
# calling a runner's main() in process) must not lock the next run in this process out; at exit all are released.
_HELD: Dict[str, "OutputDirLock"] = {}


@atexit.register
def _release_all() -> None:
    for lock in list(_HELD.values()):
        lock.release()


class OutputDirLock:
    """One run per ``--output_dir``: ``<output_dir>/run.lock`` holds the host, pid and start time of the run
    that owns the directory, and an ``flock`` on it for as long as that process lives.

    A second run is refused in one line naming the holder while the holder lives. The kernel drops the
    ``flock`` when its process dies (``kill -9``, a node's OOM killer), so a rerun takes the lock over; where
    ``flock`` is not available (some network file systems), a lock whose pid is no longer alive on this host is
    taken over. Under the launcher only the main rank takes it (every rank's writes belong to that one run).

    Args:
        output_dir: the run's directory (created if missing).
        enabled: False on every rank but the main one (acquire/release do nothing there).
    """

    def __init__(self, output_dir: str, enabled: bool = True):
        self.output_dir = output_dir
        self.path = os.path.join(output_dir, LOCK_FILE)
        self.enabled = enabled
        self.previous_holder: Optional[Dict[str, Any]] = None  # a dead run's lock this one took over
        self._fd: Optional[int] = None

    def _read_holder(self) -> Dict[str, Any]:
        try:
            with open(self.path, encoding="utf-8") as f:
                holder = json.load(f)
            return holder if isinstance(holder, dict) else {}
        except (OSError, ValueError):  # being written right now, or not ours
            return {}

    def _refuse(self, holder: Dict[str, Any]) -> None:
        started = holder.get("started")
        since = ""
        if isinstance(started, (int, float)):
            since = time.strftime(" since %Y-%m-%d %H:%M:%S", time.localtime(started))
        raise OutputDirInUseError(
            f"--output_dir {self.output_dir} is in use by another run (pid {holder.get('pid', '?')} on host "
            f"{holder.get('host', '?')}{since}, lock file {self.path}): wait for it, stop it, or use another "
            "--output_dir")

    def acquire(self) -> "OutputDirLock":
        if not self.enabled or self._fd is not None:
            return self
        import fcntl

        os.makedirs(self.output_dir, exist_ok=True)
        stale = _HELD.get(os.path.realpath(self.path))
        if stale is not None:
            stale.release()
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            self._refuse(self._read_holder())
        except OSError:  # no flock here (some NFS mounts): fall back to the pid in the file
            holder = self._read_holder()
            if holder.get("host") != socket.gethostname() or _pid_alive(int(holder.get("pid", 0) or 0)):
                if holder and holder.get("pid") != os.getpid():
                    os.close(fd)
                    self._refuse(holder)
        holder = self._read_holder()
        if holder and holder.get("pid") != os.getpid():
            self.previous_holder = holder
        text = json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "started": time.time()})
        os.ftruncate(fd, 0)
        os.pwrite(fd, text.encode(), 0)
        os.fsync(fd)
        self._fd = fd
        _HELD[os.path.realpath(self.path)] = self
        if self.previous_holder:
            print(f"note: took over {self.path} from a run that is gone (pid {self.previous_holder.get('pid')} on "
                  f"{self.previous_holder.get('host')})", flush=True)
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        _HELD.pop(os.path.realpath(self.path), None)
        try:
            os.remove(self.path)  # before unlocking: a waiting run never sees our stale content
        except OSError:
            pass
        os.close(self._fd)  # drops the flock
        self._fd = None

    def __enter__(self) -> "OutputDirLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def releasing_output_dir_locks(function: Callable) -> Callable:
    """Decorate a training loop: the output-dir locks it takes (:func:`hold_output_dir`) are released when it
    returns or raises, however far it got (a ``kill -9`` leaves a lock file the next run takes over)."""

    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        before = set(_HELD)
        try:
            return function(*args, **kwargs)
        finally:
            for key in set(_HELD) - before:
                _HELD[key].release()

    return wrapper


def hold_output_dir(output_dir: str, topo=None) -> OutputDirLock:
    """Take ``output_dir``'s lock on the main rank and remove what a killed run left there; every rank learns
    whether that worked, so a refused run stops on every rank with the same one line. The loop calling it
    is decorated with :func:`releasing_output_dir_locks` (and at exit every lock is released anyway).
    """
    lock = OutputDirLock(output_dir, enabled=topo is None or getattr(topo, "is_main", True))
    problem = ""
    if lock.enabled:
        try:
            lock.acquire()
            remove_stale_temporaries(output_dir)
        except OutputDirInUseError as err:
            problem = str(err)
    if topo is not None and getattr(topo, "world_size", 1) > 1:
        import paddle
        import paddle.distributed as dist

        refused = paddle.to_tensor([1 if problem else 0], dtype="int64")
        dist.broadcast(refused, src=0)  # also keeps the other ranks from writing before the clean-up ended
        if int(refused.item()) and not problem:
            problem = f"--output_dir {output_dir} is in use by another run (the main rank could not lock it)"
    if problem:
        raise OutputDirInUseError(problem)
    return lock


# ---- leftovers of a crash -------------------------------------------------------------------------------
def is_temporary_name(name: str) -> bool:
    """A name the writers use before their rename (``checkpoint-12.tmp``, ``latest.tmp.4711`` ...)."""
    return bool(_TEMPORARY.fullmatch(name))


def remove_stale_temporaries(output_dir: str, verbose: bool = True) -> List[str]:
    """Remove what killed writers left in ``output_dir`` (and one level down, inside checkpoints); returns
    the removed paths. Call on the main rank while holding the :class:`OutputDirLock` (then no live writer
    owns them) and before the first save."""
    removed = []
    if not os.path.isdir(output_dir):
        return removed
    for directory in [output_dir] + [os.path.join(output_dir, n) for n in sorted(os.listdir(output_dir))
                                     if os.path.isdir(os.path.join(output_dir, n)) and not is_temporary_name(n)]:
        for name in sorted(os.listdir(directory)):
            if not is_temporary_name(name):
                continue
            path = os.path.join(directory, name)
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path, ignore_errors=True)
            else:
                try:
                    os.remove(path)
                except FileNotFoundError:
                    pass
            removed.append(path)
    if removed and verbose:
        print(f"removed {len(removed)} temporary file(s) a stopped run left: "
              f"{', '.join(os.path.relpath(p, output_dir) for p in removed[:5])}"
              f"{' ...' if len(removed) > 5 else ''}", flush=True)
    return removed


# ---- the run fingerprint ----------------------------------------------------------------------------------
def file_fingerprint(path: str, head_bytes: int = HEADER_BYTES) -> Dict[str, Any]:
    """Name, size and the sha256 of the first ``head_bytes`` of a file (an input shard, a training file)."""
    with open(path, "rb") as f:
        head = f.read(head_bytes)
    return {"name": os.path.basename(path), "size": os.path.getsize(path),
            "header_sha256": hashlib.sha256(head).hexdigest()}


def run_fingerprint(data: Optional[Dict[str, Any]] = None, seed: Optional[int] = None, topo=None,
                    config: Optional[Dict[str, Any]] = None, **settings) -> Dict[str, Any]:
    """Everything that decides a run's data order and its model, as JSON for the trainer state.

    Args:
        data: what the batch source says decides its order: ``{"files": [file_fingerprint(path), ...], ...}``
            (``PretrainingDataLoader.fingerprint()``: every shard, and ``max_predictions_per_seq``).
        seed: the run's seed (the data order mid-epoch depends on it).
        topo: the run's topology: world size and the grid degrees (the data each rank reads depends on them).
        config: the model config (``config.to_dict()``); the grid and recompute fields are left out.
        settings: any other value a resume must keep (``batch_size=8`` ...).
    """
    fingerprint: Dict[str, Any] = dict(data or {})
    if seed is not None:
        fingerprint["seed"] = int(seed)
    if topo is not None:
        fingerprint["grid"] = {
            "world_size": int(getattr(topo, "world_size", 1)),
            "tensor_parallel_degree": int(getattr(topo, "tp_degree", 1)),
            "data_parallel_degree": int(getattr(topo, "dp_degree", 1)),
            "sharding_degree": int(getattr(topo, "sharding_degree", 1)),
        }
    if config is not None:
        fingerprint["config"] = {k: v for k, v in sorted(config.items()) if k not in _CONFIG_KEYS_NOT_FINGERPRINTED}
    for name, value in sorted(settings.items()):
        fingerprint[name] = value
    return json.loads(json.dumps(fingerprint))  # exactly what a trainer_state.json round trip gives back


def _files_changes(saved: List[Dict[str, Any]], current: List[Dict[str, Any]]) -> Optional[str]:
    before = {f["name"]: f for f in saved}
    now = {f["name"]: f for f in current}
    parts = []
    gone, new = sorted(set(before) - set(now)), sorted(set(now) - set(before))
    if gone:
        parts.append(f"{_few(gone)} {'is' if len(gone) == 1 else 'are'} gone")
    if new:
        parts.append(f"{_few(new)} {'is' if len(new) == 1 else 'are'} new")
    changed = []
    for name in sorted(set(before) & set(now)):
        a, b = before[name], now[name]
        if a.get("size") != b.get("size"):
            changed.append(f"{name} (size {a.get('size')} -> {b.get('size')} bytes)")
        elif a.get("header_sha256") != b.get("header_sha256"):
            changed.append(f"{name} (header checksum differs)")
    if changed:
        parts.append(f"{_few(changed)} changed")
    return f"the input files changed: {', '.join(parts)}" if parts else None


def _few(items: Sequence[str], limit: int = 3) -> str:
    return ", ".join(items[:limit]) + (f" and {len(items) - limit} more" if len(items) > limit else "")


def fingerprint_mismatches(saved: Dict[str, Any], current: Dict[str, Any]) -> List[str]:
    """One phrase per difference between a checkpoint's fingerprint and this run's (empty: the same run)."""
    problems = []
    if "files" in saved or "files" in current:
        change = _files_changes(saved.get("files", []), current.get("files", []))
        if change:
            problems.append(change)
    saved_grid, grid = saved.get("grid", {}), current.get("grid", {})
    if saved_grid != grid and saved_grid and grid:
        moved = [f"{k} {saved_grid.get(k)} -> {grid.get(k)}" for k in grid if saved_grid.get(k) != grid.get(k)]
        problems.append(f"the world size or grid changed ({', '.join(moved)}): each rank's data and random "
                        "streams depend on it")
    saved_config, config = saved.get("config", {}), current.get("config", {})
    if saved_config and config:
        moved = [f"{k} {saved_config.get(k)!r} -> {config.get(k)!r}" for k in sorted(set(saved_config) | set(config))
                 if saved_config.get(k) != config.get(k)]
        if moved:
            problems.append(f"the model config changed ({_few(moved)})")
    for key in sorted((set(saved) | set(current)) - {"files", "grid", "config"}):
        if key in saved and key in current and saved[key] != current[key]:
            problems.append(f"{key} {saved[key]!r} -> {current[key]!r}")
    return problems


class ResumeMismatchError(ValueError):
    """The checkpoint being resumed was written by a run with other inputs or settings."""


def check_resume_fingerprint(saved: Optional[Dict[str, Any]], current: Dict[str, Any], checkpoint_dir: str) -> None:
    """:class:`ResumeMismatchError` in one line naming everything that changed since ``checkpoint_dir`` was
    written. A checkpoint without a fingerprint (written before there was one) resumes with a note."""
    if not saved:
        print(f"note: {checkpoint_dir} has no run fingerprint (an older checkpoint): the inputs and settings "
              "cannot be compared", file=sys.stderr, flush=True)
        return
    problems = fingerprint_mismatches(saved, current)
    if problems:
        raise ResumeMismatchError(
            f"cannot resume from {checkpoint_dir}: {'; '.join(problems)}. Rerun with the checkpoint's inputs and "
            "settings, or start a new run (--overwrite_output_dir, or another --output_dir)")


# ---- finiteness of the updated parameters ------------------------------------------------------------------
class NonFiniteParametersError(ValueError):
    """An optimizer update made parameters NaN or infinite; raised before that state is saved."""


def nonfinite_parameter_names(model) -> List[str]:
    """The names of this rank's parameters holding a NaN or an infinity (the slow, naming pass)."""
    import paddle

    return [name for name, p in model.named_parameters() if not bool(paddle.isfinite(p).all())]


def parameters_are_finite(model, topo=None) -> bool:
    """One fused pass: ``sum(p * 0)`` over every parameter is 0 unless one holds a NaN or an infinity (never
    overflows, whatever the weights' size); all ranks agree (tensor-parallel shards differ)."""
    import paddle

    params = [p for p in model.parameters()]
    if not params:
        return True
    total = paddle.add_n([(p.astype("float32") * 0).sum() for p in params])
    bad = paddle.cast(~paddle.isfinite(total), "int64").reshape([1])
    if topo is not None and getattr(topo, "world_size", 1) > 1:
        import paddle.distributed as dist

        dist.all_reduce(bad, op=dist.ReduceOp.MAX)
    return not bool(bad.item())


def check_finite_parameters(model, step: int, topo=None, last_good: Optional[str] = None) -> None:
    """:class:`NonFiniteParametersError` (one line) when the update of ``step`` made parameters non-finite, so
    the loop saves nothing: ``last_good`` (the newest checkpoint, if any) stays the one a rerun resumes from.
    Every rank calls it (it all-reduces)."""
    with _no_grad():
        if parameters_are_finite(model, topo):
            return
        names = nonfinite_parameter_names(model)
    total = sum(1 for _ in model.parameters())
    keep = f"the newest checkpoint, {last_good}, is the last good one" if last_good else "no checkpoint was written"
    which = f"{len(names)} of {total} parameter tensors on this rank" + (f", e.g. {names[0]}" if names else "")
    raise NonFiniteParametersError(
        f"the update of step {step} made the parameters non-finite ({which}); stopped without saving: {keep}. "
        "Lower --learning_rate, lengthen the warm-up or check the data")


def _no_grad():
    import paddle

    return paddle.no_grad()


# ---- I/O errors on save ---------------------------------------------------------------------------------
class CheckpointSaveError(OSError):
    """Writing a checkpoint failed (a full disk, a lost mount, a quota); its temporaries were removed."""


def guarded_save(save: Callable[[], Any], output_dir: str, step: int, checkpoint_dir: Optional[str] = None,
                 last_good: Optional[str] = None):
    """Run ``save()`` (which writes checkpoint ``step``); on an ``OSError`` remove that save's temporaries
    (``checkpoint-<step>.tmp``, ``*.tmp.PID``) and raise one :class:`CheckpointSaveError` line naming the
    checkpoint, the file and the cause, and the checkpoint a rerun resumes from (left as it was).

    Args:
        save: writes the checkpoint; its return value is returned.
        output_dir: where the run's checkpoints live.
        step: the step being saved.
        checkpoint_dir: the directory being written (default ``<output_dir>/checkpoint-<step>``).
        last_good: the newest complete checkpoint before this save (None: none).
    """
    target = checkpoint_dir or os.path.join(output_dir, f"checkpoint-{step}")
    try:
        return save()
    except OSError as err:
        if isinstance(err, CheckpointSaveError):
            raise
        _remove_own_temporaries(output_dir, target)
        cause = err.strerror or str(err) or type(err).__name__
        file_part = f" writing {err.filename}" if getattr(err, "filename", None) else ""
        keep = f"{last_good} is unchanged and a rerun resumes from it" if last_good else "no earlier checkpoint exists"
        raise CheckpointSaveError(
            err.errno, f"saving checkpoint {target} (step {step}) failed{file_part}: {cause}; its temporary files were "
            f"removed, {keep}. Free space (or fix {output_dir}) and rerun the same command") from None


def _remove_own_temporaries(output_dir: str, target: str) -> None:
    candidates = [target + ".tmp"]
    pid = str(os.getpid())
    for directory in (output_dir, target):
        if os.path.isdir(directory):
            candidates += [os.path.join(directory, n) for n in os.listdir(directory)
                           if is_temporary_name(n) and (n.endswith(".tmp." + pid) or n.endswith(".tmp"))]
    for path in candidates:
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)
        elif os.path.lexists(path):
            try:
                os.remove(path)
            except OSError:
                pass
