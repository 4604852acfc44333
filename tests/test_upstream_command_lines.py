"""The command lines of the READMEs this project ports, run as written on CPU (issue 17 item 4).

Sources (PaddleNLP, the commit the search tool holds, 2.x line):
- ``model_zoo/megatronbert/README.md``: SQuAD 1.1, SQuAD 2.0, MNLI fine-tuning (its SQuAD lines lack the ``\\``
  after ``--model_name_or_path=megatronbert-cased``; a shell would split the command there, the intent is clear);
- ``model_zoo/bert/README.md``: pretraining and SST-2 fine-tuning.

What changes, and only that: ``python -m paddle.distributed.launch [--gpus "0"]`` is dropped (the launcher is
tested in test_parallel*.py); ``--device gpu`` becomes ``cpu``; the data, which the READMEs download, is given
locally (``--train_file/--predict_file``, ``--data_dir``); ``--output_dir`` is a scratch directory; the model name
becomes a tiny model directory of the same casing (no 345M weights here: a registered name always builds the 345M
config; that the names themselves are accepted, BERT's included, is checked by parsing each line as written).
"""

from __future__ import annotations

import json
import os
import shlex

import pytest

from helpers.runners import load_runner
from test_run_squad import write_tiny_model

from paddle_megatronbert.tokenizer import VOCAB_FILES

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SQUAD_DIR = os.path.join(REPO, "tests", "fixtures", "squad")
GLUE_DIR = os.path.join(REPO, "tests", "fixtures", "glue")

MEGATRONBERT_SQUAD_V1 = """python -m paddle.distributed.launch run_squad.py \\
    --do_train \\
    --do_predict \\
    --batch_size=8 \\
    --model_name_or_path=megatronbert-cased \\
    --learning_rate=1e-5 \\
    --output_dir=output/ \\
    --device=gpu \\
    --num_train_epochs=2"""
MEGATRONBERT_SQUAD_V2 = """python -m paddle.distributed.launch run_squad.py \\
    --do_train \\
    --version_2_with_negative \\
    --do_predict \\
    --batch_size=8 \\
    --model_name_or_path=megatronbert-cased \\
    --learning_rate=1e-5 \\
    --output_dir=output/ \\
    --device=gpu \\
    --num_train_epochs=2"""
MEGATRONBERT_MNLI = """python -m paddle.distributed.launch run_glue.py \\
    --task_name=mnli \\
    --output_dir=output/ \\
    --model_name_or_path=megatronbert-cased \\
    --learning_rate=1e-5 \\
    --device=gpu \\
    --num_train_epochs=2"""
BERT_SST2 = """python -m paddle.distributed.launch --gpus "0" run_glue.py \\
    --model_type bert \\
    --model_name_or_path bert-base-uncased \\
    --task_name SST-2 \\
    --max_seq_length 128 \\
    --batch_size 32   \\
    --learning_rate 2e-5 \\
    --num_train_epochs 3 \\
    --logging_steps 1 \\
    --save_steps 500 \\
    --output_dir ./tmp/ \\
    --device gpu"""
BERT_PRETRAIN = """python -m paddle.distributed.launch --gpus "0" run_pretrain.py \\
    --model_type bert \\
    --model_name_or_path bert-base-uncased \\
    --max_predictions_per_seq 20 \\
    --batch_size 32   \\
    --learning_rate 1e-4 \\
    --weight_decay 1e-2 \\
    --adam_epsilon 1e-6 \\
    --warmup_steps 10000 \\
    --input_dir data/ \\
    --output_dir pretrained_models/ \\
    --logging_steps 1 \\
    --save_steps 20000 \\
    --max_steps 1000000 \\
    --device gpu \\
    --use_amp False"""


TINY_FOR = {"megatronbert-cased": "megatronbert-cased", "megatronbert-uncased": "megatronbert-uncased",
            "bert-base-uncased": "megatronbert-uncased"}


def as_run_here(command: str, output_dir: str, local_data=(), models=None):
    """(runner name, argv): the launcher prefix dropped, gpu -> cpu, our output dir, local data appended, and
    (with ``models``: registered name -> directory) the model name replaced by a local directory."""
    words = shlex.split(command.replace("\\\n", " "))
    script = next(w for w in words if w.endswith(".py"))
    argv = words[words.index(script) + 1:]
    out = []
    for i, word in enumerate(argv):
        if word in ("--device=gpu",):
            word = "--device=cpu"
        elif word.startswith("--output_dir="):
            word = f"--output_dir={output_dir}"
        elif i and argv[i - 1] == "--device":
            word = "cpu"
        elif i and argv[i - 1] == "--output_dir":
            word = output_dir
        elif models and word.startswith("--model_name_or_path="):
            word = "--model_name_or_path=" + models[TINY_FOR[word.split("=", 1)[1]]]
        elif models and i and argv[i - 1] == "--model_name_or_path":
            word = models[TINY_FOR[word]]
        out.append(word)
    return script[: -len(".py")], out + list(local_data)


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    """A tiny model directory per registered name (same vocab and casing)."""
    root = tmp_path_factory.mktemp("weights")
    return {name: write_tiny_model(root / name, VOCAB_FILES[name], hidden=32, max_position_embeddings=128)
            for name in ("megatronbert-cased", "megatronbert-uncased")}


@pytest.mark.parametrize("command", ["MEGATRONBERT_SQUAD_V1", "MEGATRONBERT_SQUAD_V2", "MEGATRONBERT_MNLI",
                                     "BERT_SST2"])
def test_every_fine_tuning_line_parses_as_written_names_included(command):
    name, argv = as_run_here(globals()[command], "out")
    args = load_runner(name).parse_args(argv)
    assert args.model_name_or_path in ("megatronbert-cased", "megatronbert-uncased") and args.device == "cpu"


@pytest.mark.parametrize("command, data, version_2", [
    (MEGATRONBERT_SQUAD_V1, "squad_v1.json", False),
    (MEGATRONBERT_SQUAD_V2, "squad_v2.json", True),
], ids=["megatronbert-squad1.1", "megatronbert-squad2.0"])
def test_megatronbert_readme_squad_lines_run_as_written(tiny_models, tmp_path, command, data, version_2):
    path = os.path.join(SQUAD_DIR, data)
    name, argv = as_run_here(command, str(tmp_path / "out"), ["--train_file", path, "--predict_file", path],
                             tiny_models)
    results = load_runner(name).main(argv)
    assert results["total"] > 0 and 0.0 <= results["f1"] <= 100.0
    assert ("NoAns_total" in results) == version_2
    assert json.load(open(tmp_path / "out" / "eval_results.json")) == results
    state = json.load(open(tmp_path / "out" / "trainer_state.json"))
    assert state["max_steps"] == 2 * state["data_position"]["steps_per_epoch"]  # --num_train_epochs=2
    assert state["batch_size"] == 8


@pytest.mark.parametrize("command, metric", [(MEGATRONBERT_MNLI, "acc_mm"), (BERT_SST2, "acc")],
                         ids=["megatronbert-mnli", "bert-sst-2"])
def test_readme_glue_lines_run_as_written(tiny_models, tmp_path, command, metric):
    name, argv = as_run_here(command, str(tmp_path / "out"), ["--data_dir", GLUE_DIR], tiny_models)
    results = load_runner(name).main(argv)
    assert metric in results and 0.0 <= results[metric] <= 1.0
    assert json.load(open(tmp_path / "out" / "eval_results.json")) == results


def test_bert_readme_pretraining_line_parses_as_written():
    """Parsed, not run: bert-base-uncased names the 345M MegatronBERT config, a step of which at batch 32 takes
    minutes on this CPU; the README's own pretraining commands run in test_docs.py on a tiny config."""
    name, argv = as_run_here(BERT_PRETRAIN, "out", [])
    args = load_runner(name).parse_args(argv)
    assert (args.model_name_or_path, args.max_predictions_per_seq, args.batch_size) == ("megatronbert-uncased", 20, 32)
    assert (args.learning_rate, args.weight_decay, args.adam_epsilon, args.warmup_steps) == (1e-4, 1e-2, 1e-6, 10000)
    assert (args.max_steps, args.save_steps, args.logging_steps, args.amp, args.device) == (
        1000000, 20000, 1, "none", "cpu")
