"""Weight and training-checkpoint files (issue 15): nothing the project reads can run code; safetensors is
the native format; every genuine file of ours, of PaddleNLP and of transformers still loads.

A poisoned file is a pickle whose ``__reduce__`` is ``os.system("touch <tmp>/PWNED")``: every test that
feeds one checks that it is refused with one line naming the file and the global, and that PWNED was
never created.
"""

import json
import os
import pickle
import subprocess
import sys

import numpy as np
import paddle
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from paddle_megatronbert import (  # noqa: E402
    MegatronBertConfig,
    MegatronBertForPreTraining,
    MegatronBertForSequenceClassification,
    MegatronBertModel,
)
from paddle_megatronbert import tp_plan  # noqa: E402
from paddle_megatronbert.checkpoint import load_model_state, load_paddle_pickle  # noqa: E402
from paddle_megatronbert.checkpoint.weights import read_safetensors, write_safetensors  # noqa: E402
from paddle_megatronbert.checkpoint.training_state import load_checkpoint, save_checkpoint  # noqa: E402

TINY = dict(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
            max_position_embeddings=32, type_vocab_size=2)


class Poison:
    """Pickles as a call of ``os.system``: what a malicious weight file holds."""

    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (os.system, (f"touch {self.target}",))


def poisoned_pickle(path, name="bert.embeddings.word_embeddings.weight"):
    target = os.path.join(os.path.dirname(str(path)), "PWNED")
    with open(path, "wb") as f:
        pickle.dump({name: Poison(target), "other": np.zeros(3, "float32")}, f, protocol=4)
    return target


def tiny_config(**overrides):
    return MegatronBertConfig(**{**TINY, **overrides})


def probe(seed=0):
    return paddle.to_tensor(np.random.RandomState(seed).randint(1, TINY["vocab_size"], (2, 8)))


def assert_one_line_refusal(message, path, target):
    assert "\n" not in message, message
    assert str(path) in message and "refused to load global" in message
    assert "system" in message  # os.system pickles as posix.system
    assert not os.path.exists(target), "the pickle's command ran"


# ---- poisoned files are refused, nothing runs ----------------------------------------------------------
@pytest.mark.parametrize("name", ["bert.embeddings.word_embeddings.weight",  # ours
                                  "megatronbert.embeddings.word_embeddings.weight"])  # PaddleNLP's
def test_poisoned_pdparams_is_refused_by_from_pretrained(tmp_path, name):
    tiny_config().save_pretrained(str(tmp_path))
    target = poisoned_pickle(tmp_path / "model_state.pdparams", name)
    with pytest.raises(ValueError) as err:
        MegatronBertForPreTraining.from_pretrained(str(tmp_path))
    assert_one_line_refusal(str(err.value), tmp_path / "model_state.pdparams", target)


def _tiny_training(seed=3):
    paddle.seed(seed)
    np.random.seed(seed)
    model = MegatronBertForPreTraining(tiny_config(hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1))
    model.train()
    optimizer = paddle.optimizer.AdamW(learning_rate=1e-3, parameters=model.parameters())
    return model, optimizer


def _train_steps(model, optimizer, steps, start):
    losses = []
    for step in range(start, start + steps):
        ids = probe(step)
        labels = paddle.where(ids % 3 == 0, ids, paddle.full_like(ids, -100))
        out = model(ids, labels=labels, next_sentence_label=paddle.to_tensor([0, 1]), return_dict=True)
        out["loss"].backward()
        optimizer.step()
        optimizer.clear_grad()
        losses.append(float(out["loss"]))
    return losses


def test_resume_from_a_safetensors_checkpoint_repeats_the_losses_bit_for_bit(tmp_path):
    model, optimizer = _tiny_training()
    _train_steps(model, optimizer, 2, start=0)
    checkpoint = save_checkpoint(str(tmp_path), 2, model, optimizer, trainer_state={"data_position": 2})
    assert sorted(os.listdir(checkpoint)) == ["config.json", "model.safetensors", "optimizer.tp00.sd00.safetensors",
                                              "rng_state.rank0000.json", "trainer_state.json"]
    straight = _train_steps(model, optimizer, 3, start=2)  # dropout on: every step draws random numbers
    after_straight = save_checkpoint(str(tmp_path / "straight"), 5, model, optimizer)
    model, optimizer = _tiny_training(seed=11)  # other weights, other generators: the checkpoint restores all
    state = load_checkpoint(checkpoint, model, optimizer)
    assert state["global_step"] == 2 and state["data_position"] == 2
    assert _train_steps(model, optimizer, 3, start=2) == straight
    after_resume = save_checkpoint(str(tmp_path / "resumed"), 5, model, optimizer)
    for name in os.listdir(after_straight):  # the same state, the same bytes
        with open(os.path.join(after_straight, name), "rb") as a, open(os.path.join(after_resume, name), "rb") as b:
            assert a.read() == b.read(), name


def test_a_pickled_checkpoint_of_the_earlier_layout_still_resumes_exactly(tmp_path):
    from paddle_megatronbert.checkpoint.training_state import capture_rng_state, optimizer_state_to_structured

    model, optimizer = _tiny_training()
    _train_steps(model, optimizer, 2, start=0)
    checkpoint = save_checkpoint(str(tmp_path), 2, model, optimizer)
    for name in ("model.safetensors", "optimizer.tp00.sd00.safetensors", "rng_state.rank0000.json"):
        os.remove(os.path.join(checkpoint, name))
    # what the earlier save_checkpoint wrote: paddle.save of the weights and the optimizer, pickle of the RNG
    paddle.save(model.state_dict(), os.path.join(checkpoint, "model_state.pdparams"))
    paddle.save(optimizer_state_to_structured(optimizer.state_dict(), model),
                os.path.join(checkpoint, "optimizer.tp00.sd00.pdopt"))
    with open(os.path.join(checkpoint, "rng_state.rank0000.pkl"), "wb") as f:
        pickle.dump(capture_rng_state(), f)
    straight = _train_steps(model, optimizer, 3, start=2)
    model, optimizer = _tiny_training(seed=11)
    load_checkpoint(checkpoint, model, optimizer)
    assert _train_steps(model, optimizer, 3, start=2) == straight


@pytest.mark.parametrize("poisoned", ["optimizer.tp00.sd00.pdopt", "rng_state.rank0000.pkl", "model_state.pdparams"])
def test_poisoned_training_checkpoint_is_refused_on_resume(tmp_path, poisoned):
    model, optimizer = _tiny_training()
    _train_steps(model, optimizer, 1, start=0)
    checkpoint = save_checkpoint(str(tmp_path), 1, model, optimizer)
    new_name = {"optimizer.tp00.sd00.pdopt": "optimizer.tp00.sd00.safetensors",
                "rng_state.rank0000.pkl": "rng_state.rank0000.json", "model_state.pdparams": "model.safetensors"}
    os.remove(os.path.join(checkpoint, new_name[poisoned]))  # a checkpoint of the earlier (pickled) layout
    path = os.path.join(checkpoint, poisoned)
    target = poisoned_pickle(path)
    with pytest.raises(ValueError) as err:
        load_checkpoint(checkpoint, model, optimizer)
    assert_one_line_refusal(str(err.value), path, target)


def test_poisoned_directory_given_to_convert_checkpoint_exits_with_one_line(tmp_path):
    src = tmp_path / "src"
    tiny_config().save_pretrained(str(src))
    target = poisoned_pickle(src / "model_state.pdparams")
    proc = subprocess.run([sys.executable, os.path.join(REPO, "tools", "convert_checkpoint.py"), str(src),
                           str(tmp_path / "dst"), "--to", "hf"], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert_one_line_refusal(errors[0], src / "model_state.pdparams", target)
    assert not (tmp_path / "dst").exists()


def test_the_unpickler_rebuilds_exactly_what_paddle_save_writes(tmp_path):
    """paddle.save of a model state (float32/bf16/int64) and of an AdamW state with a LR schedule reads back
    equal to paddle.load's own result, through the restricted unpickler."""
    paddle.seed(0)
    layer = paddle.nn.Linear(3, 2)
    optimizer = paddle.optimizer.AdamW(learning_rate=paddle.optimizer.lr.LinearWarmup(0.1, 4, 0.0, 0.1),
                                       parameters=layer.parameters(), multi_precision=True)
    layer(paddle.randn([2, 3])).sum().backward()
    optimizer.step()
    weights = {"w": layer.weight, "b16": paddle.randn([4]).astype("bfloat16"), "i": paddle.to_tensor([1, 2])}
    for state, name in ((weights, "w.pdparams"), (optimizer.state_dict(), "o.pdopt")):
        paddle.save(state, str(tmp_path / name))
        expected = paddle.load(str(tmp_path / name), return_numpy=True)
        got = load_paddle_pickle(str(tmp_path / name))
        assert sorted(got) == sorted(expected)
        for key, value in expected.items():
            if isinstance(value, np.ndarray):
                assert got[key].dtype == value.dtype and np.array_equal(got[key], value), key
            else:
                assert got[key] == value, key


# ---- genuine files load --------------------------------------------------------------------------------
def test_safetensors_save_load_is_bit_exact_and_the_default(tmp_path):
    paddle.seed(1)
    model = MegatronBertForPreTraining(tiny_config())
    model.save_pretrained(str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == ["config.json", "model.safetensors"]
    loaded = MegatronBertForPreTraining.from_pretrained(str(tmp_path))
    for name, value in model.state_dict().items():
        assert np.array_equal(value.numpy(), loaded.state_dict()[name].numpy()), name
    model.eval(), loaded.eval()
    assert np.array_equal(model(probe(), return_dict=True)["prediction_logits"].numpy(),
                          loaded(probe(), return_dict=True)["prediction_logits"].numpy())
    model.save_pretrained(str(tmp_path), safe_serialization=False)  # the old format on request
    assert sorted(os.listdir(tmp_path)) == ["config.json", "model_state.pdparams"]
    assert np.array_equal(paddle.load(str(tmp_path / "model_state.pdparams"), return_numpy=True)["cls.predictions.bias"],
                          model.cls.predictions.bias.numpy())


def test_bfloat16_tensors_round_trip_through_safetensors(tmp_path):
    values = paddle.to_tensor([1.5, -2.25, 3.0e-3, 65504.0]).astype("bfloat16")
    write_safetensors({"x": values, "f": np.arange(3, dtype="float32")}, str(tmp_path / "m.safetensors"))
    back = read_safetensors(str(tmp_path / "m.safetensors"))
    assert np.array_equal(np.asarray(back["x"]), values.astype("float32").numpy())
    assert np.array_equal(np.asarray(back["f"]), np.arange(3, dtype="float32"))
    torch = pytest.importorskip("torch")
    from safetensors.torch import load_file

    assert load_file(str(tmp_path / "m.safetensors"))["x"].dtype == torch.bfloat16  # a real BF16 tensor


def test_our_old_pdparams_directories_and_shards_load(tmp_path):
    paddle.seed(2)
    model = MegatronBertForPreTraining(tiny_config())
    state = model.full_state_dict()
    old = tmp_path / "old"
    tiny_config().save_pretrained(str(old))
    paddle.save(model.state_dict(), str(old / "model_state.pdparams"))  # what save_pretrained wrote before
    shards = tmp_path / "shards"
    tiny_config(tensor_parallel_degree=2).save_pretrained(str(shards))
    for rank in range(2):
        paddle.save({k: tp_plan.shard_param(k, v, 2, rank) for k, v in state.items()},
                    str(shards / f"model_state.tp{rank:02d}.pdparams"))
    for directory in (old, shards):
        loaded = MegatronBertForPreTraining.from_pretrained(str(directory), tensor_parallel_degree=1)
        for name, value in state.items():
            assert np.array_equal(loaded.state_dict()[name].numpy(), value), (directory, name)


def test_safetensors_tp_shards_and_an_hf_style_index_load_at_tp1(tmp_path):
    paddle.seed(4)
    model = MegatronBertForPreTraining(tiny_config())
    state = model.full_state_dict()
    shards = tmp_path / "shards"
    tiny_config(tensor_parallel_degree=2).save_pretrained(str(shards))
    for rank in range(2):
        write_safetensors({k: tp_plan.shard_param(k, v, 2, rank) for k, v in state.items()},
                          str(shards / f"model.tp{rank:02d}.safetensors"))
    index = tmp_path / "index"
    tiny_config().save_pretrained(str(index))
    names = sorted(state)
    halves = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for filename, part in halves.items():
        write_safetensors({k: state[k] for k in part}, str(index / filename))
    (index / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {k: f for f, part in halves.items() for k in part}}))
    for directory in (shards, index):
        loaded = MegatronBertForPreTraining.from_pretrained(str(directory), tensor_parallel_degree=1)
        for name, value in state.items():
            assert np.array_equal(loaded.state_dict()[name].numpy(), value), (directory, name)


@pytest.mark.parametrize("safe_serialization", [False, True])
def test_a_directory_saved_by_paddlenlp_loads_with_equal_outputs(tmp_path, safe_serialization):
    paddlenlp = pytest.importorskip("paddlenlp.transformers")
    paddle.seed(5)
    config = paddlenlp.MegatronBertConfig(**TINY)
    for theirs_class, ours_class in ((paddlenlp.MegatronBertModel, MegatronBertModel),
                                     (paddlenlp.MegatronBertForPreTraining, MegatronBertForPreTraining)):
        theirs = theirs_class(config)
        theirs.eval()
        directory = tmp_path / theirs_class.__name__
        theirs.save_pretrained(str(directory), safe_serialization=safe_serialization)
        assert ("model.safetensors" if safe_serialization else "model_state.pdparams") in os.listdir(directory)
        ours = ours_class.from_pretrained(str(directory))
        ours.eval()
        expected = theirs(probe())[0].numpy()
        got = ours(probe(), attention_mask=paddle.ones_like(probe()), return_dict=True)
        got = got["last_hidden_state" if ours_class is MegatronBertModel else "prediction_logits"].numpy()
        np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)


def test_paddlenlp_reads_our_model_safetensors(tmp_path):
    """The file format is PaddleNLP's (``format: np``): its own reader takes our file as it is (the parameter
    names are HF's MegatronBert names, not PaddleNLP's; ``convert/paddlenlp.py`` maps them on our side)."""
    model_utils = pytest.importorskip("paddlenlp.transformers.model_utils")
    paddle.seed(6)
    ours = MegatronBertModel(tiny_config())
    ours.save_pretrained(str(tmp_path))
    theirs = model_utils.load_state_dict(str(tmp_path / "model.safetensors"))
    own = ours.state_dict()
    assert sorted(theirs) == sorted(own)
    assert all(np.array_equal(np.asarray(theirs[k]), own[k].numpy()) for k in own)


def _hf_model(tmp_path):
    transformers = pytest.importorskip("transformers")
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    hf_config = transformers.MegatronBertConfig(**TINY, layer_norm_eps=1e-12)
    model = transformers.MegatronBertForPreTraining(hf_config).eval()
    return transformers, torch, model


def _hf_logits(torch, model, ids):
    with torch.no_grad():
        return model(input_ids=torch.from_numpy(ids)).prediction_logits.numpy()


@pytest.mark.parametrize("weights", ["model.safetensors", "pytorch_model.bin"])
def test_a_transformers_directory_loads_without_convert_from_torch(tmp_path, weights):
    transformers, torch, hf = _hf_model(tmp_path)
    hf.save_pretrained(str(tmp_path))  # transformers 5 writes model.safetensors ({"format": "pt"})
    if weights == "pytorch_model.bin":
        os.remove(tmp_path / "model.safetensors")
        torch.save(hf.state_dict(), str(tmp_path / "pytorch_model.bin"))
    ours = MegatronBertForPreTraining.from_pretrained(str(tmp_path))
    ours.eval()
    ids = probe().numpy()
    np.testing.assert_allclose(ours(paddle.to_tensor(ids), return_dict=True)["prediction_logits"].numpy(),
                               _hf_logits(torch, hf, ids), atol=1e-4, rtol=0)


def test_a_megatron_checkpoint_directory_loads_without_convert_from_torch(tmp_path):
    pytest.importorskip("torch")
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import megatron_reference as ref

    src = ref.save_megatron_checkpoint(str(tmp_path / "src"), ref.random_shards(np.random.RandomState(0)), 2.0, True,
                                       ref.megatron_args())
    detected = MegatronBertForPreTraining.from_pretrained(src)
    explicit = MegatronBertForPreTraining.from_pretrained(src, convert_from_torch=True)
    assert detected.config.hidden_size == 32
    for name, value in explicit.state_dict().items():
        assert np.array_equal(detected.state_dict()[name].numpy(), value.numpy()), name


def test_transformers_reads_our_hf_export_with_use_safetensors(tmp_path):
    transformers, torch, _ = _hf_model(tmp_path)
    from paddle_megatronbert.convert import convert_checkpoint

    paddle.seed(7)
    ours = MegatronBertForPreTraining(tiny_config(layer_norm_eps=1e-12))
    ours.eval()
    ours.save_pretrained(str(tmp_path / "ours"))
    convert_checkpoint(str(tmp_path / "ours"), str(tmp_path / "hf"), to="hf")
    hf = transformers.MegatronBertForPreTraining.from_pretrained(str(tmp_path / "hf"), use_safetensors=True).eval()
    ids = probe().numpy()
    np.testing.assert_allclose(_hf_logits(torch, hf, ids),
                               ours(paddle.to_tensor(ids), return_dict=True)["prediction_logits"].numpy(),
                               atol=1e-4, rtol=0)


def test_convert_writes_safetensors_by_default_and_pdparams_on_request(tmp_path):
    from paddle_megatronbert.convert import convert_checkpoint

    paddle.seed(8)
    MegatronBertForSequenceClassification(tiny_config(num_labels=3)).save_pretrained(str(tmp_path / "src"))
    convert_checkpoint(str(tmp_path / "src"), str(tmp_path / "safe"))
    convert_checkpoint(str(tmp_path / "src"), str(tmp_path / "pickle"), safe_serialization=False)
    assert "model.safetensors" in os.listdir(tmp_path / "safe")
    assert "model_state.pdparams" in os.listdir(tmp_path / "pickle")
    safe, pickled = load_model_state(str(tmp_path / "safe")), load_model_state(str(tmp_path / "pickle"))
    assert sorted(safe) == sorted(pickled)
    assert all(np.array_equal(np.asarray(safe[k]), np.asarray(pickled[k])) for k in safe)


# ---- memory: one copy of the weights -------------------------------------------------------------------
def test_loading_holds_one_copy_of_the_weights(tmp_path):
    """Peak RSS of from_pretrained over a ~100 MB model.safetensors stays below 1.6x the file (the model's own
    parameters are 1.0x); `python tests/helpers/load_rss.py --size 345m` measures the 345M model."""
    from helpers import load_rss

    load_rss.write("small", str(tmp_path / "megatronbert-small"))
    proc = subprocess.run([sys.executable, load_rss.__file__, "--size", "small", "--dir", str(tmp_path), "--load_only"],
                          capture_output=True, text=True, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["file_mb"] > 90
    assert result["peak_extra_mb"] < 1.6 * result["file_mb"], result
