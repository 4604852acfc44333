"""Weight conversion from PyTorch: HF MegatronBert directories and Megatron-LM / NGC checkpoints.

Oracles: transformers' own models for HF checkpoints; for Megatron checkpoints a numpy Megatron forward
that reads the stored tensors rank by rank (tests/megatron_reference.py), plus transformers' converter's
QKV logic transcribed below as a second, independent reading of the fused layout.
"""

import importlib.util
import json
import os
import sys
import zipfile

import numpy as np
import paddle
import pytest

from paddle_megatronbert import MODEL_CLASSES, MegatronBertForPreTraining
from paddle_megatronbert.configuration import PRETRAINED_INIT_CONFIGURATION
from paddle_megatronbert.convert import convert_checkpoint, load_torch_checkpoint
from paddle_megatronbert.convert.megatron import fuse_qkv, split_fused_qkv
from paddle_megatronbert.convert.torch_checkpoints import open_checkpoint

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import megatron_reference as ref  # noqa: E402


def stored_weights(directory):
    """The tensors of a converted Paddle directory (``model.safetensors``), as numpy arrays."""
    from paddle_megatronbert.checkpoint import load_model_state

    return {name: np.asarray(value) for name, value in load_model_state(str(directory)).items()}


torch = pytest.importorskip("torch")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HEADS = sorted(MODEL_CLASSES)
TINY_HF = dict(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
               max_position_embeddings=40, type_vocab_size=2, hidden_dropout_prob=0.0,
               attention_probs_dropout_prob=0.0)


def load_tool():
    path = os.path.join(ROOT, "tools", "convert_checkpoint.py")
    spec = importlib.util.spec_from_file_location("convert_checkpoint_tool", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def batch(vocab, seed=0, size=2, seq=9):
    rng = np.random.RandomState(seed)
    ids = rng.randint(1, vocab, size=(size, seq)).astype("int64")
    types = np.zeros_like(ids)
    types[:, seq // 2:] = 1
    mask = np.ones_like(ids)
    mask[1, -3:] = 0
    return ids, types, mask


def leftovers(parent):
    return [n for n in os.listdir(parent) if ".partial-" in n or ".extract-" in n]


# ---- 1. HF checkpoints ----------------------------------------------------------------------------
def build_hf_model(head, seed=0, **overrides):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    config = transformers.MegatronBertConfig(**{**TINY_HF, **overrides}, is_decoder=head == "MegatronBertForCausalLM")
    model = getattr(transformers, head)(config).eval()
    with torch.no_grad():  # random biases and LayerNorms, so every tensor's conversion shows in the outputs
        for param in model.parameters():
            if param.ndim == 1:
                param.add_(torch.randn_like(param) * 0.1)
    return model


def save_hf(model, directory, fmt):
    """``model.safetensors`` via save_pretrained; ``pytorch_model.bin`` as torch.save of the state dict
    (transformers 5 writes safetensors only)."""
    model.save_pretrained(directory)
    if fmt == "bin":
        os.remove(os.path.join(directory, "model.safetensors"))
        torch.save(model.state_dict(), os.path.join(directory, "pytorch_model.bin"))
    return directory


def hf_inputs(head, vocab, seed=0):
    ids, types, mask = batch(vocab, seed)
    if head == "MegatronBertForMultipleChoice":
        ids, types, mask = (np.stack([a, a[:, ::-1]], axis=1) for a in (ids, types, mask))
    return dict(input_ids=ids, token_type_ids=types, attention_mask=mask)


def compare_with_hf(hf_model, ours, head, vocab):
    inputs = hf_inputs(head, vocab)
    with torch.no_grad():
        expected = hf_model(**{k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in inputs.items()})
    got = ours(**{k: paddle.to_tensor(np.ascontiguousarray(v)) for k, v in inputs.items()}, return_dict=True)
    fields = [f for f in ("last_hidden_state", "pooler_output", "prediction_logits", "seq_relationship_logits",
                          "logits", "start_logits", "end_logits") if f in got]
    assert fields
    for field in fields:
        np.testing.assert_allclose(got[field].numpy(), getattr(expected, field).numpy(), atol=1e-5, rtol=0,
                                   err_msg=f"{head}.{field}")


@pytest.mark.parametrize("head", HEADS)
def test_hf_every_head_from_bin_and_safetensors(head, tmp_path):
    overrides = dict(num_labels=3) if head in ("MegatronBertForSequenceClassification",
                                               "MegatronBertForTokenClassification") else {}
    hf_model = build_hf_model(head, **overrides)
    for fmt in ("safetensors", "bin"):
        src = save_hf(hf_model, str(tmp_path / f"hf_{fmt}"), fmt)
        dst = str(tmp_path / f"paddle_{fmt}")
        report = convert_checkpoint(src, dst)
        assert report["source_kind"] == "hf" and report["read_with"] == [
            "safetensors" if fmt == "safetensors" else "weights_only"]
        assert sorted(os.listdir(dst)) == ["config.json", "conversion_report.json", "model.safetensors"]
        ours = MODEL_CLASSES[head].from_pretrained(dst)
        ours.eval()
        assert ours.config.layer_norm_eps == hf_model.config.layer_norm_eps  # HF's eps: what HF computes
        compare_with_hf(hf_model, ours, head, TINY_HF["vocab_size"])


def test_hf_untied_decoder_tanh_gelu_and_tokenizer_files(tmp_path):
    hf_model = build_hf_model("MegatronBertForMaskedLM", seed=3, tie_word_embeddings=False,
                              hidden_act="gelu_pytorch_tanh")
    src = save_hf(hf_model, str(tmp_path / "hf"), "bin")
    vocab = [f"tok{i}" for i in range(95)]
    (tmp_path / "hf" / "vocab.txt").write_text("\n".join(vocab) + "\n")
    (tmp_path / "hf" / "tokenizer_config.json").write_text(json.dumps({"do_lower_case": False}))
    dst = str(tmp_path / "out")
    convert_checkpoint(src, dst)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["tie_word_embeddings"] is False and config["hidden_act"] == "gelu_tanh"
    assert config["do_lower_case"] is False
    assert (tmp_path / "out" / "vocab.txt").read_text().split() == vocab
    assert json.loads((tmp_path / "out" / "tokenizer_config.json").read_text())["do_lower_case"] is False
    ours = MODEL_CLASSES["MegatronBertForMaskedLM"].from_pretrained(dst)
    ours.eval()
    compare_with_hf(hf_model, ours, "MegatronBertForMaskedLM", TINY_HF["vocab_size"])


def test_safetensors_needs_no_torch(tmp_path, monkeypatch):
    hf_model = build_hf_model("MegatronBertForQuestionAnswering")
    src = save_hf(hf_model, str(tmp_path / "hf"), "safetensors")
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` now raises ImportError
    config, state = load_torch_checkpoint(src)
    assert config.num_hidden_layers == 2 and state["qa_outputs.weight"].shape == (32, 2)
    np.testing.assert_array_equal(state["qa_outputs.weight"], hf_model.qa_outputs.weight.detach().numpy().T)


# ---- 2. Megatron checkpoints ----------------------------------------------------------------------
MEGATRON_CASES = [  # (checkpoint_version, new key names ("norm": 2024's *_norm spelling too), TP degree)
    (0, False, 1), (0, False, 2), (1.0, False, 1), (1.0, True, 2), (2.0, True, 1), (2.0, False, 2),
    (3.0, True, 1), (3.0, "norm", 2),
]


def megatron_outputs(dst, ids, types, mask):
    model = MegatronBertForPreTraining.from_pretrained(dst)
    model.eval()
    out = model(paddle.to_tensor(ids), paddle.to_tensor(mask), paddle.to_tensor(types), return_dict=True)
    return out.prediction_logits.numpy(), out.seq_relationship_logits.numpy()


def assert_matches_reference(got, expected, mask):
    (logits, nsp), (ref_logits, ref_nsp) = got, expected
    # Megatron also masks padded *queries*; only unpadded positions are defined the same way everywhere.
    np.testing.assert_allclose(logits[mask > 0], ref_logits[mask > 0], atol=1e-5, rtol=0)
    np.testing.assert_allclose(nsp, ref_nsp, atol=1e-5, rtol=0)


@pytest.mark.parametrize("version,new_names,tp", MEGATRON_CASES)
def test_megatron_checkpoint_matches_megatron_forward(version, new_names, tp, tmp_path):
    rng = np.random.RandomState(int(version * 10) + tp)
    shards = ref.random_shards(rng, tp=tp)
    src = ref.save_megatron_checkpoint(str(tmp_path / "megatron"), shards, version, new_names, ref.megatron_args(tp=tp))
    report = convert_checkpoint(src, str(tmp_path / "out"))
    assert report["checkpoint_version"] == version and report["tensor_parallel_degree"] == tp
    assert report["read_with"] == ["restricted"]  # args (Namespace) and numpy RNG state: not weights_only
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["layer_norm_eps"] == 1e-5 and config["vocab_size"] == 128 and config["hidden_act"] == "gelu"
    ids, types, mask = batch(128, seed=tp)
    assert_matches_reference(megatron_outputs(str(tmp_path / "out"), ids, types, mask),
                             ref.megatron_forward(shards, version, 4, ids, types, mask), mask)


def test_fused_bias_gelu_becomes_tanh_gelu(tmp_path):
    """Megatron's fused bias-GELU is the tanh approximation; its LM head keeps the erf GELU."""
    rng = np.random.RandomState(7)
    shards = ref.random_shards(rng, tp=2)
    src = ref.save_megatron_checkpoint(str(tmp_path / "m"), shards, 3.0, True,
                                       ref.megatron_args(tp=2, bias_gelu_fusion=True))
    convert_checkpoint(src, str(tmp_path / "out"))
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert (config["hidden_act"], config["lm_head_act"]) == ("gelu_tanh", "gelu")
    ids, types, mask = batch(128)
    got = megatron_outputs(str(tmp_path / "out"), ids, types, mask)
    assert_matches_reference(got, ref.megatron_forward(shards, 3.0, 4, ids, types, mask, mlp_gelu=ref.gelu_tanh), mask)
    erf_logits, _ = ref.megatron_forward(shards, 3.0, 4, ids, types, mask)
    assert np.abs(got[0] - erf_logits)[mask > 0].max() > 1e-4


def test_ngc_style_zip_without_args_and_tool(tmp_path, capsys):
    """An NGC zip: release/mp_rank_00/model_optim_rng.pt in torch's old (pre-zip) format, no args, no
    checkpoint_version (layout 0)."""
    rng = np.random.RandomState(11)
    shards = ref.random_shards(rng, tp=1)
    ref.save_megatron_checkpoint(str(tmp_path / "ngc"), shards, None, False, None, legacy_format=True)
    archive = str(tmp_path / "megatron_bert_345m_v0_1_uncased.zip")
    with zipfile.ZipFile(archive, "w") as z:
        member = "release/mp_rank_00/model_optim_rng.pt"
        z.write(tmp_path / "ngc" / member, member)
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(f"w{i}" for i in range(120)) + "\n")
    dst = str(tmp_path / "out")
    tool = load_tool()
    assert tool.main([archive, dst, "--num_attention_heads", "4", "--vocab_file", str(vocab)]) == 0
    printed = capsys.readouterr().out
    assert "converted megatron checkpoint" in printed and "assumed the exact (erf) GELU" in printed
    assert sorted(os.listdir(dst)) == ["config.json", "conversion_report.json", "model.safetensors",
                                       "tokenizer_config.json", "vocab.txt"]
    assert leftovers(str(tmp_path)) == []
    ids, types, mask = batch(128, seed=5)
    assert_matches_reference(megatron_outputs(dst, ids, types, mask),
                             ref.megatron_forward(shards, 0, 4, ids, types, mask), mask)


def test_from_pretrained_convert_from_torch(tmp_path):
    rng = np.random.RandomState(2)
    shards = ref.random_shards(rng, tp=2)
    src = ref.save_megatron_checkpoint(str(tmp_path / "m"), shards, 2.0, True, ref.megatron_args(tp=2), iteration="300")
    model = MegatronBertForPreTraining.from_pretrained(src, convert_from_torch=True)
    model.eval()
    ids, types, mask = batch(128)
    out = model(paddle.to_tensor(ids), paddle.to_tensor(mask), paddle.to_tensor(types), return_dict=True)
    assert_matches_reference((out.prediction_logits.numpy(), out.seq_relationship_logits.numpy()),
                             ref.megatron_forward(shards, 2.0, 4, ids, types, mask), mask)


def test_qkv_split_and_fuse_are_inverse():
    rng = np.random.RandomState(0)
    fused = rng.randn(3 * 4 * 8, 5)
    for version in (0, 1.0, 2.0, 3.0):
        q, k, v = split_fused_qkv(fused, version, 4, 8)
        np.testing.assert_array_equal(fuse_qkv(q, k, v, version, 4, 8), fused)


def hf_converter_qkv_fix(param, checkpoint_version, num_heads, head_dim):
    """Oracle transcribed from transformers' convert_megatron_bert_checkpoint.py
    (fix_query_key_value_ordering, read through the search tool, not vendored): it permutes the fused rows
    to [3, heads, head_dim]: version 1.0 stores [heads, head_dim, 3] (two transposes), >= 2.0
    [heads, 3, head_dim] (one transpose), 0 is already in order."""
    shape = param.size()
    if checkpoint_version == 1.0:
        param = param.view(num_heads, head_dim, 3, *shape[1:]).transpose(0, 2).transpose(1, 2).contiguous()
    elif checkpoint_version >= 2.0:
        param = param.view(num_heads, 3, head_dim, *shape[1:]).transpose(0, 1).contiguous()
    return param.view(*shape)


def hf_converter_state(checkpoint, hidden, heads):
    """The rest of that script's mapping (Megatron TP=1 names -> HF names), transcribed the same way."""
    version = checkpoint.get("checkpoint_version", 0.0)
    lm = checkpoint["model"]["language_model"]
    out = {"bert.embeddings.word_embeddings.weight": lm["embedding"]["word_embeddings"]["weight"],
           "bert.embeddings.position_embeddings.weight": lm["embedding"]["position_embeddings"]["weight"],
           "bert.embeddings.token_type_embeddings.weight": lm["embedding"]["tokentype_embeddings"]["weight"]}
    simple = {"attention.dense": "attention.output.dense", "self_attention.dense": "attention.output.dense",
              "mlp.dense_h_to_4h": "intermediate.dense", "mlp.dense_4h_to_h": "output.dense",
              "input_layernorm": "attention.ln", "post_attention_layernorm": "ln"}
    stack = lm["transformer"] if "transformer" in lm else lm["encoder"]
    for key, value in stack.items():
        if not key.startswith("layers."):
            continue
        _, index, rest = key.split(".", 2)
        op, param = rest.rsplit(".", 1)
        prefix = f"bert.encoder.layer.{index}."
        if op.endswith("query_key_value"):
            fixed = hf_converter_qkv_fix(value, version, heads, hidden // heads)
            for j, which in enumerate(("query", "key", "value")):
                out[f"{prefix}attention.self.{which}.{param}"] = fixed[j * hidden:(j + 1) * hidden]
        else:
            out[f"{prefix}{simple[op]}.{param}"] = value
    head = checkpoint["model"]["lm_head"]
    for p in ("weight", "bias"):
        out[f"bert.encoder.ln.{p}"] = stack[f"final_layernorm.{p}"]
        out[f"bert.pooler.dense.{p}"] = lm["pooler"][f"dense.{p}"]
        out[f"cls.predictions.transform.dense.{p}"] = head[f"dense.{p}"]
        out[f"cls.predictions.transform.LayerNorm.{p}"] = head[f"layernorm.{p}"]
    out["cls.predictions.decoder.weight"] = out["bert.embeddings.word_embeddings.weight"]
    out["cls.predictions.bias"] = out["cls.predictions.decoder.bias"] = head["bias"]
    binary = checkpoint["model"]["binary_head"]
    out["cls.seq_relationship.weight"], out["cls.seq_relationship.bias"] = binary["weight"], binary["bias"]
    return out


@pytest.mark.parametrize("version", [1.0, 2.0])
def test_cross_check_with_transformers_converter(version, tmp_path):
    transformers = pytest.importorskip("transformers")
    shards = ref.random_shards(np.random.RandomState(21), tp=1)
    src = ref.save_megatron_checkpoint(str(tmp_path / "m"), shards, version, version > 1, ref.megatron_args())
    checkpoint = torch.load(os.path.join(src, "release", "mp_rank_00", "model_optim_rng.pt"), weights_only=False)
    hf_state = hf_converter_state(checkpoint, hidden=32, heads=4)
    hf_config = transformers.MegatronBertConfig(vocab_size=128, hidden_size=32, num_hidden_layers=2,
                                                num_attention_heads=4, intermediate_size=48, max_position_embeddings=40,
                                                layer_norm_eps=1e-5, hidden_dropout_prob=0.0,
                                                attention_probs_dropout_prob=0.0)
    hf_model = transformers.MegatronBertForPreTraining(hf_config).eval()
    hf_model.load_state_dict(hf_state, strict=True)

    config, state = load_torch_checkpoint(src)
    for name, value in state.items():  # the same tensors, in Paddle's layout
        theirs = hf_state[name].numpy()
        np.testing.assert_array_equal(value, theirs.T if value.ndim == 2 and "embeddings" not in name else theirs, name)
    ids, types, mask = batch(128, seed=4)
    with torch.no_grad():
        expected = hf_model(input_ids=torch.from_numpy(ids), token_type_ids=torch.from_numpy(types),
                            attention_mask=torch.from_numpy(mask))
    convert_checkpoint(src, str(tmp_path / "out"))
    logits, nsp = megatron_outputs(str(tmp_path / "out"), ids, types, mask)
    np.testing.assert_allclose(logits, expected.prediction_logits.numpy(), atol=1e-5, rtol=0)
    np.testing.assert_allclose(nsp, expected.seq_relationship_logits.numpy(), atol=1e-5, rtol=0)


# ---- 3. the NGC checkpoints' real size ------------------------------------------------------------
def save_full_size_shapes(directory, vocab, tp, args, zipped):
    """A 345M checkpoint's tensor shapes without its memory: every tensor a stride-0 view of one number
    (torch.save keeps the one-element storage), so only the config derivation runs at full size."""
    hidden, layers, ffn = 1024, 24, 4096

    def shaped(*shape):
        return torch.zeros(1).expand(*shape)

    shard = {"word_embeddings": shaped(vocab // tp, hidden), "position_embeddings": shaped(512, hidden),
             "token_type_embeddings": shaped(2, hidden), "lm_bias": shaped(vocab // tp)}
    for name in ("final_ln", "lm_ln"):
        shard[f"{name}.weight"], shard[f"{name}.bias"] = shaped(hidden), shaped(hidden)
    for name, out_dim in (("pooler", hidden), ("lm_dense", hidden), ("binary_head", 2)):
        shard[f"{name}.weight"], shard[f"{name}.bias"] = shaped(out_dim, hidden), shaped(out_dim)
    for i in range(layers):
        for ln in ("attention_ln", "mlp_ln"):
            shard[f"{i}.{ln}.weight"], shard[f"{i}.{ln}.bias"] = shaped(hidden), shaped(hidden)
        shard[f"{i}.qkv.weight"], shard[f"{i}.qkv.bias"] = shaped(3 * hidden // tp, hidden), shaped(3 * hidden // tp)
        shard[f"{i}.attention_dense.weight"] = shaped(hidden, hidden // tp)
        shard[f"{i}.attention_dense.bias"] = shaped(hidden)
        shard[f"{i}.fc1.weight"], shard[f"{i}.fc1.bias"] = shaped(ffn // tp, hidden), shaped(ffn // tp)
        shard[f"{i}.fc2.weight"], shard[f"{i}.fc2.bias"] = shaped(hidden, ffn // tp), shaped(hidden)
    for rank in range(tp):
        path = os.path.join(directory, "release", f"mp_rank_{rank:02d}", "model_optim_rng.pt")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        state = {"model": ref.megatron_model_dict(shard, False, lambda t: t)}
        if args is not None:
            state["args"], state["checkpoint_version"] = args, 3.0
        torch.save(state, path)
    if zipped:
        archive = directory + ".zip"
        with zipfile.ZipFile(archive, "w") as z:
            for rank in range(tp):
                member = f"release/mp_rank_{rank:02d}/model_optim_rng.pt"
                z.write(os.path.join(directory, member), member)
        return archive
    return directory


@pytest.mark.parametrize("name,tp,with_args", [("megatronbert-cased", 1, False), ("megatronbert-uncased", 1, False),
                                               ("megatronbert-uncased", 2, True)])
def test_full_size_config_matches_registered(name, tp, with_args, tmp_path):
    registered = PRETRAINED_INIT_CONFIGURATION[name]
    vocab = registered["vocab_size"]
    tokenizer = "BertWordPieceLowerCase" if registered["do_lower_case"] else "BertWordPieceCase"
    args = ref.megatron_args(hidden=1024, heads=16, layers=24, ffn=4096, vocab=vocab, positions=512, tp=tp,
                             tokenizer_type=tokenizer) if with_args else None
    src = save_full_size_shapes(str(tmp_path / "ngc"), vocab, tp, args, zipped=not with_args)
    checkpoint = open_checkpoint(src, workdir=str(tmp_path / "work"))
    config = checkpoint.config.to_dict()
    for key, value in registered.items():
        assert config[key] == value, key


# ---- 4. bad input --------------------------------------------------------------------------------
def megatron_dir(tmp_path, tp=1, version=2.0, edit=None):
    shards = ref.random_shards(np.random.RandomState(0), tp=tp)
    if edit:
        edit(shards)
    return ref.save_megatron_checkpoint(str(tmp_path / "src"), shards, version, True, ref.megatron_args(tp=tp))


def run_tool_expecting_error(tmp_path, capsys, src, *extra):
    dst = str(tmp_path / "out")
    capsys.readouterr()  # what earlier steps printed (progress bars) is not the tool's output
    assert load_tool().main([src, dst, *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    assert not os.path.exists(dst)
    assert leftovers(str(tmp_path)) == []
    return err


def test_not_a_checkpoint(tmp_path, capsys):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "notes.txt").write_text("hello")
    assert "is not a checkpoint" in run_tool_expecting_error(tmp_path, capsys, str(tmp_path / "src"))
    (tmp_path / "junk.pt").write_text("not a pickle")
    assert "not a torch file" in run_tool_expecting_error(tmp_path, capsys, str(tmp_path / "junk.pt"))


def test_truncated_files(tmp_path, capsys):
    src = megatron_dir(tmp_path)
    shard = os.path.join(src, "release", "mp_rank_00", "model_optim_rng.pt")
    data = open(shard, "rb").read()
    open(shard, "wb").write(data[: len(data) // 2])
    assert "truncated" in run_tool_expecting_error(tmp_path, capsys, src)
    hf = save_hf(build_hf_model("MegatronBertModel"), str(tmp_path / "hf"), "safetensors")
    weights = os.path.join(hf, "model.safetensors")
    data = open(weights, "rb").read()
    open(weights, "wb").write(data[:-100])
    assert "is truncated" in run_tool_expecting_error(tmp_path, capsys, hf)


def test_missing_tensors_are_listed(tmp_path, capsys):
    def drop(shards):
        for shard in shards:
            del shard["1.fc2.weight"], shard["final_ln.bias"]
    err = run_tool_expecting_error(tmp_path, capsys, megatron_dir(tmp_path, edit=drop))
    assert "lacks 2 tensors" in err and "final_ln.bias" in err and "layer 1 fc2.weight" in err


def test_inconsistent_tp_shards(tmp_path, capsys):
    def differ(shards):
        shards[1]["0.mlp_ln.weight"] = shards[1]["0.mlp_ln.weight"] + 1.0
    err = run_tool_expecting_error(tmp_path, capsys, megatron_dir(tmp_path, tp=2, edit=differ))
    assert "inconsistent TP shards" in err and "post_attention_layernorm.weight" in err and "rank 1" in err


def test_missing_tp_rank(tmp_path, capsys):
    src = megatron_dir(tmp_path, tp=2)
    os.rename(os.path.join(src, "release", "mp_rank_01"), os.path.join(src, "release", "mp_rank_02"))
    assert "mp_rank_01 is missing" in run_tool_expecting_error(tmp_path, capsys, src)


def test_unknown_checkpoint_version(tmp_path, capsys):
    err = run_tool_expecting_error(tmp_path, capsys, megatron_dir(tmp_path, version=7.0))
    assert "unknown checkpoint_version 7" in err


@pytest.mark.parametrize("extra, named", [
    ({"swiglu": True}, "args.swiglu=True"),
    ({"apply_layernorm_1p": True}, "args.apply_layernorm_1p=True"),  # legacy: refused, not guessed
    ({"group_query_attention": True, "num_query_groups": 2}, "args.num_query_groups=2"),
])
def test_legacy_math_changing_args_are_refused_by_name(extra, named, tmp_path, capsys):
    # megatron-core checkpoints are checked against megatron-core itself in tests/test_megatron_core.py
    shards = ref.random_shards(np.random.RandomState(0))
    src = ref.save_megatron_checkpoint(str(tmp_path / "src"), shards, 3.0, True, ref.megatron_args(**extra))
    err = run_tool_expecting_error(tmp_path, capsys, src)
    assert named in err and "not converted" in err and len(err.strip().splitlines()) == 1


def test_existing_destination_is_kept(tmp_path, capsys):
    src = megatron_dir(tmp_path)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "mine.txt").write_text("keep")
    assert load_tool().main([src, str(tmp_path / "out")]) == 2
    assert "already exists" in capsys.readouterr().err
    assert os.listdir(tmp_path / "out") == ["mine.txt"]


# ---- dtype, memory, a pickle that would run code ---------------------------------------------------
@pytest.mark.parametrize("dtype,atol", [("float16", 2e-2), ("bfloat16", 1e-1)])
def test_output_dtype(dtype, atol, tmp_path):
    src = megatron_dir(tmp_path)
    convert_checkpoint(src, str(tmp_path / "out32"))
    convert_checkpoint(src, str(tmp_path / "out"), dtype=dtype)
    from safetensors import safe_open

    with safe_open(str(tmp_path / "out" / "model.safetensors"), framework="np") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F16" if dtype == "float16" else "BF16"}
    ids, types, mask = batch(128)
    full = megatron_outputs(str(tmp_path / "out32"), ids, types, mask)
    low = megatron_outputs(str(tmp_path / "out"), ids, types, mask)
    np.testing.assert_allclose(low[0], full[0], atol=atol * np.abs(full[0]).max(), rtol=0)


def test_pickle_that_runs_code_is_refused(tmp_path, capsys):
    class RunsCode:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'pwned'}",))

    src = megatron_dir(tmp_path)
    shard = os.path.join(src, "release", "mp_rank_00", "model_optim_rng.pt")
    state = torch.load(shard, weights_only=False)
    state["args"].evil = RunsCode()
    torch.save(state, shard)
    err = run_tool_expecting_error(tmp_path, capsys, src)
    assert "refused to load global" in err and "system" in err
    assert not (tmp_path / "pwned").exists()


def test_megatron_core_safe_globals_are_rebuilt_inertly_and_nothing_else(tmp_path, capsys):
    """What megatron-core's safe_globals.py lists (signal.SIGTERM, PosixPath, SimpleNamespace, numpy dtype
    classes, a torch RNG generator) loads; a callable of the same modules (signal.signal) is refused."""
    import pathlib
    import signal
    import types

    src = megatron_dir(tmp_path)
    shard = os.path.join(src, "release", "mp_rank_00", "model_optim_rng.pt")
    state = torch.load(shard, weights_only=False)
    args = state["args"]
    args.exit_signal, args.save = signal.SIGTERM, pathlib.PosixPath("/ckpt/run")
    args.extra = types.SimpleNamespace(dtype_class=np.dtypes.UInt32DType, ids=np.arange(3, dtype=np.uint32))
    generator = torch.Generator()
    generator.manual_seed(5)
    state["rng_state"][0]["generator"] = generator
    torch.save(state, shard)
    read = open_checkpoint(src).args
    assert read["exit_signal"] == signal.SIGTERM and str(read["save"]) == "/ckpt/run"
    assert read["extra"].dtype_class is np.dtypes.UInt32DType and read["extra"].ids.tolist() == [0, 1, 2]
    assert convert_checkpoint(src, str(tmp_path / "good"))["read_with"] == ["restricted"]

    class CallsSignal:
        def __reduce__(self):
            return (signal.signal, (signal.SIGUSR1, signal.SIG_IGN))

    state["args"].evil = CallsSignal()
    torch.save(state, shard)
    before = signal.getsignal(signal.SIGUSR1)
    err = run_tool_expecting_error(tmp_path, capsys, src)
    assert "refused to load global signal.signal" in err and len(err.strip().splitlines()) == 1
    assert signal.getsignal(signal.SIGUSR1) == before


def test_peak_memory_is_one_copy_of_the_model(tmp_path):
    """Shards are memory-mapped and tensors converted one at a time: the traced peak (numpy allocations)
    stays near one float32 copy of the model, not the two or three of load-all-then-convert."""
    import tracemalloc

    sizes = dict(hidden=256, heads=4, layers=4, ffn=1024, vocab=4096, positions=64)
    shards = ref.random_shards(np.random.RandomState(0), tp=2, **sizes)
    src = ref.save_megatron_checkpoint(str(tmp_path / "m"), shards, 3.0, True, ref.megatron_args(tp=2, **sizes))
    del shards
    convert_checkpoint(src, str(tmp_path / "warmup"))  # imports and caches out of the measurement
    tracemalloc.start()
    try:
        report = convert_checkpoint(src, str(tmp_path / "out"))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    model_bytes = 4 * sum(int(np.prod(t["shape"])) for t in report["tensors"])
    assert peak < 1.25 * model_bytes, (peak / 2**20, model_bytes / 2**20)


def test_vocab_of_the_other_casing_is_refused(tmp_path, capsys):
    src = megatron_dir(tmp_path)  # 128 embedding rows
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(f"w{i}" for i in range(300)) + "\n")
    err = run_tool_expecting_error(tmp_path, capsys, src, "--vocab_file", str(vocab))
    assert "has 300 tokens" in err and "128 embedding rows" in err
    assert load_tool().main([src, str(tmp_path / "out"), "--vocab_file", str(vocab), "--allow_vocab_mismatch"]) == 0


def test_every_source_form_is_detected(tmp_path, capsys):
    shards = ref.random_shards(np.random.RandomState(1), tp=2)
    src = ref.save_megatron_checkpoint(str(tmp_path / "m"), shards, 3.0, True, ref.megatron_args(tp=2), iteration="20")
    iteration = os.path.join(src, "iter_0000020")
    full = open_checkpoint(src)
    assert full.tensor_parallel_degree == 2 and full.config.vocab_size == 128
    assert open_checkpoint(iteration).tensor_parallel_degree == 2
    one_rank = ref.save_megatron_checkpoint(str(tmp_path / "one"), ref.random_shards(np.random.RandomState(2)), 3.0,
                                            True, ref.megatron_args(tp=1))
    rank_dir = os.path.join(one_rank, "release", "mp_rank_00")
    for form in (rank_dir, os.path.join(rank_dir, "model_optim_rng.pt")):
        assert open_checkpoint(form).tensor_parallel_degree == 1
    hf = save_hf(build_hf_model("MegatronBertForPreTraining"), str(tmp_path / "hf"), "bin")
    assert open_checkpoint(os.path.join(hf, "pytorch_model.bin")).config.num_hidden_layers == 2
    err = run_tool_expecting_error(tmp_path, capsys, src, "--from", "hf")
    assert "has no config.json" in err


# ---- beyond the peers: real pickles, Megatron-core names, export back, report ------------------------
def test_megatron_enum_in_args_loads_without_megatron(tmp_path, monkeypatch):
    """Megatron-LM's args may hold its enums: saved with a stand-in ``megatron.model.enums``, read with
    the module gone (no Megatron-LM on the path) as an inert stub that keeps the name and value."""
    import enum
    import types

    class AttnMaskType(enum.Enum):
        padding = 1
        causal = 2

    AttnMaskType.__module__, AttnMaskType.__qualname__ = "megatron.model.enums", "AttnMaskType"
    shards = ref.random_shards(np.random.RandomState(9))
    with monkeypatch.context() as patch:
        for name in ("megatron", "megatron.model", "megatron.model.enums"):
            patch.setitem(sys.modules, name, types.ModuleType(name))
        sys.modules["megatron.model.enums"].AttnMaskType = AttnMaskType
        src = ref.save_megatron_checkpoint(str(tmp_path / "m"), shards, 3.0, True,
                                           ref.megatron_args(attn_mask_type=AttnMaskType.padding))
    assert "megatron" not in sys.modules
    stub = open_checkpoint(src).args["attn_mask_type"]
    assert type(stub).__name__ == "AttnMaskType" and stub.value == 1
    report = convert_checkpoint(src, str(tmp_path / "out"))
    assert report["read_with"] == ["restricted"]
    ids, types_, mask = batch(128)
    assert_matches_reference(megatron_outputs(str(tmp_path / "out"), ids, types_, mask),
                             ref.megatron_forward(shards, 3.0, 4, ids, types_, mask), mask)


def core_checkpoint_from_hf(hf_model, directory, tp, fused_layer_norms):
    """A Megatron-core BERT checkpoint (legacy torch format) built from an HF model by the inverse map:
    fused QKV rows [heads, 3, head_dim] per rank, column/row/vocab splits, Transformer Engine's fused
    LayerNorm names or the separate ones."""
    hf = {k: v.detach().numpy() for k, v in hf_model.state_dict().items()}
    config = hf_model.config
    heads, head_dim = config.num_attention_heads // tp, config.hidden_size // config.num_attention_heads

    def cols(a, r):
        return np.split(a, tp, axis=0)[r]

    def rows(a, r):
        return np.split(a, tp, axis=1)[r]

    for r in range(tp):
        m = {"embedding.word_embeddings.weight": cols(hf["bert.embeddings.word_embeddings.weight"], r),
             "embedding.position_embeddings.weight": hf["bert.embeddings.position_embeddings.weight"],
             "embedding.tokentype_embeddings.weight": hf["bert.embeddings.token_type_embeddings.weight"],
             "encoder.final_layernorm.weight": hf["bert.encoder.ln.weight"],
             "encoder.final_layernorm.bias": hf["bert.encoder.ln.bias"],
             "pooler.dense.weight": hf["bert.pooler.dense.weight"], "pooler.dense.bias": hf["bert.pooler.dense.bias"],
             "lm_head.dense.weight": hf["cls.predictions.transform.dense.weight"],
             "lm_head.dense.bias": hf["cls.predictions.transform.dense.bias"],
             "lm_head.layer_norm.weight": hf["cls.predictions.transform.LayerNorm.weight"],
             "lm_head.layer_norm.bias": hf["cls.predictions.transform.LayerNorm.bias"],
             "output_layer.bias": cols(hf["cls.predictions.decoder.bias"], r),
             "binary_head.weight": hf["cls.seq_relationship.weight"],
             "binary_head.bias": hf["cls.seq_relationship.bias"]}
        for i in range(config.num_hidden_layers):
            h, c = f"bert.encoder.layer.{i}.", f"encoder.layers.{i}."
            for p in ("weight", "bias"):
                q, k, v = (cols(hf[f"{h}attention.self.{x}.{p}"], r) for x in ("query", "key", "value"))
                per_head = [x.reshape((heads, head_dim) + x.shape[1:]) for x in (q, k, v)]
                m[f"{c}self_attention.linear_qkv.{p}"] = np.stack(per_head, axis=1).reshape((-1,) + q.shape[1:])
                proj, fc2 = hf[f"{h}attention.output.dense.{p}"], hf[f"{h}output.dense.{p}"]
                m[f"{c}self_attention.linear_proj.{p}"] = rows(proj, r) if p == "weight" else proj  # row-parallel
                m[f"{c}mlp.linear_fc1.{p}"] = cols(hf[f"{h}intermediate.dense.{p}"], r)
                m[f"{c}mlp.linear_fc2.{p}"] = rows(fc2, r) if p == "weight" else fc2
                if fused_layer_norms:
                    m[f"{c}self_attention.linear_qkv.layer_norm_{p}"] = hf[f"{h}attention.ln.{p}"]
                    m[f"{c}mlp.linear_fc1.layer_norm_{p}"] = hf[f"{h}ln.{p}"]
                else:
                    m[f"{c}input_layernorm.{p}"] = hf[f"{h}attention.ln.{p}"]
                    m[f"{c}pre_mlp_layernorm.{p}"] = hf[f"{h}ln.{p}"]
            m[f"{c}self_attention.core_attention._extra_state"] = None  # Transformer Engine state: no weights
        model = {k: (torch.from_numpy(np.ascontiguousarray(v)) if v is not None else v) for k, v in m.items()}
        state = {"model": model,
                 "checkpoint_version": 3.0,
                 "args": ref.megatron_args(hidden=config.hidden_size, heads=config.num_attention_heads,
                                           layers=config.num_hidden_layers, ffn=config.intermediate_size,
                                           vocab=config.vocab_size, positions=config.max_position_embeddings, tp=tp)}
        path = os.path.join(directory, "release", f"mp_rank_{r:02d}", "model_optim_rng.pt")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        torch.save(state, path)
    return directory


@pytest.mark.parametrize("fused_layer_norms", [True, False])
def test_megatron_core_names_tp2_match_hf(fused_layer_norms, tmp_path):
    hf_model = build_hf_model("MegatronBertForPreTraining", seed=4, vocab_size=128, intermediate_size=48,
                              layer_norm_eps=1e-5)
    src = core_checkpoint_from_hf(hf_model, str(tmp_path / "core"), 2, fused_layer_norms)
    report = convert_checkpoint(src, str(tmp_path / "out"))
    assert report["naming"] == "core" and report["tensor_parallel_degree"] == 2
    ours = MegatronBertForPreTraining.from_pretrained(str(tmp_path / "out"))
    ours.eval()
    compare_with_hf(hf_model, ours, "MegatronBertForPreTraining", 128)


def test_broken_distributed_checkpoint_is_one_line(tmp_path, capsys):
    # torch_dist checkpoints are read with torch.distributed.checkpoint (tests/test_megatron_core.py);
    # one whose .metadata is missing is an error naming the directory, not a traceback.
    iteration = tmp_path / "src" / "iter_0000010"
    iteration.mkdir(parents=True)
    (iteration / "__0_0.distcp").write_bytes(b"\0" * 16)
    (iteration / "metadata.json").write_text("{}")
    (tmp_path / "src" / "latest_checkpointed_iteration.txt").write_text("10")
    err = run_tool_expecting_error(tmp_path, capsys, str(tmp_path / "src"))
    assert "torch_dist" in err and "iter_0000010" in err and ".metadata" in err


def test_round_trip_hf_paddle_hf(tmp_path):
    transformers = pytest.importorskip("transformers")
    hf_model = build_hf_model("MegatronBertForPreTraining", seed=6)
    src = save_hf(hf_model, str(tmp_path / "hf"), "safetensors")
    (tmp_path / "hf" / "vocab.txt").write_text("\n".join(f"t{i}" for i in range(99)) + "\n")
    first = convert_checkpoint(src, str(tmp_path / "paddle"), verify=True)
    assert first["verify"]["max_abs_diff"] <= 1e-5
    back = convert_checkpoint(str(tmp_path / "paddle"), str(tmp_path / "hf2"), to="hf", verify=True)
    assert back["verify"]["max_abs_diff"] <= 1e-5 and back["source_kind"] == "paddle"
    assert sorted(os.listdir(tmp_path / "hf2")) == ["config.json", "conversion_report.json", "model.safetensors",
                                                    "tokenizer_config.json", "vocab.txt"]
    reloaded = transformers.MegatronBertForPreTraining.from_pretrained(str(tmp_path / "hf2")).eval()
    original = hf_model.state_dict()
    for name, value in reloaded.state_dict().items():
        assert torch.equal(value, original[name]), name
    ours = MegatronBertForPreTraining.from_pretrained(str(tmp_path / "paddle"))
    ours.eval()
    compare_with_hf(reloaded, ours, "MegatronBertForPreTraining", 99)


def test_round_trip_megatron_tp2_paddle_tp4_paddle(tmp_path):
    # the legacy layout (--megatron_layout legacy) round-trips through our reader and the numpy forward;
    # the default megatron-core layout is loaded by Megatron-LM itself in tests/test_megatron_core.py
    shards = ref.random_shards(np.random.RandomState(8), vocab=512, tp=2)
    src = ref.save_megatron_checkpoint(str(tmp_path / "tp2"), shards, 2.0, False, ref.megatron_args(vocab=512, tp=2))
    convert_checkpoint(src, str(tmp_path / "ours1"))
    report = convert_checkpoint(str(tmp_path / "ours1"), str(tmp_path / "tp4"), to="megatron", tensor_parallel_degree=4,
                                megatron_layout="legacy")
    assert sorted(os.listdir(tmp_path / "tp4" / "release")) == [f"mp_rank_{r:02d}" for r in range(4)]
    assert (tmp_path / "tp4" / "latest_checkpointed_iteration.txt").read_text() == "release"
    assert all(t["target"].endswith("(split over 4 ranks)") for t in report["tensors"])
    convert_checkpoint(str(tmp_path / "tp4"), str(tmp_path / "ours2"))
    first = stored_weights(tmp_path / "ours1")
    second = stored_weights(tmp_path / "ours2")
    assert sorted(first) == sorted(second)
    for name in first:
        np.testing.assert_array_equal(first[name], second[name], name)
    ids, types_, mask = batch(512)
    expected = ref.megatron_forward(shards, 2.0, 4, ids, types_, mask)
    assert_matches_reference(megatron_outputs(str(tmp_path / "ours2"), ids, types_, mask), expected, mask)
    # the TP=4 shards, read by the numpy Megatron forward itself: the export wrote Megatron's layout
    assert_matches_reference(ref.megatron_forward(ref.shards_from_checkpoint(str(tmp_path / "tp4")), 3.0, 4, ids,
                                                  types_, mask), expected, mask)


def test_export_repads_vocab_and_keeps_heads(tmp_path):
    shards = ref.random_shards(np.random.RandomState(12), vocab=128, tp=1)
    src = ref.save_megatron_checkpoint(str(tmp_path / "tp1"), shards, 3.0, True, ref.megatron_args(vocab=128))
    convert_checkpoint(src, str(tmp_path / "ours"))
    report = convert_checkpoint(str(tmp_path / "ours"), str(tmp_path / "tp4"), to="megatron", tensor_parallel_degree=4,
                                megatron_layout="legacy")
    assert report["vocab"]["padded"] == 512
    exported = ref.shards_from_checkpoint(str(tmp_path / "tp4"))
    assert [s["word_embeddings"].shape[0] for s in exported] == [128] * 4
    assert all(s["binary_head.weight"].shape == (2, 32) for s in exported)
    ids, types_, mask = batch(128)
    logits, nsp = ref.megatron_forward(exported, 3.0, 4, ids, types_, mask)
    assert_matches_reference((logits[..., :128], nsp), ref.megatron_forward(shards, 3.0, 4, ids, types_, mask), mask)
    np.testing.assert_array_equal(np.concatenate([s["lm_bias"] for s in exported])[128:], 0)


def test_report_lists_every_tensor(tmp_path):
    src = megatron_dir(tmp_path, tp=2)
    report = json.loads(json.dumps(convert_checkpoint(src, str(tmp_path / "out"))))
    assert report == json.loads((tmp_path / "out" / "conversion_report.json").read_text())
    stored = stored_weights(tmp_path / "out")
    assert sorted(t["target"] for t in report["tensors"]) == sorted(stored)
    for entry in report["tensors"]:
        assert list(stored[entry["target"]].shape) == entry["shape"] and entry["source"]
    assert report["source_kind"] == "megatron" and report["checkpoint_version"] == 2.0
    assert report["vocab"] == {"raw": None, "padded": 128, "vocab_file": None, "casing": "uncased"}


def test_cased_checkpoint_with_uncased_vocab_is_refused(tmp_path, capsys):
    src = save_full_size_shapes(str(tmp_path / "ngc"), 29056, 1, None, zipped=True)
    uncased = os.path.join(ROOT, "paddle_megatronbert", "vocab", "megatronbert-uncased-vocab.txt")
    err = run_tool_expecting_error(tmp_path, capsys, src, "--vocab_file", uncased)
    assert "30522 tokens (uncased BERT)" in err and "29056 embedding rows (BERT's cased 28996 padded)" in err


def test_export_from_sharded_paddle_dir_and_from_hf(tmp_path):
    """SRC may be any readable format: our per-rank ``model_state.tpNN.pdparams`` (as
    save_pretrained(merge_tensor_parallel=False) writes them) -> HF; HF -> Megatron TP=2 -> ours."""
    transformers = pytest.importorskip("transformers")
    from paddle_megatronbert import tp_plan

    hf_model = build_hf_model("MegatronBertForPreTraining", seed=13, vocab_size=128, intermediate_size=48)
    convert_checkpoint(save_hf(hf_model, str(tmp_path / "hf"), "bin"), str(tmp_path / "full"))
    full = stored_weights(tmp_path / "full")
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    config = json.loads((tmp_path / "full" / "config.json").read_text())
    (sharded / "config.json").write_text(json.dumps({**config, "tensor_parallel_degree": 2}))
    for rank in range(2):
        part = {k: tp_plan.shard_param(k, v, 2, rank) for k, v in full.items()}
        paddle.save(part, str(sharded / f"model_state.tp{rank:02d}.pdparams"))
    report = convert_checkpoint(str(sharded), str(tmp_path / "hf2"), to="hf")
    assert report["source_kind"] == "paddle" and report["tensor_parallel_degree"] == 2
    reloaded = transformers.MegatronBertForPreTraining.from_pretrained(str(tmp_path / "hf2")).eval()
    for name, value in reloaded.state_dict().items():
        assert torch.equal(value, hf_model.state_dict()[name]), name

    convert_checkpoint(str(tmp_path / "hf"), str(tmp_path / "megatron"), to="megatron", tensor_parallel_degree=2)
    convert_checkpoint(str(tmp_path / "megatron"), str(tmp_path / "back"))
    back = stored_weights(tmp_path / "back")
    assert sorted(back) == sorted(full)
    for name in full:  # 128 vocab rows re-padded to a multiple of 128 x 2 for Megatron: zeros after the 128
        np.testing.assert_array_equal(back[name][:len(full[name])], full[name], name)
        np.testing.assert_array_equal(back[name][len(full[name]):], 0, name)
    assert back["bert.embeddings.word_embeddings.weight"].shape == (256, 32)
