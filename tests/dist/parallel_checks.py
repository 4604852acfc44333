"""Checks that need several processes, launched by tests/test_parallel.py through
``python -m paddle.distributed.launch --nproc_per_node N ... tests/dist/parallel_checks.py --scenario S --out DIR``.

Each rank writes its measurements to ``DIR/S.rank{R}.json``; the pytest side asserts on them, so one launch
(~7 s of fleet start-up on CPU) serves many checks. Scenarios:

- ``tp``: tensor parallelism at TP=2 against TP=1 references computed in the same processes;
- ``dp``: data parallelism (dp=2, paddle.DataParallel) against one process on the full batch;
- ``sharding``: ZeRO stage 1 (sharding=2) against one process on the full batch;
- ``grid_tp_dp`` / ``grid_tp_sharding`` (4 processes): pretraining on tp=2 x dp=2 and tp=2 x sharding=2
  against one process on the global batch, collectives per group, dropout streams, checkpoints at 1 x 1
  and tp=4;
- ``bad_world`` (6 processes, tp=4) / ``bad_heads`` (4 processes, 3 heads at tp=2): a runner's start-up with
  bad degrees / a config TP cannot split: must fail on every rank before any collective.
"""

import argparse
import contextlib
import json
import os
import sys

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))

import numpy as np  # noqa: E402
import paddle  # noqa: E402
import paddle.distributed as dist  # noqa: E402

from paddle_megatronbert import (  # noqa: E402
    MegatronBertConfig,
    MegatronBertForPreTraining,
    MegatronBertForQuestionAnswering,
    MegatronBertForSequenceClassification,
    ops,
    parallel,
    tp_plan,
)
from paddle_megatronbert.distributed import (  # noqa: E402
    init_distributed,
    new_group,
    validate_tp_config,
    wrap_model,
    wrap_optimizer,
)
from paddle_megatronbert.training import build_optimizer  # noqa: E402

SEED = 1234
# vocab 1001 is not a multiple of 2 x 128 (nor of 2): the second rank's vocab slice carries one padding row.
TINY = dict(vocab_size=1001, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
            max_position_embeddings=16, type_vocab_size=2, hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0, num_labels=3)
BATCH, SEQ, MASKED = 4, 8, 3
CLIP_NORM = 0.2  # below the first step's gradient norm: clipping is active in the training checks


def tiny_config(**overrides):
    return MegatronBertConfig(**{**TINY, **overrides})


def make_batch(seed, batch=BATCH):
    """One batch with every head's labels; ids reach both vocab slices, including the last id."""
    rng = np.random.RandomState(seed)
    vocab = TINY["vocab_size"]
    input_ids = rng.randint(1, vocab, size=(batch, SEQ))
    input_ids[0, 1] = vocab - 1
    attention_mask = np.ones((batch, SEQ))
    attention_mask[1, -3:] = 0
    positions = np.stack([rng.choice(np.arange(1, SEQ), MASKED, replace=False) for _ in range(batch)])
    labels = rng.randint(0, vocab, size=(batch, MASKED))
    labels[0, 0], labels[1, 0] = vocab - 1, 0  # the last real row of the padded slice, and the first row
    labels[batch - 1, MASKED - 1] = -100  # a padded prediction slot
    token_type_ids = (np.arange(SEQ) >= SEQ // 2)[None].repeat(batch, 0)
    arrays = dict(
        input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids,
        masked_lm_positions=positions, labels=labels, next_sentence_label=rng.randint(0, 2, size=(batch,)),
        start_positions=rng.randint(0, SEQ, size=(batch,)), end_positions=rng.randint(0, SEQ, size=(batch,)),
        class_labels=rng.randint(0, TINY["num_labels"], size=(batch,)),
    )
    return {k: v.astype("float32" if k == "attention_mask" else "int64") for k, v in arrays.items()}


def head_inputs(head, batch, rows=slice(None)):
    """Forward keyword arguments of ``head`` for ``batch[rows]``, as tensors."""
    names = {
        "pretraining": ("masked_lm_positions", "labels", "next_sentence_label"),
        "qa": ("start_positions", "end_positions"),
        "cls": ("class_labels",),
    }[head]
    kwargs = {k: paddle.to_tensor(batch[k][rows]) for k in ("input_ids", "attention_mask", "token_type_ids")}
    for name in names:
        kwargs["labels" if name == "class_labels" else name] = paddle.to_tensor(batch[name][rows])
    return kwargs


HEADS = {
    "pretraining": MegatronBertForPreTraining,
    "qa": MegatronBertForQuestionAnswering,
    "cls": MegatronBertForSequenceClassification,
}


@contextlib.contextmanager
def single_process_view():
    """Build and run TP=1 reference models inside a TP=2 process (the TP group is hidden meanwhile)."""
    saved = (parallel._TP_GROUP, parallel._TP_RANK, parallel._TP_DEGREE, parallel._REPLICA_RANK)
    parallel.set_tensor_parallel_group(None, 0, 1)
    try:
        yield
    finally:
        parallel.set_tensor_parallel_group(*saved)


def build(head, seed=SEED, **overrides):
    paddle.seed(seed)
    return HEADS[head](tiny_config(**overrides))


def max_abs(a, b):
    return float(np.max(np.abs(np.asarray(a, dtype="float64") - np.asarray(b, dtype="float64"))))


def gather_full(name, local, topo):
    """The full tensor of a parameter (or its gradient) from every TP rank's shard."""
    kind = tp_plan.split_kind(name)
    if kind is None or topo.tp_degree == 1:
        return local
    pieces = []
    dist.all_gather(pieces, paddle.to_tensor(local), group=topo.tp_group)
    return tp_plan.merge([p.numpy() for p in pieces], kind, TINY["vocab_size"])


def same_on_all_tp_ranks(local, topo):
    pieces = []
    dist.all_gather(pieces, paddle.to_tensor(local), group=topo.tp_group)
    return max(max_abs(pieces[0].numpy(), p.numpy()) for p in pieces)


class AllReduceCounter:
    """Counts paddle.distributed.all_reduce calls (parallel.py calls it through the module attribute)."""

    def __init__(self):
        self.count, self._original = 0, dist.all_reduce

    def __enter__(self):
        def counting(*args, **kwargs):
            self.count += 1
            return self._original(*args, **kwargs)

        dist.all_reduce = counting
        return self

    def __exit__(self, *exc):
        dist.all_reduce = self._original


# ---- scenarios ------------------------------------------------------------------------------------
def scenario_tp(args):
    topo = init_distributed(tensor_parallel_degree=2, seed=SEED)
    from paddle.distributed import fleet

    result = dict(tp_degree=topo.tp_degree, tp_rank=topo.tp_rank, dp_degree=topo.dp_degree, clip_norm=CLIP_NORM,
                  mp_sync_param=fleet.fleet._user_defined_strategy.hybrid_configs["mp_configs"].sync_param)
    batch = make_batch(0)

    # 1. each TP=2 shard is the slice of the TP=1 weight built with the same seed
    with single_process_view():
        reference = build("pretraining")
    model = build("pretraining", tensor_parallel_degree=2)
    full_ref = reference.full_state_dict()
    result["shard_max_diff"] = max(
        max_abs(value.numpy(), tp_plan.shard_param(name, full_ref[name], 2, topo.tp_rank))
        for name, value in model.state_dict().items()
    )
    result["sharded_names"] = sorted(n for n, p in model.named_parameters() if p.is_distributed)
    result["local_word_embedding_rows"] = model.bert.embeddings.word_embeddings.weight.shape[0]

    # 2. loss and gathered gradients of each head, TP=2 vs TP=1; "pretraining_plain" runs the plain ops
    #    (config.use_fast_kernels=False), the others the default (fast kernels where they load)
    variants = [("pretraining", {}), ("qa", {}), ("cls", {}), ("pretraining_plain", {"use_fast_kernels": False})]
    for variant, overrides in variants:
        head = variant.split("_")[0]
        with single_process_view():
            ref_model = reference if variant == "pretraining" else build(head, **overrides)
        tp_model = model if variant == "pretraining" else build(head, tensor_parallel_degree=2, **overrides)
        with single_process_view():  # (ops' fast-path switch is process-wide: set by the last model built)
            ref_out = ref_model(**head_inputs(head, batch), return_dict=True)
            ref_out.loss.backward()
            ref_grads = {n: p.grad.numpy() for n, p in ref_model.named_parameters()}
        out = tp_model(**head_inputs(head, batch), return_dict=True)
        out.loss.backward()
        grad_diffs, replicated_grad_spread = {}, 0.0
        for name, param in tp_model.named_parameters():
            grad_diffs[name] = max_abs(gather_full(name, param.grad.numpy(), topo), ref_grads[name])
            if not param.is_distributed:  # replicated: every rank must hold the same gradient
                replicated_grad_spread = max(replicated_grad_spread, same_on_all_tp_ranks(param.grad.numpy(), topo))
        logits_name = {"pretraining": "prediction_logits", "qa": "start_logits", "cls": "logits"}[head]
        result[variant] = dict(
            loss=float(out.loss), ref_loss=float(ref_out.loss), loss_diff=abs(float(out.loss) - float(ref_out.loss)),
            grad_max_diff=max(grad_diffs.values()), worst_grad=max(grad_diffs, key=grad_diffs.get),
            grad_names_compared=len(grad_diffs), replicated_grad_spread=replicated_grad_spread,
            logits_shape=list(out[logits_name].shape), logits_max_diff=max_abs(out[logits_name], ref_out[logits_name]),
            fast_kernels=ops.fast_kernels_enabled(),
        )

    # 3. all-reduces per training step: 2 forward + 2 backward per layer, on both op paths
    result["allreduce"] = {}
    for path, fast in (("fast", True), ("plain", False)):
        counts = {}
        for layers in (1, 2):
            counted = build("pretraining", tensor_parallel_degree=2, num_hidden_layers=layers, use_fast_kernels=fast)
            with AllReduceCounter() as forward:
                loss = counted(**head_inputs("pretraining", batch), return_dict=True).loss
            with AllReduceCounter() as backward:
                loss.backward()
            counts[layers] = (forward.count, backward.count)
        result["allreduce"][path] = dict(
            forward_per_layer=counts[2][0] - counts[1][0], backward_per_layer=counts[2][1] - counts[1][1],
            forward_outside_layers=counts[1][0] - (counts[2][0] - counts[1][0]),
            backward_outside_layers=counts[1][1] - (counts[2][1] - counts[1][1]),
        )

    # 4. five AdamW steps (global-norm clipping active) give the TP=1 loss curve
    def train(tp_model_or_ref, wrap):
        optimizer = build_optimizer(tp_model_or_ref, 2e-3, weight_decay=0.01, max_grad_norm=CLIP_NORM)
        optimizer = wrap_optimizer(optimizer, topo) if wrap else optimizer
        losses, train_batch = [], head_inputs("pretraining", make_batch(100))
        for step in range(5):
            loss = tp_model_or_ref(**train_batch, return_dict=True).loss
            loss.backward()
            if not wrap and step == 0:
                result["train_first_grad_norm"] = float(
                    sum((p.grad.astype("float64") ** 2).sum() for p in tp_model_or_ref.parameters()) ** 0.5)
            optimizer.step()
            optimizer.clear_grad()
            losses.append(float(loss))
        return losses

    with single_process_view():
        trained_ref = build("pretraining")
        ref_losses = train(trained_ref, wrap=False)
    trained = wrap_model(build("pretraining", tensor_parallel_degree=2), topo)
    tp_losses = train(trained, wrap=True)
    ref_state = trained_ref.state_dict()
    result["train"] = dict(
        ref_losses=ref_losses, tp_losses=tp_losses, max_diff=max_abs(ref_losses, tp_losses),
        first_to_last=ref_losses[0] - ref_losses[-1],
        param_max_diff=max(max_abs(gather_full(n, v.numpy(), topo), ref_state[n].numpy())
                           for n, v in trained.state_dict().items()),
    )

    # 5. checkpoints: TP=2 -> merged and per-rank shards -> TP=1 -> TP=2, same outputs
    inputs = head_inputs("pretraining", batch)
    inputs = {k: inputs[k] for k in ("input_ids", "attention_mask", "token_type_ids", "masked_lm_positions")}

    def outputs(m):
        m.eval()
        out = m(**inputs, return_dict=True)
        return out.prediction_logits.numpy(), out.seq_relationship_logits.numpy()

    tp_outputs = outputs(trained)
    merged_dir, shards_dir = os.path.join(args.out, "ckpt_merged"), os.path.join(args.out, "ckpt_shards")
    trained.save_pretrained(merged_dir, merge_tensor_parallel=True)
    trained.save_pretrained(shards_dir, merge_tensor_parallel=False)
    full_trained = {n: gather_full(n, v.numpy(), topo) for n, v in trained.state_dict().items()}
    ckpt = dict(merged_files=sorted(os.listdir(merged_dir)), shard_files=sorted(os.listdir(shards_dir)))
    with single_process_view():
        for label, directory in (("merged", merged_dir), ("shards", shards_dir)):
            loaded = MegatronBertForPreTraining.from_pretrained(directory)
            ckpt[f"tp1_from_{label}_degree"] = loaded.config.tensor_parallel_degree
            ckpt[f"tp1_from_{label}_param_diff"] = max(
                max_abs(v.numpy(), full_trained[n]) for n, v in loaded.state_dict().items())
            ckpt[f"tp1_from_{label}_output_diff"] = max(max_abs(a, b) for a, b in zip(outputs(loaded), tp_outputs))
        tp1_dir = os.path.join(args.out, f"ckpt_tp1_rank{topo.rank}")  # each rank writes its own TP=1 copy
        loaded.save_pretrained(tp1_dir)
    back = MegatronBertForPreTraining.from_pretrained(tp1_dir)
    ckpt["tp2_from_tp1_degree"] = back.config.tensor_parallel_degree
    ckpt["tp2_from_tp1_param_diff"] = max(
        max_abs(v.numpy(), trained.state_dict()[n].numpy()) for n, v in back.state_dict().items())
    ckpt["tp2_from_tp1_output_diff"] = max(max_abs(a, b) for a, b in zip(outputs(back), tp_outputs))
    back_shards = MegatronBertForPreTraining.from_pretrained(shards_dir)
    ckpt["tp2_from_shards_output_diff"] = max(max_abs(a, b) for a, b in zip(outputs(back_shards), tp_outputs))
    qa_from_pretraining = MegatronBertForQuestionAnswering.from_pretrained(merged_dir)  # a new head on the body
    ckpt["qa_body_diff"] = max_abs(qa_from_pretraining.bert.encoder.ln.weight.numpy(),
                                   trained.bert.encoder.ln.weight.numpy())
    result["checkpoint"] = ckpt

    # 6. dropout streams: different inside the TP region on each rank, shared outside (Megatron's seeds)
    parallel.seed_tensor_parallel_rng(7)
    outside = paddle.rand([6])
    with parallel.tensor_parallel_rng():
        inside = paddle.rand([6])
    paddle.seed(7 + parallel.TENSOR_PARALLEL_SEED_OFFSET + topo.tp_rank)
    expected_inside = paddle.rand([6])
    result["rng"] = dict(outside_spread=same_on_all_tp_ranks(outside.numpy(), topo),
                         inside_spread=same_on_all_tp_ranks(inside.numpy(), topo),
                         inside_vs_convention=max_abs(inside.numpy(), expected_inside.numpy()))
    dropout_model = build("pretraining", tensor_parallel_degree=2, hidden_dropout_prob=0.1,
                          attention_probs_dropout_prob=0.1)
    dropout_model(**head_inputs("pretraining", batch), return_dict=True).loss.backward()
    result["rng"]["dropout_replicated_grad_spread"] = max(
        same_on_all_tp_ranks(p.grad.numpy(), topo) for p in dropout_model.parameters() if not p.is_distributed)
    return topo, result


def run_data_parallel(args, **degrees):
    """dp=2 (or sharding=2, or tp=2 x dp=2) with half the batch per data rank vs one process on the full
    batch, 3 AdamW steps."""
    topo = init_distributed(seed=SEED, **degrees)
    result = dict(dp_degree=topo.dp_degree, sharding_degree=topo.sharding_degree, tp_degree=topo.tp_degree,
                  dataset_rank=topo.dataset_rank, dataset_world_size=topo.dataset_world_size, clip_norm=CLIP_NORM)
    half = BATCH // topo.dataset_world_size
    rows = slice(topo.dataset_rank * half, (topo.dataset_rank + 1) * half)

    def train(model, optimizer, rows, distributed):
        losses = []
        for step in range(3):
            loss = model(**head_inputs("cls", make_batch(200 + step), rows), return_dict=True).loss
            loss.backward()
            if not distributed and step == 0:
                result["first_grad_norm"] = float(
                    sum((p.grad.astype("float64") ** 2).sum() for p in model.parameters()) ** 0.5)
            optimizer.step()
            optimizer.clear_grad()
            mean = loss.detach().clone()
            if distributed:  # the mean of the equal halves' losses (TP peers hold the same loss)
                dist.all_reduce(mean)
                mean = mean / topo.world_size
            losses.append(float(mean))
        return losses

    with single_process_view():
        reference = build("cls")
        ref_losses = train(reference, build_optimizer(reference, 1e-3, max_grad_norm=CLIP_NORM), slice(None), False)
    model = build("cls", tensor_parallel_degree=topo.tp_degree)
    wrapped = wrap_model(model, topo)
    optimizer = wrap_optimizer(build_optimizer(model, 1e-3, max_grad_norm=CLIP_NORM), topo)
    losses = train(wrapped, optimizer, rows, True)
    ref_state = reference.state_dict()
    result.update(
        wrapper=type(wrapped).__name__, optimizer=type(optimizer).__name__,
        inner_optimizer=type(getattr(optimizer, "_inner_opt", optimizer)).__name__,
        ref_losses=ref_losses, losses=losses, loss_max_diff=max_abs(ref_losses, losses),
        param_max_diff=max(max_abs(gather_full(n, v.numpy(), topo), ref_state[n].numpy())
                           for n, v in model.state_dict().items()),
    )
    if topo.sharding_degree > 1:  # ZeRO-1: each rank keeps the AdamW moments of its share of the parameters
        inner = optimizer._inner_opt
        result["moment_tensors_here"] = len(inner._inner_opt._accumulators.get("moment1", {}))
        result["parameters_total"] = len(model.parameters())
    return topo, result


class CollectiveLog:
    """Records every all_reduce / reduce / broadcast as (op, ranks of its group) while active."""

    OPS = ("all_reduce", "reduce", "broadcast")

    def __init__(self):
        self.calls, self._originals = [], {op: getattr(dist, op) for op in self.OPS}

    def __enter__(self):
        for op, original in self._originals.items():
            def recording(*a, _op=op, _original=original, **kw):
                group = kw.get("group")
                self.calls.append((_op, "world" if group is None else ",".join(map(str, group.ranks))))
                return _original(*a, **kw)

            setattr(dist, op, recording)
        return self

    def __exit__(self, *exc):
        for op, original in self._originals.items():
            setattr(dist, op, original)

    def counts(self):
        out = {}
        for op, ranks in self.calls:
            out[f"{op}@{ranks}"] = out.get(f"{op}@{ranks}", 0) + 1
        return out


def grid_batch(seed):
    """make_batch with one unlabelled MLM slot in each half, so each replica's masked mean is over as many
    labels as the other's and the mean of the replicas' losses is the one-process loss on the whole batch."""
    batch = make_batch(seed)
    batch["labels"][1, MASKED - 1] = -100
    return batch


def all_gather_numpy(value, group=None):
    pieces = []
    dist.all_gather(pieces, paddle.to_tensor(np.asarray(value)), group=group)
    return [p.numpy() for p in pieces]


def run_grid(args, **degrees):
    """Pretraining on the dp x tp x sharding grid vs one process on the same global batch: 5 AdamW steps
    (clipping active), collectives per step by group, data and dropout streams per rank, and (tp x dp)
    checkpoints loaded at 1 x 1 and tp=4."""
    topo = init_distributed(seed=SEED, **degrees)
    ranks = lambda group: None if group is None else ",".join(map(str, group.ranks))  # noqa: E731
    result = dict(rank=topo.rank, tp_degree=topo.tp_degree, dp_degree=topo.dp_degree,
                  sharding_degree=topo.sharding_degree, tp_rank=topo.tp_rank, dataset_rank=topo.dataset_rank,
                  tp_group=ranks(topo.tp_group), dp_group=ranks(topo.dp_group),
                  sharding_group=ranks(topo.sharding_group), clip_norm=CLIP_NORM)
    replicas = topo.dataset_world_size
    rows_per_replica = BATCH // replicas
    rows = slice(topo.dataset_rank * rows_per_replica, (topo.dataset_rank + 1) * rows_per_replica)
    result["batch_rows"] = [rows.start, rows.stop]

    def train(model, optimizer, rows, distributed, log=None):
        losses = []
        for step in range(5):
            inputs = head_inputs("pretraining", grid_batch(300 + step), rows)
            with (log.phase("forward") if log and step == 0 else contextlib.nullcontext()):
                loss = model(**inputs, return_dict=True).loss
            with (log.phase("backward") if log and step == 0 else contextlib.nullcontext()):
                loss.backward()
            if not distributed and step == 0:
                result["first_grad_norm"] = float(
                    sum((p.grad.astype("float64") ** 2).sum() for p in model.parameters()) ** 0.5)
            with (log.phase("optimizer") if log and step == 0 else contextlib.nullcontext()):
                optimizer.step()
            optimizer.clear_grad()
            mean = loss.detach().clone()
            if distributed:  # the mean over replicas (TP peers hold the same loss)
                dist.all_reduce(mean)
                mean = mean / topo.world_size
            losses.append(float(mean))
        return losses

    class PhaseLog:
        def __init__(self):
            self.counts = {}

        @contextlib.contextmanager
        def phase(self, name):
            with CollectiveLog() as log:
                yield
            self.counts[name] = log.counts()

    with single_process_view():
        reference = build("pretraining")
        ref_losses = train(reference, build_optimizer(reference, 2e-3, max_grad_norm=CLIP_NORM), slice(None), False)
    model = build("pretraining", tensor_parallel_degree=topo.tp_degree)
    wrapped = wrap_model(model, topo)
    optimizer = wrap_optimizer(build_optimizer(model, 2e-3, max_grad_norm=CLIP_NORM), topo)
    phases = PhaseLog()
    losses = train(wrapped, optimizer, rows, True, phases)
    ref_state = reference.state_dict()
    result.update(
        ref_losses=ref_losses, losses=losses, loss_max_diff=max_abs(ref_losses, losses),
        param_max_diff=max(max_abs(gather_full(n, v.numpy(), topo), ref_state[n].numpy())
                           for n, v in model.state_dict().items()),
        collectives=phases.counts, parameters_total=len(model.parameters()),
        distributed_parameters=sum(p.is_distributed for p in model.parameters()),
        inner_optimizer=type(getattr(optimizer, "_inner_opt", optimizer)).__name__,
    )
    if topo.sharding_degree > 1:  # ZeRO-1: each rank keeps the AdamW moments of its share of the parameters
        result["moment_tensors_here"] = len(optimizer._inner_opt._inner_opt._accumulators.get("moment1", {}))

    # dropout streams: outside the TP region one per replica, inside one per (replica, tp rank)
    parallel.seed_tensor_parallel_rng(7)
    outside = paddle.rand([4]).numpy()
    with parallel.tensor_parallel_rng():
        inside = paddle.rand([4]).numpy()
    result["rng_outside"] = [float(x) for x in outside]
    result["rng_inside"] = [float(x) for x in inside]

    if topo.dp_degree > 1 and topo.sharding_degree == 1:
        result["checkpoint"] = grid_checkpoints(args, topo, model)
    return topo, result


def grid_checkpoints(args, topo, model):
    """Save the trained grid model (merged and per-rank files), load it at 1 x 1 and at tp=4."""
    inputs = head_inputs("pretraining", grid_batch(0))
    inputs = {k: inputs[k] for k in ("input_ids", "attention_mask", "token_type_ids", "masked_lm_positions")}

    def outputs(m):
        m.eval()
        out = m(**inputs, return_dict=True)
        return out.prediction_logits.numpy(), out.seq_relationship_logits.numpy()

    grid_outputs = outputs(model)
    full = {n: gather_full(n, v.numpy(), topo) for n, v in model.state_dict().items()}
    merged_dir, shards_dir = os.path.join(args.out, "grid_merged"), os.path.join(args.out, "grid_shards")
    model.save_pretrained(merged_dir, merge_tensor_parallel=True)
    model.save_pretrained(shards_dir, merge_tensor_parallel=False)
    dist.barrier()  # replica 1 returns from save_pretrained at once (replica 0 writes): wait for the files
    ckpt = dict(merged_files=sorted(os.listdir(merged_dir)), shard_files=sorted(os.listdir(shards_dir)))

    def diff(loaded):
        return max(max_abs(a, b) for a, b in zip(outputs(loaded), grid_outputs))

    with single_process_view():
        for label, directory in (("merged", merged_dir), ("shards", shards_dir)):
            loaded = MegatronBertForPreTraining.from_pretrained(directory)
            ckpt[f"tp1_from_{label}_degree"] = loaded.config.tensor_parallel_degree
            ckpt[f"tp1_from_{label}_param_diff"] = max(max_abs(v.numpy(), full[n])
                                                       for n, v in loaded.state_dict().items())
            ckpt[f"tp1_from_{label}_output_diff"] = diff(loaded)
    # tp=4 over all four processes: a group of its own, registered while the tp=4 models run
    everyone = new_group(list(range(topo.world_size)))
    saved = (parallel._TP_GROUP, parallel._TP_RANK, parallel._TP_DEGREE, parallel._REPLICA_RANK)
    parallel.set_tensor_parallel_group(everyone, topo.rank, topo.world_size)
    try:
        for label, directory in (("merged", merged_dir), ("shards", shards_dir)):
            loaded = MegatronBertForPreTraining.from_pretrained(directory)
            ckpt[f"tp4_from_{label}_degree"] = loaded.config.tensor_parallel_degree
            ckpt[f"tp4_from_{label}_word_rows"] = loaded.bert.embeddings.word_embeddings.weight.shape[0]
            ckpt[f"tp4_from_{label}_param_diff"] = max(
                max_abs(v.numpy(), tp_plan.shard_param(n, full[n], topo.world_size, topo.rank))
                for n, v in loaded.state_dict().items())
            ckpt[f"tp4_from_{label}_output_diff"] = diff(loaded)
    finally:
        parallel.set_tensor_parallel_group(*saved)
    return ckpt


def scenario_bad_world(args):
    # 6 processes cannot be split into tensor_parallel_degree 4 groups: the first call fails on every rank
    init_distributed(tensor_parallel_degree=4)
    raise AssertionError("init_distributed accepted a world size of 6 for tp 4")


def scenario_bad_heads(args):
    # the order a runner uses: config from flags (validated) -> topology -> model; 3 heads do not split over 2
    config = MegatronBertConfig(**{**TINY, "num_attention_heads": 3, "hidden_size": 24, "intermediate_size": 48})
    validate_tp_config(config, 2)
    init_distributed(tensor_parallel_degree=2)
    raise AssertionError("validate_tp_config accepted 3 heads at tensor_parallel_degree 2")


SCENARIOS = {
    "tp": scenario_tp,
    "dp": lambda args: run_data_parallel(args, data_parallel_degree=2),
    "sharding": lambda args: run_data_parallel(args, sharding_degree=2),
    # 4 processes: the 2-D grids
    "grid_tp_dp": lambda args: run_grid(args, tensor_parallel_degree=2, data_parallel_degree=2),
    "grid_tp_sharding": lambda args: run_grid(args, tensor_parallel_degree=2, sharding_degree=2),
    "bad_world": scenario_bad_world,
    "bad_heads": scenario_bad_heads,
}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--scenario", choices=sorted(SCENARIOS), required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    topo, result = SCENARIOS[args.scenario](args)
    with open(os.path.join(args.out, f"{args.scenario}.rank{topo.rank}.json"), "w") as f:
        json.dump(result, f, indent=1, sort_keys=True)


if __name__ == "__main__":
    main()
