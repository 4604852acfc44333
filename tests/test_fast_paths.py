"""Fast paths (ops.py + kernels/) against the plain Paddle path, issue 10.

Every head, with and without padding, dropout off: outputs and gradients equal within relative 1e-5.
Dropout on: the keep rate is right, the backward pass drops what the forward dropped, the same seed gives
the same step twice. Without a compiler the model falls back to the plain ops with one warning line.
The kernels are built once per machine into a cache (~30 s the first time, ~0.1 s after).
"""

import logging
import os
import shutil
import subprocess

import numpy as np
import paddle
import pytest

from paddle_megatronbert import MODEL_CLASSES, MegatronBertConfig, ops
from paddle_megatronbert.kernels import loader
from paddle_megatronbert.parallel import ColumnParallelLinear, RowParallelLinear

TINY = dict(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
            max_position_embeddings=64, type_vocab_size=2, hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0, layer_norm_eps=1e-5)
BATCH, SEQ = 3, 11
RTOL = 1e-5
# Some gradients are zero in exact arithmetic (the key bias: softmax ignores a per-row shift; the QA bias:
# softmax minus one-hot sums to 0) and come out as float32 round-off on both paths, which is noise relative
# to itself. Those get a floor of 1e-6 times the largest value of the whole set (still 10x below RTOL).
ROUND_OFF_FLOOR = 1e-6


@pytest.fixture(scope="module")
def kernels():
    library = loader.load_cpu_kernels()
    if library is None and loader.find_compiler() is not None:
        pytest.fail(f"a compiler exists but the kernels did not build: {loader._STATE['error']}")
    if library is None:
        pytest.skip("no C++ compiler: only the fallback can be tested")
    yield library
    ops.use_fast_kernels(False)


def batch_arrays(padding, seed=0):
    rng = np.random.RandomState(seed)
    input_ids = rng.randint(1, TINY["vocab_size"], size=(BATCH, SEQ)).astype("int64")
    token_type_ids = np.zeros((BATCH, SEQ), dtype="int64")
    token_type_ids[:, SEQ // 2:] = 1
    attention_mask = np.ones((BATCH, SEQ), dtype="int64")
    if padding:
        attention_mask[1, -3:] = 0
        attention_mask[2, -5:] = 0
        input_ids[attention_mask == 0] = 0
    return input_ids, token_type_ids, attention_mask


def head_inputs(head, padding):
    input_ids, token_type_ids, attention_mask = batch_arrays(padding)
    rng = np.random.RandomState(1)
    mlm = np.where(rng.rand(BATCH, SEQ) < 0.4, input_ids, -100).astype("int64")
    mlm[0, 0] = input_ids[0, 0]
    labels = {
        "MegatronBertModel": {},
        "MegatronBertForPreTraining": dict(labels=mlm, next_sentence_label=np.array([0, 1, 1])),
        "MegatronBertForMaskedLM": dict(labels=mlm),
        "MegatronBertForCausalLM": dict(labels=input_ids.copy()),
        "MegatronBertForNextSentencePrediction": dict(labels=np.array([1, 0, 1])),
        "MegatronBertForSequenceClassification": dict(labels=np.array([1, 0, 1])),
        "MegatronBertForMultipleChoice": dict(labels=np.array([1, 0, 1])),
        "MegatronBertForTokenClassification": dict(labels=rng.randint(0, 2, size=(BATCH, SEQ))),
        "MegatronBertForQuestionAnswering": dict(start_positions=np.array([1, 3, 2]), end_positions=np.array([2, 5, 4])),
    }[head]
    arrays = [input_ids, attention_mask, token_type_ids]
    if head == "MegatronBertForMultipleChoice":  # (B, 2, S): the row and its reverse
        arrays = [np.stack([a, a[:, ::-1]], axis=1) for a in arrays]
    inputs = dict(zip(("input_ids", "attention_mask", "token_type_ids"), arrays))
    inputs.update({k: np.asarray(v).astype("int64") for k, v in labels.items()})
    return {k: paddle.to_tensor(v) for k, v in inputs.items()}


def forward_backward(model, inputs, fast):
    """Outputs and parameter gradients of one forward + backward with the fast paths on or off."""
    ops.use_fast_kernels(fast)
    out = model(**inputs, return_dict=True)
    tensors = {k: v for k, v in out.items() if isinstance(v, paddle.Tensor)}
    target = out["loss"] if "loss" in tensors else sum(v.astype("float32").mean() for v in tensors.values())
    target.backward()
    grads = {n: p.grad.numpy().copy() for n, p in model.named_parameters() if p.grad is not None}
    model.clear_gradients()
    return {k: v.numpy() for k, v in tensors.items()}, grads


def assert_close(plain, fast, what):
    assert plain.keys() == fast.keys(), what
    floor = ROUND_OFF_FLOOR * max(np.abs(a).max() for a in plain.values())
    for name in plain:
        a, b = plain[name], fast[name]
        err = np.abs(a - b).max()
        bound = RTOL * np.abs(a).max() + floor
        assert err <= bound, f"{what} {name}: max |fast - plain| = {err:.3g} > {bound:.3g}"


@pytest.mark.parametrize("padding", [False, True], ids=["no-padding", "padding"])
@pytest.mark.parametrize("head", sorted(MODEL_CLASSES))
def test_fast_equals_plain_for_every_head(kernels, head, padding):
    paddle.seed(3)
    model = MODEL_CLASSES[head](MegatronBertConfig(**TINY, use_fast_kernels=True))
    model.train()  # dropout probabilities are 0: train mode still runs the training kernels
    inputs = head_inputs(head, padding)
    plain_out, plain_grads = forward_backward(model, inputs, fast=False)
    fast_out, fast_grads = forward_backward(model, inputs, fast=True)
    assert len(plain_grads) > 0
    assert_close(plain_out, fast_out, "output")
    assert_close(plain_grads, fast_grads, "gradient of")


@pytest.mark.parametrize("act", ["gelu_new", "relu"])
def test_other_activations_and_eval_mode(kernels, act):
    paddle.seed(4)
    model = MODEL_CLASSES["MegatronBertForPreTraining"](MegatronBertConfig(**TINY, hidden_act=act))
    inputs = head_inputs("MegatronBertForPreTraining", padding=True)
    plain_out, plain_grads = forward_backward(model, inputs, fast=False)
    fast_out, fast_grads = forward_backward(model, inputs, fast=True)
    assert_close(plain_out, fast_out, "output")
    assert_close(plain_grads, fast_grads, "gradient of")
    model.eval()
    with paddle.no_grad():
        ops.use_fast_kernels(False)
        plain_eval = model(**inputs, return_dict=True)["prediction_logits"].numpy()
        ops.use_fast_kernels(True)
        fast_eval = model(**inputs, return_dict=True)["prediction_logits"].numpy()
    assert_close({"logits": plain_eval}, {"logits": fast_eval}, "eval output")


def stride_kernels_on():
    return paddle.get_flags(["FLAGS_use_stride_kernel"])["FLAGS_use_stride_kernel"]


def test_use_fast_kernels_is_the_one_switch_and_building_a_model_changes_no_process_setting(
        kernels, monkeypatch, caplog):
    ops.use_fast_kernels(False)
    MODEL_CLASSES["MegatronBertModel"](MegatronBertConfig(**TINY, use_fast_kernels=False))
    assert not ops.fast_kernels_enabled()
    assert stride_kernels_on() is True
    monkeypatch.setitem(ops._PROCESS, "tuned", False)  # as in a fresh process
    model = MODEL_CLASSES["MegatronBertModel"](MegatronBertConfig(**TINY, use_fast_kernels=True))
    assert ops.fast_kernels_enabled()
    assert stride_kernels_on() is True  # building a model changed nothing process-wide
    input_ids = paddle.to_tensor(batch_arrays(padding=False)[0])
    with caplog.at_level(logging.INFO, logger="paddle_megatronbert.ops"):
        model(input_ids)
        model(input_ids)
    assert stride_kernels_on() is False  # the first fast kernel applied the settings ...
    notes = [r.getMessage() for r in caplog.records if r.name == "paddle_megatronbert.ops"]
    assert len(notes) == 1 and "FLAGS_use_stride_kernel=False" in notes[0]  # ... and said so, once
    ops.use_fast_kernels(False)
    assert stride_kernels_on() is True


# ---- dropout -----------------------------------------------------------------------------------------
def test_bias_dropout_add_keep_rate_and_backward_mask(kernels):
    ops.use_fast_kernels(True)
    p = 0.1
    layer = RowParallelLinear(64, 512)
    layer.weight.set_value(paddle.zeros([64, 512]))
    layer.bias.set_value(paddle.ones([512]))  # layer(x) == 1 everywhere: the output is the keep mask / (1 - p)
    x = paddle.ones([2, 128, 64])
    residual = paddle.zeros([2, 128, 512])
    residual.stop_gradient = False
    paddle.seed(11)
    out = ops.linear_dropout_add(layer, x, residual, p, training=True)
    values = out.numpy()
    kept = values != 0
    assert abs(kept.mean() - (1 - p)) < 0.005  # 131072 draws: 4 standard deviations is 0.0033
    np.testing.assert_allclose(values[kept], 1 / (1 - p), rtol=1e-6)
    out.sum().backward()
    # d out / d bias = sum of the same mask: the backward pass recomputed what the forward dropped
    np.testing.assert_allclose(layer.bias.grad.numpy(), values.sum(axis=(0, 1)), rtol=1e-5)
    np.testing.assert_array_equal(residual.grad.numpy(), np.ones_like(values))
    paddle.seed(11)
    again = ops.linear_dropout_add(layer, x, residual, p, training=True).numpy()
    np.testing.assert_array_equal(values, again)
    paddle.seed(12)
    assert (ops.linear_dropout_add(layer, x, residual, p, training=True).numpy() != values).any()
    assert (ops.linear_dropout_add(layer, x, residual, p, training=False).numpy() == 1).all()


def test_attention_dropout_keep_rate_and_gradient(kernels):
    ops.use_fast_kernels(True)
    p, seq = 0.2, 64
    rng = np.random.RandomState(0)
    q = paddle.to_tensor(rng.randn(2, 4, seq, seq).astype("float32"), stop_gradient=False)
    k = paddle.to_tensor(rng.randn(2, 4, seq, seq).astype("float32"))
    v = paddle.to_tensor(np.broadcast_to(np.eye(seq, dtype="float32"), (2, 4, seq, seq)).copy())
    mask_np = np.zeros((2, 1, 1, seq), dtype="float32")
    mask_np[1, ..., -10:] = -1e4  # padding keys of the second sequence
    paddle.seed(5)
    out = ops.attention(q, k, v, paddle.to_tensor(mask_np), p, training=True)
    dropped = out.numpy()  # v = I: the output is the dropped, rescaled probabilities themselves
    scores = np.einsum("bhqd,bhkd->bhqk", q.numpy(), k.numpy()) / np.sqrt(seq) + mask_np
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    kept = dropped != 0
    assert abs(kept.mean() - (1 - p)) < 0.01  # 32768 draws: 4.5 standard deviations
    np.testing.assert_allclose(dropped[kept], probs[kept] / (1 - p), rtol=1e-5, atol=1e-12)
    # the backward pass must drop the same entries: compare with the gradient written out by hand
    g = rng.randn(*dropped.shape).astype("float32")
    (out * paddle.to_tensor(g)).sum().backward()
    dprobs = g * kept / (1 - p)
    dscores = probs * (dprobs - (dprobs * probs).sum(-1, keepdims=True)) / np.sqrt(seq)
    expected_dq = np.einsum("bhqk,bhkd->bhqd", dscores, k.numpy())
    np.testing.assert_allclose(q.grad.numpy(), expected_dq, rtol=1e-4, atol=1e-6)
    paddle.seed(5)
    np.testing.assert_array_equal(ops.attention(q, k, v, paddle.to_tensor(mask_np), p, True).numpy(), dropped)


def test_same_seed_same_training_step_with_dropout(kernels):
    config = MegatronBertConfig(**{**TINY, "hidden_dropout_prob": 0.1, "attention_probs_dropout_prob": 0.1})
    inputs = head_inputs("MegatronBertForPreTraining", padding=True)

    def step(seed):
        paddle.seed(0)
        model = MODEL_CLASSES["MegatronBertForPreTraining"](config)
        paddle.seed(seed)
        return forward_backward(model, inputs, fast=True)

    first_out, first_grads = step(7)
    second_out, second_grads = step(7)
    other_out, _ = step(8)
    for name in first_out:
        np.testing.assert_array_equal(first_out[name], second_out[name])
    for name in first_grads:
        np.testing.assert_array_equal(first_grads[name], second_grads[name])
    assert not np.array_equal(first_out["loss"], other_out["loss"])


# ---- the build --------------------------------------------------------------------------------------
def test_kernels_are_cached_and_link_paddles_intel_openmp(kernels):
    assert kernels.path == os.path.join(loader.cache_root(), loader.build_key(), "pmb_cpu_kernels",
                                        "pmb_cpu_kernels.so")
    readelf = shutil.which("readelf")
    if readelf is None:
        pytest.skip("no readelf to list the library's dependencies")
    needed = subprocess.run([readelf, "-d", kernels.path], capture_output=True, text=True, check=True).stdout
    assert "libiomp5.so" in needed  # Paddle's OpenMP runtime ...
    assert "libgomp" not in needed  # ... not a second one fighting it for the cores


# ---- layers this does not fuse, and the fallback ----------------------------------------------------
def test_layer_kinds_outside_the_fast_path_take_the_plain_one(kernels):
    ops.use_fast_kernels(True)
    paddle.seed(1)
    x = paddle.randn([2, 5, 8])
    gathered = ColumnParallelLinear(8, 6, gather_output=True)  # degree 1: a plain linear
    y = ops.linear_activation(gathered, x, "gelu")
    np.testing.assert_allclose(y.numpy(), ops.activation(gathered(x), "gelu").numpy(), rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match="unknown activation"):
        ops.linear_activation(gathered, x, "swish")


def test_without_a_compiler_the_plain_path_runs_with_one_warning(monkeypatch, tmp_path, caplog):
    had_kernels = loader.load_cpu_kernels() is not None
    monkeypatch.setenv(loader.CACHE_ENV, str(tmp_path / "empty-cache"))
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    loader.reset_for_tests()
    try:
        paddle.seed(3)
        model = MODEL_CLASSES["MegatronBertForPreTraining"](MegatronBertConfig(**TINY))
        inputs = head_inputs("MegatronBertForPreTraining", padding=True)
        with caplog.at_level(logging.WARNING, logger="paddle_megatronbert.kernels"):
            fast_out, fast_grads = forward_backward(model, inputs, fast=True)
            forward_backward(model, inputs, fast=True)  # a second step: still one warning
        warnings = [r for r in caplog.records if r.name == "paddle_megatronbert.kernels"]
        assert len(warnings) == 1 and "\n" not in warnings[0].getMessage()
        assert "no C++ compiler" in warnings[0].getMessage() and "plain Paddle ops" in warnings[0].getMessage()
        assert loader.load_cpu_kernels() is None
        plain_out, plain_grads = forward_backward(model, inputs, fast=False)
        assert_close(plain_out, fast_out, "output")  # the fallback is the plain path
        assert_close(plain_grads, fast_grads, "gradient of")
    finally:
        monkeypatch.undo()
        loader.reset_for_tests()
        assert (loader.load_cpu_kernels() is not None) == had_kernels  # as before, for the other tests


def test_attention_probabilities_come_from_the_fast_kernel_too(kernels):
    """output_attentions on CPU: the masked-softmax kernel returns the probabilities it computed (no switch to
    the plain path); they equal the plain path's, padding included."""
    paddle.seed(6)
    model = MODEL_CLASSES["MegatronBertModel"](MegatronBertConfig(**TINY))
    model.eval()
    input_ids, token_type_ids, attention_mask = (paddle.to_tensor(a) for a in batch_arrays(padding=True))
    probs = {}
    for fast in (False, True):
        ops.use_fast_kernels(fast)
        with paddle.no_grad():
            out = model(input_ids, attention_mask, token_type_ids, output_attentions=True, return_dict=True)
        probs[fast] = [a.numpy() for a in out.attentions]
    assert len(probs[True]) == TINY["num_hidden_layers"]
    for plain, fast in zip(probs[False], probs[True]):
        np.testing.assert_allclose(fast, plain, rtol=RTOL, atol=1e-7)
        np.testing.assert_allclose(fast.sum(-1), 1.0, rtol=1e-5)
    assert np.abs(probs[True][0][2, :, :, -5:]).max() < 1e-6  # row 2's five padding keys get no probability
