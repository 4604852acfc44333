"""A user sees the project's lines and real problems only (issue 17 item 10): every runner's --help and a
warm tiny run print none of the libraries' start-up warnings, compiler lines, colour codes or carriage-return
progress updates, and a failure is one line. The kernel build's compiler output goes to its log file."""

import os
import shutil
import subprocess
import sys

import pytest

from helpers.output_noise import noise_lines
from helpers.tiny_pretraining import REPO, subprocess_env
from paddle_megatronbert.logging_utils import progress, quiet_third_party_output

RUNNERS = ("run_pretrain.py", "run_squad.py", "run_glue.py")
TOOLS = ("tools/convert_checkpoint.py", "tools/create_pretraining_data.py", "tools/plot_metrics.py")
SQUAD_V1 = os.path.join(REPO, "tests", "fixtures", "squad", "squad_v1.json")


def run(script, *args, timeout=300):
    return subprocess.run([sys.executable, os.path.join(REPO, script), *args], capture_output=True, text=True,
                          env=subprocess_env(), timeout=timeout)


@pytest.mark.parametrize("script", RUNNERS + TOOLS)
def test_help_is_quiet(script):
    result = run(script, "--help")
    assert result.returncode == 0 and "usage:" in result.stdout, result.stderr[-2000:]
    assert noise_lines(result.stdout + result.stderr) == [] and result.stderr == ""


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """A from-scratch model with the uncased vocab, as a released checkpoint directory."""
    import paddle

    from paddle_megatronbert import MegatronBertConfig, MegatronBertForPreTraining
    from paddle_megatronbert.vocab_resolution import REGISTERED_VOCABS

    directory = str(tmp_path_factory.mktemp("quiet") / "model")
    paddle.seed(0)
    config = MegatronBertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                intermediate_size=64, max_position_embeddings=64)
    MegatronBertForPreTraining(config).save_pretrained(directory)
    shutil.copy(REGISTERED_VOCABS["megatronbert-uncased"], os.path.join(directory, "vocab.txt"))
    return directory


def test_warm_squad_run_is_quiet(tiny_model, tmp_path):
    """Fine-tuning from a checkpoint without the QA head (Paddle's "Skip loading" would sit beside our own
    note), progress bars, PaddleNLP's coloured tokenizer-save lines: none of it reaches the output."""
    result = run("run_squad.py", "--do_train", "--do_predict", "--train_file", SQUAD_V1, "--predict_file", SQUAD_V1,
                 "--model_name_or_path", tiny_model, "--output_dir", str(tmp_path / "out"), "--device", "cpu",
                 "--max_seq_length", "48", "--doc_stride", "16", "--batch_size", "8", "--max_steps", "2")
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert noise_lines(result.stdout + result.stderr) == []
    assert "newly initialised" in result.stdout + result.stderr  # the project's own note stays


def test_making_shards_into_a_log_file_is_quiet(tmp_path):
    """The shard tool's byte progress bar is for terminals only: under a launcher or a log file, tqdm's
    carriage-return updates would each become a line."""
    text = open(os.path.join(REPO, "data", "sample_text.txt"), encoding="utf-8").read()[:20000]
    (tmp_path / "in.txt").write_text(text, encoding="utf-8")
    proc = run("tools/create_pretraining_data.py", "--input_file", str(tmp_path / "in.txt"), "--output_dir",
               str(tmp_path / "shards"), "--vocab_file", "megatronbert-uncased", "--max_seq_length", "64",
               "--max_predictions_per_seq", "10", "--dupe_factor", "1")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "wrote " in proc.stdout
    assert noise_lines(proc.stdout + proc.stderr) == []


def test_a_failure_is_one_line(tmp_path):
    result = run("run_pretrain.py", "--input_dir", str(tmp_path / "missing"), "--output_dir", str(tmp_path / "out"),
                 "--device", "cpu")
    assert result.returncode != 0
    errors = [line for line in (result.stdout + result.stderr).splitlines() if "missing" in line]
    assert errors == [f"error: --input_dir {tmp_path / 'missing'} is not a directory"], result.stdout + result.stderr
    assert noise_lines(result.stdout + result.stderr) == []


def test_kernel_build_output_goes_to_its_log(tmp_path, monkeypatch, capfd):
    """The compiler writes to the process' file descriptors (a subprocess), not to sys.stdout."""
    from paddle.utils import cpp_extension

    from paddle_megatronbert.kernels import loader

    def noisy_load(**kwargs):
        subprocess.run(["sh", "-c", "echo 'g++ -O3 -c cpu_kernels.cc -o cpu_kernels.o'; echo 'warning: x' >&2"],
                       check=True)
        if kwargs["build_directory"].endswith("broken"):
            raise OSError("the compiler failed")

    monkeypatch.setattr(cpp_extension, "load", noisy_load)
    loader._build(str(tmp_path / "ok"))
    captured = capfd.readouterr()
    assert "g++" not in captured.out + captured.err and "warning: x" not in captured.out + captured.err
    with open(tmp_path / "ok" / loader.BUILD_LOG) as f:
        assert f.read().split("\n")[:2] == ["g++ -O3 -c cpu_kernels.cc -o cpu_kernels.o", "warning: x"]
    failure = r"(?s)the compiler failed \(build log .*build\.log\): g\+\+ -O3 .*warning: x"
    with pytest.raises(RuntimeError, match=failure):
        loader._build(str(tmp_path / "broken"))


def test_progress_off_a_terminal_is_plain_periodic_lines(capsys):
    assert list(progress(range(3), "features", interval=0.0)) == [0, 1, 2]
    lines = capsys.readouterr().err.split("\n")
    assert lines[:3] == [f"features: {n}/3 ({100 * n / 3:.0f}%), elapsed 0s" for n in (1, 2, 3)] and "\r" not in lines
    assert list(progress(iter(range(3)), "features", interval=3600.0)) == [0, 1, 2]
    assert list(progress(range(3), "features", enabled=False, interval=0.0)) == [0, 1, 2]
    assert capsys.readouterr().err == ""


def test_quieting_filters_the_listed_warnings_only_and_respects_the_users_environment(monkeypatch, capsys):
    import warnings

    monkeypatch.delenv("GLOG_minloglevel", raising=False)
    monkeypatch.setenv("NO_COLOR", "")  # the user's own setting stays
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_third_party_output()
        warnings.warn("No ccache found. Please be aware ...", UserWarning)
        warnings.warn("Setuptools is replacing distutils.", UserWarning)
        warnings.warn("a warning of the user's own", UserWarning)
    assert [str(w.message) for w in caught] == ["a warning of the user's own"]
    assert os.environ["GLOG_minloglevel"] == "1" and os.environ["NO_COLOR"] == ""
