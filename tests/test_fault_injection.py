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

Then the faults a cluster throws (``paddle_megatronbert/faults.py``), each on real runner processes:
SIGTERM x3 at 0.2 s to ``paddle.distributed.launch --nproc_per_node 2 run_pretrain.py`` and to ``run_squad.py``
(a checkpoint at the current step, exit code 75, no traceback, the rerun on the uninterrupted trajectory); a
second run on a live run's ``--output_dir`` (refused), the lock taken over after ``kill -9``; resumes with other
shards, predictions per sequence, seed or world size (refused, naming what changed); a 3 MB tmpfs filling up
mid-save (the error names the checkpoint, nothing temporary stays, the rerun resumes exactly); a divergent
update (never saved).
"""

import json
import os
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
KILL_KINDS = ["hook"] * 3 + ["save"] * 3 + ["step"] * 2 + ["startup"] * 1  # 9 kills (the suite's time budget)
SEED = 20260508
ATTEMPT_TIMEOUT_S = 90
CHECKPOINT_FILES = {"config.json", "model.safetensors", "optimizer.tp00.sd00.safetensors", "rng_state.rank0000.json",
                    "trainer_state.json", "vocab.txt"}
# Everything a kill may leave in the output directory: final names, and the temporary names the runner
# writes under before renaming (a checkpoint directory, `latest` and the rewritten metrics log).
ALLOWED_NAMES = re.compile(r"checkpoint-\d+|checkpoint-\d+\.tmp|latest|latest\.tmp\.\d+|metrics\.jsonl"
                           r"|metrics\.jsonl\.tmp\.\d+|run\.lock")
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
        with open(os.path.join(checkpoint_dir, "rng_state.rank0000.json"), encoding="utf-8") as f:
            assert set(json.load(f)) >= {"python", "numpy", "paddle_cpu"}
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
    assert len(journal) == len(KILL_KINDS) >= 9
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


# ---- the faults a cluster throws: preemption, a second run, a changed resume, a full disk, divergence ------
LAUNCH_TIMEOUT_S = 120
SHORT_STEPS = 12


def pretrain_command(data, output_dir, *extra, max_steps=SHORT_STEPS, save_steps=1000, launcher_log=None):
    """run_pretrain.py as a user starts it: alone, or under ``paddle.distributed.launch`` with 2 processes."""
    argv = pretrain_argv(data, output_dir, *extra, max_steps=max_steps, save_steps=save_steps)
    if launcher_log is None:
        return [sys.executable, "-u", os.path.join(REPO, "run_pretrain.py"), *argv]
    return [sys.executable, "-m", "paddle.distributed.launch", "--nproc_per_node", "2", "--log_dir", str(launcher_log),
            os.path.join(REPO, "run_pretrain.py"), *argv]


def run_to_end(command, timeout=LAUNCH_TIMEOUT_S):
    return subprocess.run(command, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=timeout)


def wait_for_record(output_dir, step, proc, timeout=LAUNCH_TIMEOUT_S):
    """Poll ``metrics.jsonl`` until it holds ``step`` (rank 0 writes it as it logs)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        records, _ = read_metrics(str(output_dir))
        if records and records[-1]["step"] >= step:
            return records[-1]["step"]
        assert proc.poll() is None, f"the run ended (rc {proc.returncode}) before step {step}"
        time.sleep(0.02)
    raise AssertionError(f"no step {step} within {timeout}s")


def deterministic(records):
    return [{k: r[k] for k in DETERMINISTIC_KEYS} for r in records]


def error_line(proc):
    """The one line a refused run prints (stderr, ``error: ...``)."""
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert proc.returncode == 2 and len(lines) == 1, (proc.returncode, proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    return lines[0]


def test_sigterm_three_times_to_the_launcher_saves_the_current_step_and_resumes_exactly(data, tmp_path):
    from paddle_megatronbert.faults import EXIT_PREEMPTED
    from paddle_megatronbert.training import latest_checkpoint, read_trainer_state

    reference, output = tmp_path / "uninterrupted", tmp_path / "preempted"
    straight = run_to_end(pretrain_command(data, reference, launcher_log=tmp_path / "log_ref"))
    assert straight.returncode == 0, straight.stderr[-3000:]
    expected = deterministic(read_metrics(str(reference))[0])
    assert [r["step"] for r in expected] == list(range(1, SHORT_STEPS + 1))

    command = pretrain_command(data, output, launcher_log=tmp_path / "log")
    launcher = subprocess.Popen(command, cwd=REPO, env=subprocess_env(), stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
    seen = wait_for_record(output, 2, launcher)
    for _ in range(3):  # what SLURM / Kubernetes preemption does to the launcher
        launcher.send_signal(signal.SIGTERM)
        time.sleep(0.2)
    launcher_out, _ = launcher.communicate(timeout=LAUNCH_TIMEOUT_S)
    assert launcher.returncode != 0, launcher_out[-3000:]
    saved = read_trainer_state(latest_checkpoint(str(output)))["global_step"]
    records, cut = read_metrics(str(output))
    assert seen <= saved < SHORT_STEPS and records[-1]["step"] == saved and not cut  # the step it was in
    for rank in (0, 1):
        log = (tmp_path / "log" / f"workerlog.{rank}").read_text(errors="replace")
        assert "Traceback" not in log and "KeyboardInterrupt" not in log, log[-3000:]
        assert (f"stopped by SIGTERM: checkpoint {output}/checkpoint-{saved} holds step {saved}; rerun the same "
                f"command to resume (exit code {EXIT_PREEMPTED})") in log, log[-2000:]
    assert not [n for n in os.listdir(output) if ".tmp" in n], os.listdir(output)

    resumed = run_to_end(command)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert deterministic(read_metrics(str(output))[0]) == expected

    # The same checkpoint resumed by one process instead of two: refused, naming the world size.
    line = error_line(run_to_end(pretrain_command(data, output, max_steps=SHORT_STEPS + 2)))
    assert "world_size 2 -> 1" in line and "data_parallel_degree 2 -> 1" in line, line


def test_a_live_runs_output_dir_is_refused_taken_over_after_kill_9_and_a_changed_resume_refused(data, tmp_path):
    from paddle_megatronbert.faults import LOCK_FILE

    output = tmp_path / "shared"
    command = pretrain_command(data, output, max_steps=200, save_steps=2)
    first = Run(command, subprocess_env())
    first.wait_for_line(step_line(3))
    second = run_to_end(command)
    line = error_line(second)
    assert f"--output_dir {output} is in use by another run (pid {first.proc.pid} on host" in line, line
    assert first.kill() == -signal.SIGKILL and os.path.isfile(output / LOCK_FILE)  # kill -9 leaves the file
    from paddle_megatronbert.training import latest_checkpoint, read_trainer_state

    saved = read_trainer_state(latest_checkpoint(str(output)))["global_step"]
    third = Run(pretrain_command(data, output, max_steps=saved + 2, save_steps=2), subprocess_env())
    third.wait_for_line(lambda text: f"took over {output / LOCK_FILE} from a run that is gone (pid {first.proc.pid}"
                        in text)
    third.wait_for_line(lambda text: f"resumed from {output}/checkpoint-{saved} at step {saved}" in text)
    assert third.finish() == 0, third.tail()
    assert not os.path.exists(output / LOCK_FILE)  # released at the end

    # Resuming that run with other inputs or settings: refused, naming what changed.
    _rewrite_shards(data.shards, tmp_path / "permuted", permute=True)
    _rewrite_shards(data.shards, tmp_path / "fewer_predictions", predictions=5)
    resume_from = f"error: cannot resume from {output}/checkpoint-{saved + 2}: "

    def resume(*changes):
        command = pretrain_command(data, output, max_steps=saved + 4, save_steps=2)
        for flag, value in zip(changes[::2], changes[1::2]):
            command[command.index(flag) + 1] = value
        return error_line(run_to_end(command))

    line = resume("--input_dir", str(tmp_path / "permuted"))  # other shards, the same batches per epoch
    assert line.startswith(resume_from + "the input files changed: pretraining_00000.hdf5 (size"), line
    line = resume("--input_dir", str(tmp_path / "fewer_predictions"), "--max_predictions_per_seq", "5")
    assert "max_predictions_per_seq 10 -> 5" in line and "the input files changed" in line, line
    line = resume("--seed", "12")
    assert line.startswith(resume_from + "seed 11 -> 12. "), line


def _rewrite_shards(source_dir, target_dir, permute=False, predictions=None):
    """A copy of the shards with the rows of each permuted (other shards, the same batches per epoch) or with
    only the first ``predictions`` masked positions (shards made with another max_predictions_per_seq)."""
    import h5py
    import numpy as np

    os.makedirs(target_dir)
    for name in sorted(os.listdir(source_dir)):
        with h5py.File(os.path.join(source_dir, name), "r") as f:
            arrays = {key: f[key][...] for key in f}
            attrs = dict(f.attrs)
        order = np.random.default_rng(0).permutation(len(arrays["input_ids"])) if permute else slice(None)
        with h5py.File(os.path.join(target_dir, name), "w") as f:
            for key, value in arrays.items():
                value = value[order]
                if predictions is not None and key in ("masked_lm_positions", "masked_lm_ids"):
                    value = value[:, :predictions]
                f.create_dataset(key, data=value, compression="gzip")
            f.attrs.update(attrs)


def test_a_divergent_update_is_never_saved_as_a_good_checkpoint(data, tmp_path):
    output = tmp_path / "diverged"
    # lr 1e38 fits float32, but lr x weight decay does not: the first update turns the decayed weights into inf
    # while step 1's loss (computed before it) is finite, so only a check of the updated parameters stops the
    # checkpoint of step 1.
    proc = run_to_end(pretrain_command(data, output, "--warmup_steps", "0", "--learning_rate", "1e38",
                                       "--weight_decay", "100", max_steps=3, save_steps=1))
    line = error_line(proc)
    assert line.startswith("error: the update of step 1 made the parameters non-finite ("), line
    assert "no checkpoint was written" in line, line
    assert not [n for n in os.listdir(output) if n.startswith("checkpoint-") or n == "latest"], os.listdir(output)


def test_a_full_disk_names_the_checkpoint_cleans_up_and_the_rerun_resumes_exactly(data, tmp_path):
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(disk)], capture_output=True).returncode:
        pytest.skip("mounting a 3 MB tmpfs is not permitted here")
    try:
        with open(data.config, encoding="utf-8") as f:
            config = json.load(f)
        config.update(hidden_size=16, intermediate_size=64)  # checkpoints of ~1.2 MB: two fit in 3 MB
        small = tmp_path / "small.json"
        small.write_text(json.dumps(config))

        def command(output_dir):
            argv = pretrain_command(data, output_dir, "--save_total_limit", "1", max_steps=6, save_steps=2)
            argv[argv.index("--config_file") + 1] = str(small)
            return argv

        reference = run_to_end(command(tmp_path / "reference"))
        assert reference.returncode == 0, reference.stderr[-3000:]
        checkpoint_bytes = sum(os.path.getsize(os.path.join(tmp_path / "reference" / "checkpoint-6", n))
                               for n in os.listdir(tmp_path / "reference" / "checkpoint-6"))
        output = disk / "run"
        free = os.statvfs(disk).f_bavail * os.statvfs(disk).f_frsize
        filler = disk / "filler"
        filler.write_bytes(b"\0" * (free - checkpoint_bytes * 3 // 2))  # room for one checkpoint and a half
        failed = run_to_end(command(output))
        line = error_line(failed)
        assert line.startswith(f"error: [Errno 28] saving checkpoint {output}/checkpoint-4 (step 4) failed"), line
        assert f"{output}/checkpoint-2 is unchanged and a rerun resumes from it" in line, line
        assert sorted(os.listdir(output)) == ["checkpoint-2", "latest", "metrics.jsonl"]  # no temporary, no lock
        filler.unlink()  # space freed: the same command resumes
        resumed = run_to_end(command(output))
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        assert f"resumed from {output}/checkpoint-2 at step 2" in resumed.stdout
        assert deterministic(read_metrics(str(output))[0]) == deterministic(
            read_metrics(str(tmp_path / "reference"))[0])
        assert sorted(os.listdir(output)) == ["checkpoint-6", "latest", "metrics.jsonl"]
    finally:
        subprocess.run(["umount", str(disk)], capture_output=True)


def test_sigterm_three_times_to_fine_tuning_checkpoints_exits_75_and_resumes_exactly(tmp_path):
    from test_run_squad import synthetic_run_args

    from paddle_megatronbert.faults import EXIT_PREEMPTED

    base = synthetic_run_args(tmp_path, version_2=False, num_train=200)  # vocab, tiny model, train/dev files
    base.remove("--do_predict")

    def command(output_dir):
        argv = list(base)
        argv[argv.index("--output_dir") + 1] = str(output_dir)
        argv[argv.index("--logging_steps") + 1] = "1"
        return [sys.executable, "-u", os.path.join(REPO, "run_squad.py"), *argv, "--max_steps", "16",
                "--save_steps", "1000", "--device", "cpu"]

    straight = run_to_end(command(tmp_path / "uninterrupted"))
    assert straight.returncode == 0, straight.stderr[-3000:]
    expected = [{k: r[k] for k in ("step", "loss", "lr")} for r in read_metrics(str(tmp_path / "uninterrupted"))[0]]
    assert [r["step"] for r in expected] == list(range(1, 17))

    output = tmp_path / "preempted"
    run = Run(command(output), subprocess_env())
    wait_for_record(output, 3, run.proc)
    for _ in range(3):
        run.proc.send_signal(signal.SIGTERM)
        time.sleep(0.2)
    assert run.finish() == EXIT_PREEMPTED, run.tail()
    assert "Traceback" not in "".join(run.lines), run.tail()
    assert any("stopped by SIGTERM: checkpoint" in line for line in run.lines), run.tail()
    resumed = run_to_end(command(output))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert [{k: r[k] for k in ("step", "loss", "lr")} for r in read_metrics(str(output))[0]] == expected
