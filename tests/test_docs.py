"""The docs stay true: every relative link in README.md and docs/*.md points at a file that exists, every doc is
reachable from the README, every Python snippet compiles, and every shell command either runs here on CPU or is
listed below with the reason it cannot (a GPU, a network, the user's own data, minutes of work) - and then its
flags are still checked by the script's own argument parser, so a renamed or removed flag fails here.

A command is a line of a ```bash (or unlabelled) block, backslash continuations joined, comments dropped, or an
inline `python ...` span. A new command that matches no rule below fails the test until it is given one.
"""

import contextlib
import glob
import importlib.util
import io
import os
import re
import shlex
import sys

import pytest

from helpers.tiny_pretraining import REPO

DOCS = ["README.md"] + sorted(os.path.relpath(p, REPO) for p in glob.glob(os.path.join(REPO, "docs", "*.md")))
PROGRAMS = ("python", ".venv/bin/python", "bash", "wget", "export")
REPO_DIRS = ("configs", "data", "paddle_megatronbert", "scripts", "tools", "benchmarks")
GPU_MARKERS = ("--device gpu", "--device=gpu", "--gpus ", "--ips ", "--n_gpu 1", "--amp fp16")
PLACEHOLDERS = ("...", "DIR", "SRC", "DST", "path/to/", "NODE1", "OUTPUT_DIR", "train-v1.1.json", "train-v2.0.json",
                "glue_data", "weights/", "megatron_bert_345m_v0_1_")

# Commands that are not Python scripts: why each is not run here.
NOT_SCRIPTS = {
    "bash scripts/quickstart.sh": "sets up a venv and runs the demo for minutes; tests/test_demo.py runs the demo",
    "bash scripts/setup_env.sh": "creates a venv (network, ~1 minute)",
    ".venv/bin/python -m pytest": "the test suite itself",
    "wget ": "network: downloads an NGC checkpoint",
    "export ": "sets a shell variable",
}
EXACT = {"python -m paddle.distributed.launch": "Paddle's launcher, named in the text"}
# Python commands that could run on CPU but are not run here, and why (their flags are still parsed).
NOT_RUN = {
    "python tools/create_pretraining_data.py --input_file data/sample_text.txt --output_dir shards --vocab_file "
    "megatronbert-uncased --max_seq_length 128 --max_predictions_per_seq 20 --dupe_factor 5":
        "the README's shard command with --dupe_factor 5 (half a minute); the README's one runs",
    "python run_pretrain.py --config_file configs/tiny.json --input_dir shards --output_dir output/pretrain "
    "--max_predictions_per_seq 20 --batch_size 16":
        "300 steps; the README's pretraining command runs (one step)",
    "python tools/plot_metrics.py OUTPUT_DIR/metrics.jsonl": "needs a run's metrics.jsonl",
    "python -m paddle.distributed.launch --nproc_per_node 4 --log_dir /tmp/log tests/dist/parallel_checks.py":
        "four-process checks; tests/test_parallel.py runs them",
}
# Commands run as written except for these replacements (tiny input, one step), in a scratch directory.
RUN = {
    "python tools/create_pretraining_data.py --input_file data/sample_text.txt --output_dir shards --vocab_file "
    "megatronbert-uncased --max_seq_length 128 --max_predictions_per_seq 20":
        {"data/sample_text.txt": "sample_head.txt", "--max_seq_length 128": "--max_seq_length 128 --num_workers 1"},
    "python run_pretrain.py --config_file configs/tiny.json --input_dir shards --output_dir output/pretrain "
    "--max_predictions_per_seq 20 --batch_size 32 --learning_rate 1e-3 --max_steps 300 --device cpu":
        {"--max_steps 300": "--max_steps 1"},
}


def read(doc):
    with open(os.path.join(REPO, doc), encoding="utf-8") as f:
        return f.read()


def doc_links():
    for doc in DOCS:
        for target in re.findall(r"\]\(([^)\s]+)\)", read(doc)):
            if not re.match(r"[a-z]+:", target) and not target.startswith("#"):
                yield doc, target.split("#")[0]


def code_blocks(doc):
    return re.findall(r"```(\w*)\n(.*?)```", read(doc), re.S)


def doc_commands():
    """``(doc, command)`` for every shell command in the docs, in order."""
    for doc in DOCS:
        for language, body in code_blocks(doc):
            if language not in ("", "bash", "sh"):
                continue
            for line in re.sub(r"\\\n\s*", " ", body).split("\n"):
                command = re.sub(r"\s+#.*$", "", line).strip()
                command = re.sub(r"^(\w+=\S+\s+)+", "", " ".join(command.split()))  # OMP_NUM_THREADS=2 ...
                if command.startswith(PROGRAMS):
                    yield doc, command
        for span in re.findall(r"`((?:python|bash) [^`]+)`", read(doc)):
            yield doc, " ".join(span.split())


def script_and_arguments(command):
    """``(script, arguments)`` of a ``python [-u] [-m paddle.distributed.launch LAUNCH_ARGS] SCRIPT ARGS`` command."""
    words = [w for w in shlex.split(command) if w != "..."]
    scripts = [i for i, w in enumerate(words) if w.endswith(".py")]
    assert scripts, f"no script in {command!r}"
    return words[scripts[0]], words[scripts[0] + 1:]


def load_script(script):
    name = "doc_" + re.sub(r"\W", "_", script)
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, script))
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def parse_with_the_script(script, arguments):
    """The script's own argument parsing of ``arguments`` (``parse_args``; else the flags must be ones it
    defines, see :func:`help_text`). Returns None, or the parser's complaint."""
    if not has_parse_args(script):
        unknown = [w for w in arguments if w.startswith("--") and w.split("=")[0] not in help_text(script)]
        return f"unknown flags {unknown}" if unknown else None
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            load_script(script).parse_args(arguments)
        except SystemExit as stop:
            return f"exit {stop.code}: {(err.getvalue().strip().splitlines() or [''])[-1]}"
    return None


def has_parse_args(script):
    return "\ndef parse_args(argv" in read(script)


def help_text(script):
    """What ``SCRIPT --help`` prints, from the script's own ``parse_args``; for a script without one (the
    benchmarks build their parser inside ``main``, and import torch first) its source, where every flag is a
    literal."""
    if not has_parse_args(script):
        return read(script)
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
        with pytest.raises(SystemExit):
            load_script(script).parse_args(["--help"])
    return out.getvalue()


def reason_not_run(command):
    if command in EXACT:
        return EXACT[command]
    for prefix, reason in {**NOT_SCRIPTS, **NOT_RUN}.items():
        if command.startswith(prefix):
            return reason
    if any(marker in command + " " for marker in GPU_MARKERS):
        return "GPU only"
    if any(placeholder in command for placeholder in PLACEHOLDERS):
        return "names the user's own data, model or checkpoint"
    if command.startswith("python benchmarks/"):
        return "a benchmark (minutes of timing)"
    if "[--" in command:
        return "a usage synopsis"
    return None


# ---- links --------------------------------------------------------------------------------------------
def test_every_link_points_at_a_file():
    broken = [f"{doc}: {target}" for doc, target in doc_links()
              if not os.path.exists(os.path.normpath(os.path.join(REPO, os.path.dirname(doc), target)))]
    assert broken == []


def test_every_doc_is_linked_from_the_readme():
    linked = {os.path.normpath(target) for doc, target in doc_links() if doc == "README.md"}
    assert [doc for doc in DOCS[1:] if doc not in linked] == []


def test_python_snippets_compile():
    for doc in DOCS:
        for language, body in code_blocks(doc):
            if language == "python":
                compile(body, doc, "exec")


# ---- commands ---------------------------------------------------------------------------------------------
def test_every_command_is_run_or_has_a_reason_and_parses():
    problems, checked = [], 0
    for doc, command in doc_commands():
        if command in RUN:
            continue
        if command.startswith("python ") and command.endswith(" --help"):  # cheap: run here
            assert "usage:" in help_text(script_and_arguments(command)[0]), command
            continue
        reason = reason_not_run(command)
        if reason is None:
            problems.append(f"{doc}: {command!r} could run on CPU: add it to RUN or give a reason in NOT_RUN")
            continue
        if command in EXACT or command.startswith(tuple(NOT_SCRIPTS)):
            continue
        script, arguments = script_and_arguments(command)
        if not os.path.isfile(os.path.join(REPO, script)):
            problems.append(f"{doc}: {command!r}: {script} does not exist")
            continue
        if "[--" in command or " ..." in command:  # a synopsis or elided arguments: the flag names it shows
            flags = re.findall(r"(--[\w-]+)", command.split(script, 1)[1])
            complaint = [flag for flag in flags if flag not in help_text(script)] or None
        else:
            complaint = parse_with_the_script(script, arguments)
        if complaint:
            problems.append(f"{doc}: {command!r} ({reason}): {complaint}")
        checked += 1
    assert problems == []
    assert checked > 10


def test_every_listed_reason_is_for_a_command_in_the_docs():
    commands = [command for _, command in doc_commands()]
    rules = [*NOT_SCRIPTS, *NOT_RUN]
    stale = [rule for rule in rules if not any(command.startswith(rule) for command in commands)]
    stale += [command for command in [*EXACT, *RUN] if command not in commands]
    assert stale == []


def test_repository_paths_in_commands_exist():
    missing = []
    for doc, command in doc_commands():
        for word in shlex.split(command):
            if word.split("/")[0] in REPO_DIRS and "/" in word and not os.path.exists(os.path.join(REPO, word)):
                missing.append(f"{doc}: {word}")
    assert missing == []


def test_the_readme_pretraining_commands_run_on_cpu(tmp_path, monkeypatch):
    """The README's shard + pretraining pair as written (each script's ``main`` on the command's arguments, in a
    scratch directory), on the first 20 kB of the text and for one step."""
    monkeypatch.chdir(tmp_path)
    with open(os.path.join(REPO, "data", "sample_text.txt"), encoding="utf-8") as f:
        (tmp_path / "sample_head.txt").write_text(f.read(20000), encoding="utf-8")
    for name in REPO_DIRS:
        os.symlink(os.path.join(REPO, name), tmp_path / name)
    ran = []
    for doc, command in doc_commands():
        if command not in RUN or command in ran:
            continue
        shortened = command
        for old, new in RUN[command].items():
            assert old in shortened, (old, command)
            shortened = shortened.replace(old, new)
        script, arguments = script_and_arguments(shortened)
        load_script(script).main(arguments)
        ran.append(command)
    assert sorted(ran) == sorted(RUN)
    assert (tmp_path / "output" / "pretrain" / "checkpoint-1" / "config.json").is_file()
