"""HF transformers' MegatronBERT model tests, translated to this package.

Source: huggingface/transformers tests/models/megatron_bert/test_modeling_megatron_bert.py at commit
0597cc27c284586f645f340941caa4d7faf1ee53 (MegatronBertModelTester and MegatronBertModelTest), plus the
checks of tests/test_modeling_common.py (ModelTesterMixin) that apply to an encoder: save/load, determinism,
hidden states, attentions, inputs_embeds, resize embeddings, get/set embeddings, tuple vs dict outputs,
training (and with recompute), problem types, initialisation. The tester's inputs and every asserted shape are
HF's; HF's torch shapes become lists. Where this project deliberately differs the check is skipped with the
reason. With transformers installed, the attention probabilities of converted weights equal HF's, with padding.
"""

import copy

import numpy as np
import paddle
import pytest
from peer_common import ALL_MODEL_CLASSES, Draws, converted_hf_model, for_class, labels_for_class

from paddle_megatronbert import (
    MegatronBertConfig,
    MegatronBertForMaskedLM,
    MegatronBertForMultipleChoice,
    MegatronBertForNextSentencePrediction,
    MegatronBertForPreTraining,
    MegatronBertForQuestionAnswering,
    MegatronBertForSequenceClassification,
    MegatronBertForTokenClassification,
    MegatronBertModel,
)


class MegatronBertModelTester:
    """HF's tester: its sizes (``embedding_size=32`` is an unused HF kwarg; type_vocab_size 16)."""

    batch_size, seq_length, vocab_size, hidden_size = 13, 7, 99, 64
    num_hidden_layers, num_attention_heads, intermediate_size = 2, 4, 37
    type_vocab_size, type_sequence_label_size, num_labels, num_choices = 16, 2, 3, 4

    def __init__(self, seed=0):
        draws = Draws(seed)
        b, s = self.batch_size, self.seq_length
        self.input_ids = draws.ids([b, s], self.vocab_size)
        self.input_mask = draws.attention_mask([b, s])
        self.token_type_ids = draws.ids([b, s], self.type_vocab_size)
        self.sequence_labels = draws.ids([b], self.type_sequence_label_size)
        self.token_labels = draws.ids([b, s], self.num_labels)
        self.choice_labels = draws.ids([b], self.num_choices)

    def get_config(self, **overrides):
        fields = dict(vocab_size=self.vocab_size, hidden_size=self.hidden_size,
                      num_hidden_layers=self.num_hidden_layers, num_attention_heads=self.num_attention_heads,
                      intermediate_size=self.intermediate_size, hidden_act="gelu", hidden_dropout_prob=0.1,
                      attention_probs_dropout_prob=0.1, max_position_embeddings=512,
                      type_vocab_size=self.type_vocab_size, initializer_range=0.02)
        return MegatronBertConfig(**{**fields, **overrides})

    def common_inputs(self):
        return {"input_ids": self.input_ids, "token_type_ids": self.token_type_ids, "attention_mask": self.input_mask}


@pytest.fixture
def tester():
    paddle.seed(0)
    return MegatronBertModelTester()


# ---- MegatronBertModelTester.create_and_check_* --------------------------------------------------------
def test_megatron_bert_model(tester):
    model = MegatronBertModel(tester.get_config())
    model.eval()
    model(tester.input_ids, attention_mask=tester.input_mask, token_type_ids=tester.token_type_ids, return_dict=True)
    model(tester.input_ids, token_type_ids=tester.token_type_ids, return_dict=True)
    result = model(tester.input_ids, return_dict=True)
    assert result.last_hidden_state.shape == [tester.batch_size, tester.seq_length, tester.hidden_size]
    assert result.pooler_output.shape == [tester.batch_size, tester.hidden_size]


def test_for_masked_lm(tester):
    model = MegatronBertForMaskedLM(tester.get_config())
    model.eval()
    result = model(tester.input_ids, attention_mask=tester.input_mask, token_type_ids=tester.token_type_ids,
                   labels=tester.token_labels, return_dict=True)
    assert result.logits.shape == [tester.batch_size, tester.seq_length, tester.vocab_size]


def test_for_next_sequence_prediction(tester):
    model = MegatronBertForNextSentencePrediction(tester.get_config())
    model.eval()
    result = model(tester.input_ids, attention_mask=tester.input_mask, token_type_ids=tester.token_type_ids,
                   labels=tester.sequence_labels, return_dict=True)
    assert result.logits.shape == [tester.batch_size, 2]


def test_for_pretraining(tester):
    model = MegatronBertForPreTraining(tester.get_config())
    model.eval()
    result = model(tester.input_ids, attention_mask=tester.input_mask, token_type_ids=tester.token_type_ids,
                   labels=tester.token_labels, next_sentence_label=tester.sequence_labels, return_dict=True)
    assert result.prediction_logits.shape == [tester.batch_size, tester.seq_length, tester.vocab_size]
    assert result.seq_relationship_logits.shape == [tester.batch_size, 2]


def test_for_question_answering(tester):
    model = MegatronBertForQuestionAnswering(tester.get_config())
    model.eval()
    result = model(tester.input_ids, attention_mask=tester.input_mask, token_type_ids=tester.token_type_ids,
                   start_positions=tester.sequence_labels, end_positions=tester.sequence_labels, return_dict=True)
    assert result.start_logits.shape == [tester.batch_size, tester.seq_length]
    assert result.end_logits.shape == [tester.batch_size, tester.seq_length]


def test_for_sequence_classification(tester):
    model = MegatronBertForSequenceClassification(tester.get_config(num_labels=tester.num_labels))
    model.eval()
    result = model(tester.input_ids, attention_mask=tester.input_mask, token_type_ids=tester.token_type_ids,
                   labels=tester.sequence_labels, return_dict=True)
    assert result.logits.shape == [tester.batch_size, tester.num_labels]


def test_for_token_classification(tester):
    model = MegatronBertForTokenClassification(tester.get_config(num_labels=tester.num_labels))
    model.eval()
    result = model(tester.input_ids, attention_mask=tester.input_mask, token_type_ids=tester.token_type_ids,
                   labels=tester.token_labels, return_dict=True)
    assert result.logits.shape == [tester.batch_size, tester.seq_length, tester.num_labels]


def test_for_multiple_choice(tester):
    model = MegatronBertForMultipleChoice(tester.get_config(num_choices=tester.num_choices))
    model.eval()

    def expand(t):
        return t.unsqueeze(1).expand([-1, tester.num_choices, -1])

    result = model(expand(tester.input_ids), attention_mask=expand(tester.input_mask),
                   token_type_ids=expand(tester.token_type_ids), labels=tester.choice_labels, return_dict=True)
    assert result.logits.shape == [tester.batch_size, tester.num_choices]


# ---- ConfigTester.run_common_tests ----------------------------------------------------------------------
def test_config(tester, tmp_path):
    config = tester.get_config()
    for name in ("vocab_size", "hidden_size", "num_attention_heads", "num_hidden_layers"):
        assert hasattr(config, name)
    assert MegatronBertConfig.from_dict(config.to_dict()) == config  # to_json_string / from_dict
    config.save_pretrained(str(tmp_path))
    assert MegatronBertConfig.from_pretrained(str(tmp_path)) == config
    assert MegatronBertConfig(num_labels=5).num_labels == 5


def test_config_tester_hidden_size_37():
    with pytest.raises(ValueError, match="not a multiple of num_attention_heads"):
        MegatronBertConfig(hidden_size=37)
    pytest.skip("deliberate: strict config validation refuses hidden_size 37 with 16 heads (HF's ConfigTester "
                "builds it unchecked)")


# ---- ModelTesterMixin ---------------------------------------------------------------------------------
@pytest.mark.parametrize("model_class", ALL_MODEL_CLASSES, ids=lambda c: c.__name__)
def test_save_load(tester, model_class, tmp_path):
    model = model_class(tester.get_config())
    model.eval()
    inputs = for_class(model_class, tester.common_inputs(), tester.num_choices)
    with paddle.no_grad():
        before = model(**inputs)[0].numpy()
    model.save_pretrained(str(tmp_path))
    loaded = model_class.from_pretrained(str(tmp_path))
    loaded.eval()  # PaddleNLP's convention: from_pretrained leaves train mode (see the skip below)
    with paddle.no_grad():
        after = loaded(**inputs)[0].numpy()
    assert np.abs(np.nan_to_num(after) - np.nan_to_num(before)).max() <= 1e-5


def test_from_pretrained_returns_eval_mode(tester, tmp_path):
    model = MegatronBertModel(tester.get_config())
    model.save_pretrained(str(tmp_path))
    assert MegatronBertModel.from_pretrained(str(tmp_path)).training  # PaddleNLP's behaviour, kept
    pytest.skip("deliberate: from_pretrained leaves the model in train mode as PaddleNLP does (HF: eval)")


@pytest.mark.parametrize("model_class", ALL_MODEL_CLASSES, ids=lambda c: c.__name__)
def test_determinism(tester, model_class):
    model = model_class(tester.get_config())
    model.eval()
    inputs = for_class(model_class, tester.common_inputs(), tester.num_choices)
    with paddle.no_grad():
        first, second = model(**inputs)[0].numpy(), model(**inputs)[0].numpy()
    assert np.abs(first[~np.isnan(first)] - second[~np.isnan(second)]).max() <= 1e-5


def test_forward_signature():
    import inspect

    for model_class in ALL_MODEL_CLASSES:
        names = list(inspect.signature(model_class.forward).parameters)
        assert names[1:2] == ["input_ids"], model_class.__name__  # after self
        for name in ("attention_mask", "token_type_ids", "position_ids", "inputs_embeds", "output_attentions",
                     "output_hidden_states", "return_dict"):
            assert name in names, (model_class.__name__, name)


@pytest.mark.parametrize("model_class", ALL_MODEL_CLASSES, ids=lambda c: c.__name__)
def test_hidden_states_output(tester, model_class):
    def check(model, inputs):
        with paddle.no_grad():
            hidden_states = model(**inputs).hidden_states
        assert len(hidden_states) == tester.num_hidden_layers + 1
        assert list(hidden_states[0].shape[-2:]) == [tester.seq_length, tester.hidden_size]

    inputs = for_class(model_class, tester.common_inputs(), tester.num_choices)
    model = model_class(tester.get_config())
    model.eval()
    check(model, {**inputs, "output_hidden_states": True, "return_dict": True})
    model = model_class(tester.get_config(output_hidden_states=True))  # through the config
    model.eval()
    check(model, {**inputs, "return_dict": True})


@pytest.mark.parametrize("model_class", ALL_MODEL_CLASSES, ids=lambda c: c.__name__)
def test_attention_outputs(tester, model_class):
    inputs = for_class(model_class, tester.common_inputs(), tester.num_choices)
    expected_shape = [tester.num_attention_heads, tester.seq_length, tester.seq_length]
    model = model_class(tester.get_config())
    model.eval()
    with paddle.no_grad():
        outputs = model(**inputs, output_attentions=True, output_hidden_states=False, return_dict=True)
    assert len(outputs.attentions) == tester.num_hidden_layers
    assert list(outputs.attentions[0].shape[-3:]) == expected_shape
    out_len = len(outputs)
    # through the config
    model = model_class(tester.get_config(output_attentions=True))
    model.eval()
    with paddle.no_grad():
        outputs = model(**inputs, return_dict=True)
    assert len(outputs.attentions) == tester.num_hidden_layers
    # attentions are always last, one more output with the hidden states
    with paddle.no_grad():
        outputs = model(**inputs, output_attentions=True, output_hidden_states=True, return_dict=True)
    assert len(outputs) == out_len + 1
    assert list(outputs)[-1] == "attentions"
    assert list(outputs.attentions[0].shape[-3:]) == expected_shape


@pytest.mark.parametrize("model_class", ALL_MODEL_CLASSES, ids=lambda c: c.__name__)
def test_retain_grad_hidden_states_attentions(tester, model_class):
    model = model_class(tester.get_config(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))
    inputs = for_class(model_class, tester.common_inputs(), tester.num_choices)
    outputs = model(**inputs, output_attentions=True, output_hidden_states=True, return_dict=True)
    hidden_states, attentions = outputs.hidden_states[0], outputs.attentions[0]
    hidden_states.retain_grads()
    attentions.retain_grads()
    outputs[0].flatten()[0].backward()
    assert hidden_states.grad is not None
    assert attentions.grad is not None


@pytest.mark.parametrize("model_class", ALL_MODEL_CLASSES, ids=lambda c: c.__name__)
def test_inputs_embeds_matches_input_ids(tester, model_class):
    model = model_class(tester.get_config())
    model.eval()
    inputs = for_class(model_class, tester.common_inputs(), tester.num_choices)
    with paddle.no_grad():
        from_ids = model(**inputs)[0].numpy()
        embeds = model.get_input_embeddings()(inputs.pop("input_ids"))
        from_embeds = model(inputs_embeds=embeds, **inputs)[0].numpy()
    np.testing.assert_allclose(from_embeds, from_ids, atol=1e-5)


def test_input_ids_or_inputs_embeds_not_both(tester):
    model = MegatronBertModel(tester.get_config())
    embeds = model.get_input_embeddings()(tester.input_ids)
    with pytest.raises(ValueError, match="exactly one of input_ids and inputs_embeds"):
        model(tester.input_ids, inputs_embeds=embeds)
    with pytest.raises(ValueError, match="exactly one of input_ids and inputs_embeds"):
        model()


@pytest.mark.parametrize("model_class", ALL_MODEL_CLASSES, ids=lambda c: c.__name__)
def test_model_get_set_embeddings(tester, model_class):
    model = model_class(tester.get_config())
    assert isinstance(model.get_input_embeddings(), paddle.nn.Layer)
    new_embedding = paddle.nn.Embedding(10, tester.hidden_size)
    model.set_input_embeddings(new_embedding)
    assert model.get_input_embeddings() is new_embedding
    output = model.get_output_embeddings()
    assert output is None or output.decoder is new_embedding.weight  # a tied decoder follows


LM_CLASSES = [c for c in ALL_MODEL_CLASSES if c.__name__.endswith(("PreTraining", "MaskedLM", "CausalLM"))]


@pytest.mark.parametrize("model_class,tied", [(c, True) for c in ALL_MODEL_CLASSES] + [(c, False) for c in LM_CLASSES],
                         ids=lambda v: v.__name__ if isinstance(v, type) else ("tied" if v else "untied"))
def test_resize_tokens_embeddings(tester, model_class, tied):  # HF's test_resize_embeddings_untied for the LM heads
    config = tester.get_config(tie_word_embeddings=tied)
    model = model_class(config)
    inputs = for_class(model_class, tester.common_inputs(), tester.num_choices)
    vocab = config.vocab_size
    cloned = model.resize_token_embeddings(vocab).weight.numpy().copy()

    embedding = model.resize_token_embeddings(vocab + 10)
    assert model.config.vocab_size == vocab + 10
    assert embedding.weight.shape[0] == cloned.shape[0] + 10
    output = model.get_output_embeddings()
    if output is not None:
        assert output.decoder.shape[0] == vocab + 10 and output.bias.shape[0] == vocab + 10
        assert (output.decoder is embedding.weight) == tied
    model(**inputs)  # every parameter was resized

    embedding = model.resize_token_embeddings(vocab - 15)
    assert model.config.vocab_size == vocab - 15
    assert embedding.weight.shape[0] == cloned.shape[0] - 15
    inputs["input_ids"] = paddle.clip(inputs["input_ids"], max=vocab - 15 - 1)
    model(**inputs)
    np.testing.assert_array_equal(embedding.weight.numpy(), cloned[:vocab - 15])  # kept rows unchanged

    embedding = model.resize_token_embeddings(vocab, pad_to_multiple_of=64)
    assert embedding.weight.shape[0] % 64 == 0 and embedding.weight.shape[0] >= vocab
    embedding = model.resize_token_embeddings(embedding.weight.shape[0], pad_to_multiple_of=64)
    assert embedding.weight.shape[0] % 64 == 0
    with pytest.raises(ValueError, match="pad_to_multiple_of must be a positive integer"):
        model.resize_token_embeddings(vocab, pad_to_multiple_of="12")


def test_tie_model_weights(tester):
    model = MegatronBertForMaskedLM(tester.get_config())
    assert model.get_output_embeddings().decoder is model.get_input_embeddings().weight
    model.resize_token_embeddings(tester.vocab_size + 5)
    assert model.get_output_embeddings().decoder is model.get_input_embeddings().weight


@pytest.mark.parametrize("model_class", ALL_MODEL_CLASSES, ids=lambda c: c.__name__)
def test_model_outputs_equivalence(tester, model_class):
    model = model_class(tester.get_config())
    model.eval()
    inputs = for_class(model_class, tester.common_inputs(), tester.num_choices)
    labelled = {**inputs, **labels_for_class(model_class, tester.batch_size, tester.seq_length, tester.num_choices)}

    def flatten(x):
        if isinstance(x, paddle.Tensor):
            return [x.numpy()]
        return [a for item in x for a in flatten(item)]

    for kwargs in ({}, {"output_hidden_states": True, "output_attentions": True}):
        for batch in (inputs, labelled):
            with paddle.no_grad():
                as_tuple = model(**batch, **kwargs, return_dict=False)
                as_dict = model(**batch, **kwargs, return_dict=True)
            # deliberate: the pretraining dict also carries mlm_loss / nsp_loss, which the tuple leaves out
            fields = [v for k, v in as_dict.items() if k not in ("mlm_loss", "nsp_loss")]
            for a, b in zip(flatten(as_tuple), flatten(fields), strict=True):
                np.testing.assert_allclose(a, b, atol=1e-5)


@pytest.mark.parametrize("recompute", [False, True], ids=["training", "gradient-checkpointing"])
@pytest.mark.parametrize("model_class", [c for c in ALL_MODEL_CLASSES if c is not MegatronBertModel],
                         ids=lambda c: c.__name__)
def test_training(tester, model_class, recompute):
    model = model_class(tester.get_config(recompute=recompute))
    model.train()
    inputs = for_class(model_class, tester.common_inputs(), tester.num_choices)
    inputs.update(labels_for_class(model_class, tester.batch_size, tester.seq_length, tester.num_choices))
    loss = model(**inputs, return_dict=True).loss
    assert np.isfinite(float(loss))
    loss.backward()
    assert any(p.grad is not None and float(p.grad.abs().sum()) > 0 for p in model.parameters())


@pytest.mark.parametrize("problem_type,num_labels,dtype", [
    ("multi_label_classification", 2, "float32"),
    ("single_label_classification", 1, "int64"),
    ("regression", 1, "float32"),
])
def test_problem_types(tester, problem_type, num_labels, dtype):
    model = MegatronBertForSequenceClassification(tester.get_config(problem_type=problem_type, num_labels=num_labels))
    model.train()
    labels = paddle.zeros([tester.batch_size], dtype=dtype)
    if problem_type == "multi_label_classification":
        labels = labels.unsqueeze(1).tile([1, num_labels])
    outputs = model(**tester.common_inputs(), labels=labels, return_dict=True)
    outputs.loss.backward()
    logits = outputs.logits.numpy().astype("float64")
    if problem_type == "multi_label_classification":  # BCE-with-logits against zero targets
        expected = np.mean(np.log1p(np.exp(logits)))
    elif problem_type == "regression":
        expected = np.mean(logits.reshape(-1) ** 2)
    else:
        expected = 0.0  # one class: log-softmax is 0
    np.testing.assert_allclose(float(outputs.loss), expected, rtol=1e-5, atol=1e-6)


def test_multi_label_without_problem_type_follows_the_labels_dtype(tester):
    model = MegatronBertForSequenceClassification(tester.get_config(num_labels=3))
    model.eval()
    rng = np.random.RandomState(2)
    labels = (rng.rand(tester.batch_size, 3) > 0.5).astype("float32")
    outputs = model(**tester.common_inputs(), labels=paddle.to_tensor(labels), return_dict=True)
    x = outputs.logits.numpy().astype("float64")
    expected = np.mean(np.maximum(x, 0) - x * labels + np.log1p(np.exp(-np.abs(x))))
    np.testing.assert_allclose(float(outputs.loss), expected, rtol=1e-5)
    with pytest.raises(ValueError, match="problem_type"):
        tester.get_config(problem_type="multilabel")


def test_initialization(tester):
    config = tester.get_config(initializer_range=1e-10)
    for model_class in ALL_MODEL_CLASSES:
        model = model_class(copy.deepcopy(config))
        for name, param in model.named_parameters():
            mean = round(float(param.mean()) * 1e9) / 1e9
            assert mean in (0.0, 1.0), f"{model_class.__name__}.{name}: mean {mean}"


def test_load_with_mismatched_shapes(tester, tmp_path):
    model = MegatronBertForSequenceClassification(tester.get_config(num_labels=3))
    model.save_pretrained(str(tmp_path))
    with pytest.raises(ValueError, match="classifier.weight"):
        MegatronBertForSequenceClassification.from_pretrained(str(tmp_path), num_labels=42)
    pytest.skip("deliberate: no ignore_mismatched_sizes; a head of another size is loaded from the body's "
                "checkpoint instead (the mismatch raises, naming the parameter)")


def test_correct_missing_keys(tester, tmp_path):
    base = MegatronBertModel(tester.get_config())
    base.save_pretrained(str(tmp_path))
    for model_class in ALL_MODEL_CLASSES:
        model = model_class.from_pretrained(str(tmp_path))
        np.testing.assert_array_equal(model.get_input_embeddings().weight.numpy(),
                                      base.get_input_embeddings().weight.numpy())


def test_head_masking_and_pruning():
    pytest.skip("deliberate: no head_mask / prune_heads (HF sets test_head_masking=False for this model too)")


def test_feed_forward_chunking():
    pytest.skip("deliberate: no chunk_size_feed_forward (a memory trade-off that recompute covers here)")


def test_torch_only_checks():
    pytest.skip("not applicable: torchscript, torch.fx, SDPA/flash-attention selection and pipelines are "
                "torch-only features")


# ---- the HF model itself as the oracle -----------------------------------------------------------------
@pytest.mark.parametrize("hf_class_name", ["MegatronBertModel", "MegatronBertForSequenceClassification"])
def test_attention_probabilities_equal_hf_for_converted_weights_with_padding(tmp_path, hf_class_name):
    torch = pytest.importorskip("torch")
    tester = MegatronBertModelTester(seed=3)
    hf_model, ours = converted_hf_model(
        tmp_path, hf_class_name, vocab_size=tester.vocab_size, hidden_size=tester.hidden_size,
        num_hidden_layers=tester.num_hidden_layers, num_attention_heads=tester.num_attention_heads,
        intermediate_size=tester.intermediate_size, type_vocab_size=tester.type_vocab_size, num_labels=3)
    inputs = tester.common_inputs()
    assert (inputs["attention_mask"].numpy() == 0).any()  # padding (masked keys) present
    with torch.no_grad():
        expected = hf_model(**{k: torch.from_numpy(v.numpy()) for k, v in inputs.items()},
                            output_attentions=True, output_hidden_states=True)
    with paddle.no_grad():
        got = ours(**inputs, output_attentions=True, output_hidden_states=True, return_dict=True)
    assert len(got.attentions) == len(expected.attentions) == tester.num_hidden_layers
    for layer, (ours_probs, hf_probs) in enumerate(zip(got.attentions, expected.attentions)):
        np.testing.assert_allclose(ours_probs.numpy(), hf_probs.numpy(), atol=1e-5, rtol=0, err_msg=f"layer {layer}")
    for ours_h, hf_h in zip(got.hidden_states, expected.hidden_states, strict=True):
        np.testing.assert_allclose(ours_h.numpy(), hf_h.numpy(), atol=1e-5, rtol=0)
    masked_keys = (inputs["attention_mask"].numpy() == 0)[:, None, None, :]  # (B, 1, 1, S)
    assert np.abs(got.attentions[0].numpy() * masked_keys).max() < 1e-6  # no probability on padding keys


def test_gradient_checkpointing_gives_the_same_gradients(tester):
    grads = []
    for recompute in (False, True):
        paddle.seed(0)
        model = MegatronBertForPreTraining(tester.get_config(recompute=recompute, hidden_dropout_prob=0.0,
                                                            attention_probs_dropout_prob=0.0))
        model.train()
        inputs = {**tester.common_inputs(), **labels_for_class(MegatronBertForPreTraining, tester.batch_size,
                                                               tester.seq_length, tester.num_choices)}
        model(**inputs, return_dict=True).loss.backward()
        grads.append({n: p.grad.numpy() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 0
    for name in grads[0]:
        np.testing.assert_allclose(grads[1][name], grads[0][name], rtol=1e-5, atol=1e-7, err_msg=name)


@pytest.mark.parametrize("problem_type", [None, "multi_label_classification", "regression"])
def test_sequence_classification_losses_equal_hf(tmp_path, problem_type):
    torch = pytest.importorskip("torch")
    tester = MegatronBertModelTester(seed=4)
    hf_model, ours = converted_hf_model(
        tmp_path, "MegatronBertForSequenceClassification", vocab_size=tester.vocab_size,
        hidden_size=tester.hidden_size, num_hidden_layers=tester.num_hidden_layers,
        num_attention_heads=tester.num_attention_heads, intermediate_size=tester.intermediate_size,
        type_vocab_size=tester.type_vocab_size, num_labels=3, problem_type=problem_type)
    assert ours.config.problem_type == problem_type
    rng = np.random.RandomState(7)
    labels = (rng.rand(tester.batch_size, 3) > 0.5).astype("float32")  # float (B, num_labels): multi-label unless set
    if problem_type == "regression":
        labels = rng.randn(tester.batch_size, 3).astype("float32")
    inputs = tester.common_inputs()
    with torch.no_grad():
        expected = hf_model(**{k: torch.from_numpy(v.numpy()) for k, v in inputs.items()},
                            labels=torch.from_numpy(labels)).loss.item()
    got = float(ours(**inputs, labels=paddle.to_tensor(labels), return_dict=True).loss)
    np.testing.assert_allclose(got, expected, rtol=1e-5)
