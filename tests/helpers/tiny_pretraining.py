"""Tiny pretraining inputs for tests that run ``run_pretrain.py`` the way a user does, built once per session.

The one recipe every such test uses: the tiny config over the shipped text's own slice of
BERT's uncased vocabulary (the 5264 WordPieces the text uses, so the text tokenizes exactly as with the full
vocab, and the MLM head costs a sixth of the full one), and HDF5 shards of the text (seq 64, 10 predictions).
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SAMPLE_TEXT = os.path.join(REPO, "data", "sample_text.txt")
SEQ_LENGTH = 64
MAX_PREDICTIONS = 10
VOCAB_SIZE = 5264  # measured: the distinct WordPieces of data/sample_text.txt plus the 5 specials


class TinyPretrainingData:
    """Paths of one built set of inputs.

    Args:
        root: the directory holding them: ``vocab.txt`` (the text's vocab slice), ``tiny.json`` (configs/tiny.json
            with that vocab size) and ``shards/`` (two HDF5 shards of the text).
    """

    def __init__(self, root: str):
        self.root = root
        self.vocab = os.path.join(root, "vocab.txt")
        self.config = os.path.join(root, "tiny.json")
        self.shards = os.path.join(root, "shards")


def _load_tool(name: str):
    spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, "tools", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def build_tiny_pretraining_data(root: str, dupe_factor: int = 1, seed: int = 5) -> TinyPretrainingData:
    """Write the vocab slice, the config and the shards under ``root`` (dupe 1: 1171 sequences, dupe 3: 3427)."""
    from paddle_megatronbert.tokenizer import MegatronBertTokenizer

    data = TinyPretrainingData(root)
    os.makedirs(root, exist_ok=True)
    tokenizer = MegatronBertTokenizer.from_pretrained("megatronbert-uncased")
    used = set()
    with open(SAMPLE_TEXT, encoding="utf-8") as f:
        for line in f:
            used.update(tokenizer.tokenize(line))
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    vocab = specials + sorted(used - set(specials))
    assert len(vocab) == VOCAB_SIZE, len(vocab)
    with open(data.vocab, "w", encoding="utf-8") as f:
        f.write("\n".join(vocab) + "\n")
    with open(os.path.join(REPO, "configs", "tiny.json"), encoding="utf-8") as f:
        config = json.load(f)
    config["vocab_size"] = len(vocab)
    with open(data.config, "w", encoding="utf-8") as f:
        json.dump(config, f)
    _load_tool("create_pretraining_data").main([
        "--input_file", SAMPLE_TEXT, "--output_dir", data.shards, "--vocab_file", data.vocab, "--do_lower_case", "true",
        "--max_seq_length", str(SEQ_LENGTH), "--max_predictions_per_seq", str(MAX_PREDICTIONS),
        "--dupe_factor", str(dupe_factor), "--shards_per_file", "2", "--seed", str(seed), "--num_workers", "1"])
    return data


_SESSION_DATA = {}


def shared_tiny_pretraining_data(tmp_path_factory, dupe_factor: int = 1) -> TinyPretrainingData:
    """One build per pytest session and ``dupe_factor``, whichever module asks first (modules must not
    modify it)."""
    key = (str(tmp_path_factory.getbasetemp()), dupe_factor)
    if key not in _SESSION_DATA:
        root = str(tmp_path_factory.mktemp(f"tiny_pretraining_dupe{dupe_factor}"))
        _SESSION_DATA[key] = build_tiny_pretraining_data(root, dupe_factor=dupe_factor)
    return _SESSION_DATA[key]


def pretrain_argv(data: TinyPretrainingData, output_dir, *extra, max_steps: int = 20, save_steps: int = 1000):
    """A complete run_pretrain.py command line over ``data`` (CPU, dropout on, a log record every step)."""
    return ["--config_file", data.config, "--tokenizer_name_or_path", data.vocab, "--input_dir", data.shards,
            "--output_dir", str(output_dir), "--max_predictions_per_seq", str(MAX_PREDICTIONS), "--batch_size", "8",
            "--learning_rate", "2e-3", "--warmup_steps", "5", "--max_steps", str(max_steps), "--logging_steps", "1",
            "--save_steps", str(save_steps), "--device", "cpu", "--visualdl", "false", "--seed", "11", *extra]


def subprocess_env(**extra) -> dict:
    """The environment of a runner started as a user starts it: one OMP thread (the machine is shared, and
    every run of a comparison must sum in the same order), no inherited launcher variables."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PADDLE_")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=REPO, PYTHONUNBUFFERED="1")
    env.update(extra)
    return env
