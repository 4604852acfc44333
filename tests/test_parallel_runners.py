"""The three runners on the 2-D grid: 4 CPU processes under ``paddle.distributed.launch``, tp=2 x dp=2.

- ``run_glue.py`` and ``run_squad.py`` write the metrics of one process on the same global batch (dropout
  off, same seed): each replica takes half of every global batch, and the mean of the replicas' gradients is
  the gradient of the whole batch.
- ``run_pretrain.py`` killed (SIGKILL) inside its step-6 checkpoint and relaunched resumes from checkpoint-3
  and logs the same losses, dropout on (each rank's RNG streams come back from its own file).
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from helpers.runners import load_runner
from helpers.tiny_pretraining import REPO, pretrain_argv, shared_tiny_pretraining_data, subprocess_env

from paddle_megatronbert.tokenizer import VOCAB_FILES

LAUNCH_TIMEOUT_S = 180
GLUE_DIR = os.path.join(REPO, "tests", "fixtures", "glue")
SQUAD_V1 = os.path.join(REPO, "tests", "fixtures", "squad", "squad_v1.json")  # 8 questions: 8 features at seq 128
GRID = ["--tensor_parallel_degree", "2", "--data_parallel_degree", "2", "--sharding_degree", "1"]


def write_tiny_model(directory):
    """A from-scratch MegatronBERT with pretraining heads (a released checkpoint's layout), dropout off."""
    import paddle

    from paddle_megatronbert import MegatronBertConfig, MegatronBertForPreTraining

    vocab = VOCAB_FILES["megatronbert-uncased"]
    with open(vocab, encoding="utf-8") as f:
        vocab_size = sum(1 for _ in f)
    paddle.seed(0)
    config = MegatronBertConfig(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                intermediate_size=64, max_position_embeddings=128, initializer_range=32 ** -0.5,
                                hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    MegatronBertForPreTraining(config).save_pretrained(str(directory))
    shutil.copy(vocab, os.path.join(str(directory), "vocab.txt"))
    return str(directory)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return write_tiny_model(tmp_path_factory.mktemp("grid_model") / "model")


def launch(runner, argv, log_dir, nproc=4, env=None):
    """``runner.py argv`` under paddle.distributed.launch; (return code, rank 0's log)."""
    cmd = [sys.executable, "-m", "paddle.distributed.launch", "--nproc_per_node", str(nproc), "--log_dir",
           str(log_dir), os.path.join(REPO, f"{runner}.py"), *argv]
    proc = subprocess.run(cmd, cwd=REPO, env=env or subprocess_env(), capture_output=True, text=True,
                          timeout=LAUNCH_TIMEOUT_S)
    log = (log_dir / "workerlog.0").read_text(errors="replace") if (log_dir / "workerlog.0").exists() else proc.stdout
    return proc.returncode, log


def assert_same_metrics(single, grid):
    assert list(grid) == list(single)
    for key in single:
        assert grid[key] == pytest.approx(single[key], abs=1e-4), key


def test_run_glue_on_the_grid_writes_the_metrics_of_one_process(tiny_model, tmp_path):
    # SST-2's 6 training rows: 3 global batches of 2 per epoch (1 per replica on the grid)
    common = ["--task_name", "SST-2", "--data_dir", GLUE_DIR, "--model_name_or_path", tiny_model,
              "--learning_rate", "1e-3", "--device", "cpu", "--max_steps", "3", "--save_steps", "3",
              "--max_seq_length", "64", "--seed", "3", "--no_progress", "--visualdl", "false"]
    single = load_runner("run_glue").main(common + ["--batch_size", "2", "--output_dir", str(tmp_path / "single")])
    rc, log = launch("run_glue", common + GRID + ["--batch_size", "1", "--output_dir", str(tmp_path / "grid")],
                     tmp_path / "log")
    assert rc == 0, log[-3000:]
    assert_same_metrics(single, json.load(open(tmp_path / "grid" / "eval_results.json")))


def test_run_squad_on_the_grid_writes_the_metrics_of_one_process(tiny_model, tmp_path):
    common = ["--do_train", "--do_predict", "--train_file", SQUAD_V1, "--predict_file", SQUAD_V1,
              "--model_name_or_path", tiny_model, "--learning_rate", "1e-3", "--device", "cpu", "--max_steps", "2",
              "--save_steps", "2", "--max_seq_length", "128", "--doc_stride", "64", "--seed", "3", "--no_progress",
              "--visualdl", "false"]
    single = load_runner("run_squad").main(common + ["--batch_size", "4", "--output_dir", str(tmp_path / "single")])
    rc, log = launch("run_squad", common + GRID + ["--batch_size", "2", "--output_dir", str(tmp_path / "grid")],
                     tmp_path / "log")
    assert rc == 0, log[-3000:]
    grid = json.load(open(tmp_path / "grid" / "eval_results.json"))
    assert_same_metrics(single, grid)
    assert json.load(open(tmp_path / "grid" / "predictions.json")) == json.load(
        open(tmp_path / "single" / "predictions.json"))


def _processes_writing_to(output_dir):
    """Pids of the runner processes whose command line names ``output_dir`` (the launcher's workers)."""
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    args = f.read().split(b"\0")
            except OSError:
                continue
            if str(output_dir).encode() in args and any(a.endswith(b"run_pretrain.py") for a in args):
                pids.append(int(entry))
    return pids


def _records(output_dir):
    with open(os.path.join(output_dir, "metrics.jsonl"), encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def test_run_pretrain_killed_and_resumed_on_the_grid_repeats_its_losses(tmp_path_factory, tmp_path):
    data = shared_tiny_pretraining_data(tmp_path_factory)
    out = tmp_path / "run"
    argv = pretrain_argv(data, out, *GRID, max_steps=6, save_steps=3)
    log_dir = tmp_path / "log_killed"
    cmd = [sys.executable, "-m", "paddle.distributed.launch", "--nproc_per_node", "4", "--log_dir", str(log_dir),
           os.path.join(REPO, "run_pretrain.py"), *argv]
    proc = subprocess.Popen(cmd, cwd=REPO, env=subprocess_env(MEGATRONBERT_TEST_PAUSE_IN_SAVE="6:60"),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline, paused = time.time() + LAUNCH_TIMEOUT_S, False
    try:
        while time.time() < deadline and proc.poll() is None and not paused:
            time.sleep(0.5)
            rank0 = log_dir / "workerlog.0"  # rank 0 pauses in the save; its peers wait for it at a barrier
            paused = rank0.exists() and "[test hook] pausing" in rank0.read_text(errors="replace")
    finally:
        # kill -9, inside the step-6 save: the launcher, and its 4 workers (each in a session of its own)
        for pid in [proc.pid] + _processes_writing_to(out):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        proc.wait()
    assert paused, (log_dir / "workerlog.0").read_text(errors="replace")[-3000:]
    left = set(os.listdir(out))  # killed inside the step-6 save: checkpoint-3 is the newest complete one
    assert {"checkpoint-3", "checkpoint-6.tmp", "latest", "metrics.jsonl"} <= left and "checkpoint-6" not in left
    killed = _records(out)
    assert [r["step"] for r in killed] == [1, 2, 3, 4, 5, 6]
    assert len({r["loss"] for r in killed}) == 6  # dropout on: the resumed steps must redraw the same masks
    deadline = time.time() + 10
    while _processes_writing_to(out) and time.time() < deadline:
        time.sleep(0.2)
    assert not _processes_writing_to(out)  # every worker is gone: nothing of the killed run survives
    rc, log = launch("run_pretrain", argv, tmp_path / "log_resumed")  # the same command resumes
    assert rc == 0, log[-3000:]
    resumed = _records(out)
    assert [r["step"] for r in resumed] == [1, 2, 3, 4, 5, 6]
    for key in ("loss", "mlm_loss", "nsp_loss", "lr"):
        assert [r[key] for r in resumed] == [r[key] for r in killed], key  # steps 4-6 redone bit for bit
