"""Process topology for tensor, data and sharded-optimizer parallelism, set up through fleet.

A runner calls, in this order::

    topo = init_distributed(tensor_parallel_degree=tp, sharding_degree=s, seed=42)  # before the model
    model = MegatronBertForPreTraining(config)        # config.tensor_parallel_degree == topo.tp_degree
    train_model = wrap_model(model, topo)              # forward/backward through this one
    optimizer = wrap_optimizer(build_optimizer(model, ...), topo)

and feeds every tensor-parallel rank of one replica the same batch: split the data by
``topo.dataset_rank`` over ``topo.dataset_world_size`` (dp x sharding), never by the global rank.
``model.save_pretrained`` is called on every rank (it gathers the shards over the TP group).

The ranks are laid out as fleet lays them out (``dp, pp, sharding, sep, mp``: tensor-parallel peers are
neighbouring ranks, so on a multi-GPU node they share the fast links). Any dp x tp x sharding grid runs, on
CPU (gloo) as on GPU: on CPU each process group gets a TCP store of its own (:func:`new_group`).
"""

from __future__ import annotations

import contextlib
import os
import random
from dataclasses import dataclass
from typing import Any, Optional

from . import parallel, tp_plan

MAX_SEED = 2**31 - 1 - parallel.TENSOR_PARALLEL_SEED_OFFSET - 1024  # room for seed + 2718 + tp_rank


@dataclass(frozen=True)
class Topology:
    """Where this process sits in the dp x sharding x tp grid.

    Args:
        world_size: processes launched.
        rank: this process' global rank.
        tp_degree, tp_rank: tensor-parallel degree and this process' rank in its TP group.
        dp_degree, dp_rank: data-parallel degree and rank.
        sharding_degree, sharding_rank: ZeRO (optimizer-state sharding) degree and rank; sharding ranks
            also take different data, like dp ranks.
        tp_group, dp_group, sharding_group: ``paddle.distributed`` groups (None in a single process).
    """

    world_size: int = 1
    rank: int = 0
    tp_degree: int = 1
    tp_rank: int = 0
    dp_degree: int = 1
    dp_rank: int = 0
    sharding_degree: int = 1
    sharding_rank: int = 0
    tp_group: Any = None
    dp_group: Any = None
    sharding_group: Any = None

    @property
    def is_main(self) -> bool:
        """Global rank 0: the process that logs and writes run-level files."""
        return self.rank == 0

    @property
    def dataset_rank(self) -> int:
        """Which slice of the data this process reads (TP peers read the same slice)."""
        return self.dp_rank * self.sharding_degree + self.sharding_rank

    @property
    def dataset_world_size(self) -> int:
        """Number of distinct data slices: dp x sharding."""
        return self.dp_degree * self.sharding_degree


def add_parallel_arguments(parser) -> None:
    """The grid flags every runner takes, in one argparse group; pass them to :func:`init_distributed`.

    ``--data_parallel_degree`` defaults to what is left of the launched world after tp x sharding, so
    ``paddle.distributed.launch --nproc_per_node 8 ... --tensor_parallel_degree 2`` runs 4 replicas.
    """
    group = parser.add_argument_group("parallelism (under python -m paddle.distributed.launch; "
                                      "world size = data x tensor x sharding)")
    group.add_argument("--tensor_parallel_degree", type=int, default=1,
                       help="ranks each layer is split over (neighbouring ranks: keep them on one node)")
    group.add_argument("--data_parallel_degree", type=int, default=None,
                       help="data-parallel replicas (default: world / (tensor_parallel_degree x sharding_degree))")
    group.add_argument("--sharding_degree", type=int, default=1,
                       help="ZeRO-1: the optimizer state split over N replicas (they also take different data)")
    group.add_argument("--sharding_stage", type=int, default=1, choices=[1, 2, 3],
                       help="ZeRO stage of --sharding_degree: 1 (optimizer state); 2/3 are refused (GPU-only in "
                            "Paddle, not wired into tensor parallelism here)")


def _launched_world_size() -> int:
    """Processes launched, from the environment ``paddle.distributed.launch`` sets (1 without it)."""
    return int(os.environ.get("PADDLE_TRAINERS_NUM", "1"))


def resolve_degrees(world_size: int, tensor_parallel_degree: int = 1, data_parallel_degree: Optional[int] = None,
                    sharding_degree: int = 1) -> tuple:
    """(dp, tp, sharding) with dp inferred when None; ValueError unless world_size == dp x tp x sharding."""
    for name, value in (("tensor_parallel_degree", tensor_parallel_degree), ("sharding_degree", sharding_degree),
                        ("data_parallel_degree", data_parallel_degree)):
        if value is not None and (not isinstance(value, int) or value < 1):
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    if data_parallel_degree is None:
        if world_size % (tensor_parallel_degree * sharding_degree) != 0:
            raise ValueError(
                f"world size {world_size} (processes launched) is not divisible by tensor_parallel_degree "
                f"{tensor_parallel_degree} x sharding_degree {sharding_degree}; launch a multiple of "
                f"{tensor_parallel_degree * sharding_degree} processes"
            )
        data_parallel_degree = world_size // (tensor_parallel_degree * sharding_degree)
    product = data_parallel_degree * tensor_parallel_degree * sharding_degree
    if product != world_size:
        raise ValueError(
            f"world size {world_size} (processes launched) != data_parallel_degree {data_parallel_degree} x "
            f"tensor_parallel_degree {tensor_parallel_degree} x sharding_degree {sharding_degree} = {product}"
        )
    return data_parallel_degree, tensor_parallel_degree, sharding_degree


def init_distributed(tensor_parallel_degree: int = 1, data_parallel_degree: Optional[int] = None,
                     sharding_degree: int = 1, seed: Optional[int] = None) -> Topology:
    """Set up fleet's hybrid topology (pp = 1), register the TP group and seed the RNG streams.

    The degrees are checked against the launched world size before any collective, so a bad combination
    fails on every rank with the same ValueError instead of hanging. In a single process nothing is
    initialised (no fleet), only the seeds. ``seed=None`` draws one seed on rank 0 and shares it, because
    every rank must build the same initial weights (each TP rank keeps its slice of one full draw).
    """
    world_size = _launched_world_size()
    dp, tp, sharding = resolve_degrees(world_size, tensor_parallel_degree, data_parallel_degree, sharding_degree)
    if seed is not None and not 0 <= int(seed) <= MAX_SEED:
        raise ValueError(f"seed must be in [0, {MAX_SEED}], got {seed}")
    if world_size == 1:
        parallel.set_tensor_parallel_group(None, 0, 1)
        _seed_all(random.randint(0, MAX_SEED) if seed is None else int(seed))
        return Topology()

    import paddle
    import paddle.distributed as dist
    from paddle.distributed import fleet

    from paddle.distributed.fleet.utils import log_util

    log_util.set_log_level("WARNING")  # before the strategy object, which logs an INFO line when it is built
    strategy = fleet.DistributedStrategy()
    strategy.hybrid_configs = {
        "dp_degree": dp, "mp_degree": tp, "pp_degree": 1, "sharding_degree": sharding,
        # fleet's default re-broadcasts every LayerNorm/bias/embedding over the TP group after each step; the
        # replicated parameters get identical gradients on every TP rank (tested), so, as in Megatron and
        # PaddleNLP's default, they are not re-synchronised.
        "mp_configs": {"sync_param": False},
    }
    with _fleet_groups_on_own_stores(), _quiet_fleet_start():
        fleet.init(is_collective=True, strategy=strategy, log_level="WARNING")
    hcg = fleet.get_hybrid_communicate_group()
    topo = Topology(
        world_size=world_size,
        rank=dist.get_rank(),
        tp_degree=tp,
        tp_rank=hcg.get_model_parallel_rank(),
        dp_degree=dp,
        dp_rank=hcg.get_data_parallel_rank(),
        sharding_degree=sharding,
        sharding_rank=hcg.get_sharding_parallel_rank(),
        tp_group=hcg.get_model_parallel_group(),
        dp_group=hcg.get_data_parallel_group(),
        sharding_group=hcg.get_sharding_parallel_group(),
    )
    parallel.set_tensor_parallel_group(topo.tp_group if tp > 1 else None, topo.tp_rank, tp,
                                       replica_rank=topo.dataset_rank)
    if seed is None:
        shared = paddle.to_tensor([random.randint(0, MAX_SEED) if topo.is_main else 0], dtype="int64")
        dist.broadcast(shared, src=0)
        seed = int(shared.item())
    _seed_all(int(seed))
    return topo


# ---- process groups over gloo (CPU) -------------------------------------------------------------------
# Measured with Paddle 3.3.1 over gloo, 4 processes: building the groups of a grid one after the other
# ([0, 1], [2, 3], [0, 2], [1, 3], [0, 1, 2, 3] ...) fails at random with "connect ... Connection refused",
# "sizeof(impl_) == bytes.size(). 136 vs 45" or a hang in ProcessGroupGloo.create, with or without a barrier
# after each group. The cause is in Paddle's C++: ProcessGroupGloo's constructor runs a second gloo
# rendezvous on the *unprefixed* keys "0", "1", ... of the shared TCP store, so every group overwrites
# (and may read a stale copy of) the previous group's addresses. Giving each group's rendezvous a TCP store
# of its own removes the collision; the collectives themselves use Paddle's prefixed context as before.
_GROUP_STORES = []  # the per-group stores must outlive their groups
_GROUPS_MADE = [0]


def new_group(ranks, **kwargs):
    """``paddle.distributed.new_group`` whose gloo rendezvous runs on a TCP store of its own.

    Every process must call it for every group, in the same order (fleet does); the lowest member hosts the
    group's store and announces its port on the default store. Off CPU (NCCL) it is Paddle's own.
    """
    import paddle
    import paddle.distributed as dist
    from paddle.distributed import collective

    ranks = sorted(int(r) for r in ranks)
    _GROUPS_MADE[0] += 1
    me = dist.get_rank()
    if paddle.get_device() != "cpu" or len(ranks) < 2 or me not in ranks:
        return collective.new_group(ranks=ranks, **kwargs)
    import socket

    from paddle.base import core

    default_store = collective._default_store
    endpoints = os.environ.get("PADDLE_TRAINER_ENDPOINTS", "").split(",")
    host = endpoints[ranks[0]].split(":")[0] if len(endpoints) > ranks[0] else "127.0.0.1"
    key = f"paddle_megatronbert/group_store/{_GROUPS_MADE[0]}/{','.join(map(str, ranks))}"
    if me == ranks[0]:
        with socket.socket() as probe:  # a free port for this group's store
            probe.bind(("", 0))
            port = probe.getsockname()[1]
        default_store.set(key, str(port).encode())
        store = core.TCPStore(host, port, True, len(ranks), 900)
    else:
        default_store.wait(key)
        store = core.TCPStore(host, int(bytes(default_store.get(key)).decode()), False, len(ranks), 900)
    _GROUP_STORES.append(store)
    collective._default_store = store
    try:
        return collective.new_group(ranks=ranks, **kwargs)
    finally:
        collective._default_store = default_store


class _DropModifiedFlagsBlock:
    """A stderr wrapper that drops the "Modified FLAGS detected" block ``init_parallel_env`` writes on every
    rank (our process settings are deliberate, see ``ops.apply_cpu_process_settings``); every other write passes."""

    def __init__(self, stream):
        self.stream, self.in_block = stream, False

    def write(self, text):
        if "Modified FLAGS detected" in text:
            self.in_block = True
        elif self.in_block and text.startswith("====="):
            self.in_block = False
        elif not self.in_block:
            return self.stream.write(text)
        return len(text)

    def __getattr__(self, name):
        return getattr(self.stream, name)


@contextlib.contextmanager
def _quiet_fleet_start():
    """fleet.init's start-up chatter off (issue 17 item 10; its INFO lines go with ``log_level="WARNING"``): the
    "Current global rank N is not in group" warning (every rank builds every group of the grid, as Paddle
    requires) and the modified-flags block. Its warnings and errors stay."""
    import sys
    import warnings

    stderr = sys.stderr
    sys.stderr = _DropModifiedFlagsBlock(stderr)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r"Current global rank \d+ is not in group")
            yield
    finally:
        sys.stderr = stderr


@contextlib.contextmanager
def _fleet_groups_on_own_stores():
    """While fleet builds its topology, its ``paddle.distributed.new_group`` calls go to :func:`new_group`."""
    import paddle.distributed as dist

    original = dist.new_group

    def fleet_new_group(ranks=None, **kwargs):
        return new_group(ranks, **kwargs)

    dist.new_group = fleet_new_group
    try:
        yield
    finally:
        dist.new_group = original


def _seed_all(seed: int) -> None:
    import numpy as np

    random.seed(seed)
    np.random.seed(seed)
    parallel.seed_tensor_parallel_rng(seed)


def validate_tp_config(config, tensor_parallel_degree: int) -> None:
    """ValueError (one line, every problem listed) unless ``config`` splits evenly over the TP ranks.

    Call it before :func:`init_distributed` or before building the model: it needs no collective, so every
    rank fails the same way. The vocabulary need not divide (the last rank's slice is padded).
    """
    tp = tensor_parallel_degree
    problems = tp_plan.divisibility_problems(config, tp)
    if config.tensor_parallel_degree != tp:
        problems.append(f"config.tensor_parallel_degree is {config.tensor_parallel_degree}, the run uses {tp}")
    if problems:
        raise ValueError("; ".join(problems))


def wrap_model(model, topo: Topology):
    """The module to run forward/backward through, with gradients synchronised over dp (and sharding).

    - one process: ``model`` itself;
    - tp = 1: ``fleet.distributed_model`` (``paddle.DataParallel`` over the dp group, or fleet's
      ``ShardingParallel`` with ZeRO), which all-reduces gradients in the backward pass;
    - tp > 1: ``model`` itself after broadcasting the replicated parameters from the first rank of each
      group. fleet's ``TensorParallel`` wrapper is not used: it broadcasts every input over the TP group
      with a device check that fails on CPU. The dp gradient all-reduce is then done by the optimizer of
      :func:`wrap_optimizer` (fleet's HybridParallelOptimizer), so use both.

    The broadcasts also make every replica start from replica 0's weights: replicas seed their dropout streams
    differently (``parallel.replica_seed``), so freshly initialised weights differ until then.
    Keep a reference to the unwrapped ``model`` for ``save_pretrained`` (or use :func:`unwrap_model`).
    """
    if topo.world_size == 1:
        return model
    from paddle.distributed import fleet

    if topo.tp_degree == 1:
        return fleet.distributed_model(model)
    from paddle.distributed.fleet.utils.hybrid_parallel_util import (
        broadcast_dp_parameters,
        broadcast_mp_parameters,
        broadcast_sharding_parameters,
    )

    hcg = fleet.get_hybrid_communicate_group()
    broadcast_mp_parameters(model, hcg, fuse_params=False)  # skips the is_distributed shards
    if topo.sharding_degree > 1:
        broadcast_sharding_parameters(model, hcg, fuse_params=False)
    if topo.dp_degree > 1:
        broadcast_dp_parameters(model, hcg, fuse_params=False)
    return model


def unwrap_model(model):
    """The model inside a ``paddle.DataParallel`` / fleet wrapper (itself when not wrapped)."""
    while hasattr(model, "_layers"):
        model = model._layers
    return model


def sharding_stage_problem(sharding_stage: int):
    """Why a ZeRO stage cannot run here (a runner reports it before any work), or None for stage 1."""
    if sharding_stage not in (1, 2, 3):
        return f"sharding_stage must be 1, 2 or 3, got {sharding_stage}"
    if sharding_stage > 1:
        import paddle

        where = "on CPU: Paddle's group_sharded_parallel runs only on GPU, XPU and custom devices" if (
            paddle.get_device() == "cpu") else "here: this project wires only stage 1 into tensor parallelism"
        return (f"ZeRO sharding stage {sharding_stage} is not available {where}; use stage 1 "
                "(--sharding_degree N shards the optimizer state)")
    return None


def wrap_optimizer(optimizer, topo: Topology, sharding_stage: int = 1):
    """fleet's HybridParallelOptimizer around ``optimizer`` in a multi-process run.

    It computes global-norm clipping over the TP shards counted once (parameters marked
    ``is_distributed``), all-reduces dp gradients when tp > 1, and with ``sharding_degree > 1`` shards the
    optimizer state over the sharding group (ZeRO stage 1, fleet's ``DygraphShardingOptimizer``).
    Stages 2 and 3 (gradient / parameter sharding, ``group_sharded_parallel``) are refused: Paddle runs
    them only on GPU/XPU, and they are not wired into this model's tensor-parallel layers.
    """
    problem = sharding_stage_problem(sharding_stage)
    if problem:
        raise ValueError(problem)
    if topo.world_size == 1:
        return optimizer
    from paddle.distributed import fleet

    return fleet.distributed_optimizer(optimizer)
