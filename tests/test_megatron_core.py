"""megatron-core as the oracle for Megatron-LM conversion, as transformers is for HF.

A tiny ``BertModel`` is built, saved and loaded by Megatron-LM itself (``tests/helpers/megatron_core_bert.py``,
CPU shims in ``tests/helpers/megatron_core_shims.py``), in one launch of 2 gloo processes:

1. its ``save_checkpoint`` (torch format) → ``tools/convert_checkpoint.py`` → our logits equal its forward,
   at TP 1 and 2, tied and untied, with ``--openai-gelu`` (which megatron-core ignores), the fused
   bias-GELU on and off, ``--apply-layernorm-1p`` and ``--disable-bias-linear``;
2. our model → ``--to megatron`` (TP 1, 2) → its ``load_checkpoint(strict=True)`` (``--use-checkpoint-args``)
   into a fresh ``BertModel`` → its logits equal ours;
3. its ``torch_dist`` checkpoint (TP 2) and a PP=2 checkpoint convert to the same logits;
4. an arg that changes the math and is not converted is one line naming it.

Skipped without torch or megatron-core (``pip install --no-deps --ignore-requires-python megatron-core==0.19.2``).
"""

import importlib.util
import os
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
# find_spec("megatron.core") would import the megatron package into this process: look for its files only
_MEGATRON = importlib.util.find_spec("megatron")
if _MEGATRON is None or not any(os.path.isdir(os.path.join(p, "core", "models", "bert"))
                                for p in _MEGATRON.submodule_search_locations or ()):
    pytest.skip("megatron-core is not installed", allow_module_level=True)

import paddle  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests", "helpers"))
import megatron_core_bert as oracle  # noqa: E402

from paddle_megatronbert import MegatronBertConfig, MegatronBertForPreTraining  # noqa: E402
from paddle_megatronbert.convert.torch_checkpoints import open_checkpoint  # noqa: E402

TOOL = os.path.join(ROOT, "tools", "convert_checkpoint.py")
# flags of the two saved models: A tied, the fused (tanh) bias-GELU, --openai-gelu that mcore ignores;
# B untied, erf GELU, zero-centered LayerNorm weights, no linear biases
FLAGS = {"a": ["--openai-gelu"],
         "b": ["--no-bias-gelu-fusion", "--apply-layernorm-1p", "--disable-bias-linear",
               "--untie-embeddings-and-output-weights"]}
VOCAB = 112  # real vocab rows (what the oracle's embedding has, padded for TP 1 and 2 alike)
# args that change the math and are not converted: Megatron-LM's own save with the stored arg changed
REFUSED_ARGS = [("qk_layernorm", True), ("normalization", "RMSNorm"), ("position_embedding_type", "rope")]


def load_tool():
    spec = importlib.util.spec_from_file_location("convert_checkpoint_tool", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def our_model(directory):
    """A tiny MegatronBERT of ours, every weight random (LayerNorms and biases too), saved to ``directory``."""
    config = MegatronBertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                intermediate_size=64, max_position_embeddings=16, hidden_act="gelu_tanh",
                                lm_head_act="gelu", hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    paddle.seed(3)
    model = MegatronBertForPreTraining(config)
    rng = np.random.RandomState(3)
    for name, param in model.named_parameters():
        base = 1.0 if name.endswith(("ln.weight", "LayerNorm.weight")) else 0.0
        param.set_value((base + 0.2 * rng.randn(*param.shape)).astype("float32"))
    model.save_pretrained(directory)
    return directory


def our_logits(directory):
    model = MegatronBertForPreTraining.from_pretrained(directory)
    model.eval()
    ids, mask, types = oracle.batch()
    out = model(paddle.to_tensor(ids), attention_mask=paddle.to_tensor(mask), token_type_ids=paddle.to_tensor(types),
                return_dict=True)
    return out.prediction_logits.numpy(), out.seq_relationship_logits.numpy()


def assert_same_logits(ours, theirs):
    """LM logits on the valid positions and the real vocab rows, and NSP, within 1e-5."""
    valid = oracle.batch()[1].astype(bool)
    np.testing.assert_allclose(ours[0][valid][:, :VOCAB], theirs["lm"][valid][:, :VOCAB], rtol=0, atol=1e-5)
    np.testing.assert_allclose(ours[1], theirs["nsp"], rtol=0, atol=1e-5)


@pytest.fixture(scope="module")
def mcore(tmp_path_factory):
    """Every checkpoint Megatron-LM saves or loads here, made by two launches of the oracle."""
    root = tmp_path_factory.mktemp("mcore")
    path = lambda *parts: str(root.joinpath(*parts))  # noqa: E731
    tool = load_tool()
    our_model(path("ours"))
    for tp in (1, 2):  # exported before Megatron-LM runs, so the same launches load them
        assert tool.main([path("ours"), path(f"export_tp{tp}"), "--to", "megatron", "--tensor_parallel_degree",
                          str(tp), "--quiet"]) == 0
    oracle.run_jobs([  # TP=1 jobs run data-parallel on the 2 processes
        {"argv": FLAGS["a"], "formats": {"torch": path("a_tp1")}, "logits": path("a_tp1.npz"),
         "variants": {path(f"a_{arg}"): {arg: value} for arg, value in REFUSED_ARGS}},
        {"argv": FLAGS["b"], "formats": {"torch": path("b_tp1")}, "logits": path("b_tp1.npz")},
        {"argv": [], "load": path("export_tp1"), "logits": path("export_tp1.npz")},
        {"argv": FLAGS["a"], "tp": 2, "formats": {"torch": path("a_tp2"), "torch_dist": path("a_dist")},
         "logits": path("a_tp2.npz")},
        {"argv": FLAGS["b"], "tp": 2, "formats": {"torch": path("b_tp2")}, "logits": path("b_tp2.npz")},
        {"argv": FLAGS["a"], "pp": 2, "formats": {"torch": path("a_pp2")}},
        {"argv": [], "tp": 2, "load": path("export_tp2"), "logits": path("export_tp2.npz")},
    ], 2, str(root))
    return root


def convert(tool, source, destination):
    assert tool.main([str(source), str(destination), "--quiet"]) == 0
    return str(destination)


@pytest.mark.parametrize("name", ["a_tp1", "b_tp1", "b_tp2"])
def test_megatron_core_checkpoint_converts_to_its_logits(mcore, name, tmp_path):
    # the field that made every checkpoint since late 2025 refused, read as what it is
    assert open_checkpoint(str(mcore / name)).args["exit_signal"] == signal.SIGTERM
    out = convert(load_tool(), mcore / name, tmp_path / "ours")
    assert_same_logits(our_logits(out), np.load(mcore / f"{name}.npz"))


def test_tool_as_a_user_runs_it_tp2_tied(mcore, tmp_path):
    result = subprocess.run([sys.executable, TOOL, str(mcore / "a_tp2"), str(tmp_path / "ours")],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "megatron-core ignores it" in result.stdout  # --openai-gelu, said in a note
    assert_same_logits(our_logits(str(tmp_path / "ours")), np.load(mcore / "a_tp2.npz"))


@pytest.mark.parametrize("name", ["a_dist", "a_pp2"])
def test_torch_dist_and_pipeline_parallel_convert_to_the_same_logits(mcore, name, tmp_path):
    out = convert(load_tool(), mcore / name, tmp_path / "ours")
    assert_same_logits(our_logits(out), np.load(mcore / "a_tp1.npz"))


@pytest.mark.parametrize("tp", [1, 2])
def test_our_export_loads_into_megatron_core_strictly(mcore, tp):
    # load_checkpoint(strict=True) said "successfully loaded" and its forward is ours: every weight arrived
    assert_same_logits(our_logits(str(mcore / "ours")), np.load(mcore / f"export_tp{tp}.npz"))


def test_new_dir_of_megatron_conversion_is_accepted(mcore, tmp_path):
    # Megatron-LM's --ckpt-convert-save NEW_DIR writes NEW_DIR/torch
    shutil.copytree(mcore / "a_tp1", tmp_path / "new" / "torch")
    out = convert(load_tool(), tmp_path / "new", tmp_path / "ours")
    assert_same_logits(our_logits(out), np.load(mcore / "a_tp1.npz"))


@pytest.mark.parametrize("arg, value", REFUSED_ARGS)
def test_math_changing_arg_is_refused_by_name(mcore, arg, value, tmp_path, capsys):
    capsys.readouterr()
    assert load_tool().main([str(mcore / f"a_{arg}"), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"args.{arg}={value!r}" in err and "not converted" in err
    assert not (tmp_path / "out").exists()


def test_missing_pipeline_stage_is_one_line(mcore, tmp_path, capsys):
    source = tmp_path / "src"
    shutil.copytree(mcore / "a_pp2", source)
    shutil.rmtree(source / "iter_0000001" / "mp_rank_00_001")
    capsys.readouterr()
    assert load_tool().main([str(source), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "pipeline_model_parallel_size=2" in err
