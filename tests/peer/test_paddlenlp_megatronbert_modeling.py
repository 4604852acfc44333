"""PaddleNLP's MegatronBert model tests, translated to this package.

Source: PaddlePaddle/PaddleNLP tests/transformers/megatronbert/test_modeling.py at commit
2773285b0f34bfb7d57d7fa33eaad5b0788d2dcd (MegatronBertModelTester, MegatronBertModelTest parameterised over
return_dict x use_labels), with the checks of tests/transformers/test_modeling_common.py (ModelTesterMixin, commit
03e542d2233b4e78f8c7a299a86b9bd28ccc55a2): save/load, determinism, forward signature, attentions, hidden
states, resize token embeddings, inputs_embeds. Inputs and asserted shapes are PaddleNLP's; its single-output
heads return a bare tensor without return_dict, so ``result[0]`` of the LM heads is the first row
``[seq_length, vocab_size]``, as asserted there. PaddleNLP turns resize and inputs_embeds off for its own
MegatronBert; they run here because this package has them.
"""

import inspect
import os

import numpy as np
import paddle
import pytest
from peer_common import ALL_MODEL_CLASSES, Draws, for_class, labels_for_class

from paddle_megatronbert import (
    MegatronBertConfig,
    MegatronBertForCausalLM,
    MegatronBertForMaskedLM,
    MegatronBertForMultipleChoice,
    MegatronBertForNextSentencePrediction,
    MegatronBertForQuestionAnswering,
    MegatronBertForSequenceClassification,
    MegatronBertForTokenClassification,
    MegatronBertModel,
)


class MegatronBertModelTester:
    """PaddleNLP's tester (``use_relative_position`` is an unused PaddleNLP kwarg; ``num_class`` = num_labels)."""

    batch_size, seq_length, vocab_size, hidden_size = 13, 7, 99, 32
    num_hidden_layers, num_attention_heads, intermediate_size, type_vocab_size = 5, 4, 37, 2
    type_sequence_label_size, num_labels, num_choices, num_classes = 2, 3, 4, 3

    def __init__(self, use_labels, seed=0):
        draws = Draws(seed)
        b, s = self.batch_size, self.seq_length
        self.input_ids = draws.ids([b, s], self.vocab_size)
        self.input_mask = draws.attention_mask([b, s])
        self.token_type_ids = draws.ids([b, s], self.type_vocab_size)
        self.labels = None
        if use_labels:
            self.labels = dict(sequence=draws.ids([b], self.type_sequence_label_size),
                               token=draws.ids([b, s], self.num_labels), choice=draws.ids([b], self.num_choices))

    def get_config(self, **overrides):
        fields = dict(vocab_size=self.vocab_size, hidden_size=self.hidden_size,
                      num_hidden_layers=self.num_hidden_layers, num_attention_heads=self.num_attention_heads,
                      intermediate_size=self.intermediate_size, hidden_act="gelu", hidden_dropout_prob=0.1,
                      attention_probs_dropout_prob=0.1, max_position_embeddings=512,
                      type_vocab_size=self.type_vocab_size, initializer_range=0.02, pad_token_id=0,
                      num_labels=self.num_classes, num_choices=self.num_choices)
        return MegatronBertConfig(**{**fields, **overrides})

    def common_inputs(self):
        return {"input_ids": self.input_ids, "token_type_ids": self.token_type_ids, "attention_mask": self.input_mask}


# parameterized_class(("return_dict", "use_labels"), [[False, False], [False, True], [True, False], [True, True]])
VARIANTS = [(False, False), (False, True), (True, False), (True, True)]


@pytest.fixture(params=VARIANTS, ids=lambda v: f"return_dict={v[0]}-use_labels={v[1]}")
def variant(request):
    paddle.seed(0)
    return_dict, use_labels = request.param
    return return_dict, MegatronBertModelTester(use_labels)


# ---- MegatronBertModelTester.create_and_check_* (no return_dict passed, as there) -------------------------
def test_model(variant):
    _, t = variant
    model = MegatronBertModel(t.get_config())
    model.eval()
    model(t.input_ids, attention_mask=t.input_mask, token_type_ids=t.token_type_ids)
    model(t.input_ids, token_type_ids=t.token_type_ids)
    result = model(t.input_ids)
    assert result[0].shape == [t.batch_size, t.seq_length, t.hidden_size]
    assert result[1].shape == [t.batch_size, t.hidden_size]


def test_for_multiple_choice(variant):
    _, t = variant
    model = MegatronBertForMultipleChoice(t.get_config())
    model.eval()

    def expand(x):
        return x.unsqueeze(1).expand([-1, t.num_choices, -1])

    result = model(expand(t.input_ids), attention_mask=expand(t.input_mask), token_type_ids=expand(t.token_type_ids))
    assert paddle.is_tensor(result)  # a bare tensor (PaddleNLP's convention)
    assert result.shape == [t.batch_size, t.num_choices]


def test_for_question_answering(variant):
    _, t = variant
    model = MegatronBertForQuestionAnswering(t.get_config())
    model.eval()
    start_logits, end_logits = model(t.input_ids, attention_mask=t.input_mask, token_type_ids=t.token_type_ids)
    assert start_logits.shape == [t.batch_size, t.seq_length]
    assert end_logits.shape == [t.batch_size, t.seq_length]


def test_for_sequence_classification(variant):
    _, t = variant
    model = MegatronBertForSequenceClassification(t.get_config())
    model.eval()
    result = model(t.input_ids, attention_mask=t.input_mask, token_type_ids=t.token_type_ids)
    assert paddle.is_tensor(result) and result.shape == [t.batch_size, t.num_classes]


def test_for_next_sentence_prediction(variant):
    _, t = variant
    model = MegatronBertForNextSentencePrediction(t.get_config())
    model.eval()
    result = model(t.input_ids, attention_mask=t.input_mask, token_type_ids=t.token_type_ids)
    assert paddle.is_tensor(result) and result.shape == [t.batch_size, 2]


def test_for_token_classification(variant):
    _, t = variant
    model = MegatronBertForTokenClassification(t.get_config())
    model.eval()
    result = model(t.input_ids, attention_mask=t.input_mask, token_type_ids=t.token_type_ids)
    assert paddle.is_tensor(result) and result.shape == [t.batch_size, t.seq_length, t.num_classes]


def test_for_causal_lm(variant):
    _, t = variant
    model = MegatronBertForCausalLM(t.get_config())
    model.eval()
    result = model(t.input_ids, attention_mask=t.input_mask, token_type_ids=t.token_type_ids)
    assert result[0].shape == [t.seq_length, t.vocab_size]


def test_for_masked_lm(variant):
    _, t = variant
    model = MegatronBertForMaskedLM(t.get_config())
    model.eval()
    result = model(t.input_ids, attention_mask=t.input_mask, token_type_ids=t.token_type_ids)
    assert result[0].shape == [t.seq_length, t.vocab_size]


def test_heads_with_labels_and_return_dict(variant):
    """What the parameterisation is for: with labels the loss comes first, with return_dict a ModelOutput."""
    return_dict, t = variant
    for model_class in [c for c in ALL_MODEL_CLASSES if c is not MegatronBertModel]:
        model = model_class(t.get_config())
        model.eval()
        inputs = for_class(model_class, t.common_inputs(), t.num_choices)
        if t.labels is not None:
            inputs.update(labels_for_class(model_class, t.batch_size, t.seq_length, t.num_choices))
        result = model(**inputs, return_dict=return_dict)
        if t.labels is None:
            assert not return_dict or "loss" not in result, model_class.__name__
            continue
        loss = result.loss if return_dict else result[0]
        assert loss.shape == [] and np.isfinite(float(loss)), model_class.__name__


# ---- ModelTesterMixin -------------------------------------------------------------------------------------
@pytest.mark.parametrize("return_dict", [False, True], ids=["tuple", "dict"])  # use_labels: no labels here
@pytest.mark.parametrize("model_class", ALL_MODEL_CLASSES, ids=lambda c: c.__name__)
def test_save_load(return_dict, model_class, tmp_path):
    t = MegatronBertModelTester(False)
    model = model_class(t.get_config())
    model.eval()
    inputs = {**for_class(model_class, t.common_inputs(), t.num_choices), "return_dict": return_dict}
    with paddle.no_grad():
        before = model(**inputs)[0].numpy()
    model.save_pretrained(str(tmp_path))
    model = model_class.from_pretrained(str(tmp_path))
    model.eval()
    with paddle.no_grad():
        after = model(**inputs)[0].numpy()
    assert np.amax(np.abs(np.nan_to_num(after) - np.nan_to_num(before))) <= 1e-5


@pytest.mark.parametrize("return_dict", [False, True], ids=["tuple", "dict"])  # use_labels: no labels here
@pytest.mark.parametrize("model_class", ALL_MODEL_CLASSES, ids=lambda c: c.__name__)
def test_determinism(return_dict, model_class):
    t = MegatronBertModelTester(False)
    model = model_class(t.get_config())
    model.eval()
    inputs = {**for_class(model_class, t.common_inputs(), t.num_choices), "return_dict": return_dict}
    with paddle.no_grad():
        first, second = model(**inputs)[0].numpy(), model(**inputs)[0].numpy()
    assert np.amax(np.abs(first[~np.isnan(first)] - second[~np.isnan(second)])) <= 1e-5


def test_forward_signature():
    for model_class in ALL_MODEL_CLASSES:
        arg_names = [*inspect.signature(model_class(MegatronBertModelTester(False).get_config()).forward).parameters]
        assert arg_names[:1] == ["input_ids"]


@pytest.mark.parametrize("model_class", ALL_MODEL_CLASSES, ids=lambda c: c.__name__)
def test_attention_outputs(model_class):
    t = MegatronBertModelTester(False)
    inputs = for_class(model_class, t.common_inputs(), t.num_choices)
    model = model_class(t.get_config())
    model.eval()
    with paddle.no_grad():
        outputs = model(**inputs, output_attentions=True, output_hidden_states=False, return_dict=True)
    assert len(outputs.attentions) == t.num_hidden_layers
    assert list(outputs.attentions[0].shape[-3:]) == [t.num_attention_heads, t.seq_length, t.seq_length]
    out_len = len(outputs)
    with paddle.no_grad():
        outputs = model(**inputs, output_attentions=True, output_hidden_states=True, return_dict=True)
    assert out_len + 1 == len(outputs)
    assert len(outputs.attentions) == t.num_hidden_layers
    assert list(outputs.attentions[0].shape[-3:]) == [t.num_attention_heads, t.seq_length, t.seq_length]


@pytest.mark.parametrize("model_class", ALL_MODEL_CLASSES, ids=lambda c: c.__name__)
def test_hidden_states_output(model_class):
    t = MegatronBertModelTester(False)
    model = model_class(t.get_config())
    model.eval()
    inputs = for_class(model_class, t.common_inputs(), t.num_choices)
    with paddle.no_grad():
        hidden_states = model(**inputs, output_hidden_states=True, return_dict=True).hidden_states
    assert len(hidden_states) == t.num_hidden_layers + 1
    assert list(hidden_states[0].shape[-2:]) == [t.seq_length, t.hidden_size]


@pytest.mark.parametrize("model_class", ALL_MODEL_CLASSES, ids=lambda c: c.__name__)
def test_resize_tokens_embeddings(model_class):
    t = MegatronBertModelTester(False)
    config = t.get_config()
    model = model_class(config)
    inputs = for_class(model_class, t.common_inputs(), t.num_choices)
    model_vocab_size = config.vocab_size
    cloned = model.resize_token_embeddings(model_vocab_size).weight.clone()
    model_embed = model.resize_token_embeddings(model_vocab_size + 10)
    assert model.base_model.config.vocab_size == model_vocab_size + 10  # PaddleNLP: config["vocab_size"]
    assert model_embed.weight.shape[0] == cloned.shape[0] + 10
    model(**inputs)
    model_embed = model.resize_token_embeddings(model_vocab_size - 15)
    assert model.base_model.config.vocab_size == model_vocab_size - 15
    assert model_embed.weight.shape[0] == cloned.shape[0] - 15
    inputs["input_ids"] = paddle.clip(inputs["input_ids"], max=model_vocab_size - 15 - 1)
    model(**inputs)
    for p1, p2 in zip(cloned, model_embed.weight):
        assert paddle.equal_all(p1, p2).item()


@pytest.mark.parametrize("model_class", ALL_MODEL_CLASSES, ids=lambda c: c.__name__)
def test_inputs_embeds(model_class):
    t = MegatronBertModelTester(False)
    model = model_class(t.get_config())
    model.eval()
    inputs = for_class(model_class, t.common_inputs(), t.num_choices)
    with paddle.no_grad():
        ids_output = model(**inputs)
        inputs["inputs_embeds"] = model.get_input_embeddings()(inputs.pop("input_ids"))
        embeds_output = model(**inputs)
    ids_output = ids_output[0] if isinstance(ids_output, tuple) else ids_output
    embeds_output = embeds_output[0] if isinstance(embeds_output, tuple) else embeds_output
    assert paddle.allclose(ids_output, embeds_output, 1e-4, 1e-4).item()


def test_model_name_list():
    pytest.skip("deliberate: no model_name_list; the registered names are configuration.PRETRAINED_INIT_CONFIGURATION")


def test_model_from_pretrained():
    """PaddleNLP's @slow check: a registered name loads (weights from $MEGATRONBERT_WEIGHTS_DIR, offline)."""
    root = os.environ.get("MEGATRONBERT_WEIGHTS_DIR")
    name = "megatronbert-cased"
    if not root or not os.path.isdir(os.path.join(root, name)):
        pytest.skip("needs the 345M weights: set MEGATRONBERT_WEIGHTS_DIR to a directory holding megatronbert-cased/")
    assert MegatronBertModel.from_pretrained(name) is not None
