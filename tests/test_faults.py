"""paddle_megatronbert/faults.py piece by piece (in process, fast), and the pretraining shard checks a cluster's
bad data needs at start. The runner processes killed, filled and raced are in test_fault_injection.py."""

import argparse
import errno
import os
import signal
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest

from paddle_megatronbert import faults
from paddle_megatronbert.data.pretraining import SHARD_KEYS, PretrainingDataLoader, read_shard


def test_first_signal_requests_a_stop_and_later_ones_are_absorbed():
    before = signal.getsignal(signal.SIGTERM)
    with faults.PreemptionHandler(announce=False) as quiet:
        pass
    assert signal.getsignal(signal.SIGTERM) == before and not quiet.requested  # no signal: the previous is back
    try:
        with faults.PreemptionHandler(announce=False) as handler:
            assert not handler.requested
            for _ in range(3):  # Paddle's launcher: SIGTERM three times, 0.2 s apart (here without the wait)
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(0.01)
            assert handler.requested and handler.count == 3 and handler.signal_name == "SIGTERM"
        assert signal.getsignal(signal.SIGTERM) == signal.SIG_IGN  # on the way to the exit: ignored
        os.kill(os.getpid(), signal.SIGTERM)
    finally:
        signal.signal(signal.SIGTERM, before)
    error = faults.Preempted(7, "/out/checkpoint-7", "SIGTERM")
    assert error.exit_code == faults.EXIT_PREEMPTED != 0 and "checkpoint-7 holds step 7" in str(error)


def _hold_lock(output_dir):
    code = ("import sys, time; from paddle_megatronbert.faults import OutputDirLock; "
            f"OutputDirLock({str(output_dir)!r}).acquire(); print('locked', flush=True); time.sleep(60)")
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=env)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_a_live_run_keeps_the_output_dir_and_a_dead_ones_lock_is_taken_over(tmp_path):
    holder = _hold_lock(tmp_path)
    try:
        with pytest.raises(faults.OutputDirInUseError) as refused:
            faults.OutputDirLock(str(tmp_path)).acquire()
        message = str(refused.value)
        assert "\n" not in message and f"pid {holder.pid}" in message and str(tmp_path) in message
    finally:
        holder.send_signal(signal.SIGKILL)  # kill -9: the lock file stays, the flock goes with the process
        holder.wait()
    assert os.path.isfile(tmp_path / faults.LOCK_FILE)
    lock = faults.OutputDirLock(str(tmp_path)).acquire()
    assert lock.previous_holder["pid"] == holder.pid
    lock.release()
    assert not os.path.exists(tmp_path / faults.LOCK_FILE)
    faults.OutputDirLock(str(tmp_path), enabled=False).acquire().release()  # non-main ranks: no lock at all


def test_stale_temporaries_are_removed_and_nothing_else(tmp_path):
    for name in ("checkpoint-3.tmp/model_state.pdparams", "checkpoint-2/config.json", "checkpoint-2/x.json.tmp.77",
                 "latest.tmp.4711", "metrics.jsonl.tmp.12", "metrics.jsonl", "latest", "notes.tmpl"):
        os.makedirs(os.path.dirname(tmp_path / name), exist_ok=True)
        (tmp_path / name).write_text("x")
    removed = faults.remove_stale_temporaries(str(tmp_path), verbose=False)
    assert sorted(os.path.relpath(p, tmp_path) for p in removed) == [
        "checkpoint-2/x.json.tmp.77", "checkpoint-3.tmp", "latest.tmp.4711", "metrics.jsonl.tmp.12"]
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-2", "latest", "metrics.jsonl", "notes.tmpl"]
    assert os.listdir(tmp_path / "checkpoint-2") == ["config.json"]


class _Topo:
    def __init__(self, world_size=1, dp_degree=1):
        self.world_size, self.tp_degree, self.dp_degree, self.sharding_degree = world_size, 1, dp_degree, 1


def files_of(paths, max_predictions_per_seq=10):
    return {"files": [faults.file_fingerprint(p) for p in paths], "max_predictions_per_seq": max_predictions_per_seq}


def test_every_change_a_resume_cannot_absorb_is_named(tmp_path):
    shards = []
    for i in range(2):
        shards.append(str(tmp_path / f"s{i}.hdf5"))
        with open(shards[-1], "wb") as f:
            f.write(bytes([i]) * 1000)
    saved = faults.run_fingerprint(files_of(shards), seed=11, topo=_Topo(2, 2),
                                   config={"hidden_size": 64, "recompute": False}, batch_size=8)
    assert faults.fingerprint_mismatches(saved, saved) == []
    faults.check_resume_fingerprint(saved, saved, "ckpt")
    with open(shards[1], "r+b") as f:
        f.write(b"\x07")  # same size, other header
    other = faults.run_fingerprint(files_of(shards, 20), seed=12, topo=_Topo(1, 1),
                                   config={"hidden_size": 64, "recompute": True}, batch_size=8)
    problems = faults.fingerprint_mismatches(saved, other)
    assert problems == ["the input files changed: s1.hdf5 (header checksum differs) changed",
                        "the world size or grid changed (world_size 2 -> 1, data_parallel_degree 2 -> 1): each rank's "
                        "data and random streams depend on it",
                        "max_predictions_per_seq 10 -> 20", "seed 11 -> 12"]  # recompute changes no number
    fewer = faults.run_fingerprint(files_of(shards[:1]), seed=11, topo=_Topo(2, 2),
                                   config={"hidden_size": 32}, batch_size=8)
    assert faults.fingerprint_mismatches(saved, fewer) == ["the input files changed: s1.hdf5 is gone",
                                                           "the model config changed (hidden_size 64 -> 32)"]
    with pytest.raises(faults.ResumeMismatchError) as refused:
        faults.check_resume_fingerprint(saved, other, "out/checkpoint-4")
    assert "\n" not in str(refused.value) and str(refused.value).startswith("cannot resume from out/checkpoint-4: ")


def test_a_divergent_update_is_named_before_any_save():
    import paddle

    paddle.seed(0)
    model = paddle.nn.Sequential(paddle.nn.Linear(3, 4), paddle.nn.Linear(4, 2))
    faults.check_finite_parameters(model, 5)
    huge = paddle.full([3, 4], 3e38)  # finite: sum(p * 0) cannot overflow where sum(p) would
    model[0].weight.set_value(huge)
    faults.check_finite_parameters(model, 5)
    bad = np.ones([4], dtype="float32")
    bad[2] = np.inf
    model[0].bias.set_value(bad)
    with pytest.raises(faults.NonFiniteParametersError) as stopped:
        faults.check_finite_parameters(model, 6, last_good="out/checkpoint-4")
    assert str(stopped.value) == (
        "the update of step 6 made the parameters non-finite (1 of 4 parameter tensors on this rank, e.g. 0.bias); "
        "stopped without saving: the newest checkpoint, out/checkpoint-4, is the last good one. Lower "
        "--learning_rate, lengthen the warm-up or check the data")


def test_a_failed_save_names_the_checkpoint_and_removes_its_temporaries(tmp_path):
    (tmp_path / "checkpoint-2").mkdir()

    def save():
        os.makedirs(tmp_path / "checkpoint-4.tmp")
        (tmp_path / "checkpoint-4.tmp" / "model_state.pdparams").write_bytes(b"half")
        (tmp_path / f"latest.tmp.{os.getpid()}").write_text("x")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with pytest.raises(faults.CheckpointSaveError) as failed:
        faults.guarded_save(save, str(tmp_path), 4, last_good=str(tmp_path / "checkpoint-2"))
    message = str(failed.value)
    assert "\n" not in message and failed.value.errno == errno.ENOSPC
    assert message.startswith(f"[Errno 28] saving checkpoint {tmp_path / 'checkpoint-4'} (step 4) failed: No space")
    assert f"{tmp_path / 'checkpoint-2'} is unchanged" in message
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-2"]
    assert faults.guarded_save(lambda: "done", str(tmp_path), 6) == "done"


def test_a_learning_rate_float32_cannot_hold_is_refused():
    from paddle_megatronbert.training import training_argument_problems

    assert training_argument_problems(argparse.Namespace(learning_rate=1e39)) == [
        "--learning_rate must be in [0, 3.40282e+38], got 1e+39"]
    assert training_argument_problems(argparse.Namespace(learning_rate=3e38)) == []


# ---- shards: every bad value one line naming the file and the field ----------------------------------------
def _write_shard(path, n=4, seq=8, pred=2, **overrides):
    arrays = {"input_ids": np.full((n, seq), 5, np.int32), "input_mask": np.ones((n, seq), np.int8),
              "segment_ids": np.zeros((n, seq), np.int8), "masked_lm_positions": np.ones((n, pred), np.int32),
              "masked_lm_ids": np.full((n, pred), 6, np.int32), "next_sentence_labels": np.zeros((n,), np.int8)}
    for key, (row, value) in overrides.items():
        arrays[key][row] = value
    with h5py.File(path, "w") as f:
        for key in SHARD_KEYS:
            f[key] = arrays[key]
    return str(path)


@pytest.mark.parametrize("field, value, expected", [
    ("next_sentence_labels", 7, "next_sentence_labels holds 7 (row 2); it must be 0 (the real next sentence) or 1"),
    ("segment_ids", 5, "segment_ids holds 5 (row 2); it must be 0 (sentence A) or 1 (sentence B)"),
    ("input_mask", 3, "input_mask holds 3 (row 2); it must be 0 (padding) or 1 (a token)"),
    ("input_ids", -4, "input_ids holds the negative value -4 (row 2); ids and positions are >= 0"),
    ("masked_lm_ids", -1, "masked_lm_ids holds the negative value -1 (row 2)"),
    ("masked_lm_positions", -3, "masked_lm_positions holds the negative value -3 (row 2)"),
])
def test_each_bad_shard_value_is_one_line_naming_the_file_and_field(tmp_path, field, value, expected):
    path = _write_shard(tmp_path / "bad.hdf5", **{field: (2, value)})
    with pytest.raises(ValueError) as refused:
        read_shard(path, 2, vocab_size=100)
    assert str(refused.value).startswith(f"shard {path}: {expected}") and "\n" not in str(refused.value)


def test_a_zero_row_shard_is_refused_at_start_from_its_header(tmp_path):
    good = [_write_shard(tmp_path / f"a{i}.hdf5") for i in range(2)]
    empty = _write_shard(tmp_path / "b.hdf5", n=0)
    with pytest.raises(ValueError, match=rf"^shard {empty} holds no samples \(input_ids has 0 rows\)"):
        PretrainingDataLoader(good + [empty], 2, 2, prefetch=False)
