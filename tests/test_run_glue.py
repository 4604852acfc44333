"""run_glue.py and its data path: the official TSV layouts, strict reading, every task end to end with its
metric, and a tiny model that learns a synthetic SST-2-format task when run as a user runs it."""

import json
import os
import random
import shutil
import subprocess
import sys

import pytest

from helpers.output_noise import noise_lines
from helpers.runners import load_runner

from paddle_megatronbert.data.glue import GLUE_TASKS, get_glue_task, read_glue_tsv
from paddle_megatronbert.finetune import shard_batches
from paddle_megatronbert.loop import resolve_device
from paddle_megatronbert.tokenizer import VOCAB_FILES

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GLUE_DIR = os.path.join(ROOT, "tests", "fixtures", "glue")


def write_tiny_model(directory, vocab_file, hidden=32):
    """A from-scratch MegatronBERT with pretraining heads (as a released checkpoint: no classifier) and its vocab."""
    import paddle

    from paddle_megatronbert import MegatronBertConfig, MegatronBertForPreTraining

    with open(vocab_file, encoding="utf-8") as f:
        vocab_size = sum(1 for _ in f)
    paddle.seed(0)
    # std 1/sqrt(hidden) rather than BERT-large's 0.02, so a hidden-64 model leaves its initial plateau quickly
    config = MegatronBertConfig(vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=1, num_attention_heads=4,
                                intermediate_size=2 * hidden, max_position_embeddings=128,
                                initializer_range=hidden ** -0.5, hidden_dropout_prob=0.0,
                                attention_probs_dropout_prob=0.0)
    MegatronBertForPreTraining(config).save_pretrained(str(directory))
    shutil.copy(vocab_file, os.path.join(str(directory), "vocab.txt"))
    return str(directory)


# ---- task names and files -----------------------------------------------------------------------------
def test_task_names_are_case_insensitive():
    assert get_glue_task("SST-2").directory == get_glue_task("sst2").directory == "SST-2"
    assert get_glue_task("mnli") is get_glue_task("MNLI") is GLUE_TASKS["mnli"]
    assert get_glue_task("STSB").is_regression and get_glue_task("sts-b").num_labels == 1
    with pytest.raises(ValueError, match="unknown GLUE task 'squad'; choose one of CoLA, SST-2, MRPC, STS-B"):
        get_glue_task("squad")


def test_unknown_task_fails_before_any_work(tmp_path):
    with pytest.raises(ValueError, match="unknown GLUE task 'sst-5'"):
        load_runner("run_glue").main(["--task_name", "sst-5", "--model_name_or_path", str(tmp_path / "none"),
                                      "--device", "cpu"])


EXPECTED_ROWS = {"cola": (6, 4), "sst-2": (6, 4), "mrpc": (4, 4), "sts-b": (4, 4), "qqp": (4, 4), "mnli": (4, 4),
                 "qnli": (4, 4), "rte": (4, 4), "wnli": (4, 4)}


@pytest.mark.parametrize("name", sorted(GLUE_TASKS))
def test_every_fixture_reads_in_the_official_layout(name):
    task = GLUE_TASKS[name]
    train = read_glue_tsv(os.path.join(GLUE_DIR, task.directory, "train.tsv"), task)
    dev = read_glue_tsv(os.path.join(GLUE_DIR, task.directory, f"{task.dev_splits[0]}.tsv"), task)
    assert (len(train), len(dev)) == EXPECTED_ROWS[name]
    pair_task = name not in ("cola", "sst-2")
    assert all((e.text_b is not None) == pair_task for e in train + dev)
    if task.is_regression:
        assert [e.label for e in train] == [4.8, 0.2, 3.75, 4.25]
    else:
        assert {e.label for e in train} <= set(range(task.num_labels)) and len({e.label for e in train}) > 1


def test_labels_quotes_and_mnli_columns():
    mnli = GLUE_TASKS["mnli"]
    matched = read_glue_tsv(os.path.join(GLUE_DIR, "MNLI", "dev_matched.tsv"), mnli)  # 16 columns, label last
    assert [e.label for e in matched] == [1, 0, 2, 1]  # entailment, contradiction, neutral (PaddleNLP's order)
    assert matched[0].text_a == "The children are playing in the garden." and matched[0].text_b == "Kids are outside."
    assert len(read_glue_tsv(os.path.join(GLUE_DIR, "MNLI", "dev_mismatched.tsv"), mnli)) == 3
    sst = read_glue_tsv(os.path.join(GLUE_DIR, "SST-2", "train.tsv"), GLUE_TASKS["sst-2"])
    assert sst[2].text_a == 'the "twist" is wonderful'  # no CSV quoting in GLUE files
    cola = read_glue_tsv(os.path.join(GLUE_DIR, "CoLA", "train.tsv"), GLUE_TASKS["cola"])  # no header
    assert cola[1].text_a == "Cat the mat on sat the." and cola[1].label == 0
    qnli = read_glue_tsv(os.path.join(GLUE_DIR, "QNLI", "train.tsv"), GLUE_TASKS["qnli"])
    assert [e.label for e in qnli] == [0, 1, 0, 1]  # entailment, not_entailment


def test_bad_tsv_is_an_error_naming_file_and_line(tmp_path):
    sst = GLUE_TASKS["sst-2"]
    path = tmp_path / "train.tsv"
    path.write_text("sentence\tlabel\ngood film\t1\nno label column\nbad film\t0\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"train\.tsv:3: expected 2 tab-separated columns for SST-2, found 1"):
        read_glue_tsv(str(path), sst)
    path.write_text("sentence\tlabel\ngood film\tpositive\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"train\.tsv:2: label 'positive' is not one of \['0', '1'\]"):
        read_glue_tsv(str(path), sst)
    path.write_text("text\tlabel\ngood film\t1\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"header lacks the column\(s\) \['sentence'\] of SST-2"):
        read_glue_tsv(str(path), sst)
    path.write_text("index\tsentence1\tsentence2\tscore\n0\ta\tb\thigh\n", encoding="utf-8")
    stsb = GLUE_TASKS["sts-b"]
    with pytest.raises(ValueError, match=r"train\.tsv:2: label 'high' is not a number"):
        read_glue_tsv(str(path), stsb)
    with pytest.raises(FileNotFoundError, match="GLUE SST-2 file not found"):
        read_glue_tsv(str(tmp_path / "nope.tsv"), sst)


# ---- command line and devices ---------------------------------------------------------------------------
def test_seed_command_lines_parse():
    run_glue = load_runner("run_glue")
    args = run_glue.parse_args("--task_name=mnli --output_dir=output/ --model_name_or_path=megatronbert-cased "
                               "--learning_rate=1e-5 --device=gpu --num_train_epochs=2".split())
    assert (args.task_name, args.device, args.learning_rate, args.num_train_epochs) == ("mnli", "gpu", 1e-5, 2)
    args = run_glue.parse_args("--model_type bert --model_name_or_path x --task_name SST-2 --max_seq_length 128 "
                               "--batch_size 32 --learning_rate 2e-5 --num_train_epochs 3 --logging_steps 1 "
                               "--save_steps 500 --output_dir out --n_gpu 1".split())
    assert (args.model_type, args.n_gpu, args.batch_size, args.save_steps) == ("bert", 1, 32, 500)


def test_device_flags():
    import paddle

    assert resolve_device(None, 0) == "cpu" and resolve_device("cpu", None) == "cpu"
    with pytest.raises(ValueError, match="--device gpu contradicts --n_gpu 0"):
        resolve_device("gpu", 0)
    with pytest.raises(ValueError, match="paddle.distributed.launch --gpus 0,1"):
        resolve_device(None, 2)
    if not paddle.is_compiled_with_cuda():
        with pytest.raises(ValueError, match="this Paddle build has no CUDA .* --n_gpu 0"):
            resolve_device(None, 1)


def test_data_parallel_batches_are_disjoint_and_cover_the_epoch():
    shards = [shard_batches(10, 2, epoch=3, seed=5, rank=r, world_size=3) for r in range(3)]
    assert [len(s) for s in shards] == [2, 2, 2]  # 10 padded to 12: every rank runs the same steps
    seen = [i for s in shards for batch in s for i in batch]
    assert sorted(set(seen)) == list(range(10)) and len(seen) == 12
    assert shard_batches(10, 2, 3, 5) != shard_batches(10, 2, 4, 5)  # reshuffled each epoch
    assert shard_batches(10, 4, 0, 0, shuffle=False) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]


# ---- every task end to end on the fixtures --------------------------------------------------------------
EXPECTED_KEYS = {
    "cola": ["mcc", "acc", "loss"],
    "sst-2": ["acc", "loss"],
    "mrpc": ["acc_and_f1", "acc", "precision", "recall", "f1", "loss"],
    "sts-b": ["pearson_and_spearman", "pearson", "spearman", "loss"],
    "qqp": ["acc_and_f1", "acc", "precision", "recall", "f1", "loss"],
    "mnli": ["acc", "loss", "acc_mm", "loss_mm"],
    "qnli": ["acc", "loss"],
    "rte": ["acc", "loss"],
    "wnli": ["acc", "loss"],
}


@pytest.fixture(scope="module")
def tiny_uncased_model(tmp_path_factory):
    return write_tiny_model(tmp_path_factory.mktemp("tiny") / "model", VOCAB_FILES["megatronbert-uncased"])


@pytest.mark.parametrize("name", sorted(GLUE_TASKS))
def test_every_task_trains_and_reports_its_metric(name, tiny_uncased_model, tmp_path, capsys):
    task = GLUE_TASKS[name]
    out = tmp_path / "out"
    results = load_runner("run_glue").main(
        ["--task_name", task.directory.lower() if name != "sst-2" else "SST-2", "--data_dir", GLUE_DIR,
         "--model_name_or_path", tiny_uncased_model, "--output_dir", str(out), "--device", "cpu", "--batch_size", "1",
         "--gradient_accumulation_steps", "2", "--max_steps", "2", "--save_steps", "1", "--logging_steps", "1",
         "--max_seq_length", "64", "--no_progress"])
    assert list(results) == EXPECTED_KEYS[name]
    assert json.load(open(out / "eval_results.json")) == results
    state = json.load(open(out / "trainer_state.json"))
    assert [h["step"] for h in state["history"]] == [1, 2] and state["metric_name"] == EXPECTED_KEYS[name][0]
    config = json.load(open(out / "best_model" / "config.json"))
    assert config["num_labels"] == task.num_labels
    assert config["architectures"] == ["MegatronBertForSequenceClassification"]
    printed = capsys.readouterr().out
    assert "global step 2/2, epoch: 1, batch: 4, loss: " in printed  # 2 micro-batches per optimizer step
    assert printed.count("eval loss: ") == 2 * len(task.dev_splits)


def _records(output_dir):
    with open(os.path.join(output_dir, "metrics.jsonl"), encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def test_fine_tuning_resumes_exactly_with_the_same_loop_as_pretraining(tiny_uncased_model, tmp_path, capsys):
    """The one loop's checkpoints in fine-tuning: stop at step 2 (--exit_interval), rerun the same command, and
    the losses, LRs, evaluations and kept model equal a straight run's (dropout on, so the RNG must come back).
    No --max_seq_length: it defaults to the model's 128 positions."""
    common = ["--task_name", "SST-2", "--data_dir", GLUE_DIR, "--model_name_or_path", tiny_uncased_model,
              "--device", "cpu", "--batch_size", "1", "--max_steps", "4", "--save_steps", "2", "--logging_steps", "1",
              "--hidden_dropout_prob", "0.1", "--learning_rate", "1e-3", "--no_progress", "--visualdl", "false"]
    run_glue = load_runner("run_glue")
    straight = run_glue.main(common + ["--output_dir", str(tmp_path / "straight")])
    assert "note: --max_seq_length 128, the model's max_position_embeddings" in capsys.readouterr().out
    run_glue.main(common + ["--output_dir", str(tmp_path / "resumed"), "--exit_interval", "2"])
    assert "exiting at step 2 as asked" in capsys.readouterr().out
    resumed = run_glue.main(common + ["--output_dir", str(tmp_path / "resumed")])
    assert "resumed from " in capsys.readouterr().out
    a, b = _records(tmp_path / "straight"), _records(tmp_path / "resumed")
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    for key in ("loss", "lr", "epoch", "batch"):
        assert [r[key] for r in a] == [r[key] for r in b], key
    assert len({r["loss"] for r in a}) == 4
    state_a, state_b = (json.load(open(tmp_path / d / "trainer_state.json")) for d in ("straight", "resumed"))
    assert [h["step"] for h in state_b["history"]] == [2, 4] and state_a == state_b
    assert resumed == straight or (not resumed and state_b["best_step"] == 2)  # the best came before the stop
    assert sorted(os.listdir(tmp_path / "resumed")) == ["best_model", "checkpoint-4", "eval_results.json", "latest",
                                                         "metrics.jsonl", "trainer_state.json"]


def test_fine_tuning_resume_with_another_training_file_is_refused_by_name(tiny_uncased_model, tmp_path, capsys):
    """The run fingerprint covers fine-tuning data too: a stopped run resumed over an edited train.tsv is refused
    in one line naming the training features, not continued on other data."""
    data = tmp_path / "glue"
    shutil.copytree(os.path.join(GLUE_DIR, "SST-2"), data / "SST-2")
    args = ["--task_name", "SST-2", "--data_dir", str(data), "--model_name_or_path", tiny_uncased_model,
            "--device", "cpu", "--batch_size", "1", "--max_steps", "4", "--save_steps", "2", "--no_progress",
            "--visualdl", "false", "--output_dir", str(tmp_path / "out")]
    run_glue = load_runner("run_glue")
    run_glue.main(args + ["--exit_interval", "2"])
    train = data / "SST-2" / "train.tsv"
    lines = train.read_text(encoding="utf-8").splitlines()
    train.write_text("\n".join(lines[:1] + lines[2:] + lines[1:2]) + "\n", encoding="utf-8")  # same rows, other order
    capsys.readouterr()
    with pytest.raises(ValueError, match=r"cannot resume from .*checkpoint-2: training_features '\d+ features"):
        run_glue.main(args)


# ---- learning a synthetic task ------------------------------------------------------------------------------
def write_synthetic_sst2(data_dir, vocab_path):
    """SST-2 layout; a sentence is 6-14 random filler words with 1, 3 or 5 of "good"/"bad" inserted, and its
    label is whether "good" is the majority: the model has to count, not spot one word."""
    words = [f"w{i}" for i in range(40)]
    vocab_path.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "good", "bad"] + words) + "\n",
                          encoding="utf-8")
    os.makedirs(data_dir / "SST-2")
    for split, size, seed in (("train", 800, 1), ("dev", 300, 2)):  # dev: held-out sentences
        rng = random.Random(seed)
        lines = ["sentence\tlabel"]
        for _ in range(size):
            marks = rng.choice([1, 3, 5])
            good = rng.randint(0, marks)
            tokens = rng.choices(words, k=rng.randint(6, 14))
            for mark in ["good"] * good + ["bad"] * (marks - good):
                tokens.insert(rng.randint(0, len(tokens)), mark)
            lines.append(f"{' '.join(tokens)}\t{int(good > marks - good)}")
        (data_dir / "SST-2" / f"{split}.tsv").write_text("\n".join(lines) + "\n", encoding="utf-8")


def test_tiny_model_learns_synthetic_sst2_run_as_a_user_would(tmp_path):
    write_synthetic_sst2(tmp_path / "glue", tmp_path / "vocab.txt")
    model_dir = write_tiny_model(tmp_path / "model", str(tmp_path / "vocab.txt"), hidden=64)
    out = tmp_path / "out"
    command = ("run_glue.py --model_type bert --model_name_or_path {model} --task_name SST-2 --max_seq_length 32 "
               "--batch_size 32 --learning_rate 5e-3 --num_train_epochs 3 --logging_steps 1 --save_steps 25 "
               "--output_dir {out} --n_gpu 0 --data_dir {data} --seed 3").format(model=model_dir, out=out,
                                                                                 data=tmp_path / "glue")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    proc = subprocess.run([sys.executable, "-u", *command.split()], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "global step 1/75, epoch: 1, batch: 1, loss: " in proc.stdout and "speed: " in proc.stdout
    assert "eval loss: " in proc.stdout and "acc: " in proc.stdout
    results = json.load(open(out / "eval_results.json"))
    assert list(results) == ["acc", "loss"] and results["acc"] >= 0.9, results
    state = json.load(open(out / "trainer_state.json"))
    assert [h["step"] for h in state["history"]] == [25, 50, 75]
    assert state["best_metric"] == results["acc"] == max(h["acc"] for h in state["history"])


def test_tensor_parallel_launch_matches_one_process(tiny_uncased_model, tmp_path):
    """The seed's launch command with --tensor_parallel_degree 2 on CPU (gloo): same numbers as one process."""
    common = ["--task_name=mnli", "--data_dir", GLUE_DIR, f"--model_name_or_path={tiny_uncased_model}",
              "--learning_rate=1e-3", "--device=cpu", "--batch_size", "2", "--max_steps", "3", "--save_steps", "3",
              "--max_seq_length", "64", "--no_progress"]
    single = load_runner("run_glue").main(common + ["--output_dir", str(tmp_path / "single")])
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    proc = subprocess.run(
        [sys.executable, "-m", "paddle.distributed.launch", "--nproc_per_node", "2", "--log_dir", str(tmp_path / "log"),
         "run_glue.py", *common, "--output_dir", str(tmp_path / "tp2"), "--tensor_parallel_degree", "2"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    logs = "".join(open(tmp_path / "log" / f"workerlog.{r}").read() for r in range(2))
    assert proc.returncode == 0, logs[-3000:]
    assert logs.count("eval loss: ") == 2  # matched + mismatched, printed by rank 0 only
    assert noise_lines(logs) == []  # fleet's start-up chatter and the libraries' warnings stay out of the logs
    parallel = json.load(open(tmp_path / "tp2" / "eval_results.json"))
    assert list(parallel) == list(single)
    for key in single:
        assert parallel[key] == pytest.approx(single[key], abs=1e-5), key
    assert json.load(open(tmp_path / "tp2" / "best_model" / "config.json"))["tensor_parallel_degree"] == 1  # merged


def test_paddlenlp_dataset_names_convert_and_fail_clearly_offline(monkeypatch):
    import paddlenlp.datasets

    from paddle_megatronbert.data.glue import load_glue_split

    def fake_load_dataset(name, task, splits):  # PaddleNLP maps label strings to ids through label_list
        assert (name, task, splits) == ("glue", "rte", "dev")
        return [{"sentence1": "A dog barks.", "sentence2": "An animal makes noise.", "labels": 0}]

    monkeypatch.setattr(paddlenlp.datasets, "load_dataset", fake_load_dataset)
    (example,) = load_glue_split(GLUE_TASKS["rte"], "dev")
    assert (example.text_a, example.text_b, example.label) == ("A dog barks.", "An animal makes noise.", 0)

    def offline(*args, **kwargs):
        raise RuntimeError("Download from https://bj.bcebos.com/dataset/glue/RTE.zip failed. Retry limit reached")

    monkeypatch.setattr(paddlenlp.datasets, "load_dataset", offline)
    with pytest.raises(OSError, match=r"cannot load PaddleNLP's glue/rte dev .* pass --data_dir .* \(RTE/dev\.tsv\)"):
        load_glue_split(GLUE_TASKS["rte"], "dev")
