"""Fault injection: run_pretrain.py killed with SIGKILL at seeded random points, each time resumed by running
the same command again, must end on the loss trajectory of an uninterrupted run, bit for bit (CPU, dropout
on), and must never leave a half-written checkpoint where a resume could pick it up.

The kill points (the plan comes from a seeded RNG; where a kill lands inside a step is up to the clock):
- ``step``: a random delay after a random step's log line: inside a forward/backward/optimizer step;
- ``save``: a random delay after the log line of a checkpointing step: mostly inside the checkpoint write;
- ``hook``: inside the save of a checkpointing step, after its files are written and before the rename
  (``MEGATRONBERT_TEST_PAUSE_IN_SAVE`` holds it there), so some kills certainly land mid-save;
- ``startup``: 0.2-1.5 s after launch, inside start-up (imports, argument checks) before any step runs.
Hook kills come first in the plan, while save steps still lie ahead of the resumed run.

After every kill the output directory is audited: only complete checkpoints under final names (every file
byte-identical to the uninterrupted run's checkpoint of the same step, and loadable: model + optimizer),
``latest`` naming one of them, and a metrics log whose every record equals the uninterrupted run's.
"""

import json
import os
import pickle
import queue
import random
import re
import signal
import subprocess
import sys
import threading
import time

import pytest

from helpers.tiny_pretraining import REPO, pretrain_argv, shared_tiny_pretraining_data, subprocess_env

TOTAL_STEPS = 36
SAVE_STEPS = 3
KILL_KINDS = ["hook"] * 3 + ["save"] * 4 + ["step"] * 3 + ["startup"] * 2  # 12 kills
SEED = 20260508
ATTEMPT_TIMEOUT_S = 90
CHECKPOINT_FILES = {"config.json", "model_state.pdparams", "optimizer.tp00.sd00.pdopt", "rng_state.rank0000.pkl",
                    "trainer_state.json", "vocab.txt"}
# Everything a kill may leave in the output directory: final names, and the temporary names the runner
# writes under before renaming (a checkpoint directory, `latest` and the rewritten metrics log).
ALLOWED_NAMES = re.compile(r"checkpoint-\d+|checkpoint-\d+\.tmp|latest|latest\.tmp\.\d+|metrics\.jsonl"
                           r"|metrics\.jsonl\.tmp\.\d+")
# The per-step values a resumed run must reproduce exactly (throughput fields depend on the clock).
DETERMINISTIC_KEYS = ("step", "max_steps", "epoch", "loss", "mlm_loss", "nsp_loss", "lr")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return shared_tiny_pretraining_data(tmp_path_factory)


class Run:
    """One launch of run_pretrain.py with its stdout read line by line on a thread (so waits can time out).

    Args:
        command: the argv to launch.
        env: its environment.
    """

    def __init__(self, command, env):
        self.started = time.time()
        self.proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True)
        self.lines, self._queue = [], queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self):
        for line in self.proc.stdout:
            self._queue.put(line)
        self._queue.put(None)

    def wait_for_line(self, predicate, timeout=ATTEMPT_TIMEOUT_S) -> str:
        deadline = time.time() + timeout
        while time.time() < deadline:
            try:
                line = self._queue.get(timeout=max(0.01, deadline - time.time()))
            except queue.Empty:
                break
            if line is None:
                raise AssertionError(f"run ended (rc {self.proc.wait()}) before the awaited line:\n{self.tail()}")
            self.lines.append(line)
            if predicate(line):
                return line
        raise AssertionError(f"no awaited line within {timeout}s:\n{self.tail()}")

    def kill(self) -> int:
        self.proc.send_signal(signal.SIGKILL)  # kill -9: no handler runs, nothing is cleaned up
        rc = self.proc.wait()
        self._reader.join(timeout=10)
        return rc

    def finish(self) -> int:
        rc = self.proc.wait(timeout=ATTEMPT_TIMEOUT_S)
        self._reader.join(timeout=10)
        while not self._queue.empty():
            line = self._queue.get()
            if line is not None:
                self.lines.append(line)
        return rc

    def tail(self, n=30) -> str:
        return "".join(self.lines[-n:])


def step_line(step):
    return lambda line: line.startswith(f"step {step}/")


def read_metrics(output_dir):
    """(records, cut): the metrics log's records, and whether its last line was cut by the kill."""
    path = os.path.join(output_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        return [], False
    with open(path, encoding="utf-8") as f:
        text = f.read()
    lines = text.split("\n")
    records, cut = [], False
    for number, line in enumerate(lines):
        if not line:
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            # Only the very last line may be unfinished (the kill landed inside its write).
            assert number == len(lines) - 1, f"metrics.jsonl line {number + 1} is not JSON: {line!r}"
            cut = True
    return records, cut


def checkpoint_step(name):
    match = re.fullmatch(r"checkpoint-(\d+)", name)
    return int(match.group(1)) if match else None


def file_bytes(path):
    with open(path, "rb") as f:
        return f.read()


class Auditor:
    """Checks an output directory against the uninterrupted run's (``reference``): called at every kill point.

    Args:
        reference: the uninterrupted run's output directory (checkpoints every SAVE_STEPS steps and at the end).
        data: the run's inputs (the model config for the load check).
    """

    def __init__(self, reference, data):
        self.reference = reference
        self.reference_records = {r["step"]: r for r in read_metrics(reference)[0]}
        self.loaded_steps = set()
        self._data = data
        self._bytes = {}

    def reference_file(self, step, name):
        key = (step, name)
        if key not in self._bytes:
            self._bytes[key] = file_bytes(os.path.join(self.reference, f"checkpoint-{step}", name))
        return self._bytes[key]

    def load(self, checkpoint_dir):
        """Resume's own loader on a fresh model and optimizer: model strictly, then the optimizer state."""
        from paddle_megatronbert import MegatronBertConfig, MegatronBertForPreTraining
        from paddle_megatronbert.training import build_optimizer, linear_warmup_decay, load_checkpoint

        model = MegatronBertForPreTraining(MegatronBertConfig.from_pretrained(self._data.config))
        schedule = linear_warmup_decay(2e-3, TOTAL_STEPS, 5)
        optimizer = build_optimizer(model, schedule)
        state = load_checkpoint(checkpoint_dir, model, optimizer, schedule, restore_rng=False)
        with open(os.path.join(checkpoint_dir, "rng_state.rank0000.pkl"), "rb") as f:
            assert set(pickle.load(f)) >= {"python", "numpy", "paddle_cpu"}
        moments = [k for k in optimizer.state_dict() if k.endswith("_moment1_0")]
        assert len(moments) == len(model.parameters()), checkpoint_dir  # every AdamW moment came back
        return state

    def check_directory(self, output_dir, context):
        from paddle_megatronbert.training import latest_checkpoint

        names = sorted(os.listdir(output_dir))
        stray = [n for n in names if not ALLOWED_NAMES.fullmatch(n)]
        assert not stray, f"{context}: unexpected entries {stray} in {names}"
        complete = sorted(s for s in map(checkpoint_step, names) if s is not None)
        for step in complete:
            directory = os.path.join(output_dir, f"checkpoint-{step}")
            files = set(os.listdir(directory))
            assert files == CHECKPOINT_FILES, f"{context}: checkpoint-{step} holds {sorted(files)}"
            for name in sorted(files):
                same = file_bytes(os.path.join(directory, name)) == self.reference_file(step, name)
                assert same, f"{context}: checkpoint-{step}/{name} differs from the uninterrupted run's"
            if step not in self.loaded_steps:  # the bytes equal the reference's: loading once per step is enough
                assert self.load(directory)["global_step"] == step
                self.loaded_steps.add(step)
        latest = latest_checkpoint(output_dir)  # raises unless `latest` names a complete checkpoint
        if complete:
            assert latest is not None, f"{context}: checkpoints {complete} but no `latest`"
        if latest is not None:
            assert checkpoint_step(os.path.basename(latest)) in complete, f"{context}: latest -> {latest}"
        return complete, latest

    def check_metrics(self, output_dir, context):
        records, cut = read_metrics(output_dir)
        steps = [r["step"] for r in records]
        assert steps == list(range(1, len(steps) + 1)), f"{context}: metrics.jsonl steps {steps}"
        for record in records:
            expected = self.reference_records[record["step"]]
            for key in DETERMINISTIC_KEYS:
                assert record[key] == expected[key], (
                    f"{context}: step {record['step']} {key} {record[key]!r} != uninterrupted {expected[key]!r}")
        return steps, cut


def resumed_step(output_dir):
    from paddle_megatronbert.training import latest_checkpoint, read_trainer_state

    latest = latest_checkpoint(output_dir) if os.path.isdir(output_dir) else None
    return int(read_trainer_state(latest)["global_step"]) if latest else 0


def next_save_step(after, rng):
    """One of the next three checkpointing steps after ``after`` (never the final save)."""
    first = (after // SAVE_STEPS + 1) * SAVE_STEPS
    candidates = [s for s in range(first, first + 3 * SAVE_STEPS, SAVE_STEPS) if s < TOTAL_STEPS]
    return rng.choice(candidates) if candidates else None


def landing(output_dir, started, latest_step, logged):
    """Where the kill landed, read from what it left behind (a ``.tmp`` directory of a step this attempt
    logged and created: inside that save; a final name newer than ``latest``: between rename and pointer)."""
    for name in os.listdir(output_dir):
        match = re.fullmatch(r"checkpoint-(\d+)\.tmp", name)
        path = os.path.join(output_dir, name)
        if match and int(match.group(1)) in logged and os.stat(path).st_ctime >= started:
            written = os.path.isfile(os.path.join(path, "trainer_state.json"))  # the save's last file
            phase = "files written, before the rename" if written else "writing files"
            return f"mid-save of {match.group(1)} ({phase})"
    newer = [s for s in map(checkpoint_step, os.listdir(output_dir)) if s is not None and s > latest_step]
    if newer:
        return f"between the rename of checkpoint-{max(newer)} and the update of `latest`"
    if not logged:
        return "before the first step (start-up, checkpoint load or metrics log truncation)"
    return f"between saves (last logged step {logged[-1]})"


def test_sigkill_at_random_points_resumes_to_the_uninterrupted_trajectory(data, tmp_path):
    reference, output = tmp_path / "uninterrupted", tmp_path / "killed"
    command = [sys.executable, "-u", os.path.join(REPO, "run_pretrain.py"),
               *pretrain_argv(data, "{out}", max_steps=TOTAL_STEPS, save_steps=SAVE_STEPS)]

    def launch(output_dir, **env):
        return Run([str(output_dir) if a == "{out}" else a for a in command], subprocess_env(**env))

    straight = launch(reference)
    assert straight.finish() == 0, straight.tail()
    auditor = Auditor(str(reference), data)
    assert sorted(auditor.reference_records) == list(range(1, TOTAL_STEPS + 1))
    assert len({auditor.reference_records[s]["loss"] for s in range(1, TOTAL_STEPS + 1)}) == TOTAL_STEPS

    rng = random.Random(SEED)
    kinds = list(KILL_KINDS)
    rng.shuffle(kinds)
    # Hook kills first, while save steps lie ahead: late in the run they would turn into step kills.
    kinds.sort(key=lambda kind: kind != "hook")
    journal = []  # one line per kill: the plan, where it landed, what survived
    logged_by_attempt = []
    for number, kind in enumerate(kinds, 1):
        start_step = resumed_step(str(output))
        if start_step >= TOTAL_STEPS - 2:
            kind = "startup"  # no step left to aim at before the final save
        target = next_save_step(start_step, rng) if kind in ("save", "hook") else None
        if kind in ("save", "hook") and target is None:
            kind = "step"  # too near the end for another intermediate save
        if kind == "step":
            target = min(TOTAL_STEPS - 2, start_step + rng.randint(1, 6))
        env = {"MEGATRONBERT_TEST_PAUSE_IN_SAVE": f"{target}:60"} if kind == "hook" else {}
        run = launch(output, **env)
        if kind == "startup":
            time.sleep(rng.uniform(0.2, 1.5))  # paddle alone takes ~2 s to import: still in start-up
        elif kind == "hook":
            run.wait_for_line(lambda line: line.startswith(f"[test hook] pausing 60s inside the save of step {target}"))
        else:
            run.wait_for_line(step_line(target))
            time.sleep(rng.uniform(0.0, 0.06 if kind == "save" else 0.04))
        rc = run.kill()
        assert rc == -signal.SIGKILL, f"kill {number} ({kind}): the run was not killed (rc {rc}):\n{run.tail()}"
        context = f"after kill {number} ({kind}, resumed at {start_step}, target {target})"
        logged = [int(m.group(1)) for m in (re.match(r"step (\d+)/", line) for line in run.lines) if m]
        assert not logged or logged[0] == start_step + 1, f"{context}: first logged step {logged[0]}"
        steps, cut = auditor.check_metrics(str(output), context)
        complete, latest = auditor.check_directory(str(output), context)
        latest_step = checkpoint_step(os.path.basename(latest)) if latest else 0
        journal.append(f"{number:2d} {kind:7s} from {start_step:2d} target {target}: "
                       f"{landing(str(output), run.started, latest_step, logged)}; latest {latest_step}, "
                       f"log to step {steps[-1] if steps else 0}{' + a cut line' if cut else ''}")
        logged_by_attempt.append(logged)
    report = "\n".join(journal)
    assert len(journal) == len(KILL_KINDS) >= 10
    assert sum("mid-save" in line for line in journal) >= 3, report
    assert sum("mid-save" not in line for line in journal) >= 2, report
    assert len({step for logged in logged_by_attempt for step in logged}) >= TOTAL_STEPS // 2, report

    final = launch(output)
    assert final.finish() == 0, final.tail()
    complete, latest = auditor.check_directory(str(output), "after the final resume")
    assert latest == str(output / f"checkpoint-{TOTAL_STEPS}"), report
    assert complete == list(range(SAVE_STEPS, TOTAL_STEPS, SAVE_STEPS)) + [TOTAL_STEPS], report
    # every save clears its own step's leftover, and the final run passed every step again
    assert not [n for n in os.listdir(output) if n.endswith(".tmp")], sorted(os.listdir(output))
    steps, cut = auditor.check_metrics(str(output), "after the final resume")
    assert steps == list(range(1, TOTAL_STEPS + 1)) and not cut, report
    # Every step each killed attempt logged was a step of the uninterrupted trajectory (checked record by
    # record above, before the next resume dropped the records past its checkpoint), and so is the final log.
    final_logged = [line for line in final.lines if re.match(r"step \d+/", line)]
    redone = sum(len(logged) for logged in logged_by_attempt) + len(final_logged) - TOTAL_STEPS
    print(f"{len(journal)} kills, {redone} steps redone after resumes:\n{report}")
