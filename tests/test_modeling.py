"""The model family: parity with HF transformers and PaddleNLP, padding, save/load, training, bad input."""

import json
import os

import numpy as np
import paddle
import pytest

from paddle_megatronbert import (
    MODEL_CLASSES,
    MegatronBertConfig,
    MegatronBertForPreTraining,
    MegatronBertForQuestionAnswering,
    MegatronBertForSequenceClassification,
    MegatronBertModel,
)
from paddle_megatronbert.configuration import PRETRAINED_INIT_CONFIGURATION

TINY = dict(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
            max_position_embeddings=64, type_vocab_size=2, hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0, layer_norm_eps=1e-5)
BATCH, SEQ = 3, 11
HEADS = sorted(MODEL_CLASSES)


def tiny_config(**overrides):
    return MegatronBertConfig(**{**TINY, **overrides})


def make_batch(seed=0, vocab=99, batch=BATCH, seq=SEQ):
    rng = np.random.RandomState(seed)
    input_ids = rng.randint(1, vocab, size=(batch, seq)).astype("int64")
    token_type_ids = np.zeros((batch, seq), dtype="int64")
    token_type_ids[:, seq // 2:] = 1
    attention_mask = np.ones((batch, seq), dtype="int64")
    if batch >= 3:  # padding on two of the rows
        attention_mask[1, -3:] = 0
        attention_mask[2, -5:] = 0
    input_ids[attention_mask == 0] = 0
    return input_ids, token_type_ids, attention_mask


def labels_for(head, input_ids, config, rng=None):
    """Label keyword arguments for each head, as numpy arrays."""
    rng = rng or np.random.RandomState(1)
    batch, seq = input_ids.shape
    mlm = np.where(rng.rand(batch, seq) < 0.4, input_ids, -100).astype("int64")
    mlm[0, 0] = input_ids[0, 0]  # at least one labelled position
    if head == "MegatronBertForPreTraining":
        return dict(labels=mlm, next_sentence_label=rng.randint(0, 2, size=(batch,)).astype("int64"))
    if head == "MegatronBertForMaskedLM":
        return dict(labels=mlm)
    if head == "MegatronBertForCausalLM":
        return dict(labels=input_ids.copy())
    if head == "MegatronBertForNextSentencePrediction":
        return dict(labels=rng.randint(0, 2, size=(batch,)).astype("int64"))
    if head == "MegatronBertForSequenceClassification":
        if config.num_labels == 1:
            return dict(labels=rng.randn(batch).astype("float32"))
        return dict(labels=rng.randint(0, config.num_labels, size=(batch,)).astype("int64"))
    if head == "MegatronBertForMultipleChoice":
        return dict(labels=rng.randint(0, 2, size=(batch,)).astype("int64"))
    if head == "MegatronBertForTokenClassification":
        tags = rng.randint(0, config.num_labels, size=(batch, seq)).astype("int64")
        tags[:, 0] = -100
        return dict(labels=tags)
    if head == "MegatronBertForQuestionAnswering":
        return dict(start_positions=np.array([1, 3, 99]), end_positions=np.array([2, 5, 4]))  # 99: ignored
    return {}


def multiple_choice(arrays):
    """(B, S) -> (B, 2, S): two choices per example (the row and its reverse)."""
    return [np.stack([a, a[:, ::-1]], axis=1) for a in arrays]


def to_paddle(kwargs):
    return {k: paddle.to_tensor(v) for k, v in kwargs.items()}


# ---- HF oracle ------------------------------------------------------------------------------------
def hf_state_to_ours(state):
    """HF MegatronBert state dict (torch) -> ours (numpy): Linear weights transposed, embeddings not."""
    out = {}
    for name, tensor in state.items():
        value = tensor.detach().cpu().numpy()
        if name == "cls.predictions.bias" and "cls.predictions.decoder.bias" in state:
            continue  # HF's forward adds decoder.bias (one tensor with this one only when tied)
        if name == "cls.predictions.decoder.bias":
            name = "cls.predictions.bias"
        if name == "cls.predictions.decoder.weight":
            out["cls.predictions.decoder_weight"] = value
            continue
        if value.ndim == 2 and "embeddings" not in name:
            value = value.T
        out[name] = np.ascontiguousarray(value)
    return out


def build_hf(head, config_kwargs, seed=0):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    hf_config = transformers.MegatronBertConfig(
        vocab_size=config_kwargs["vocab_size"], hidden_size=config_kwargs["hidden_size"],
        num_hidden_layers=config_kwargs["num_hidden_layers"], num_attention_heads=config_kwargs["num_attention_heads"],
        intermediate_size=config_kwargs["intermediate_size"], hidden_act=config_kwargs.get("hidden_act", "gelu"),
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        max_position_embeddings=config_kwargs["max_position_embeddings"], type_vocab_size=2,
        layer_norm_eps=config_kwargs["layer_norm_eps"], num_labels=config_kwargs.get("num_labels", 2),
        tie_word_embeddings=config_kwargs.get("tie_word_embeddings", True),
        is_decoder=head == "MegatronBertForCausalLM",
    )
    model = getattr(transformers, head)(hf_config).eval()
    with torch.no_grad():  # random LayerNorm and bias values too, so every parameter is exercised
        for name, param in model.named_parameters():
            if param.ndim == 1:
                param.add_(torch.randn_like(param) * 0.1)
    return model


@pytest.mark.parametrize("head", HEADS)
def test_every_head_matches_hf_transformers(head):
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    overrides = dict(num_labels=3) if head == "MegatronBertForTokenClassification" else {}
    config = tiny_config(**overrides)
    hf_model = build_hf(head, {**TINY, **overrides})
    ours = MODEL_CLASSES[head](config)
    ours.load_full_state_dict(hf_state_to_ours(hf_model.state_dict()), strict=True)
    ours.eval()

    input_ids, token_type_ids, attention_mask = make_batch()
    labels = labels_for(head, input_ids, config)
    if head == "MegatronBertForMultipleChoice":
        input_ids, token_type_ids, attention_mask = multiple_choice([input_ids, token_type_ids, attention_mask])
    inputs = dict(input_ids=input_ids, token_type_ids=token_type_ids, attention_mask=attention_mask, **labels)

    with torch.no_grad():
        expected = hf_model(**{k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in inputs.items()},
                            return_dict=True)
    got = ours(**to_paddle(inputs), return_dict=True)

    fields = [k for k in ("loss", "last_hidden_state", "pooler_output", "prediction_logits",
                          "seq_relationship_logits", "logits", "start_logits", "end_logits") if k in got]
    assert fields, f"{head} returned nothing comparable: {list(got)}"
    if head != "MegatronBertModel":
        assert "loss" in got
    for field in fields:
        ours_value = got[field].numpy()
        hf_value = getattr(expected, field).numpy()
        assert ours_value.shape == hf_value.shape, field
        np.testing.assert_allclose(ours_value, hf_value, atol=1e-5, rtol=0, err_msg=f"{head}.{field}")


@pytest.mark.parametrize("num_labels,tied", [(1, True), (2, False)])
def test_regression_head_and_untied_decoder_match_hf(num_labels, tied):
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    input_ids, token_type_ids, attention_mask = make_batch(seed=3)
    head = "MegatronBertForSequenceClassification" if num_labels == 1 else "MegatronBertForPreTraining"
    overrides = dict(num_labels=num_labels, tie_word_embeddings=tied)
    config = tiny_config(**overrides)
    hf_model = build_hf(head, {**TINY, **overrides}, seed=5)
    ours = MODEL_CLASSES[head](config)
    ours.load_full_state_dict(hf_state_to_ours(hf_model.state_dict()), strict=True)
    ours.eval()
    inputs = dict(input_ids=input_ids, token_type_ids=token_type_ids, attention_mask=attention_mask,
                  **labels_for(head, input_ids, config))
    with torch.no_grad():
        expected = hf_model(**{k: torch.from_numpy(v) for k, v in inputs.items()}, return_dict=True)
    got = ours(**to_paddle(inputs), return_dict=True)
    np.testing.assert_allclose(got.loss.numpy(), expected.loss.numpy(), atol=1e-5)
    key = "logits" if num_labels == 1 else "prediction_logits"
    np.testing.assert_allclose(got[key].numpy(), getattr(expected, key).numpy(), atol=1e-5)


# ---- padding --------------------------------------------------------------------------------------
def test_padding_does_not_change_unpadded_tokens():
    paddle.seed(0)
    model = MegatronBertModel(tiny_config())
    model.eval()
    input_ids, token_type_ids, _ = make_batch(batch=1)
    short = 6
    alone = model(paddle.to_tensor(input_ids[:, :short]), paddle.ones([1, short], dtype="int64"),
                  paddle.to_tensor(token_type_ids[:, :short]), return_dict=True)
    padded_ids = input_ids.copy()
    padded_ids[:, short:] = 0
    mask = np.zeros_like(padded_ids)
    mask[:, :short] = 1
    padded = model(paddle.to_tensor(padded_ids), paddle.to_tensor(mask), paddle.to_tensor(token_type_ids),
                   return_dict=True)
    np.testing.assert_allclose(padded.last_hidden_state.numpy()[:, :short], alone.last_hidden_state.numpy(),
                               atol=1e-5)
    np.testing.assert_allclose(padded.pooler_output.numpy(), alone.pooler_output.numpy(), atol=1e-5)
    # A 4-D additive mask means the same as the 2-D 0/1 one.
    additive = paddle.to_tensor(((1 - mask) * -1e4).astype("float32")[:, None, None, :])
    four_d = model(paddle.to_tensor(padded_ids), additive, paddle.to_tensor(token_type_ids), return_dict=True)
    np.testing.assert_allclose(four_d.last_hidden_state.numpy(), padded.last_hidden_state.numpy(), atol=1e-6)
    two_d_additive = paddle.to_tensor(((1 - mask) * -1e9).astype("float32"))
    two_d = model(paddle.to_tensor(padded_ids), two_d_additive, paddle.to_tensor(token_type_ids), return_dict=True)
    np.testing.assert_allclose(two_d.last_hidden_state.numpy(), padded.last_hidden_state.numpy(), atol=1e-6)
    float_keep = model(paddle.to_tensor(padded_ids), paddle.to_tensor(mask.astype("float32")),
                       paddle.to_tensor(token_type_ids), return_dict=True)
    np.testing.assert_allclose(float_keep.last_hidden_state.numpy(), padded.last_hidden_state.numpy(), atol=1e-6)


def test_mlm_loss_is_mean_over_labelled_positions_only():
    """Guards against Paddle 3.3's cross_entropy(ignore_index=-100) mean dividing by every position."""
    paddle.seed(0)
    model = MODEL_CLASSES["MegatronBertForMaskedLM"](tiny_config())
    model.eval()
    input_ids, token_type_ids, attention_mask = make_batch()
    labels = np.full_like(input_ids, -100)
    labels[0, 2], labels[1, 4], labels[2, 1] = 5, 17, 42
    out = model(paddle.to_tensor(input_ids), paddle.to_tensor(attention_mask), paddle.to_tensor(token_type_ids),
                labels=paddle.to_tensor(labels), return_dict=True)
    logits = out.logits.numpy().astype("float64")
    log_probs = logits - logits.max(-1, keepdims=True)
    log_probs -= np.log(np.exp(log_probs).sum(-1, keepdims=True))
    by_hand = -np.mean([log_probs[0, 2, 5], log_probs[1, 4, 17], log_probs[2, 1, 42]])
    assert abs(float(out.loss) - by_hand) < 1e-5


def test_masked_positions_head_equals_full_head():
    paddle.seed(0)
    model = MegatronBertForPreTraining(tiny_config())
    model.eval()
    input_ids, token_type_ids, attention_mask = make_batch()
    positions = np.array([[1, 3, 0], [2, 4, 5], [1, 0, 0]])
    ids_at = np.take_along_axis(input_ids, positions, axis=1)
    short_labels = np.where(positions > 0, ids_at, -100)
    full_labels = np.full_like(input_ids, -100)
    for row in range(BATCH):
        for pos, label in zip(positions[row], short_labels[row]):
            if pos > 0:
                full_labels[row, pos] = label
    common = dict(input_ids=paddle.to_tensor(input_ids), attention_mask=paddle.to_tensor(attention_mask),
                  token_type_ids=paddle.to_tensor(token_type_ids), return_dict=True)
    full = model(labels=paddle.to_tensor(full_labels), **common)
    masked = model(labels=paddle.to_tensor(short_labels), masked_lm_positions=paddle.to_tensor(positions), **common)
    np.testing.assert_allclose(float(masked.loss), float(full.loss), atol=1e-6)
    np.testing.assert_allclose(masked.prediction_logits.numpy()[1], full.prediction_logits.numpy()[1][[2, 4, 5]],
                               atol=1e-5)


def test_labelled_rows_head_equals_full_head_in_training():
    paddle.seed(0)
    plain = MegatronBertForPreTraining(tiny_config())
    paddle.seed(0)
    selective = MegatronBertForPreTraining(tiny_config(mlm_head_on_labelled_rows=True))
    input_ids, token_type_ids, attention_mask = make_batch()
    labels = labels_for("MegatronBertForPreTraining", input_ids, plain.config)
    inputs = to_paddle(dict(input_ids=input_ids, token_type_ids=token_type_ids, attention_mask=attention_mask,
                            **labels))
    full = plain(**inputs, return_dict=True)
    rows = selective(**inputs, return_dict=True)
    kept = labels["labels"] != -100
    assert rows.prediction_logits.shape == [int(kept.sum()), 99]
    np.testing.assert_allclose(float(rows.loss), float(full.loss), atol=1e-6)
    np.testing.assert_allclose(rows.prediction_logits.numpy(), full.prediction_logits.numpy()[kept], atol=1e-5)
    full.loss.backward()
    rows.loss.backward()
    for (name, a), b in zip(plain.named_parameters(), selective.parameters()):
        np.testing.assert_allclose(b.grad.numpy(), a.grad.numpy(), atol=1e-6, err_msg=name)


# ---- save / load ----------------------------------------------------------------------------------
def test_save_pretrained_from_pretrained_bit_identical(tmp_path):
    paddle.seed(0)
    model = MegatronBertForQuestionAnswering(tiny_config())
    model.eval()
    model.save_pretrained(str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == ["config.json", "model.safetensors"]
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["hidden_size"] == 32 and saved["architectures"] == ["MegatronBertForQuestionAnswering"]
    loaded = MegatronBertForQuestionAnswering.from_pretrained(str(tmp_path))
    loaded.eval()
    input_ids, token_type_ids, attention_mask = make_batch()
    args = [paddle.to_tensor(a) for a in (input_ids, attention_mask, token_type_ids)]
    a, b = model(*args, return_dict=True), loaded(*args, return_dict=True)
    assert np.array_equal(a.start_logits.numpy(), b.start_logits.numpy())
    assert np.array_equal(a.end_logits.numpy(), b.end_logits.numpy())


def test_head_from_pretrained_body_keeps_body_and_inits_head(tmp_path):
    paddle.seed(0)
    body = MegatronBertForPreTraining(tiny_config())
    body.save_pretrained(str(tmp_path))
    classifier = MegatronBertForSequenceClassification.from_pretrained(str(tmp_path), num_labels=3)
    assert classifier.config.num_labels == 3
    np.testing.assert_array_equal(classifier.bert.encoder.ln.weight.numpy(), body.bert.encoder.ln.weight.numpy())


def test_paddlenlp_checkpoint_loads_and_matches_paddlenlp_outputs(tmp_path):
    pytest.importorskip("paddlenlp")
    from paddlenlp.transformers import MegatronBertConfig as PNLPConfig
    from paddlenlp.transformers import MegatronBertForPreTraining as PNLPPretraining

    paddle.seed(1)
    pnlp_config = PNLPConfig(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                             intermediate_size=37, max_position_embeddings=64, type_vocab_size=2,
                             hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    reference = PNLPPretraining(pnlp_config)
    reference.eval()
    with paddle.no_grad():  # random LayerNorm/bias values so the renamed ones are checked too
        for name, param in reference.named_parameters():
            if param.ndim == 1:
                param.set_value(param + paddle.randn(param.shape) * 0.1)
        # Paddle's Embedding(padding_idx=0) reads zeros for [PAD] whatever the row holds: make the row say so.
        word_embeddings = reference.megatronbert.embeddings.word_embeddings.weight
        word_embeddings.set_value(paddle.concat([paddle.zeros([1, 32]), word_embeddings[1:]]))
    # The directory exactly as PaddleNLP writes it (its config.json, its names, its untied decoder).
    reference.save_pretrained(str(tmp_path))
    ours = MegatronBertForPreTraining.from_pretrained(str(tmp_path))
    assert ours.config.tie_word_embeddings is False and ours.config.layer_norm_eps == 1e-12
    ours.eval()

    input_ids, token_type_ids, _ = make_batch(seed=4)
    # PaddleNLP never turns a 2-D 0/1 mask into an additive one: compare with a 4-D additive mask.
    mask = np.ones_like(input_ids)
    mask[1, -4:] = 0
    additive = paddle.to_tensor(((1 - mask) * -1e4).astype("float32")[:, None, None, :])
    expected_mlm, expected_nsp = reference(paddle.to_tensor(input_ids), paddle.to_tensor(token_type_ids),
                                           attention_mask=additive)
    got = ours(paddle.to_tensor(input_ids), paddle.to_tensor(mask), paddle.to_tensor(token_type_ids),
               return_dict=True)
    np.testing.assert_allclose(got.prediction_logits.numpy(), expected_mlm.numpy(), atol=1e-5)
    np.testing.assert_allclose(got.seq_relationship_logits.numpy(), expected_nsp.numpy(), atol=1e-5)


# ---- registered names ---------------------------------------------------------------------------
@pytest.mark.parametrize("name,vocab,lower", [("megatronbert-cased", 29056, False),
                                              ("megatronbert-uncased", 30592, True)])
def test_registered_names_resolve_offline(name, vocab, lower):
    config = MegatronBertConfig.from_pretrained(name)
    assert (config.vocab_size, config.hidden_size, config.num_hidden_layers, config.num_attention_heads,
            config.intermediate_size, config.max_position_embeddings) == (vocab, 1024, 24, 16, 4096, 512)
    assert config.layer_norm_eps == 1e-5 and config.do_lower_case is lower
    from paddle_megatronbert.configuration import PRETRAINED_RESOURCE_FILES_MAP

    url = PRETRAINED_RESOURCE_FILES_MAP["model_state"][name]
    assert url.startswith("https://") and url.endswith(f"{name}/model_state.pdparams")
    assert set(PRETRAINED_INIT_CONFIGURATION) == {"megatronbert-cased", "megatronbert-uncased"}


def test_registered_name_without_weights_or_network_says_how(tmp_path, monkeypatch):
    monkeypatch.setenv("MEGATRONBERT_HOME", str(tmp_path))
    monkeypatch.delenv("MEGATRONBERT_WEIGHTS_DIR", raising=False)
    import paddle_megatronbert.download as download

    def offline(*args, **kwargs):
        raise ConnectionError("no network")

    monkeypatch.setattr("paddle.utils.download.get_path_from_url", offline)
    with pytest.raises(OSError, match="convert_checkpoint.py"):
        download.download_pretrained_weights("megatronbert-uncased")


def test_weights_dir_env_serves_registered_name(tmp_path, monkeypatch):
    config = tiny_config()
    paddle.seed(0)
    model = MegatronBertModel(config)
    target = tmp_path / "megatronbert-uncased"
    model.save_pretrained(str(target))
    monkeypatch.setenv("MEGATRONBERT_WEIGHTS_DIR", str(tmp_path))
    # The registered 345M config does not fit the tiny weights: the error names the parameter and both shapes.
    with pytest.raises(ValueError, match=r"embeddings\.word_embeddings\.weight has shape \[99, 32\].*\[30592, 1024\]"):
        MegatronBertModel.from_pretrained("megatronbert-uncased", num_hidden_layers=1)


# ---- initialisation -------------------------------------------------------------------------------
def test_initialisation_follows_bert():
    paddle.seed(0)
    model = MegatronBertForPreTraining(tiny_config(hidden_size=64, intermediate_size=128, initializer_range=0.02))
    state = {k: v.numpy() for k, v in model.state_dict().items()}
    weight = state["bert.encoder.layer.0.intermediate.dense.weight"]
    assert abs(weight.std() - 0.02) < 0.002 and abs(weight.mean()) < 0.002
    assert np.all(state["bert.encoder.layer.0.intermediate.dense.bias"] == 0)
    assert np.all(state["bert.encoder.layer.1.ln.weight"] == 1) and np.all(state["bert.encoder.ln.bias"] == 0)
    assert np.all(state["bert.embeddings.word_embeddings.weight"][0] == 0)  # [PAD]
    assert "cls.predictions.decoder_weight" not in state  # tied to the word embeddings


# ---- training -------------------------------------------------------------------------------------
@pytest.mark.parametrize("head", [h for h in HEADS if h != "MegatronBertModel"])
def test_every_head_trains(head):
    paddle.seed(0)
    overrides = dict(num_labels=3) if head == "MegatronBertForTokenClassification" else {}
    config = tiny_config(**overrides)
    model = MODEL_CLASSES[head](config)
    model.train()
    input_ids, token_type_ids, attention_mask = make_batch()
    labels = labels_for(head, input_ids, config)
    if head == "MegatronBertForMultipleChoice":
        input_ids, token_type_ids, attention_mask = multiple_choice([input_ids, token_type_ids, attention_mask])
    inputs = to_paddle(dict(input_ids=input_ids, token_type_ids=token_type_ids, attention_mask=attention_mask,
                            **labels))
    optimizer = paddle.optimizer.AdamW(learning_rate=1e-2, parameters=model.parameters())
    losses = []
    for _ in range(10):
        loss = model(**inputs, return_dict=True).loss
        loss.backward()
        optimizer.step()
        optimizer.clear_grad()
        losses.append(float(loss))
    assert losses[-1] < 0.7 * losses[0], losses


# ---- bad input ------------------------------------------------------------------------------------
def test_hidden_not_divisible_by_heads():
    with pytest.raises(ValueError, match=r"hidden_size \(30\) is not a multiple of num_attention_heads \(4\)"):
        tiny_config(hidden_size=30)


def test_input_longer_than_max_positions():
    model = MegatronBertModel(tiny_config())
    with pytest.raises(ValueError, match="input length 70 exceeds max_position_embeddings \\(64\\)"):
        model(paddle.ones([1, 70], dtype="int64"))


def test_token_id_outside_vocab():
    model = MegatronBertModel(tiny_config())
    with pytest.raises(ValueError, match=r"token id 99 is outside the vocabulary \[0, 99\)"):
        model(paddle.to_tensor([[1, 2, 99]]))


def test_checkpoint_shape_mismatch_names_parameter_and_shapes(tmp_path):
    MegatronBertModel(tiny_config()).save_pretrained(str(tmp_path))
    config = json.loads((tmp_path / "config.json").read_text())
    config["intermediate_size"] = 40
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"encoder\.layer\.0\.intermediate\.dense\.weight has shape \[32, 37\] "
                                         r"in the checkpoint but \[32, 40\]"):
        MegatronBertModel.from_pretrained(str(tmp_path))


def test_missing_or_corrupt_checkpoint(tmp_path):
    with pytest.raises(ValueError, match="is neither a registered name"):
        MegatronBertModel.from_pretrained(str(tmp_path / "nope"))
    tiny_config().save_pretrained(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="has no model.safetensors"):
        MegatronBertModel.from_pretrained(str(tmp_path))
    (tmp_path / "model_state.pdparams").write_bytes(b"not a pickle")
    with pytest.raises(ValueError, match="cannot read .*model_state.pdparams as a Paddle state file"):
        MegatronBertModel.from_pretrained(str(tmp_path))
    MegatronBertModel(tiny_config()).save_pretrained(str(tmp_path))
    whole = (tmp_path / "model.safetensors").read_bytes()
    for broken, error in ((b"not safetensors", "model.safetensors is not a safetensors file"),
                          (whole[: len(whole) - 100], "cannot read .*model.safetensors: it is truncated")):
        (tmp_path / "model.safetensors").write_bytes(broken)
        with pytest.raises(ValueError, match=error):
            MegatronBertModel.from_pretrained(str(tmp_path))
