"""run_pretrain.py end to end on the shipped text: a real learning check, exact resume (also after a
SIGKILL in the middle of a checkpoint write), TP=2 against TP=1, and one clear error per bad input.

The runs use the tiny config with the shipped text's own slice of BERT's uncased vocabulary (the 5264
WordPieces the text uses, so the text tokenizes exactly as with the full vocab): the MLM head over 30522
tokens would cost 4x more per step on this 2-core machine, and the suite has a time budget.
"""

import json
import os
import signal
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest

from helpers.tiny_pretraining import REPO, pretrain_argv, shared_tiny_pretraining_data, subprocess_env

sys.path.insert(0, REPO)
LAUNCH_TIMEOUT_S = 120

import run_pretrain  # noqa: E402
from paddle_megatronbert.checkpoint.training_state import latest_checkpoint, read_trainer_state  # noqa: E402
from paddle_megatronbert.training import (  # noqa: E402
    MetricsLogger,
    NonFiniteLossError,
    linear_warmup_decay,
    pretraining_flops_per_sequence,
    resolve_amp,
)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """The text's vocab slice, the tiny config over it, and 2 shards (seq 64, 10 predictions, dupe 3: 3427
    samples: the 200 steps of the learning check read no sequence twice)."""
    return shared_tiny_pretraining_data(tmp_path_factory, dupe_factor=3)


def records(output_dir):
    with open(os.path.join(output_dir, "metrics.jsonl"), encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def test_seed_command_line_parses_as_written():
    args = run_pretrain.parse_args(
        "--model_type bert --model_name_or_path megatronbert-uncased --max_predictions_per_seq 20 --batch_size 32 "
        "--learning_rate 1e-4 --weight_decay 1e-2 --adam_epsilon 1e-6 --warmup_steps 10000 --num_train_epochs 1e5 "
        "--input_dir data/shards --output_dir output --logging_steps 1 --save_steps 20000 --max_steps 1000000".split())
    assert (args.model_type, args.model_name_or_path, args.max_predictions_per_seq, args.batch_size) == (
        "bert", "megatronbert-uncased", 20, 32)
    assert (args.learning_rate, args.weight_decay, args.adam_epsilon, args.warmup_steps) == (1e-4, 1e-2, 1e-6, 10000)
    assert (args.num_train_epochs, args.max_steps, args.save_steps, args.amp, args.resume) == (
        1e5, 1000000, 20000, "none", "auto")
    assert run_pretrain.parse_args(["--input_dir", "d", "--output_dir", "o", "--use_amp", "true"]).amp == "fp16"


def test_tiny_model_learns_from_the_shipped_text(data, tmp_path):
    result = run_pretrain.main(pretrain_argv(data, tmp_path, max_steps=200))
    mlm = [r["mlm_loss"] for r in records(tmp_path)]
    assert result["step"] == 200 and len(mlm) == 200
    # Starts at ln(5264) = 8.57 (a uniform guess over the vocab); 200 steps of 8 sequences bring it to about
    # 6.2 (measured: steps 1-5 average 8.55, steps 181-200 average 6.24): the model has learnt the WordPiece
    # frequencies (the unigram entropy of the text's WordPieces is ~6.15 nats), not yet much context; that
    # takes thousands of steps. NSP stays at ln 2 this early.
    start, end = np.mean(mlm[:5]), np.mean(mlm[-20:])
    assert start > 8.4, mlm[:5]
    assert end < 6.6, mlm[-20:]
    record = records(tmp_path)[-1]
    assert record["sequences_per_sec"] > 0 and record["tokens_per_sec"] == pytest.approx(64 * record["sequences_per_sec"])
    assert record["tflops"] > 0 and record["lr"] < 2e-3


def test_resume_continues_exactly_with_dropout_on(data, tmp_path, capsys):
    straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"
    run_pretrain.main(pretrain_argv(data, straight))
    first = run_pretrain.main(pretrain_argv(data, interrupted, "--exit_interval", "10"))
    assert first["step"] == 10 and latest_checkpoint(str(interrupted)).endswith("checkpoint-10")
    position = read_trainer_state(latest_checkpoint(str(interrupted)))["data_position"]
    assert (position["epoch"], position["batches_in_epoch"], position["offset"]) == (0, 10, 80)
    capsys.readouterr()
    second = run_pretrain.main(pretrain_argv(data, interrupted))  # the same command resumes from `latest`
    assert second["step"] == 20
    start = capsys.readouterr().out.splitlines()[0]  # the start-up line says where the weights come from
    assert f"resumed from {interrupted}/checkpoint-10 at step 10" in start and "from scratch" not in start, start
    a, b = records(straight), records(interrupted)
    assert [r["step"] for r in b] == list(range(1, 21))  # one record per step, none repeated
    for key in ("loss", "mlm_loss", "nsp_loss", "lr"):
        assert [r[key] for r in a] == [r[key] for r in b], key  # bit-identical, steps 11-20 included
    assert len({r["loss"] for r in a[10:]}) == 10  # dropout on: every step differs
    import paddle

    from safetensors.numpy import load_file

    weights_a = load_file(str(straight / "checkpoint-20" / "model.safetensors"))
    weights_b = load_file(str(interrupted / "checkpoint-20" / "model.safetensors"))
    assert all(np.array_equal(weights_a[k], weights_b[k]) for k in weights_a)
    from paddle_megatronbert import MegatronBertForPreTraining

    model = MegatronBertForPreTraining.from_pretrained(str(straight / "checkpoint-20"))
    assert np.array_equal(model.cls.seq_relationship.weight.numpy(), weights_a["cls.seq_relationship.weight"])


def test_sigkill_during_checkpoint_write_leaves_a_checkpoint_that_loads(data, tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, os.path.join(REPO, "run_pretrain.py"), *pretrain_argv(data, out, max_steps=6, save_steps=3)]
    # the thread count of this process (set by run_pretrain's import or Paddle's), so that the resumed
    # in-process steps and the killed run's sum in the same order
    env = subprocess_env(OMP_NUM_THREADS=os.environ["OMP_NUM_THREADS"], MEGATRONBERT_TEST_PAUSE_IN_SAVE="6:60")
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline, output = time.time() + LAUNCH_TIMEOUT_S, []
    try:
        for line in proc.stdout:
            output.append(line)
            if "[test hook] pausing" in line or time.time() > deadline:
                break
        assert "[test hook] pausing" in output[-1], "".join(output[-20:])
    finally:
        proc.send_signal(signal.SIGKILL)  # kill -9: no handler, no cleanup
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    # Killed between writing checkpoint-6's files and the rename: `latest` still names checkpoint-3.
    # the lock file stays after kill -9 (the next run takes it over)
    assert sorted(os.listdir(out)) == ["checkpoint-3", "checkpoint-6.tmp", "latest", "metrics.jsonl", "run.lock"]
    assert latest_checkpoint(str(out)) == str(out / "checkpoint-3")
    killed = records(out)
    assert [r["step"] for r in killed] == [1, 2, 3, 4, 5, 6]
    # The same command resumes from checkpoint-3 and redoes steps 4-6 exactly as the killed run did.
    result = run_pretrain.main(pretrain_argv(data, out, max_steps=6, save_steps=3))
    assert result["step"] == 6 and latest_checkpoint(str(out)) == str(out / "checkpoint-6")
    assert sorted(os.listdir(out)) == ["checkpoint-3", "checkpoint-6", "latest", "metrics.jsonl"]
    assert [r["loss"] for r in records(out)] == [r["loss"] for r in killed]


def test_tensor_parallel_2_gives_the_first_losses_of_tp_1(data, tmp_path):
    no_dropout = ["--hidden_dropout_prob", "0", "--attention_probs_dropout_prob", "0"]
    run_pretrain.main(pretrain_argv(data, tmp_path / "tp1", *no_dropout, max_steps=5))
    log_dir = tmp_path / "log"
    cmd = [sys.executable, "-m", "paddle.distributed.launch", "--nproc_per_node", "2", "--log_dir", str(log_dir),
           os.path.join(REPO, "run_pretrain.py"), *pretrain_argv(data, tmp_path / "tp2", *no_dropout, max_steps=5),
           "--tensor_parallel_degree", "2"]
    env = subprocess_env()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT_S)
    worker_log = (log_dir / "workerlog.0").read_text(errors="replace") if (log_dir / "workerlog.0").exists() else ""
    assert proc.returncode == 0, worker_log[-3000:]
    tp1, tp2 = records(tmp_path / "tp1"), records(tmp_path / "tp2")
    assert len(tp1) == len(tp2) == 5
    for a, b in zip(tp1, tp2):
        assert abs(a["loss"] - b["loss"]) < 1e-5 and abs(a["mlm_loss"] - b["mlm_loss"]) < 1e-5, (a, b)
    assert sorted(f for f in os.listdir(tmp_path / "tp2" / "checkpoint-5") if "tp0" in f) == [
        "model.tp00.safetensors", "model.tp01.safetensors", "optimizer.tp00.sd00.safetensors",
        "optimizer.tp01.sd00.safetensors"]


def test_non_finite_loss_stops_the_run_before_it_is_logged_or_saved(data, tmp_path):
    # An absurd learning rate: step 1 is fine, its update sends the weights to ~1e30 and step 2's loss is NaN.
    # A checkpoint every step and a log line every 3: the check must not wait for the log line.
    args = pretrain_argv(data, tmp_path, "--learning_rate", "1e30", "--warmup_steps", "0", "--logging_steps", "3",
                         max_steps=4, save_steps=1)
    with pytest.raises(NonFiniteLossError, match=r"the training loss became nan \(mean over steps 1-2\); stopped "
                                                 r"without saving: the newest checkpoint, \S*checkpoint-1, is the last"):
        run_pretrain.main(args)
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-1", "latest", "metrics.jsonl"]
    assert latest_checkpoint(str(tmp_path)) == str(tmp_path / "checkpoint-1")
    assert records(tmp_path) == []  # no NaN record: the first log line was due at step 3


# ---- bad input: one clear error each, naming the file ----------------------------------------------------
def _copy_shard(data, target_dir):
    os.makedirs(target_dir, exist_ok=True)
    source = os.path.join(data.shards, sorted(os.listdir(data.shards))[0])
    target = os.path.join(target_dir, "bad.hdf5")
    with open(source, "rb") as f, open(target, "wb") as g:
        g.write(f.read())
    return target


def _truncated(data, d):
    path = _copy_shard(data, d)
    os.truncate(path, os.path.getsize(path) // 2)
    return {}, r"cannot open shard .*bad\.hdf5 as HDF5 \(corrupt or truncated\?\)"


def _corrupt(data, d):
    path = _copy_shard(data, d)
    with open(path, "r+b") as f:  # scribble over compressed data chunks
        f.seek(os.path.getsize(path) // 3)
        f.write(b"\xa5" * 4096)
    return {}, r"cannot read shard .*bad\.hdf5 \(corrupt or truncated\?\)"


def _missing_key(data, d):
    path = _copy_shard(data, d)
    with h5py.File(path, "a") as f:
        del f["masked_lm_ids"]
    return {}, r"shard .*bad\.hdf5 lacks the key\(s\) masked_lm_ids"


def _wrong_predictions(data, d):
    _copy_shard(data, d)
    return {"--max_predictions_per_seq": "20"}, \
        r"shard .*bad\.hdf5 has 10 masked positions per sequence but --max_predictions_per_seq is 20"


def _vocab_larger_than_config(data, d):
    _copy_shard(data, d)
    small = os.path.join(d, "small.json")
    with open(data.config, encoding="utf-8") as f:
        config = json.load(f)
    config["vocab_size"] = 1000
    with open(small, "w", encoding="utf-8") as f:
        json.dump(config, f)
    return {"--config_file": small}, r"the vocab .*vocab\.txt has 5264 tokens but the model's vocab_size is 1000"


def _shards_from_another_vocab(data, d):
    _copy_shard(data, d)
    full = os.path.join(d, "full.json")
    with open(os.path.join(REPO, "configs", "tiny.json"), encoding="utf-8") as f:
        config = json.load(f)
    with open(full, "w", encoding="utf-8") as f:
        json.dump(config, f)
    return {"--config_file": full, "--tokenizer_name_or_path": "megatronbert-uncased"}, \
        r"shard .*bad\.hdf5 was made with a 5264-token vocabulary but the tokenizer has 30522 tokens"


BAD_INPUTS = {
    "empty_input_dir": lambda data, d: (os.makedirs(d) or {}, r"--input_dir .*bad_input has no HDF5 shards"),
    "truncated_shard": _truncated,
    "corrupt_shard": _corrupt,
    "missing_key": _missing_key,
    "max_predictions_mismatch": _wrong_predictions,
    "vocab_larger_than_config": _vocab_larger_than_config,
    "shards_from_another_vocab": _shards_from_another_vocab,
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_fails_with_one_clear_error_naming_the_file(data, tmp_path, case):
    input_dir = str(tmp_path / "bad_input")
    overrides, pattern = BAD_INPUTS[case](data, input_dir)
    args = pretrain_argv(data, tmp_path / "out", max_steps=2)
    args[args.index("--input_dir") + 1] = input_dir
    for flag, value in overrides.items():
        if flag in args:
            args[args.index(flag) + 1] = value
        else:
            args += [flag, value]
    with pytest.raises((ValueError, FileNotFoundError)) as info:
        run_pretrain.main(args)
    assert "\n" not in str(info.value)
    assert __import__("re").search(pattern, str(info.value)), str(info.value)


def test_command_line_error_is_one_line_and_exit_code_2(tmp_path):
    os.makedirs(tmp_path / "empty")
    env = subprocess_env()
    proc = subprocess.run([sys.executable, os.path.join(REPO, "run_pretrain.py"), "--input_dir",
                           str(tmp_path / "empty"), "--output_dir", str(tmp_path / "out"), "--device", "cpu"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: --input_dir ") and "empty has no HDF5 shards" in last


# ---- the loop's pieces in training.py ----------------------------------------------------------------------
def test_linear_warmup_decay_matches_paddlenlp_schedule():
    schedule = linear_warmup_decay(1.0, total_steps=10, warmup=4)
    values = []
    for _ in range(12):
        values.append(schedule())
        schedule.step()
    assert values == pytest.approx([0, 0.25, 0.5, 0.75, 1, 5 / 6, 4 / 6, 3 / 6, 2 / 6, 1 / 6, 0, 0])
    assert linear_warmup_decay(1.0, total_steps=10, warmup=0.2)() == 0.0  # a proportion: 2 warm-up steps


def test_flops_estimate_by_hand():
    from paddle_megatronbert import MegatronBertConfig

    config = MegatronBertConfig(vocab_size=100, hidden_size=8, num_hidden_layers=2, num_attention_heads=2,
                                intermediate_size=32)
    # per layer 8*S*H^2 + 4*S*H*I + 4*S^2*H with S=4: 2048 + 4096 + 512; head 2*P*H^2 + 2*P*H*V + 2*H^2 + 4*H, P=2
    forward = 2 * (2048 + 4096 + 512) + (256 + 3200 + 128 + 32)
    assert pretraining_flops_per_sequence(config, 4, 2) == 3 * forward
    assert pretraining_flops_per_sequence(config, 4, 2, recompute=True) == 4 * forward


def test_amp_on_cpu_is_reported_not_pretended():
    assert resolve_amp("fp16", "cpu") == "none" and resolve_amp("bf16", "gpu") == "bf16"
    with pytest.raises(ValueError, match="--amp must be one of none, fp16, bf16"):
        resolve_amp("fp8", "gpu")


def test_metrics_log_drops_the_records_of_an_interrupted_run_on_resume(tmp_path):
    logger = MetricsLogger(str(tmp_path), use_visualdl=False)
    for step in (1, 2, 3, 4):
        logger.log(step, {"loss": 10.0 - step, "lr": 1e-4})
    with open(tmp_path / "metrics.jsonl", "a", encoding="utf-8") as f:
        f.write('{"step": 5, "lo')  # cut by a kill
    resumed = MetricsLogger(str(tmp_path), use_visualdl=False, resume_step=2)
    line = resumed.log(3, {"loss": 1.5, "lr": 1e-4, "sequences_per_sec": 12.0})
    assert line == "step 3 | loss 1.5000 | lr 1.000e-04 | 12.0 seq/s"
    assert [(r["step"], r["loss"]) for r in records(tmp_path)] == [(1, 9.0), (2, 8.0), (3, 1.5)]
