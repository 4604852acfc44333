"""Tensor, data and sharded-optimizer parallelism on CPU (gloo), issue 4.

The multi-process checks run in ``tests/dist/parallel_checks.py`` under ``paddle.distributed.launch`` with
2 CPU processes; each launch costs ~5-9 s, so one launch per scenario measures many things and writes
them to JSON, and the tests below assert on those numbers. Single-process tests cover the error paths
that must fire before any collective.
"""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from paddle_megatronbert import MegatronBertConfig, MegatronBertForPreTraining, parallel
from paddle_megatronbert.checkpoint.files import CONFIG_NAME, WEIGHTS_NAME, shard_weights_name
from paddle_megatronbert.distributed import (
    Topology,
    init_distributed,
    resolve_degrees,
    validate_tp_config,
    wrap_model,
    wrap_optimizer,
)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "tests", "dist", "parallel_checks.py")
LAUNCH_TIMEOUT_S = 120  # a hang fails the test instead of blocking the suite
VOCAB = 1001  # the launched script's vocab: not a multiple of 2 x 128
MERGED_FILES = sorted([CONFIG_NAME, WEIGHTS_NAME])  # what save_pretrained writes, merged or per TP rank
SHARD_FILES = sorted([CONFIG_NAME, shard_weights_name(0), shard_weights_name(1)])
FP32_ULPS = 8  # tolerance, in float32 ulps of the compared value, where only the summation order differs


def launch(scenario, tmp_path_factory, nproc=2):
    """Run one scenario under paddle.distributed.launch; (return code, [rank results], [worker logs], seconds)."""
    out = tmp_path_factory.mktemp(scenario)
    log_dir = out / "log"
    cmd = [sys.executable, "-m", "paddle.distributed.launch", "--nproc_per_node", str(nproc), "--log_dir",
           str(log_dir), SCRIPT, "--scenario", scenario, "--out", str(out)]
    env = {k: v for k, v in os.environ.items() if not k.startswith("PADDLE_")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=REPO)
    start = time.time()
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        output = proc.communicate(timeout=LAUNCH_TIMEOUT_S)[0].decode(errors="replace")
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the launcher and the workers it started
        proc.communicate()
        pytest.fail(f"scenario {scenario} hung: no exit within {LAUNCH_TIMEOUT_S} s")
    elapsed = time.time() - start
    logs = [(log_dir / f"workerlog.{r}").read_text(errors="replace") if (log_dir / f"workerlog.{r}").exists() else ""
            for r in range(nproc)]
    results = [json.loads((out / f"{scenario}.rank{r}.json").read_text())
               for r in range(nproc) if (out / f"{scenario}.rank{r}.json").exists()]
    if proc.returncode == 0 and len(results) != nproc:
        pytest.fail(f"scenario {scenario} exited 0 but wrote {len(results)} of {nproc} results:\n{output[-3000:]}")
    return proc.returncode, results, logs, elapsed, output


def ok_results(scenario, tmp_path_factory, nproc=2):
    rc, results, logs, _, output = launch(scenario, tmp_path_factory, nproc)
    assert rc == 0, f"scenario {scenario} failed (rc {rc}):\n{output[-2000:]}\n" + "\n".join(
        log[-3000:] for log in logs)
    return results


@pytest.fixture(scope="module")
def tp_results(tmp_path_factory):
    return ok_results("tp", tmp_path_factory)


@pytest.fixture(scope="module")
def dp_results(tmp_path_factory):
    return ok_results("dp", tmp_path_factory)


@pytest.fixture(scope="module")
def sharding_results(tmp_path_factory):
    return ok_results("sharding", tmp_path_factory)


# ---- TP=2 vs TP=1 -------------------------------------------------------------------------------------
def test_tp_shards_are_slices_of_the_tp1_weights(tp_results):
    assert [r["tp_rank"] for r in tp_results] == [0, 1]
    for r in tp_results:
        assert r["tp_degree"] == 2 and r["dp_degree"] == 1
        assert r["mp_sync_param"] is False  # replicated parameters are not re-broadcast after every step
        assert r["shard_max_diff"] == 0.0
        assert r["local_word_embedding_rows"] == 501  # ceil(1001 / 2): rank 1 holds one padding row
        sharded = set(r["sharded_names"])
        for i in (0, 1):
            layer = f"bert.encoder.layer.{i}."
            qkv = {layer + f"attention.self.{m}.{p}" for m in ("query", "key", "value") for p in ("weight", "bias")}
            assert qkv <= sharded
            assert {layer + "intermediate.dense.weight", layer + "intermediate.dense.bias",
                    layer + "attention.output.dense.weight", layer + "output.dense.weight"} <= sharded
            assert layer + "output.dense.bias" not in sharded  # added once, after the all-reduce
        assert {"bert.embeddings.word_embeddings.weight", "cls.predictions.bias"} <= sharded
        assert not any("ln." in n or "LayerNorm" in n or "pooler" in n for n in sharded)


@pytest.mark.parametrize("variant", ["pretraining", "qa", "cls", "pretraining_plain"])
def test_tp2_loss_and_gathered_grads_equal_tp1(tp_results, variant):
    expected_logits = {"pretraining": [4, 3, VOCAB], "qa": [4, 8], "cls": [4, 3]}[variant.split("_")[0]]
    for r in tp_results:
        m = r[variant]
        assert m["fast_kernels"] == (variant != "pretraining_plain")
        # float32 sums reordered over the ranks (row-parallel partial products, the vocab-split exp-sum): the
        # losses agree to a few ulps of their own size (one ulp of a loss of 7.6 is 9.5e-7)
        assert m["loss_diff"] <= FP32_ULPS * np.finfo(np.float32).eps * abs(m["ref_loss"]), m
        assert m["grad_max_diff"] <= 1e-5, m
        assert m["grad_names_compared"] >= 39
        assert m["replicated_grad_spread"] == 0.0  # replicated parameters get identical gradients on each rank
        assert m["logits_shape"] == expected_logits  # the full vocabulary, padding dropped
        assert m["logits_max_diff"] <= 1e-5
    assert tp_results[0][variant]["loss"] == tp_results[1][variant]["loss"]


@pytest.mark.parametrize("path", ["fast", "plain"])
def test_exactly_four_allreduces_per_layer_per_step(tp_results, path):
    for r in tp_results:
        assert r["allreduce"][path] == {
            "forward_per_layer": 2,  # attention output and 4h->h (row-parallel)
            "backward_per_layer": 2,  # input grads of QKV (one for the three) and h->4h (column-parallel)
            "forward_outside_layers": 4,  # vocab-parallel embedding + cross entropy's max, target, exp-sum
            "backward_outside_layers": 1,  # the LM head's input (tied vocab-parallel decoder)
        }


def test_five_adamw_steps_follow_the_tp1_loss_curve(tp_results):
    for r in tp_results:
        t = r["train"]
        assert r["train_first_grad_norm"] > r["clip_norm"]  # global-norm clipping is active
        assert t["max_diff"] <= 1e-5, t
        assert t["param_max_diff"] <= 1e-5
        assert t["first_to_last"] > 0.3  # the steps do train
        assert len(t["tp_losses"]) == 5


def test_checkpoint_tp2_to_tp1_and_back(tp_results):
    for r in tp_results:
        c = r["checkpoint"]
        assert c["merged_files"] == MERGED_FILES
        assert c["shard_files"] == SHARD_FILES
        for source in ("merged", "shards"):
            assert c[f"tp1_from_{source}_degree"] == 1
            assert c[f"tp1_from_{source}_param_diff"] == 0.0
            assert c[f"tp1_from_{source}_output_diff"] <= 1e-6
        assert c["tp2_from_tp1_degree"] == 2
        assert c["tp2_from_tp1_param_diff"] == 0.0
        assert c["tp2_from_tp1_output_diff"] == 0.0
        assert c["tp2_from_shards_output_diff"] == 0.0
        assert c["qa_body_diff"] == 0.0


def test_dropout_streams_follow_megatron_seeding(tp_results):
    for r in tp_results:
        rng = r["rng"]
        assert rng["outside_spread"] == 0.0  # shared stream outside the TP region
        assert rng["inside_spread"] > 0.1  # per-rank stream inside it
        assert rng["inside_vs_convention"] == 0.0  # seeded seed + 2718 + tp_rank
        assert rng["dropout_replicated_grad_spread"] == 0.0  # with dropout on, replicated grads still agree


# ---- data parallel and ZeRO-1 ----------------------------------------------------------------------------
def test_dp2_equals_one_process_on_the_full_batch(dp_results):
    assert sorted(r["dataset_rank"] for r in dp_results) == [0, 1]
    for r in dp_results:
        assert (r["dp_degree"], r["tp_degree"], r["sharding_degree"]) == (2, 1, 1)
        assert r["wrapper"] == "DataParallel"
        assert r["first_grad_norm"] > r["clip_norm"]
        assert r["loss_max_diff"] <= 1e-6, r
        assert r["param_max_diff"] <= 1e-6


def test_zero1_sharding_equals_one_process_and_splits_optimizer_state(sharding_results):
    for r in sharding_results:
        assert (r["dp_degree"], r["sharding_degree"]) == (1, 2)
        assert (r["wrapper"], r["inner_optimizer"]) == ("ShardingParallel", "DygraphShardingOptimizer")
        assert r["loss_max_diff"] <= 1e-6, r
        assert r["param_max_diff"] <= 1e-5
        assert 0 < r["moment_tensors_here"] < r["parameters_total"]
    assert sum(r["moment_tensors_here"] for r in sharding_results) == sharding_results[0]["parameters_total"]


# ---- the 2-D grid: 4 processes, tp=2 x dp=2 and tp=2 x sharding=2 ----------------------------------------
@pytest.fixture(scope="module")
def grid_tp_dp(tmp_path_factory):
    return ok_results("grid_tp_dp", tmp_path_factory, nproc=4)


@pytest.fixture(scope="module")
def grid_tp_sharding(tmp_path_factory):
    return ok_results("grid_tp_sharding", tmp_path_factory, nproc=4)


def test_grid_rank_layout_and_batches(grid_tp_dp, grid_tp_sharding):
    """fleet's layout: TP peers are neighbouring ranks; each replica (dp or sharding) takes its rows."""
    for results, replica_group in ((grid_tp_dp, "dp_group"), (grid_tp_sharding, "sharding_group")):
        assert [r["rank"] for r in results] == [0, 1, 2, 3]
        assert [r["tp_rank"] for r in results] == [0, 1, 0, 1]
        assert [r["tp_group"] for r in results] == ["0,1", "0,1", "2,3", "2,3"]
        assert [r[replica_group] for r in results] == ["0,2", "1,3", "0,2", "1,3"]
        assert [r["dataset_rank"] for r in results] == [0, 0, 1, 1]  # one batch per replica, shared by TP peers
        assert [r["batch_rows"] for r in results] == [[0, 2], [0, 2], [2, 4], [2, 4]]


@pytest.mark.parametrize("grid", ["grid_tp_dp", "grid_tp_sharding"])
def test_grid_five_steps_equal_one_process_on_the_global_batch(grid, request):
    for r in request.getfixturevalue(grid):
        assert r["first_grad_norm"] > r["clip_norm"]  # global-norm clipping is active
        assert r["loss_max_diff"] <= 1e-5, r  # the bound; measured 4.8e-7
        assert r["param_max_diff"] <= 1e-5
        assert r["ref_losses"][0] != r["ref_losses"][-1] and len(r["losses"]) == 5


def test_grid_collectives_go_to_their_groups(grid_tp_dp, grid_tp_sharding):
    """Per step of 2 layers: TP all-reduces only in the TP group (2 per layer each way, 4 + 1 outside the
    layers, as at tp=2 alone); the gradients over the dp group in one fused all-reduce, or (ZeRO-1) one
    reduce and one broadcast per parameter over the sharding group; the clipping norm summed over the TP
    peers once (the shards' squares) and, with sharding, over the sharding group; nothing on the world group."""
    for r in grid_tp_dp + grid_tp_sharding:
        tp, params = r["tp_group"], r["parameters_total"]
        assert r["collectives"]["forward"] == {f"all_reduce@{tp}": 2 * 2 + 4}
        assert r["collectives"]["backward"] == {f"all_reduce@{tp}": 2 * 2 + 1}
    for r in grid_tp_dp:
        assert r["collectives"]["optimizer"] == {f"all_reduce@{r['dp_group']}": 1, f"all_reduce@{r['tp_group']}": 1}
    for r in grid_tp_sharding:
        sharding = r["sharding_group"]
        assert r["collectives"]["optimizer"] == {
            f"reduce@{sharding}": r["parameters_total"], f"broadcast@{sharding}": r["parameters_total"],
            f"all_reduce@{sharding}": 2, f"all_reduce@{r['tp_group']}": 1}
        assert r["distributed_parameters"] == 22  # 2 layers x (QKV weights+biases, h->4h, 2 row weights) + 2 vocab


def test_grid_zero1_splits_the_optimizer_state_over_the_sharding_group(grid_tp_sharding):
    for r in grid_tp_sharding:
        assert r["inner_optimizer"] == "DygraphShardingOptimizer" and 0 < r["moment_tensors_here"] < r["parameters_total"]
    for tp_rank in (0, 1):  # the two sharding peers of a TP rank hold disjoint shares that cover every parameter
        peers = [r for r in grid_tp_sharding if r["tp_rank"] == tp_rank]
        assert sum(r["moment_tensors_here"] for r in peers) == peers[0]["parameters_total"]


def test_grid_dropout_streams_per_replica_and_tp_rank(grid_tp_dp):
    outside = [tuple(r["rng_outside"]) for r in grid_tp_dp]
    inside = [tuple(r["rng_inside"]) for r in grid_tp_dp]
    assert outside[0] == outside[1] and outside[2] == outside[3]  # shared by the TP peers of a replica
    assert outside[0] != outside[2]  # replicas (different examples) draw different masks
    assert len(set(inside)) == 4  # inside the TP region: one stream per (replica, TP rank)


def test_grid_checkpoint_loads_at_1x1_and_tp4(grid_tp_dp):
    for r in grid_tp_dp:
        c = r["checkpoint"]
        assert c["merged_files"] == MERGED_FILES
        assert c["shard_files"] == SHARD_FILES
        for source in ("merged", "shards"):
            assert c[f"tp1_from_{source}_degree"] == 1 and c[f"tp4_from_{source}_degree"] == 4
            assert c[f"tp1_from_{source}_param_diff"] == 0.0 and c[f"tp4_from_{source}_param_diff"] == 0.0
            assert c[f"tp4_from_{source}_word_rows"] == 251  # ceil(1001 / 4)
            # the same weights; the logits differ only in float32 summation order (~1e-7 measured)
            assert c[f"tp1_from_{source}_output_diff"] <= 1e-6 and c[f"tp4_from_{source}_output_diff"] <= 1e-6


# ---- bad input: a clear error on every rank, no hang ------------------------------------------------------
@pytest.mark.parametrize("scenario, nproc, message", [
    ("bad_world", 6, "world size 6 (processes launched) is not divisible by tensor_parallel_degree 4"),
    ("bad_heads", 4, "num_attention_heads (3) is not divisible by tensor_parallel_degree (2)"),
])
def test_bad_input_fails_on_every_rank_without_hanging(tmp_path_factory, scenario, nproc, message):
    rc, _, logs, elapsed, _ = launch(scenario, tmp_path_factory, nproc=nproc)
    assert rc != 0
    assert len(logs) == nproc
    for log in logs:
        assert f"ValueError: {message}" in log
        assert "HybridParallelInfo" not in log  # fleet never built its groups: no collective was reached
    assert elapsed < LAUNCH_TIMEOUT_S


# ---- single process: errors before any collective ----------------------------------------------------
def tiny(**overrides):
    base = dict(vocab_size=101, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64,
                max_position_embeddings=16)
    return MegatronBertConfig(**{**base, **overrides})


def test_validate_tp_config_lists_every_problem():
    with pytest.raises(ValueError, match=r"num_attention_heads \(3\) is not divisible.*hidden_size \(27\) is not "
                                         r"divisible.*intermediate_size \(63\)"):
        validate_tp_config(tiny(hidden_size=27, num_attention_heads=3, intermediate_size=63), 2)
    with pytest.raises(ValueError, match="config.tensor_parallel_degree is 1, the run uses 2"):
        validate_tp_config(tiny(), 2)
    validate_tp_config(tiny(tensor_parallel_degree=1), 1)
    with pytest.raises(ValueError, match=r"intermediate_size \(62\) is not divisible by tensor_parallel_degree \(4\)"):
        tiny(intermediate_size=62, tensor_parallel_degree=4)  # the config itself refuses


def test_degrees_are_checked_against_the_world_size():
    assert resolve_degrees(8, tensor_parallel_degree=2, sharding_degree=2) == (2, 2, 2)
    with pytest.raises(ValueError, match=r"world size 6 .* not divisible by tensor_parallel_degree 4"):
        resolve_degrees(6, tensor_parallel_degree=4)
    with pytest.raises(ValueError, match=r"world size 4 .* != data_parallel_degree 1 x tensor_parallel_degree 2 x "
                                         r"sharding_degree 1 = 2"):
        resolve_degrees(4, tensor_parallel_degree=2, data_parallel_degree=1)
    with pytest.raises(ValueError, match="tensor_parallel_degree must be an integer >= 1"):
        resolve_degrees(2, tensor_parallel_degree=0)


def test_init_distributed_refuses_before_fleet(monkeypatch):
    monkeypatch.setenv("PADDLE_TRAINERS_NUM", "2")
    monkeypatch.setenv("PADDLE_TRAINER_ID", "1")
    with pytest.raises(ValueError, match="world size 2"):
        init_distributed(tensor_parallel_degree=4)
    monkeypatch.setenv("PADDLE_TRAINERS_NUM", "6")
    with pytest.raises(ValueError, match=r"world size 6 .* not divisible by tensor_parallel_degree 4"):
        init_distributed(tensor_parallel_degree=4)


def test_single_process_topology_and_seeding():
    import paddle

    topo = init_distributed(seed=11)
    assert topo == Topology() and topo.is_main and (topo.dataset_rank, topo.dataset_world_size) == (0, 1)
    first = paddle.rand([3]).numpy()
    init_distributed(seed=11)
    np.testing.assert_array_equal(paddle.rand([3]).numpy(), first)
    model = MegatronBertForPreTraining(tiny())
    assert wrap_model(model, topo) is model
    optimizer = paddle.optimizer.AdamW(parameters=model.parameters())
    assert wrap_optimizer(optimizer, topo) is optimizer
    with pytest.raises(ValueError, match="stage 2 is not available on CPU"):
        wrap_optimizer(optimizer, topo, sharding_stage=2)


def test_tp_model_without_a_tp_group_is_refused():
    assert parallel.get_tensor_parallel_degree() == 1
    with pytest.raises(RuntimeError, match=r"tensor_parallel_degree=2 but the process group has 1.*init_distributed"):
        MegatronBertForPreTraining(tiny(tensor_parallel_degree=2))
