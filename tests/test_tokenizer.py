"""MegatronBertTokenizer: offline registered vocab, ids equal HF's tokenizer, save/load."""

import os

import pytest

from paddle_megatronbert.tokenizer import VOCAB_FILES, MegatronBertTokenizer

PARAGRAPH = (
    "Héllo, Wörld! The café's crème brûlée cost $4.50 — naïve résumé-writers (and Zoë) "
    "didn't agree... Megatron-LM trains 8.3B-parameter models; x²+y²=z² isn't ÆØÅ. "
    "Qwxzzyv blorptastic 東京 ελληνικά русский \t\n tabs  and   spaces?!"
)
SENTENCE_B = "Is the naïve café open on Sundays?"


def hf_tokenizer(vocab_file, lower):
    transformers = pytest.importorskip("transformers")
    # transformers 5.x ignores vocab_file= and builds a 5-token vocab: pass vocab= and check its size.
    tokenizer = transformers.BertTokenizerFast(vocab=vocab_file, do_lower_case=lower, strip_accents=None)
    with open(vocab_file, encoding="utf-8") as f:
        assert tokenizer.vocab_size == sum(1 for _ in f)
    return tokenizer


@pytest.mark.parametrize("name,lower", [("megatronbert-uncased", True), ("megatronbert-cased", False)])
def test_ids_equal_hf_tokenizer(name, lower):
    if not os.path.isfile(VOCAB_FILES[name]):
        pytest.skip(f"{name} vocab not shipped")
    ours = MegatronBertTokenizer.from_pretrained(name)
    theirs = hf_tokenizer(VOCAB_FILES[name], lower)
    assert ours(PARAGRAPH)["input_ids"] == theirs(PARAGRAPH)["input_ids"]
    pair_ours = ours(PARAGRAPH, SENTENCE_B)
    pair_theirs = theirs(PARAGRAPH, SENTENCE_B)
    assert pair_ours["input_ids"] == pair_theirs["input_ids"]
    assert pair_ours["token_type_ids"] == pair_theirs["token_type_ids"]
    tokens = ours.tokenize(PARAGRAPH)
    assert "[UNK]" in tokens or any(t.startswith("##") for t in tokens)  # unknown words split or UNK


def test_uncased_vocab_is_the_real_bert_vocab():
    tokenizer = MegatronBertTokenizer.from_pretrained("megatronbert-uncased")
    assert len(tokenizer.vocab) == 30522
    assert [tokenizer.vocab[t] for t in ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")] == [0, 100, 101, 102, 103]
    assert tokenizer.tokenize("Héllo WÖRLD") == ["hello", "world"]


def test_save_pretrained_writes_vocab_and_reloads(tmp_path):
    tokenizer = MegatronBertTokenizer.from_pretrained("megatronbert-uncased")
    tokenizer.save_pretrained(str(tmp_path))
    assert (tmp_path / "vocab.txt").is_file()
    reloaded = MegatronBertTokenizer.from_pretrained(str(tmp_path))
    assert reloaded(PARAGRAPH)["input_ids"] == tokenizer(PARAGRAPH)["input_ids"]
    assert reloaded.do_lower_case is True


def test_bad_names_say_what_is_wrong(tmp_path):
    with pytest.raises(ValueError, match="neither a registered name"):
        MegatronBertTokenizer.from_pretrained("bert-nope")
    with pytest.raises(FileNotFoundError, match="has no vocab.txt"):
        MegatronBertTokenizer.from_pretrained(str(tmp_path))
