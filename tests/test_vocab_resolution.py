"""Which vocab a run uses and whether it fits (paddle_megatronbert/vocab_resolution.py), and the two user paths
it unblocks: pretraining from a config with no vocab, and an NGC zip (no vocab inside) converted with the
converter's defaults and fine-tuned offline."""

import importlib.util
import json
import os
import zipfile

import numpy as np
import pytest

import megatron_reference as ref
from helpers.tiny_pretraining import REPO, pretrain_argv, shared_tiny_pretraining_data
from paddle_megatronbert.configuration import MegatronBertConfig
from paddle_megatronbert.vocab_resolution import (
    REGISTERED_VOCABS,
    count_vocab,
    registered_vocab_for_rows,
    resolve_run_vocab,
    split_model_argument,
    vocab_fit_problem,
)

UNCASED = REGISTERED_VOCABS["megatronbert-uncased"]
CASED = REGISTERED_VOCABS["megatronbert-cased"]


def tiny_config(**fields):
    settings = dict(vocab_size=1003, hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16)
    return MegatronBertConfig(**{**settings, **fields})


def write_vocab(path, tokens, trailing="\n"):
    path.write_text("\n".join(tokens) + trailing, encoding="utf-8")
    return str(path)


# ---- counting and fitting ------------------------------------------------------------------------------
def test_trailing_blank_lines_are_no_tokens_for_the_counter_and_the_tokenizer(tmp_path):
    from paddle_megatronbert.tokenizer import MegatronBertTokenizer

    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "hello"]
    path = write_vocab(tmp_path / "vocab.txt", tokens, trailing="\n\n\n")
    assert count_vocab(path) == 6
    tokenizer = MegatronBertTokenizer(path)
    assert len(tokenizer) == 6 and tokenizer.convert_tokens_to_ids(["hello", "[MASK]"]) == [5, 4]
    assert count_vocab(UNCASED) == 30522 and count_vocab(CASED) == 28996


def test_non_utf8_vocab_names_the_file(tmp_path):
    path = tmp_path / "vocab.txt"
    path.write_bytes(b"[PAD]\ncaf\xe9\n")
    with pytest.raises(ValueError, match=r"vocab file .*vocab\.txt is not UTF-8 text"):
        count_vocab(str(path))


def test_fit_rule_knows_megatron_padding_and_the_two_casings():
    assert vocab_fit_problem("v", 30522, 30592, "src") is None
    too_many = vocab_fit_problem("v", 30522, 29056, "src")
    assert "29056 embedding rows (BERT's cased 28996 padded) cannot hold them" in too_many
    # More rows than 128 x TP of padding: another vocabulary, only when the rows are known to be padded.
    assert vocab_fit_problem("v", 28996, 30592, "src") is None
    wrong_casing = vocab_fit_problem("v", 28996, 30592, "src", padded_for_tp=8)
    assert "28996 tokens (cased BERT)" in wrong_casing and "30592 embedding rows (BERT's uncased 30522 padded)" in \
        wrong_casing
    assert registered_vocab_for_rows(30592) == "megatronbert-uncased"
    assert registered_vocab_for_rows(29056) == "megatronbert-cased"
    assert registered_vocab_for_rows(30592 + 1024) is None and registered_vocab_for_rows(1003) is None


# ---- choosing the vocab of a run ----------------------------------------------------------------------
def test_an_implied_vocab_that_does_not_fit_is_skipped_with_one_note():
    vocab = resolve_run_vocab(None, None, tiny_config(), "configs/small.json", config_file="configs/small.json")
    assert vocab.path is None and vocab.tokens is None
    assert vocab.note.startswith("note: no vocab for this run") and "vocab_size 1003" in vocab.note
    assert len(vocab.note.splitlines()) == 1
    with pytest.raises(ValueError, match="no vocab for configs/small.json"):
        resolve_run_vocab(None, None, tiny_config(), "configs/small.json", required=True)
    # The implied vocab is used when it fits the config the way Megatron pads it.
    cased = resolve_run_vocab(None, None, tiny_config(vocab_size=29056, do_lower_case=False), "c.json")
    assert (cased.path, cased.tokens, cased.note) == (CASED, 28996, None)


def test_a_named_vocab_is_checked_and_refused_when_it_does_not_fit(tmp_path):
    small = write_vocab(tmp_path / "small.txt", [f"t{i}" for i in range(1000)])
    assert resolve_run_vocab(small, None, tiny_config(), "c.json").tokens == 1000
    with pytest.raises(ValueError, match=r"--tokenizer_name_or_path: the vocab .* has 30522 tokens \(uncased BERT\) "
                                         r"but the model's vocab_size is 1003 \(c\.json\)"):
        resolve_run_vocab("megatronbert-uncased", None, tiny_config(), "c.json")
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    write_vocab(model_dir / "vocab.txt", [f"t{i}" for i in range(1004)])
    with pytest.raises(ValueError, match=r"--model_name_or_path: the vocab .*model/vocab\.txt has 1004 tokens"):
        resolve_run_vocab(None, str(model_dir), tiny_config(), str(model_dir))
    with pytest.raises(FileNotFoundError, match="--tokenizer_name_or_path 'nope' is neither a vocab file"):
        resolve_run_vocab("nope", None, tiny_config(), "c.json")


def test_a_json_given_as_the_model_is_the_config(tmp_path):
    config = tmp_path / "small.json"
    config.write_text("{}")
    assert split_model_argument(str(config), None) == (None, str(config))
    assert split_model_argument("megatronbert-cased", None) == ("megatronbert-cased", None)
    with pytest.raises(ValueError, match="pass the config once, as --config_file"):
        split_model_argument(str(config), "other.json")
    (tmp_path / "weights.bin").write_text("x")
    with pytest.raises(ValueError, match="is a file but not a .json config"):
        split_model_argument(str(tmp_path / "weights.bin"), None)


# ---- the user paths -----------------------------------------------------------------------------------
def load_script(path):
    spec = importlib.util.spec_from_file_location("script_" + os.path.basename(path)[:-3], os.path.join(REPO, path))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_pretraining_from_a_config_without_a_vocab_starts(tmp_path_factory, tmp_path, capsys):
    """A config whose vocab_size (5264) fits no registered vocab, given as --model_name_or_path (taken as the
    config), no --tokenizer_name_or_path: one note, the run trains from the shards' ids, and no vocab.txt is
    saved beside the checkpoint."""
    data = shared_tiny_pretraining_data(tmp_path_factory)
    argv = pretrain_argv(data, tmp_path / "out", max_steps=2)
    at = argv.index("--tokenizer_name_or_path")
    del argv[at:at + 2]
    argv[argv.index("--config_file")] = "--model_name_or_path"
    capsys.readouterr()
    result = load_script("run_pretrain.py").main(argv)
    assert result["step"] == 2
    notes = [line for line in capsys.readouterr().out.splitlines() if line.startswith("note: no vocab for this run")]
    assert len(notes) == 1 and "vocab_size 5264" in notes[0]
    checkpoint = tmp_path / "out" / "checkpoint-2"
    assert (checkpoint / "config.json").is_file() and not (checkpoint / "vocab.txt").exists()


def test_ngc_zip_converted_with_defaults_fine_tunes_offline(tmp_path, capsys):
    """NGC's zip holds only release/mp_rank_00/model_optim_rng.pt (no args, no vocab): the converter ships the
    bundled vocab its 30592 embedding rows imply (uncased) and says so; run_glue then fine-tunes the result."""
    pytest.importorskip("torch")
    shards = ref.random_shards(np.random.RandomState(3), hidden=32, heads=4, layers=1, ffn=64, vocab=30592,
                               positions=64)
    ref.save_megatron_checkpoint(str(tmp_path / "ngc"), shards, None, False, None, legacy_format=True)
    archive = str(tmp_path / "megatron_bert_345m_v0_1_uncased.zip")
    member = "release/mp_rank_00/model_optim_rng.pt"
    with zipfile.ZipFile(archive, "w") as z:
        z.write(tmp_path / "ngc" / member, member)
    model = str(tmp_path / "converted")
    assert load_script("tools/convert_checkpoint.py").main([archive, model, "--num_attention_heads", "4"]) == 0
    assert "added the bundled megatronbert-uncased vocab" in capsys.readouterr().out
    report = json.loads((tmp_path / "converted" / "conversion_report.json").read_text())
    assert report["vocab"]["raw"] == 30522 and report["vocab"]["casing"] == "uncased"
    assert any("bundled megatronbert-uncased vocab" in note for note in report["notes"])
    assert count_vocab(os.path.join(model, "vocab.txt")) == 30522

    load_script("run_glue.py").main([
        "--task_name", "sst-2", "--data_dir", os.path.join(REPO, "tests", "fixtures", "glue", "SST-2"),
        "--model_name_or_path", model, "--output_dir", str(tmp_path / "sst2"), "--device", "cpu",
        "--max_seq_length", "32", "--batch_size", "4", "--num_train_epochs", "1"])
    results = json.loads((tmp_path / "sst2" / "eval_results.json").read_text())
    assert 0.0 <= results["acc"] <= 1.0 and np.isfinite(results["loss"])
