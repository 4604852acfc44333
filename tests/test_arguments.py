"""The runners' shared flags (paddle_megatronbert/arguments.py): one meaning in all three runners, read off
their --help; --max_steps overriding the epochs in pretraining (the shards cycled, the LR schedule ending
there); the PaddleNLP and Megatron-LM spellings users bring."""

import json
import os
import re

import h5py
import pytest

from helpers.runners import load_runner
from helpers.tiny_pretraining import pretrain_argv, shared_tiny_pretraining_data

from paddle_megatronbert.arguments import TASK_DEFAULTS, resolve_max_seq_length, total_optimizer_steps

RUNNERS = {"pretrain": "run_pretrain", "squad": "run_squad", "glue": "run_glue"}
REQUIRED = {"pretrain": ["--input_dir", "d", "--output_dir", "o"], "squad": ["--do_train"],
            "glue": ["--task_name", "sst-2"]}


@pytest.fixture(scope="module")
def runners():
    return {key: load_runner(name) for key, name in RUNNERS.items()}


def help_entries(text):
    """``{--flag: (its other spellings, its help text)}`` from argparse's --help output."""
    entries, current = {}, None
    for line in text.splitlines():
        match = re.match(r"^  (-[-\w]+.*?)(?:  +(\S.*))?$", line)
        if match and line.startswith("  -"):
            spellings = [s.split(" ")[0] for s in match.group(1).split(", ")]
            current = spellings[0]
            entries[current] = [spellings[1:], match.group(2) or ""]
        elif current and line.startswith("    ") and line.strip():
            entries[current][1] += " " + line.strip()
        elif not line.strip() or not line.startswith(" "):
            current = None
    return {flag: (spellings, " ".join(text.split())) for flag, (spellings, text) in entries.items()}


def run_help(runner, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")  # one width for all three, so wrapping cannot differ
    with pytest.raises(SystemExit) as exit_:
        runner.parse_args(["--help"])
    assert exit_.value.code == 0
    return help_entries(capsys.readouterr().out)


def test_shared_flags_have_one_meaning_in_every_runner(runners, capsys, monkeypatch):
    helps = {key: run_help(runner, capsys, monkeypatch) for key, runner in runners.items()}
    shared = set.intersection(*(set(h) for h in helps.values())) - {"-h"}
    # the loop's flags, the device/precision flags and the grid flags exist in all three
    assert {"--max_steps", "--num_train_epochs", "--amp", "--use_amp", "--amp_dtype", "--n_gpu", "--learning_rate",
            "--gradient_accumulation_steps", "--save_steps", "--resume", "--exit_interval", "--tensor_parallel_degree",
            "--data_parallel_degree", "--sharding_degree", "--model_name_or_path", "--seed"} <= shared
    from paddle_megatronbert.arguments import RunnerArgumentParser, add_training_arguments

    only_shared = RunnerArgumentParser("glue")
    add_training_arguments(only_shared)
    assert shared == {a.option_strings[0] for a in only_shared._actions} - {"-h"}  # every shared flag, each once
    for flag in sorted(shared):
        (spellings, text), *others = [helps[key][flag] for key in RUNNERS]
        assert "(default: " in text, f"{flag}: no default shown in --help: {text}"
        if flag[2:] in TASK_DEFAULTS:  # the same help; the default is the task's own (listed in one table)
            for key in RUNNERS:
                shown = re.search(r"\(default: (.*)\)$", helps[key][flag][1]).group(1)
                assert shown == str(TASK_DEFAULTS[flag[2:]][key]), (flag, key, shown)
            text = re.sub(r" \(default: .*\)$", "", text)
            others = [(s, re.sub(r" \(default: .*\)$", "", t)) for s, t in others]
        for other_spellings, other_text in others:
            assert (other_spellings, other_text) == (spellings, text), flag
    # the meaning of --max_steps is said once, and says it overrides the epochs
    assert "overriding --num_train_epochs" in helps["pretrain"]["--max_steps"][1]


def test_max_steps_and_epochs_count_the_same_way_everywhere():
    assert total_optimizer_steps(150, 3, 16) == 150  # --max_steps wins whatever the epochs
    assert total_optimizer_steps(-1, 3, 16) == 48
    assert total_optimizer_steps(-1, 0.1, 146) == 15  # epochs round up (PaddleNLP's Trainer, HF)
    assert total_optimizer_steps(-1, 0.001, 10) == 1


def _small_shard(data, directory, rows=128):
    """The first ``rows`` sequences of a tiny shard, as a shard of their own."""
    os.makedirs(directory)
    source = os.path.join(data.shards, sorted(os.listdir(data.shards))[0])
    with h5py.File(source, "r") as f, h5py.File(os.path.join(directory, "small.hdf5"), "w") as g:
        for key, dataset in f.items():
            g.create_dataset(key, data=dataset[:rows], compression="gzip")
        g.attrs.update(dict(f.attrs))
    return str(directory)


def test_pretraining_max_steps_overrides_the_epochs_and_ends_the_schedule(tmp_path_factory, tmp_path):
    data = shared_tiny_pretraining_data(tmp_path_factory)
    shards = _small_shard(data, tmp_path / "shards")
    argv = pretrain_argv(data, tmp_path / "out", "--num_train_epochs", "1", "--warmup_steps", "0",
                         "--logging_steps", "1", max_steps=40)
    argv[argv.index("--input_dir") + 1] = shards
    result = load_runner("run_pretrain").main(argv)
    with open(tmp_path / "out" / "metrics.jsonl", encoding="utf-8") as f:
        records = [json.loads(line) for line in f]
    # 128 sequences at batch 8: 16 steps an epoch; 1 epoch asked, 40 steps asked -> 40 steps over 3 epochs
    assert result["step"] == result["last_step"] == 40 and [r["step"] for r in records] == list(range(1, 41))
    assert {r["max_steps"] for r in records} == {40}
    assert [r["epoch"] for r in records] == [0] * 16 + [1] * 16 + [2] * 8
    # the LR of step k is 2e-3 * (40 - (k - 1)) / 40: linear decay to 0 at step 40, not at the epochs' 16
    assert [r["lr"] for r in records] == pytest.approx([2e-3 * (41 - k) / 40 for k in range(1, 41)], rel=1e-6)
    assert records[-1]["eta_s"] == 0 and records[-1]["elapsed_s"] > 0


def test_megatron_lm_spellings_are_aliases(runners):
    args = runners["pretrain"].parse_args(REQUIRED["pretrain"] + (
        "--lr 3e-4 --clip-grad 0.5 --warmup .02 --fp16 --train-iters 7 --save-interval 3 --micro-batch-size 4 "
        "--exit-interval 5 --log-interval 2 --weight-decay 0.1 --adam-beta2 0.98 --hidden-dropout 0.05 "
        "--recompute-activations --vocab-file v.txt").split())
    assert (args.learning_rate, args.max_grad_norm, args.warmup_proportion, args.amp) == (3e-4, 0.5, 0.02, "fp16")
    assert (args.max_steps, args.save_steps, args.batch_size, args.exit_interval, args.logging_steps) == (7, 3, 4, 5, 2)
    assert (args.weight_decay, args.adam_beta2, args.hidden_dropout_prob, args.recompute) == (0.1, 0.98, 0.05, True)
    assert args.tokenizer_name_or_path == "v.txt"
    assert runners["squad"].parse_args(REQUIRED["squad"] + ["--seq-length", "128", "--bf16"]).max_seq_length == 128


@pytest.mark.parametrize("flag, equivalent", [
    ("--num-layers", "num_hidden_layers in --config_file"),
    ("--hidden-size", "hidden_size in --config_file"),
    ("--global-batch-size", "set --gradient_accumulation_steps"),
    ("--seq-length", "pretraining reads the sequence length from the shards"),
])
def test_megatron_lm_flags_without_an_equivalent_are_answered_in_one_line(runners, capsys, flag, equivalent):
    with pytest.raises(SystemExit) as exit_:
        runners["pretrain"].parse_args(REQUIRED["pretrain"] + [flag, "24"])
    assert exit_.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert re.match(rf"^\S+: error: {flag} is Megatron-LM's flag; here ", last), last
    assert equivalent in last


def test_abbreviations_are_refused_not_guessed(runners, capsys):
    with pytest.raises(SystemExit):
        runners["pretrain"].parse_args(REQUIRED["pretrain"] + ["--warm", "3"])  # --warmup_steps? --warmup?
    assert "unrecognized arguments: --warm" in capsys.readouterr().err


@pytest.mark.parametrize("key", sorted(RUNNERS))
def test_paddlenlp_spellings_mean_the_same_everywhere(runners, capsys, key):
    parse = runners[key].parse_args
    assert parse(REQUIRED[key] + ["--use_amp", "true"]).amp == "fp16"
    assert parse(REQUIRED[key] + ["--use_amp", "--amp_dtype", "bfloat16"]).amp == "bf16"
    assert parse(REQUIRED[key] + ["--amp", "bf16"]).amp == "bf16" and parse(REQUIRED[key]).amp == "none"
    assert parse(REQUIRED[key] + ["--n_gpu", "0"]).n_gpu == 0
    capsys.readouterr()
    args = parse(REQUIRED[key] + ["--model_name_or_path", "bert-base-uncased", "--model_type", "bert"])
    assert args.model_name_or_path == "megatronbert-uncased"
    assert "note: bert-base-uncased is PaddleNLP's BERT name; using its MegatronBERT counterpart megatronbert-uncased" \
        in capsys.readouterr().out
    args = parse(REQUIRED[key] + ["--model_name_or_path", "bert-large-cased"])
    assert args.model_name_or_path == "megatronbert-cased"


def test_fine_tuning_sequence_length_defaults_to_the_model_positions(capsys):
    from argparse import Namespace

    from paddle_megatronbert import MegatronBertConfig

    short = MegatronBertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                               intermediate_size=64, max_position_embeddings=128)
    assert resolve_max_seq_length(Namespace(max_seq_length=None), short) == 128
    assert "note: --max_seq_length 128, the model's max_position_embeddings" in capsys.readouterr().out
    assert resolve_max_seq_length(Namespace(max_seq_length=64), short) == 64
    long = MegatronBertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                              intermediate_size=64, max_position_embeddings=1024)
    assert resolve_max_seq_length(Namespace(max_seq_length=None), long) == 512
    assert capsys.readouterr().out == ""
