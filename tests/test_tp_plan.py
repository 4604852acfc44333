"""The tensor-parallel plan (``tp_plan``): one table for how every parameter is split.

The walk builds each of the eight heads and the base model, tied and untied, at TP=1 and — in one process,
by registering a TP group of degree 2 without collectives (building and initialising need none) — at
TP=2 for both ranks, and checks that the plan predicts the real layer shapes, that each rank's
parameter is the plan's shard of the TP=1 parameter, and that merging the shards gives the TP=1 one back.
"""

import ast
import os
import subprocess
import sys

import numpy as np
import pytest

from paddle_megatronbert import MODEL_CLASSES, MegatronBertConfig, MegatronBertModel, parallel, tp_plan

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# vocab 13 is odd: rank 1's vocab slice carries one padding row
TINY = dict(vocab_size=13, hidden_size=8, num_hidden_layers=2, num_attention_heads=2, intermediate_size=16,
            max_position_embeddings=8, type_vocab_size=2, num_labels=3)


def test_kinds_of_our_names():
    layer = "bert.encoder.layer.1."
    expected = {
        layer + "attention.self.query.weight": "column", layer + "attention.self.value.bias": "column",
        layer + "intermediate.dense.weight": "column", layer + "intermediate.dense.bias": "column",
        layer + "attention.output.dense.weight": "row", layer + "output.dense.weight": "row",
        layer + "attention.output.dense.bias": None, layer + "output.dense.bias": None,
        "bert.embeddings.word_embeddings.weight": "vocab", "embeddings.word_embeddings.weight": "vocab",
        "cls.predictions.bias": "vocab", "cls.predictions.decoder_weight": "vocab",
        "bert.embeddings.position_embeddings.weight": None, "bert.encoder.ln.weight": None,
        "cls.predictions.transform.dense.weight": None, "bert.pooler.dense.weight": None,
    }
    assert {name: tp_plan.split_kind(name) for name in expected} == expected


def test_shard_merge_round_trip_and_axes():
    weight = np.arange(4 * 6, dtype="float32").reshape(4, 6)  # Paddle [in, out]
    np.testing.assert_array_equal(tp_plan.shard(weight, "column", 2, 1), weight[:, 3:])
    np.testing.assert_array_equal(tp_plan.shard(weight, "row", 2, 1), weight[2:])
    np.testing.assert_array_equal(tp_plan.shard(weight, "column", 2, 1, layout="torch"), weight[2:])  # [out, in]
    np.testing.assert_array_equal(tp_plan.shard(weight, "row", 2, 1, layout="torch"), weight[:, 3:])
    np.testing.assert_array_equal(tp_plan.shard(np.arange(6), "column", 3, 2), [4, 5])  # a column bias
    for kind in ("column", "row", None):
        shards = [tp_plan.shard(weight, kind, 2, r) for r in (0, 1)]
        np.testing.assert_array_equal(tp_plan.merge(shards, kind), weight)
    vocab = np.arange(5 * 3, dtype="float32").reshape(5, 3)
    shards = [tp_plan.shard(vocab, "vocab", 2, r) for r in (0, 1)]
    assert [s.shape for s in shards] == [(3, 3), (3, 3)]
    np.testing.assert_array_equal(shards[1][-1], 0.0)  # the padding row
    np.testing.assert_array_equal(tp_plan.merge(shards, "vocab", 5), vocab)
    assert tp_plan.full_shape("vocab", [3, 3], 2, vocab_size=5) == [5, 3]
    assert tp_plan.full_shape("column", [4, 3], 2) == [4, 6] and tp_plan.full_shape("row", [2, 6], 2) == [4, 6]
    assert tp_plan.local_shape("vocab", [5, 3], 2) == [3, 3]


def test_bad_splits_are_one_clear_line():
    with pytest.raises(ValueError, match="a column split of size 6 is not divisible by tensor_parallel_degree 4"):
        tp_plan.shard(np.zeros((2, 6)), "column", 4, 0)
    with pytest.raises(ValueError, match="unknown tensor-parallel split kind 'diagonal'"):
        tp_plan.shard(np.zeros((2, 6)), "diagonal", 2, 0)
    with pytest.raises(ValueError, match="rank 2 is outside tensor_parallel_degree 2"):
        tp_plan.shard(np.zeros((2, 6)), "row", 2, 2)
    config = MegatronBertConfig(**{**TINY, "num_attention_heads": 1, "intermediate_size": 15})
    assert tp_plan.divisibility_problems(config, 2) == [
        "num_attention_heads (1) is not divisible by tensor_parallel_degree (2)",
        "intermediate_size (15) is not divisible by tensor_parallel_degree (2)",
    ]
    with pytest.raises(ValueError, match=r"num_attention_heads \(1\) .*; intermediate_size \(15\)"):
        MegatronBertConfig(**{**TINY, "num_attention_heads": 1, "intermediate_size": 15, "tensor_parallel_degree": 2})


def build_at(cls, rank, degree, tie):
    """``cls`` built with seed 5 as TP rank ``rank`` of ``degree`` (no collective is needed to build)."""
    import paddle

    parallel.set_tensor_parallel_group(None, rank, degree)
    try:
        paddle.seed(5)
        return cls(MegatronBertConfig(**TINY, tie_word_embeddings=tie, tensor_parallel_degree=degree))
    finally:
        parallel.set_tensor_parallel_group(None, 0, 1)


HEADS = sorted({cls for cls in MODEL_CLASSES.values()} | {MegatronBertModel}, key=lambda c: c.__name__)


@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
def test_every_parameter_of_every_head_follows_the_plan(tie):
    assert len(HEADS) == 9, [c.__name__ for c in HEADS]  # the eight heads and the base model
    split_seen = set()
    for cls in HEADS:
        full = {name: p.numpy() for name, p in build_at(cls, 0, 1, tie).named_parameters()}
        ranks = [{name: p for name, p in build_at(cls, r, 2, tie).named_parameters()} for r in (0, 1)]
        assert [sorted(r) for r in ranks] == [sorted(full)] * 2, cls.__name__
        for name, value in full.items():
            kind = tp_plan.split_kind(name)
            local = [ranks[r][name] for r in (0, 1)]
            assert all(p.is_distributed == (kind is not None) for p in local), (cls.__name__, name)
            assert list(local[0].shape) == tp_plan.local_shape(kind, value.shape, 2), (cls.__name__, name)
            assert tp_plan.full_shape(kind, local[0].shape, 2, TINY["vocab_size"]) == list(value.shape)
            for r in (0, 1):
                np.testing.assert_array_equal(local[r].numpy(), tp_plan.shard_param(name, value, 2, r))
            np.testing.assert_array_equal(tp_plan.merge_param(name, [p.numpy() for p in local], TINY["vocab_size"]),
                                          value)
            if kind is not None:
                split_seen.add((kind, name.rsplit(".", 1)[-1]))
    expected = {("column", "weight"), ("column", "bias"), ("row", "weight"), ("vocab", "weight"), ("vocab", "bias")}
    assert expected | ({("vocab", "decoder_weight")} if not tie else set()) == split_seen


def test_tp_plan_imports_without_paddle():
    source = open(os.path.join(REPO, "paddle_megatronbert", "tp_plan.py")).read()
    imported = {alias.name.split(".")[0] for node in ast.walk(ast.parse(source))
                if isinstance(node, (ast.Import, ast.ImportFrom)) for alias in node.names}
    assert "paddle" not in imported
    # and it really loads without paddle: the file alone, paddle made unimportable
    code = ("import sys, importlib.util; sys.modules['paddle'] = None; "
            f"spec = importlib.util.spec_from_file_location('tp_plan', {os.path.join(REPO, 'paddle_megatronbert', 'tp_plan.py')!r}); "
            "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m); print(m.split_kind('cls.predictions.bias'))")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "vocab"
