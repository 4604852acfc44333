"""PaddleNLP's MegatronBert tokenizer tests, translated to this package's MegatronBertTokenizer, and the
round trip between the two: a directory our tokenizer saves loads in PaddleNLP's own ``BertTokenizer``.

Source: PaddlePaddle/PaddleNLP tests/transformers/megatronbert/test_tokenizer.py at commit
3cd1d383ad2a2664bc5c77a36582d989f2855c70 (MegatronBertTokenizerTest; its TokenizerTesterMixin is HF's, see
test_hf_bert_tokenization.py). Its 15-token vocab, inputs and expected values are kept; PaddleNLP's ``encode``
returns a dict, so ids are read from ``["input_ids"]`` as there.
"""

import os

import pytest
from paddlenlp.transformers import BertTokenizer

from paddle_megatronbert.tokenizer import VOCAB_FILES, MegatronBertTokenizer

VOCAB_TOKENS = ["[UNK]", "[CLS]", "[SEP]", "[PAD]", "[MASK]", "want", "##want", "##ed", "wa", "un", "runn", "##ing",
                ",", "low", "lowest"]
TEXT = "A blorptastic [E1] day, UNwant\u00E9d running! Qwxz?"


@pytest.fixture
def vocab_file(tmp_path):
    path = tmp_path / MegatronBertTokenizer.resource_files_names["vocab_file"]
    path.write_text("".join(token + "\n" for token in VOCAB_TOKENS), encoding="utf-8")
    return str(path)


def registered(name):
    if not os.path.isfile(VOCAB_FILES[name]):
        pytest.skip(f"{name} vocab not shipped")
    return MegatronBertTokenizer.from_pretrained(name)


def test_full_tokenizer(vocab_file):
    tokenizer = MegatronBertTokenizer(vocab_file)
    tokens = tokenizer.tokenize("UNwant\u00E9d,running")
    assert tokens == ["un", "##want", "##ed", ",", "runn", "##ing"]
    assert tokenizer.convert_tokens_to_ids(tokens) == [9, 6, 7, 12, 10, 11]


def test_clean_text(vocab_file):
    tokenizer = MegatronBertTokenizer.from_pretrained(os.path.dirname(vocab_file))
    assert [tokenizer.tokenize(t) for t in ["Test", "\xad", "test"]] == [["[UNK]"], [], ["[UNK]"]]


def test_sequence_builders():
    tokenizer = registered("megatronbert-uncased")  # PaddleNLP's @slow check: offline here
    text = tokenizer.encode("sequence builders", return_token_type_ids=None, add_special_tokens=False)["input_ids"]
    text_2 = tokenizer.encode("multi-sequence build", return_token_type_ids=None, add_special_tokens=False)["input_ids"]
    assert tokenizer.build_inputs_with_special_tokens(text) == [101] + text + [102]
    assert tokenizer.build_inputs_with_special_tokens(text, text_2) == [101] + text + [102] + text_2 + [102]


@pytest.mark.parametrize("name", ["megatronbert-uncased", "megatronbert-cased"])
def test_offsets_with_special_characters(name):
    tokenizer = registered(name)
    sentence = f"A, naïve {tokenizer.mask_token} AllenNLP sentence."
    tokens = tokenizer.encode(sentence, return_attention_mask=False, return_token_type_ids=False,
                              return_offsets_mapping=True, add_special_tokens=True)
    if not tokenizer.do_lower_case:
        expected = [((0, 0), tokenizer.cls_token), ((0, 1), "A"), ((1, 2), ","), ((3, 5), "na"), ((5, 6), "##ï"),
                    ((6, 8), "##ve"), ((9, 15), tokenizer.mask_token), ((16, 21), "Allen"), ((21, 23), "##NL"),
                    ((23, 24), "##P"), ((25, 33), "sentence"), ((33, 34), "."), ((0, 0), tokenizer.sep_token)]
    else:
        expected = [((0, 0), tokenizer.cls_token), ((0, 1), "a"), ((1, 2), ","), ((3, 8), "naive"),
                    ((9, 15), tokenizer.mask_token), ((16, 21), "allen"), ((21, 23), "##nl"), ((23, 24), "##p"),
                    ((25, 33), "sentence"), ((33, 34), "."), ((0, 0), tokenizer.sep_token)]
    assert [e[1] for e in expected] == tokenizer.convert_ids_to_tokens(tokens["input_ids"])
    assert [e[0] for e in expected] == tokens["offset_mapping"]
    assert "attention_mask" not in tokens  # return_attention_mask=False is honoured


# ---- save -> load keeps the added state; PaddleNLP's BertTokenizer reads our directory -------------------
@pytest.mark.parametrize("name", ["megatronbert-uncased", "megatronbert-cased"])
def test_saved_directory_keeps_added_tokens_special_tokens_and_max_length(name, tmp_path):
    registered(name)
    tokenizer = MegatronBertTokenizer.from_pretrained(name, model_max_length=42, additional_special_tokens=["[E1]"])
    tokenizer.add_tokens(["blorptastic", "qwxz"])
    expected = tokenizer(TEXT, "and a second segment")
    assert tokenizer.convert_tokens_to_ids("[E1]") in expected["input_ids"]  # special token kept whole
    assert tokenizer.convert_tokens_to_ids("blorptastic") in expected["input_ids"]
    tokenizer.save_pretrained(str(tmp_path))

    reloaded = MegatronBertTokenizer.from_pretrained(str(tmp_path))
    assert reloaded(TEXT, "and a second segment") == expected
    assert reloaded.model_max_length == 42
    assert reloaded.additional_special_tokens == ["[E1]"]
    assert reloaded.get_vocab() == tokenizer.get_vocab()
    assert reloaded.do_lower_case == tokenizer.do_lower_case

    theirs = BertTokenizer.from_pretrained(str(tmp_path))  # PaddleNLP's own class, our files
    assert theirs(TEXT, "and a second segment")["input_ids"] == expected["input_ids"]
    assert theirs.model_max_length == 42 and theirs.additional_special_tokens == ["[E1]"]


def test_model_directory_without_tokenizer_config_takes_the_model_config(tmp_path, vocab_file):
    (tmp_path / "model").mkdir()
    directory = tmp_path / "model"
    (directory / "vocab.txt").write_text(open(vocab_file, encoding="utf-8").read(), encoding="utf-8")
    (directory / "config.json").write_text('{"do_lower_case": false, "max_position_embeddings": 128}')
    tokenizer = MegatronBertTokenizer.from_pretrained(str(directory))
    assert tokenizer.do_lower_case is False and tokenizer.model_max_length == 128
    assert tokenizer.tokenize("UNwant") == ["[UNK]"]  # cased: "UNwant" is not in the vocab
