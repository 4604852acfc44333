"""Tensor-parallel layers and their autograd mappings: the only module that knows about ranks.

fleet's ``meta_parallel`` layers have no CPU kernels (``c_identity``/``c_split`` and the parallel
cross-entropy fail on CPU), so the Megatron mappings are written here as ``PyLayer``s over
``paddle.distributed`` collectives, which run over gloo on CPU and NCCL on GPU.

At ``tensor_parallel_degree == 1`` every layer here is the plain Paddle layer (no group, no collective),
so the model reads as a plain BERT.
"""

from __future__ import annotations

import contextlib

import paddle
import paddle.distributed as dist
import paddle.nn as nn
import paddle.nn.functional as F
from paddle.autograd import PyLayer

from . import tp_plan

# ---- the tensor-parallel group -------------------------------------------------------------------
_TP_GROUP = None  # paddle.distributed group of this rank's tensor-parallel peers
_TP_RANK = 0
_TP_DEGREE = 1
_REPLICA_RANK = 0  # which copy of the (tensor-parallel) model this process holds among dp x sharding copies


def set_tensor_parallel_group(group, rank: int, degree: int, replica_rank: int = 0) -> None:
    """Register the tensor-parallel group (called once by :func:`distributed.init_distributed`).

    ``replica_rank`` numbers the data-parallel (and sharding) copies of the model; only copy 0 writes
    checkpoints, so dp ranks do not write the same file at once.
    """
    global _TP_GROUP, _TP_RANK, _TP_DEGREE, _REPLICA_RANK
    _TP_GROUP, _TP_RANK, _TP_DEGREE, _REPLICA_RANK = group, rank, degree, replica_rank


def get_tensor_parallel_group():
    return _TP_GROUP


def get_tensor_parallel_rank() -> int:
    return _TP_RANK


def get_tensor_parallel_degree() -> int:
    return _TP_DEGREE


def get_replica_rank() -> int:
    return _REPLICA_RANK


def _check_degree(degree: int) -> None:
    if degree > 1 and _TP_DEGREE != degree:
        raise RuntimeError(
            f"the model asks for tensor_parallel_degree={degree} but the process group has "
            f"{_TP_DEGREE}: call paddle_megatronbert.distributed.init_distributed(tensor_parallel_degree="
            f"{degree}) under paddle.distributed.launch before building the model"
        )


def gather_full_array(value, kind, full_size=None):
    """The full numpy tensor of a tensor-parallel-split parameter, from every TP rank's shard (``value``: a
    Paddle tensor or array of this rank's shard, split as ``kind``): a collective over the TP group, so every
    rank of the group calls it. The one gather that saving merged weights and resizing embeddings share."""
    pieces = []
    dist.all_gather(pieces, value if isinstance(value, paddle.Tensor) else paddle.to_tensor(value), group=_TP_GROUP)
    return tp_plan.merge([p.numpy() for p in pieces], kind, full_size)


# ---- autograd mappings (Megatron's mappings.py) ---------------------------------------------------
def _all_reduce(tensor, group):
    out = tensor.clone()
    dist.all_reduce(out, group=group)
    return out


def _gather_last_dim(tensor, group, degree):
    pieces = []
    dist.all_gather(pieces, tensor, group=group)
    return paddle.concat(pieces, axis=-1)


def _split_last_dim(tensor, rank, degree):
    size = tensor.shape[-1] // degree
    return tensor[..., rank * size : (rank + 1) * size].clone()


class _CopyToRegion(PyLayer):
    """Identity forward, all-reduce of the gradient backward (the input of a column-parallel layer)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return _all_reduce(grad, ctx.group)


class _ReduceFromRegion(PyLayer):
    """All-reduce forward, identity backward (the output of a row-parallel layer)."""

    @staticmethod
    def forward(ctx, x, group):
        return _all_reduce(x, group)

    @staticmethod
    def backward(ctx, grad):
        return grad


class _GatherFromRegion(PyLayer):
    """All-gather along the last dim forward, keep this rank's slice backward."""

    @staticmethod
    def forward(ctx, x, group, rank, degree):
        ctx.rank, ctx.degree = rank, degree
        return _gather_last_dim(x, group, degree)

    @staticmethod
    def backward(ctx, grad):
        return _split_last_dim(grad, ctx.rank, ctx.degree)


def copy_to_tensor_parallel_region(x):
    if _TP_DEGREE == 1:
        return x
    return _CopyToRegion.apply(x, _TP_GROUP)


def reduce_from_tensor_parallel_region(x):
    if _TP_DEGREE == 1:
        return x
    return _ReduceFromRegion.apply(x, _TP_GROUP)


def gather_from_tensor_parallel_region(x):
    if _TP_DEGREE == 1:
        return x
    return _GatherFromRegion.apply(x, _TP_GROUP, _TP_RANK, _TP_DEGREE)


# ---- layers ---------------------------------------------------------------------------------------
class ColumnParallelLinear(nn.Layer):
    """``y = x W + b`` with ``W`` split along its output dim: each rank computes a slice of ``y``.

    Args:
        in_features: input width (full).
        out_features: output width (full); must divide by the tensor-parallel degree.
        degree: tensor-parallel degree (1 = a plain ``nn.Linear``).
        gather_output: all-gather the output slices into the full ``y``. Megatron keeps it False for
            QKV and h->4h, whose consumers work per head / per column.
        reduce_input_grad: all-reduce the gradient of ``x`` over the ranks (``copy_to_tensor_parallel_region``).
            False when the caller has already passed ``x`` through that copy once for several layers that
            share it (Q, K and V): their input gradients then add up locally and are all-reduced once,
            as with Megatron's fused QKV.
        weight_attr, bias_attr: Paddle parameter attributes (initialisers).
    """

    def __init__(self, in_features, out_features, degree=1, gather_output=False, reduce_input_grad=True,
                 weight_attr=None, bias_attr=None):
        super().__init__()
        _check_degree(degree)
        self.degree, self.gather_output, self.reduce_input_grad = degree, gather_output, reduce_input_grad
        weight_shape = tp_plan.local_shape(tp_plan.COLUMN, [in_features, out_features], degree)
        self.weight = self.create_parameter(weight_shape, attr=weight_attr)
        self.bias = self.create_parameter(weight_shape[1:], attr=bias_attr, is_bias=True)
        self.weight.is_distributed = self.bias.is_distributed = degree > 1

    def matmul_without_bias(self, x):
        """``x W`` on this rank's columns, with the layer's communication; None with ``gather_output``
        (the gather must follow the bias). The fast kernels add the bias in their fused op."""
        if self.degree > 1 and self.gather_output:
            return None
        x = copy_to_tensor_parallel_region(x) if self.degree > 1 and self.reduce_input_grad else x
        return paddle.matmul(x, self.weight)

    def forward(self, x):
        x = copy_to_tensor_parallel_region(x) if self.degree > 1 and self.reduce_input_grad else x
        y = F.linear(x, self.weight, self.bias)
        return gather_from_tensor_parallel_region(y) if self.degree > 1 and self.gather_output else y


class RowParallelLinear(nn.Layer):
    """``y = x W + b`` with ``W`` split along its input dim; partial products are all-reduced.

    Args:
        in_features: input width (full); must divide by the tensor-parallel degree.
        out_features: output width.
        degree: tensor-parallel degree (1 = a plain ``nn.Linear``).
        weight_attr, bias_attr: Paddle parameter attributes. The bias is replicated and added once,
            after the all-reduce.
    """

    def __init__(self, in_features, out_features, degree=1, weight_attr=None, bias_attr=None):
        super().__init__()
        _check_degree(degree)
        self.degree = degree
        self.weight = self.create_parameter(tp_plan.local_shape(tp_plan.ROW, [in_features, out_features], degree),
                                            attr=weight_attr)
        self.bias = self.create_parameter([out_features], attr=bias_attr, is_bias=True)
        self.weight.is_distributed = degree > 1

    def matmul_without_bias(self, x):
        """``x W`` summed over the ranks (the all-reduce comes before the replicated bias)."""
        y = paddle.matmul(x, self.weight)
        return reduce_from_tensor_parallel_region(y) if self.degree > 1 else y

    def forward(self, x):
        if self.degree == 1:
            return F.linear(x, self.weight, self.bias)
        return self.matmul_without_bias(x) + self.bias


class VocabParallelEmbedding(nn.Layer):
    """Embedding whose rows (the vocabulary) are split over the ranks; out-of-slice ids give zeros,
    and the all-reduce sums the one rank that holds each id.

    Args:
        num_embeddings: vocabulary size (full). When it does not divide by ``degree`` the last rank's
            slice is padded with rows no id reaches.
        embedding_dim: width.
        degree: tensor-parallel degree (1 = a plain ``nn.Embedding``).
        weight_attr: parameter attribute (initialiser).
    """

    def __init__(self, num_embeddings, embedding_dim, degree=1, weight_attr=None):
        super().__init__()
        _check_degree(degree)
        self.degree, self.num_embeddings = degree, num_embeddings
        self.per_partition = tp_plan.local_shape(tp_plan.VOCAB, [num_embeddings], degree)[0]
        self.vocab_start = _TP_RANK * self.per_partition if degree > 1 else 0
        self.weight = self.create_parameter([self.per_partition, embedding_dim], attr=weight_attr)
        self.weight.is_distributed = degree > 1

    def forward(self, ids):
        if self.degree == 1:
            return F.embedding(ids, self.weight)
        local = ids - self.vocab_start
        outside = (local < 0) | (local >= self.per_partition)
        local = paddle.where(outside, paddle.zeros_like(local), local)
        out = F.embedding(local, self.weight)
        out = out * (~outside).astype(out.dtype).unsqueeze(-1)
        return reduce_from_tensor_parallel_region(out)


# ---- vocab-parallel cross entropy ----------------------------------------------------------------
class _VocabParallelCrossEntropy(PyLayer):
    """Per-position cross entropy of logits split on the vocab dim (Megatron's cross_entropy.py).

    All-reduces: MAX of the logits, SUM of the target logit, SUM of the exp-sum. Positions whose label
    is ``ignore_index`` give 0 loss and 0 gradient.
    """

    @staticmethod
    def forward(ctx, logits, labels, vocab_start, vocab_size_valid, group, ignore_index):
        # logits: (N, V_local) float32, labels: (N,) int64 global ids
        logits_max = logits.max(axis=-1, keepdim=True)
        dist.all_reduce(logits_max, op=dist.ReduceOp.MAX, group=group)
        shifted = logits - logits_max
        per_partition = logits.shape[-1]
        local = labels - vocab_start
        outside = (local < 0) | (local >= per_partition)
        safe_local = paddle.where(outside, paddle.zeros_like(local), local)
        target = paddle.take_along_axis(shifted, safe_local.unsqueeze(-1), axis=-1).squeeze(-1)
        target = target * (~outside).astype(target.dtype)
        dist.all_reduce(target, group=group)
        exp = shifted.exp()
        if vocab_size_valid < per_partition:  # padded rows on this rank never win probability mass
            col = paddle.arange(per_partition).unsqueeze(0)
            exp = exp * (col < vocab_size_valid).astype(exp.dtype)
        sum_exp = exp.sum(axis=-1)
        dist.all_reduce(sum_exp, group=group)
        loss = sum_exp.log() - target
        ignored = labels == ignore_index
        loss = loss * (~ignored).astype(loss.dtype)
        softmax = exp / sum_exp.unsqueeze(-1)
        ctx.save_for_backward(softmax, safe_local, outside, ignored)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        softmax, safe_local, outside, ignored = ctx.saved_tensor()
        one_hot = F.one_hot(safe_local, softmax.shape[-1]) * (~outside).astype(softmax.dtype).unsqueeze(-1)
        keep = ((~ignored).astype(softmax.dtype) * grad_loss).unsqueeze(-1)
        return (softmax - one_hot) * keep, None  # no gradient for the labels


def vocab_parallel_cross_entropy(logits, labels, vocab_size, ignore_index=-100):
    """Per-position loss (N,) of ``logits`` (N, V_local) against ``labels`` (N,); 0 where ignored.

    At degree 1 ``logits`` holds the whole vocabulary and this is plain cross entropy.
    """
    if _TP_DEGREE == 1:
        safe = paddle.where(labels == ignore_index, paddle.zeros_like(labels), labels)
        loss = F.cross_entropy(logits, safe.unsqueeze(-1), reduction="none").squeeze(-1)
        return loss * (labels != ignore_index).astype(loss.dtype)
    per_partition = logits.shape[-1]
    vocab_start = _TP_RANK * per_partition
    valid = max(0, min(per_partition, vocab_size - vocab_start))
    return _VocabParallelCrossEntropy.apply(logits, labels, vocab_start, valid, _TP_GROUP, ignore_index)


def gather_vocab_logits(logits, vocab_size):
    """Full-vocabulary logits from vocab-parallel ones (padding rows dropped)."""
    if _TP_DEGREE == 1:
        return logits
    return gather_from_tensor_parallel_region(logits)[..., :vocab_size]


# ---- dropout RNG ---------------------------------------------------------------------------------
# Megatron's convention (tensor_parallel/random.py, model_parallel_cuda_manual_seed): the default stream
# is seeded with ``seed`` on every tensor-parallel rank, so dropout outside the TP region (embeddings,
# residual branches, replicated activations) is the same on the TP peers of a replica; the stream used
# inside the region (attention probabilities, which each rank holds for its own heads) is seeded
# ``seed + 2718 + tp_rank``. Replicas (data-parallel / sharding copies, which see different examples) each
# take their own ``seed``: replica r uses ``seed + r * REPLICA_SEED_STRIDE``, so replica 0 draws what one
# process would. The replicas' initial weights may then differ; ``distributed.wrap_model`` broadcasts
# replica 0's before training.
TENSOR_PARALLEL_SEED_OFFSET = 2718
REPLICA_SEED_STRIDE = 2**20  # > 2718 + any TP degree: a replica's streams never meet another's
_TP_RNG_NAME = "model_parallel_rng"  # fleet's MODEL_PARALLEL_RNG: fleet's own parallel layers use it too


def replica_seed(seed: int, replica_rank: int) -> int:
    """The seed of replica ``replica_rank``'s default (outside the TP region) stream."""
    return int(seed) + REPLICA_SEED_STRIDE * int(replica_rank)


def seed_tensor_parallel_rng(seed: int) -> None:
    """Seed this replica's shared stream with ``replica_seed(seed, replica)`` and this rank's
    tensor-parallel stream with that + 2718 + tp_rank (paddle's default generator and fleet's RNG state
    tracker)."""
    from paddle.distributed.fleet.meta_parallel import get_rng_state_tracker

    shared = replica_seed(seed, _REPLICA_RANK)
    tracker = get_rng_state_tracker()
    tracker.reset()
    tracker.add(_TP_RNG_NAME, shared + TENSOR_PARALLEL_SEED_OFFSET + _TP_RANK)
    paddle.seed(shared)


@contextlib.contextmanager
def tensor_parallel_rng():
    """Dropout inside the TP region draws from a per-rank stream; outside it, the shared stream."""
    if _TP_DEGREE == 1:
        yield
        return
    from paddle.distributed.fleet.meta_parallel import get_rng_state_tracker

    tracker = get_rng_state_tracker()
    if _TP_RNG_NAME not in tracker.states_:
        raise RuntimeError("the tensor-parallel dropout stream is not seeded: call "
                           "paddle_megatronbert.distributed.init_distributed(..., seed=...) first")
    with tracker.rng_state(_TP_RNG_NAME):
        yield
