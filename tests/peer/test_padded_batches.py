"""Issue 17 item 1: the habit of both ecosystems, ``model(**tokenizer(batch, padding=True, return_tensors="pd"))``,
gives each row what the row alone gives. The tokenizer returns ``attention_mask`` (HF), and a model called
without a mask masks ``pad_token_id`` positions (PaddleNLP's BERT); an explicit all-ones mask still attends
everywhere."""

import os

import numpy as np
import paddle
import pytest

from paddle_megatronbert import MegatronBertConfig, MegatronBertForSequenceClassification, MegatronBertModel
from paddle_megatronbert.tokenizer import VOCAB_FILES, MegatronBertTokenizer

BATCH = ["The capital of France is Paris.", "Short one.", "A somewhat longer sentence, with more words in it!"]


@pytest.fixture(scope="module")
def tokenizer():
    if not os.path.isfile(VOCAB_FILES["megatronbert-uncased"]):
        pytest.skip("uncased vocab not shipped")
    return MegatronBertTokenizer.from_pretrained("megatronbert-uncased")


def tiny(model_class, tokenizer, **overrides):
    paddle.seed(5)
    config = MegatronBertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                intermediate_size=37, max_position_embeddings=64, pad_token_id=tokenizer.pad_token_id,
                                **overrides)
    model = model_class(config)
    model.eval()
    return model


def test_tokenizer_returns_the_attention_mask_with_lists_and_tensors(tokenizer):
    as_lists = tokenizer(BATCH, padding=True)
    lengths = [len(tokenizer(text)["input_ids"]) for text in BATCH]
    assert as_lists["attention_mask"] == [[1] * n + [0] * (max(lengths) - n) for n in lengths]
    as_tensors = tokenizer(BATCH, padding=True, return_tensors="pd")
    assert sorted(as_tensors.keys()) == ["attention_mask", "input_ids", "token_type_ids"]
    np.testing.assert_array_equal(as_tensors["attention_mask"].numpy(), np.array(as_lists["attention_mask"]))


@pytest.mark.parametrize("model_class,field", [(MegatronBertModel, "last_hidden_state"),
                                               (MegatronBertModel, "pooler_output"),
                                               (MegatronBertForSequenceClassification, "logits")])
@pytest.mark.parametrize("with_mask", [True, False], ids=["tokenizer-mask", "no-mask-pad-ids-masked"])
def test_padded_batch_rows_equal_the_rows_alone(tokenizer, model_class, field, with_mask):
    model = tiny(model_class, tokenizer)
    batch = tokenizer(BATCH, padding=True, return_tensors="pd")
    if not with_mask:
        del batch["attention_mask"]  # PaddleNLP's habit: the model masks pad_token_id itself
    with paddle.no_grad():
        padded = model(**batch, return_dict=True)[field].numpy()
        for row, text in enumerate(BATCH):
            alone = model(**tokenizer(text, return_tensors="pd"), return_dict=True)[field].numpy()[0]
            got = padded[row][: alone.shape[0]] if field == "last_hidden_state" else padded[row]
            np.testing.assert_allclose(got, alone, atol=1e-5, rtol=0, err_msg=f"row {row}")


def test_an_explicit_all_ones_mask_attends_everywhere(tokenizer):
    model = tiny(MegatronBertForSequenceClassification, tokenizer, num_labels=3)
    batch = tokenizer(BATCH, padding=True, return_tensors="pd")
    ids, types = batch["input_ids"], batch["token_type_ids"]
    with paddle.no_grad():
        masked = model(ids, token_type_ids=types).numpy()
        ones = model(ids, attention_mask=paddle.ones_like(ids), token_type_ids=types).numpy()
        # inputs_embeds carry no ids to find padding in: attention everywhere, the reference for "all ones"
        unmasked = model(inputs_embeds=model.get_input_embeddings()(ids), token_type_ids=types).numpy()
    np.testing.assert_allclose(ones, unmasked, atol=1e-6)
    longest = int(np.argmax(batch["attention_mask"].numpy().sum(1)))
    np.testing.assert_allclose(ones[longest], masked[longest], atol=1e-6)  # no padding: same either way
    padded_rows = [r for r in range(len(BATCH)) if r != longest]
    assert np.abs(ones[padded_rows] - masked[padded_rows]).min(axis=1).max() > 1e-4  # the pads were attended


def test_star_import_binds_the_tokenizer():
    namespace = {}
    exec("from paddle_megatronbert import *", namespace)  # noqa: S102 - the user's habit under test
    assert namespace["MegatronBertTokenizer"] is MegatronBertTokenizer
    assert "MegatronBertForPreTraining" in namespace and "MegatronBertConfig" in namespace
