"""What the training loop (loop.py) takes from the model and training.py: activation recompute, gradient accumulation,
which parameters AdamW decays, and the warm-up/decay learning-rate schedule."""

import numpy as np
import paddle
import pytest

from paddle_megatronbert import MegatronBertConfig, MegatronBertForPreTraining
from paddle_megatronbert.training import build_optimizer, linear_warmup_decay, no_decay_parameter

TINY = dict(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
            max_position_embeddings=64, type_vocab_size=2, hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0, layer_norm_eps=1e-5)
SEQ, PREDICTIONS = 12, 3


def tiny_model(seed=0, **overrides):
    paddle.seed(seed)
    model = MegatronBertForPreTraining(MegatronBertConfig(**{**TINY, **overrides}))
    model.train()
    return model


def pretraining_batch(batch, seed=0):
    """A run_pretrain.py-shaped batch: every row has PREDICTIONS labelled masked positions (no -100 padding)."""
    rng = np.random.RandomState(seed)
    input_ids = rng.randint(1, TINY["vocab_size"], size=(batch, SEQ)).astype("int64")
    attention_mask = np.ones((batch, SEQ), dtype="int64")
    attention_mask[1, -4:] = 0  # some padding, so the additive mask matters
    input_ids[attention_mask == 0] = 0
    token_type_ids = np.zeros((batch, SEQ), dtype="int64")
    token_type_ids[:, SEQ // 2:] = 1
    positions = np.stack([np.sort(rng.choice(np.arange(1, SEQ - 4), PREDICTIONS, replace=False))
                          for _ in range(batch)]).astype("int64")
    labels = rng.randint(1, TINY["vocab_size"], size=(batch, PREDICTIONS)).astype("int64")
    next_sentence_label = rng.randint(0, 2, size=(batch,)).astype("int64")
    arrays = dict(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids,
                  masked_lm_positions=positions, labels=labels, next_sentence_label=next_sentence_label)
    return {k: paddle.to_tensor(v) for k, v in arrays.items()}


def gradients(model):
    return {n: p.grad.numpy().copy() for n, p in model.named_parameters() if p.grad is not None}


def test_recompute_gives_the_same_loss_and_gradients(monkeypatch):
    import paddle.distributed.fleet.utils as fleet_utils

    calls = []
    real_recompute = fleet_utils.recompute

    def counting_recompute(*args, **kwargs):
        calls.append(1)
        return real_recompute(*args, **kwargs)

    # MegatronBertEncoder imports recompute at call time, so this proves the recompute path really runs
    monkeypatch.setattr(fleet_utils, "recompute", counting_recompute)
    batch = pretraining_batch(4)
    results = []
    for recompute in (False, True):
        model = tiny_model(seed=7, recompute=recompute)
        assert model.config.use_fast_kernels and model.config.recompute is recompute
        loss = model(**batch, return_dict=True).loss
        loss.backward()
        assert len(calls) == (TINY["num_hidden_layers"] if recompute else 0)
        results.append((float(loss), gradients(model), len(list(model.parameters()))))
    (loss_plain, grads_plain, count), (loss_recompute, grads_recompute, _) = results
    assert abs(loss_plain - loss_recompute) <= 1e-6
    # every parameter has a gradient in both runs (recompute must not cut the graph)
    assert len(grads_plain) == count and sorted(grads_recompute) == sorted(grads_plain)
    for name, grad in grads_plain.items():
        np.testing.assert_allclose(grads_recompute[name], grad, rtol=0, atol=1e-6, err_msg=name)
    assert any(np.abs(g).max() > 1e-4 for g in grads_plain.values())  # not trivially all zero


def test_two_micro_batches_accumulate_to_the_full_batch_gradient():
    # This repeats the step of the one loop (loop.train, inline there): `(out.loss / accumulation).backward()`
    # per micro-batch, then one optimizer step.
    # Exact only because both micro-batches hold the same number of labelled MLM positions (4 rows x
    # PREDICTIONS, no -100): the MLM loss is a mean over labelled positions, so unequal counts would weight
    # them differently from the full batch. The NSP loss is a mean over rows, equal counts (4 and 4) too.
    batch = pretraining_batch(8, seed=3)
    full = tiny_model(seed=11)
    full(**batch, return_dict=True).loss.backward()
    expected = gradients(full)

    accumulated = tiny_model(seed=11)
    accumulation = 2
    for micro in range(accumulation):
        rows = slice(4 * micro, 4 * micro + 4)
        out = accumulated(**{k: v[rows] for k, v in batch.items()}, return_dict=True)
        (out.loss / accumulation).backward()
    got = gradients(accumulated)
    assert sorted(got) == sorted(expected)
    for name, grad in expected.items():
        np.testing.assert_allclose(got[name], grad, rtol=0, atol=1e-6, err_msg=name)


def test_weight_decay_goes_to_2d_weights_only():
    model = tiny_model()
    named = list(model.named_parameters())
    decayed = {n for n, p in named if not no_decay_parameter(n, p)}
    assert decayed == {n for n, p in named if p.ndim == 2}
    assert not any(n.endswith("bias") or ".ln." in n or "LayerNorm" in n for n in decayed)
    assert "bert.embeddings.word_embeddings.weight" in decayed and "bert.encoder.layer.0.intermediate.dense.weight" in decayed
    assert "cls.predictions.transform.LayerNorm.weight" not in decayed and "bert.encoder.ln.weight" not in decayed

    # Behaviour: zero gradients and lr 1 leave Adam's update at 0, so only the decoupled decay
    # (p -= lr * weight_decay * p) can move a parameter.
    weight_decay = 0.25
    optimizer = build_optimizer(model, 1.0, weight_decay=weight_decay)
    before = {n: p.numpy().copy() for n, p in named}
    sum(p.sum() for _, p in named).multiply(paddle.to_tensor(0.0)).backward()  # every gradient exactly 0
    assert all(p.grad is not None and not p.grad.numpy().any() for _, p in named)
    optimizer.step()
    for name, param in named:
        if name in decayed:
            np.testing.assert_allclose(param.numpy(), before[name] * (1 - weight_decay), rtol=1e-6, atol=1e-7,
                                       err_msg=name)
        else:
            np.testing.assert_array_equal(param.numpy(), before[name], err_msg=name)


def schedule_values(scheduler, steps):
    values = []
    for _ in range(steps + 1):
        values.append(scheduler.get_lr())
        scheduler.step()
    return values


def test_linear_warmup_decay_values():
    lr, total, warmup = 0.5, 10, 2
    # documented: linear warm-up to lr over `warmup` steps (0 at step 0), then linear decay to 0 at total_steps
    expected = [lr * s / warmup if s < warmup else lr * (total - s) / (total - warmup) for s in range(total + 1)]
    assert expected[:3] == [0.0, 0.25, 0.5] and expected[-1] == 0.0
    np.testing.assert_allclose(schedule_values(linear_warmup_decay(lr, total, warmup), total), expected, rtol=0,
                               atol=1e-12)
    # a float is a proportion of total_steps: 0.2 of 10 steps is the same 2-step warm-up
    np.testing.assert_allclose(schedule_values(linear_warmup_decay(lr, total, 0.2), total), expected, rtol=0,
                               atol=1e-12)


def test_warmup_proportion_one_warms_up_over_every_step():
    lr, total = 0.5, 10
    # warm-up over all 10 steps, then the decay's end point: 0 at total_steps (PaddleNLP gives the same)
    expected = [lr * s / total for s in range(total)] + [0.0]
    np.testing.assert_allclose(schedule_values(linear_warmup_decay(lr, total, 1.0), total), expected, rtol=0,
                               atol=1e-12)


def test_the_one_loss_scaler_halves_after_two_overflows_in_a_row(monkeypatch):
    # Paddle's GradScaler is disabled on CPU (its getters fail), so the settings are read where they are passed.
    from paddle_megatronbert.training import build_grad_scaler

    passed = {}

    class RecordingScaler:
        def __init__(self, **kwargs):
            passed.update(kwargs)

    monkeypatch.setattr(paddle.amp, "GradScaler", RecordingScaler)
    assert isinstance(build_grad_scaler("fp16", 1024.0), RecordingScaler)
    assert passed == dict(init_loss_scaling=1024.0, incr_every_n_steps=1000, decr_every_n_nan_or_inf=2,
                          use_dynamic_loss_scaling=True)
    assert build_grad_scaler("bf16") is None and build_grad_scaler("none") is None
