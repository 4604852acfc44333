"""Bad-input sweep: every runner x each kind of bad argument or file, run as a user runs it, must exit non-zero
with ONE clear error line (``error: ...`` or ``PROG: error: ...``, naming the problem and the file or argument,
as the last line of stderr) and no Python traceback.

Most cases execute the script's ``__main__`` block in this process (``runpy``, output captured at the file
descriptors, an escaping exception printed as the interpreter would print it): the user-visible behaviour
at a fraction of a subprocess's start-up cost. At least one case per runner is a real subprocess.
Cases marked ``xfail(strict=True)`` are known runner bugs, described in their reason: fixing one flips it.
"""

import json
import logging
import os
import re
import runpy
import shutil
import subprocess
import sys
import traceback
from dataclasses import dataclass
from typing import Callable, Optional

import pytest

from helpers.tiny_pretraining import REPO, VOCAB_SIZE, pretrain_argv, shared_tiny_pretraining_data, subprocess_env

TRACEBACK = "Traceback (most recent call last)"
# "error: ..." (the runners' own handler) or "PROG: error: ..." (argparse, plot_metrics)
ERROR_LINE = re.compile(r"^(?:[\w.-]+: )?error: ")
SQUAD_V1 = os.path.join(REPO, "tests", "fixtures", "squad", "squad_v1.json")
GLUE_DIR = os.path.join(REPO, "tests", "fixtures", "glue")


@pytest.fixture(scope="module")
def pretraining_data(tmp_path_factory):
    return shared_tiny_pretraining_data(tmp_path_factory)


@pytest.fixture(scope="module")
def tiny_model(pretraining_data, tmp_path_factory):
    """A from-scratch 1-layer MegatronBERT directory (config.json, weights, vocab.txt) for the fine-tuning runners."""
    import paddle

    from paddle_megatronbert import MegatronBertConfig, MegatronBertForPreTraining

    directory = str(tmp_path_factory.mktemp("tiny_model"))
    paddle.seed(0)
    config = MegatronBertConfig(vocab_size=VOCAB_SIZE, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                intermediate_size=64, max_position_embeddings=128)
    MegatronBertForPreTraining(config).save_pretrained(directory)
    shutil.copy(pretraining_data.vocab, os.path.join(directory, "vocab.txt"))
    return directory


@pytest.fixture(scope="module")
def checkpointed_run(pretraining_data, tmp_path_factory):
    """An output directory of a 1-step pretraining run: checkpoint-1, `latest`, metrics.jsonl."""
    directory = tmp_path_factory.mktemp("checkpointed_run")
    run_pretrain = runpy.run_path(os.path.join(REPO, "run_pretrain.py"))  # the module, not its __main__ block
    run_pretrain["main"](pretrain_argv(pretraining_data, directory, max_steps=1))
    assert os.path.isfile(directory / "checkpoint-1" / "trainer_state.json")
    return str(directory)


class Inputs:
    """What a case builds its command line from; fixtures are built only when a case asks for them.

    Args:
        request: the test's pytest request (for lazy fixtures).
        tmp: the case's own temporary directory.
    """

    def __init__(self, request, tmp):
        self._request = request
        self.tmp = str(tmp)
        self.out = os.path.join(self.tmp, "out")

    @property
    def data(self):
        return self._request.getfixturevalue("pretraining_data")

    @property
    def model(self):
        return self._request.getfixturevalue("tiny_model")

    def path(self, name):
        return os.path.join(self.tmp, name)

    def write(self, name, content):
        """``content`` (text or bytes) into ``name`` under the case's directory; returns its path."""
        path = self.path(name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(content if isinstance(content, bytes) else content.encode("utf-8"))
        return path

    # ---- run_pretrain ----
    def pretrain(self, **overrides):
        """The working tiny command line with ``--flag value`` overrides (value None drops the flag)."""
        argv = pretrain_argv(self.data, self.out, max_steps=2)
        for flag, value in overrides.items():
            flag = "--" + flag
            if flag in argv:
                index = argv.index(flag)
                if value is None:
                    del argv[index:index + 2]
                else:
                    argv[index + 1] = value
            elif value is not None:
                argv += [flag, value]
        return argv

    def shard_dir(self, damage=None):
        """A directory with one copy of a good shard, ``damage(path)`` applied to it."""
        directory = self.path("shards")
        os.makedirs(directory)
        source = os.path.join(self.data.shards, sorted(os.listdir(self.data.shards))[0])
        target = os.path.join(directory, "bad.hdf5")
        shutil.copyfile(source, target)
        if damage:
            damage(target)
        return directory

    def config(self, **changes):
        """configs/tiny.json over the test vocab, with ``changes``."""
        with open(self.data.config, encoding="utf-8") as f:
            config = json.load(f)
        config.update(changes)
        return self.write("config.json", json.dumps(config))

    def resumable(self, damage):
        """A copy of the 1-step run's output directory, ``damage(directory)`` applied: the output_dir of a resume."""
        shutil.copytree(self._request.getfixturevalue("checkpointed_run"), self.out)
        damage(self.out)
        return self.pretrain(max_steps="3")

    # ---- create_pretraining_data ----
    def create_data(self, **overrides):
        options = {"--input_file": os.path.join(REPO, "data", "sample_text.txt"), "--output_dir": self.out,
                   "--vocab_file": self.data.vocab, "--max_seq_length": "64", "--max_predictions_per_seq": "10",
                   "--dupe_factor": "1", "--num_workers": "1"}
        options.update({"--" + k: v for k, v in overrides.items()})
        return [x for item in options.items() for x in item]

    # ---- convert_checkpoint ----
    def hf_dir_with_corrupt_weights(self, weights="model.safetensors", content=bytes(64)):
        """An HF-layout directory (config.json + ``weights``) whose weights file holds ``content`` (64 zero bytes)."""
        self.write("hf/config.json", json.dumps({"model_type": "megatron-bert", "hidden_size": 64}))
        return os.path.dirname(self.write(f"hf/{weights}", content))

    # ---- fine-tuning ----
    def squad(self, *extra, model=None):
        return ["--do_train", "--model_name_or_path", model or self.model, "--output_dir", self.out, "--device", "cpu",
                "--max_seq_length", "64", "--max_steps", "1", "--no_progress", *extra]

    def glue(self, *extra, model=None):
        return ["--model_name_or_path", model or self.model, "--output_dir", self.out, "--device", "cpu",
                "--max_seq_length", "32", "--max_steps", "1", "--no_progress", *extra]

    def glue_dir(self, train_tsv):
        """A GLUE data directory whose SST-2 train.tsv is ``train_tsv`` (dev.tsv from the fixtures)."""
        self.write("glue/SST-2/train.tsv", train_tsv)
        shutil.copy(os.path.join(GLUE_DIR, "SST-2", "dev.tsv"), self.path("glue/SST-2/dev.tsv"))
        return self.path("glue")


def truncate_half(path):
    os.truncate(path, os.path.getsize(path) // 2)


def scribble(path):
    with open(path, "r+b") as f:  # over compressed data chunks: the file opens, reading fails
        f.seek(os.path.getsize(path) // 3)
        f.write(b"\xa5" * 4096)


def write_file(relative, content):
    def damage(directory):
        with open(os.path.join(directory, relative), "wb") as f:
            f.write(content)
    return damage


def truncate_file(relative):
    return lambda directory: truncate_half(os.path.join(directory, relative))


@dataclass
class Case:
    """One bad input.

    Args:
        script: the runner, relative to the repository.
        argv: builds its command line from an :class:`Inputs`.
        error: a regex the one error line must match (it names the problem and the file or argument).
        subprocess: run as a real subprocess (else the ``__main__`` block in this process).
        bug: a known runner bug (the case is an xfail until it is fixed).
        no_work: the output directory must not even be created (the check comes before any work).
        needs: a module the case needs (skipped without it).
        not_shown: a regex no line of the output (or INFO log record, in process) may match: noise that would
            bury the error line.
    """

    script: str
    argv: Callable[[Inputs], list]
    error: str
    subprocess: bool = False
    bug: Optional[str] = None
    no_work: bool = False
    needs: Optional[str] = None
    not_shown: Optional[str] = None


PRETRAIN, CREATE, CONVERT = "run_pretrain.py", "tools/create_pretraining_data.py", "tools/convert_checkpoint.py"
SQUAD, GLUE, PLOT = "run_squad.py", "run_glue.py", "tools/plot_metrics.py"
BAD_SST2 = "sentence\tlabel\ngood film\t1\nno label column\nbad film\t0\n"

CASES = {
    # ---- run_pretrain.py ----
    "pretrain-missing_input_dir": Case(PRETRAIN, lambda i: i.pretrain(input_dir=i.path("nope")),
                                       r"--input_dir \S*/nope is not a directory", subprocess=True, no_work=True),
    "pretrain-empty_input_dir": Case(PRETRAIN, lambda i: i.pretrain(input_dir=os.makedirs(i.path("e")) or i.path("e")),
                                     r"--input_dir \S*/e has no HDF5 shards", no_work=True),
    "pretrain-truncated_shard": Case(PRETRAIN, lambda i: i.pretrain(input_dir=i.shard_dir(truncate_half)),
                                     r"cannot open shard \S*/bad\.hdf5 as HDF5 \(corrupt or truncated\?\)"),
    "pretrain-corrupt_shard": Case(PRETRAIN, lambda i: i.pretrain(input_dir=i.shard_dir(scribble)),
                                   r"cannot read shard \S*/bad\.hdf5 \(corrupt or truncated\?\)"),
    "pretrain-wrong_max_predictions": Case(
        PRETRAIN, lambda i: i.pretrain(max_predictions_per_seq="20"),
        r"shard \S*\.hdf5 has 10 masked positions per sequence but --max_predictions_per_seq is 20"),
    "pretrain-missing_config_file": Case(PRETRAIN, lambda i: i.pretrain(config_file=i.path("nope.json")),
                                         r"nope\.json' is neither a registered name .* nor a JSON file", no_work=True),
    "pretrain-config_not_json": Case(
        PRETRAIN, lambda i: i.pretrain(config_file=i.write("c.json", '{"hidden_size": 64,')),
        r"c\.json is not valid JSON", no_work=True),
    "pretrain-config_not_an_object": Case(
        PRETRAIN, lambda i: i.pretrain(config_file=i.write("c.json", "[64, 2]")),
        r"c\.json: a config must be a JSON object of fields, got a list", no_work=True),
    "pretrain-config_field_wrong_type": Case(
        PRETRAIN, lambda i: i.pretrain(config_file=i.config(num_attention_heads="two")),
        r"config\.json: config field num_attention_heads must be a positive integer, got 'two'", no_work=True),
    "pretrain-config_unknown_key": Case(  # a typo would otherwise leave hidden_size at its default, silently
        PRETRAIN, lambda i: i.pretrain(config_file=i.config(hidden_sizee=64)),
        r"config\.json: unknown config field\(s\): hidden_sizee", no_work=True),
    "pretrain-unknown_model_name": Case(
        PRETRAIN, lambda i: i.pretrain(config_file=None, model_name_or_path="megatronbert-huge"),
        r"'megatronbert-huge' is neither a registered name", no_work=True),
    "pretrain-negative_batch_size": Case(PRETRAIN, lambda i: i.pretrain(batch_size="-4"),
                                         r"--batch_size must be >= 1, got -4", no_work=True),
    "pretrain-tp_not_dividing_heads": Case(
        PRETRAIN, lambda i: i.pretrain(tensor_parallel_degree="3"),
        r"num_attention_heads \(2\) is not divisible by tensor_parallel_degree \(3\)", no_work=True),
    "pretrain-nan_learning_rate": Case(
        PRETRAIN, lambda i: i.pretrain(learning_rate="nan"), r"--learning_rate must be in \[0, 3\.40282e\+38\], got nan",
        no_work=True),
    "pretrain-warmup_proportion_above_1": Case(PRETRAIN, lambda i: i.pretrain(warmup_proportion="1.5"),
                                               r"--warmup_proportion must be in \[0, 1\], got 1\.5", no_work=True),
    "pretrain-zero_stage_2_on_cpu": Case(
        PRETRAIN, lambda i: i.pretrain(sharding_stage="2"),
        r"--sharding_stage: ZeRO sharding stage 2 is not available on CPU", no_work=True),
    "pretrain-max_steps_zero": Case(PRETRAIN, lambda i: i.pretrain(max_steps="0"),
                                    r"--max_steps must be >= 1, or -1 to train for --num_train_epochs; got 0",
                                    no_work=True),
    "pretrain-loss_becomes_nan": Case(  # step 1's update sends the weights to ~1e30: step 2's loss is NaN
        PRETRAIN, lambda i: i.pretrain(learning_rate="1e30", warmup_steps="0"),
        r"the training loss became nan \(mean over step 2\); stopped without saving: no checkpoint was written"),
    "pretrain-seq_longer_than_positions": Case(
        PRETRAIN, lambda i: i.pretrain(config_file=i.config(max_position_embeddings=32)),
        r"shard \S*\.hdf5 holds sequences of 64 tokens but the model's max_position_embeddings is 32", no_work=True),
    "pretrain-output_dir_is_a_file": Case(
        PRETRAIN, lambda i: i.pretrain(output_dir=i.write("taken", "x")),
        r"--output_dir \S*/taken exists and is not a directory"),
    "pretrain-missing_vocab_file": Case(PRETRAIN, lambda i: i.pretrain(tokenizer_name_or_path=i.path("nope.txt")),
                                        r"--tokenizer_name_or_path '\S*/nope\.txt' is neither a vocab file, a "
                                        r"directory with vocab\.txt, nor a registered name \(megatronbert-uncased", no_work=True),
    "pretrain-latest_names_no_checkpoint": Case(
        PRETRAIN, lambda i: i.resumable(write_file("latest", b"checkpoint-99\n")),
        r"latest names 'checkpoint-99', which is not a complete checkpoint"),
    "pretrain-truncated_checkpoint_weights": Case(
        PRETRAIN, lambda i: i.resumable(truncate_file("checkpoint-1/model.safetensors")),
        r"\S*/checkpoint-1/model\.safetensors\b.*(truncated|not a safetensors file)"),
    "pretrain-truncated_checkpoint_optimizer": Case(
        PRETRAIN, lambda i: i.resumable(truncate_file("checkpoint-1/optimizer.tp00.sd00.safetensors")),
        r"\S*/checkpoint-1/optimizer\.tp00\.sd00\.safetensors"),
    "pretrain-truncated_checkpoint_rng_state": Case(
        PRETRAIN, lambda i: i.resumable(truncate_file("checkpoint-1/rng_state.rank0000.json")),
        r"cannot read \S*/checkpoint-1/rng_state\.rank0000\.json \(corrupt or truncated\?\)"),
    "pretrain-corrupt_trainer_state": Case(
        PRETRAIN, lambda i: i.resumable(write_file("checkpoint-1/trainer_state.json", b"{not json")),
        r"\S*/checkpoint-1/trainer_state\.json is not valid JSON"),
    "pretrain-metrics_log_not_utf8": Case(
        PRETRAIN, lambda i: i.resumable(write_file("metrics.jsonl", b"\xff\xfe garbage\n")),
        r"\S*/metrics\.jsonl is not UTF-8 text"),
    # ---- tools/create_pretraining_data.py ----
    "create_data-missing_input_file": Case(CREATE, lambda i: i.create_data(input_file=i.path("nope.txt")),
                                           r"input file not found: \S*/nope\.txt", subprocess=True, no_work=True),
    "create_data-missing_vocab_file": Case(CREATE, lambda i: i.create_data(vocab_file=i.path("nope-vocab.txt")),
                                           r"nope-vocab\.txt' is neither a registered name", no_work=True),
    "create_data-bad_max_seq_length": Case(CREATE, lambda i: i.create_data(max_seq_length="4"),
                                           r"--max_seq_length must be >= 8, got 4", no_work=True),
    "create_data-seq_longer_than_positions": Case(
        CREATE, lambda i: i.create_data(max_seq_length="100000"),
        r"--max_seq_length 100000 exceeds --max_position_embeddings 512", no_work=True),
    "create_data-input_not_utf8": Case(
        CREATE, lambda i: i.create_data(input_file=i.write("latin1.txt", "caf\xe9 ol\xe9\n".encode("latin-1"))),
        r"latin1\.txt:1 is not UTF-8"),
    "create_data-bad_json_line": Case(
        CREATE, lambda i: i.create_data(input_file=i.write("docs.jsonl", '{"text": "A b."}\n{oops\n')),
        r"docs\.jsonl:2 is not a JSON object"),
    "create_data-output_dir_is_a_file": Case(
        CREATE, lambda i: i.create_data(output_dir=i.write("taken", "x")),
        r"--output_dir \S*/taken exists and is not a directory"),
    # ---- tools/convert_checkpoint.py ----
    "convert-missing_src": Case(CONVERT, lambda i: [i.path("nope"), i.out], r"no such checkpoint: \S*/nope",
                                subprocess=True, no_work=True),
    "convert-not_a_checkpoint": Case(CONVERT, lambda i: [os.path.dirname(i.write("d/readme.txt", "hi")), i.out],
                                     r"\S*/d is not a checkpoint", no_work=True),
    "convert-corrupt_ngc_zip": Case(CONVERT, lambda i: [i.write("megatron_bert_345m.zip", b"PK" + bytes(998)), i.out],
                                    r"megatron_bert_345m\.zip is not a valid zip file", no_work=True),
    "convert-corrupt_safetensors": Case(CONVERT, lambda i: [i.hf_dir_with_corrupt_weights(), i.out],
                                        r"hf/model\.safetensors\b.*(truncated|not a safetensors file)", no_work=True),
    "convert-dst_exists": Case(
        CONVERT, lambda i: [i.hf_dir_with_corrupt_weights(), os.path.dirname(i.write("out/x", "x"))],
        r"\S*/out already exists; pass --overwrite"),
    "convert-garbage_torch_pickle": Case(  # no "cannot be read with torch.load(weights_only=True)" paragraph first
        CONVERT, lambda i: [i.hf_dir_with_corrupt_weights("pytorch_model.bin", b"garbage, not a pickle\n"), i.out],
        r"cannot read \S*/hf/pytorch_model\.bin as a PyTorch checkpoint", no_work=True, needs="torch",
        not_shown=r"weights_only"),
    # ---- run_squad.py ----
    "squad-missing_train_file": Case(SQUAD, lambda i: i.squad("--train_file", i.path("nope.json")),
                                     r"SQuAD file not found: \S*/nope\.json", subprocess=True),
    "squad-malformed_json": Case(
        SQUAD, lambda i: i.squad("--train_file", i.write("broken.json", '{"data": [{"title": "x", "paragraphs": [}')),
        r"broken\.json is not valid JSON \(line 1, column \d+"),
    "squad-not_squad_json": Case(SQUAD, lambda i: i.squad("--train_file", i.write("list.json", "[1, 2]")),
                                 r"list\.json: the top level has no 'data' field"),
    "squad-unknown_model_name": Case(SQUAD, lambda i: i.squad("--train_file", SQUAD_V1, model="megatronbert-huge"),
                                     r"'megatronbert-huge' is neither a registered name"),
    "squad-nothing_to_do": Case(SQUAD, lambda i: i.squad("--train_file", SQUAD_V1)[1:],
                                r"nothing to do: pass --do_train and/or --do_predict", no_work=True),
    "squad-doc_stride_zero": Case(SQUAD, lambda i: i.squad("--train_file", SQUAD_V1, "--doc_stride", "0"),
                                  r"--doc_stride must be >= 1, got 0", no_work=True),
    "squad-nan_learning_rate": Case(SQUAD, lambda i: i.squad("--train_file", SQUAD_V1, "--learning_rate", "nan"),
                                    r"--learning_rate must be in \[0, 3\.40282e\+38\], got nan", no_work=True),
    # ---- run_glue.py ----
    "glue-unknown_task": Case(GLUE, lambda i: i.glue("--task_name", "sst-5", "--data_dir", GLUE_DIR),
                              r"unknown GLUE task 'sst-5'; choose one of CoLA, SST-2", subprocess=True, no_work=True),
    "glue-missing_data_dir": Case(GLUE, lambda i: i.glue("--task_name", "sst-2", "--data_dir", i.path("nope")),
                                  r"--data_dir \S*/nope is not a directory"),
    "glue-wrong_column_count": Case(GLUE, lambda i: i.glue("--task_name", "sst-2", "--data_dir", i.glue_dir(BAD_SST2)),
                                    r"SST-2/train\.tsv:3: expected 2 tab-separated columns for SST-2, found 1"),
    "glue-unknown_label": Case(
        GLUE, lambda i: i.glue("--task_name", "sst-2", "--data_dir", i.glue_dir("sentence\tlabel\ngood\t1\nbad\t7\n")),
        r"SST-2/train\.tsv:3: label '7' is not one of"),
    "glue-zero_batch_size": Case(GLUE, lambda i: i.glue("--task_name", "sst-2", "--data_dir", GLUE_DIR,
                                                        "--batch_size", "0"),
                                 r"--batch_size must be >= 1, got 0", no_work=True),
    "glue-unknown_model_name": Case(GLUE, lambda i: i.glue("--task_name", "sst-2", "--data_dir", GLUE_DIR,
                                                           model="megatronbert-huge"),
                                    r"'megatronbert-huge' is neither a registered name"),
    # ---- tools/plot_metrics.py ----
    "plot-missing_file": Case(PLOT, lambda i: [i.path("nope.jsonl"), "--out", i.out + "/p.png"],
                              r"no such metrics file: \S*/nope\.jsonl", subprocess=True, no_work=True),
    "plot-not_json_lines": Case(PLOT, lambda i: [i.write("m.jsonl", "step 1 loss 3\n"), "--out", i.out + "/p.png"],
                                r"m\.jsonl:1 is not JSON", no_work=True),
    "plot-no_step_records": Case(PLOT, lambda i: [i.write("m.jsonl", '{"loss": 3}\n'), "--out", i.out + "/p.png"],
                                 r"m\.jsonl has no records with a 'step' field", no_work=True),
    "plot-not_a_regular_file": Case(PLOT, lambda i: [os.devnull, "--out", i.out + "/p.png"],
                                    r"/dev/null is not a regular file", no_work=True),
    "plot-empty_file": Case(PLOT, lambda i: [i.write("m.jsonl", ""), "--out", i.out + "/p.png"],
                            r"\S*/m\.jsonl is empty", no_work=True),
}


def run_in_process(script, argv, capfd):
    """The script's ``__main__`` block in this process: (exit code, stdout, stderr) as the user would see them."""
    path = os.path.join(REPO, script)
    root = logging.getLogger()
    # what a script may change process-wide (convert_checkpoint calls logging.basicConfig), restored after
    saved = sys.argv, list(sys.path), list(root.handlers), root.level
    sys.argv = [path, *argv]
    code = 0
    try:
        runpy.run_path(path, run_name="__main__")
    except SystemExit as exit_:
        if isinstance(exit_.code, str):  # sys.exit("message"): the interpreter prints it and exits 1
            print(exit_.code, file=sys.stderr)
            code = 1
        else:
            code = exit_.code or 0
    except Exception:  # uncaught: the interpreter prints the traceback and exits 1
        traceback.print_exc()
        code = 1
    finally:
        sys.argv, sys.path[:] = saved[0], saved[1]
        root.handlers[:], root.level = saved[2], saved[3]
    sys.stdout.flush()
    sys.stderr.flush()
    captured = capfd.readouterr()
    return code, captured.out, captured.err


def run_subprocess(script, argv):
    proc = subprocess.run([sys.executable, os.path.join(REPO, script), *argv], cwd=REPO, env=subprocess_env(),
                          capture_output=True, text=True, timeout=120)
    return proc.returncode, proc.stdout, proc.stderr


def params():
    for name, case in CASES.items():
        marks = [pytest.mark.xfail(strict=True, reason=case.bug)] if case.bug else []
        yield pytest.param(name, marks=marks, id=name)


@pytest.mark.parametrize("name", params())
def test_bad_input_gives_one_clear_error_line_and_a_failing_exit_code(name, request, tmp_path, capfd, caplog):
    case = CASES[name]
    if case.needs:
        pytest.importorskip(case.needs)
    if case.not_shown:  # in process, pytest's log handlers take what the script would print: look there too
        caplog.set_level(logging.INFO)
    inputs = Inputs(request, tmp_path)
    argv = case.argv(inputs)
    capfd.readouterr()  # drop what building the inputs printed
    if case.subprocess:
        code, out, err = run_subprocess(case.script, argv)
    else:
        code, out, err = run_in_process(case.script, argv, capfd)
    shown = f"exit code {code}\n--- stdout (tail) ---\n{out[-2000:]}\n--- stderr (tail) ---\n{err[-3000:]}"
    assert TRACEBACK not in out + err, shown
    assert code != 0, shown
    error_lines = [line for line in (out + "\n" + err).splitlines() if ERROR_LINE.match(line)]
    assert len(error_lines) == 1, shown
    assert err.strip().splitlines()[-1] == error_lines[0], shown  # the last thing the user sees
    assert re.search(case.error, error_lines[0]), shown
    if case.not_shown:
        assert not re.search(case.not_shown, out + err + caplog.text), f"{shown}\n--- log ---\n{caplog.text}"
    if case.no_work:
        assert not os.path.exists(inputs.out), f"{inputs.out} was created before the error\n{shown}"


def test_every_runner_has_a_subprocess_case():
    scripts = {case.script for case in CASES.values()}
    assert scripts == {PRETRAIN, CREATE, CONVERT, SQUAD, GLUE, PLOT}
    assert {case.script for case in CASES.values() if case.subprocess} == scripts
