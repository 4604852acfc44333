"""What the fine-tuning runners (``run_squad.py``, ``run_glue.py``) share around the one training loop
(:func:`paddle_megatronbert.loop.train`): batches of features (:class:`FeatureBatches`, padded by
:func:`pad_batch`), the PaddleNLP-style log line, the kept model directories, and :func:`finetune`, which
hands all of it to the loop.

Parallelism comes from :mod:`paddle_megatronbert.distributed`: tensor-parallel peers read the same
batches; data-parallel replicas read disjoint slices. Evaluation runs on the first replica only (all its
tensor-parallel ranks, which the forward needs) and only global rank 0 writes files and logs.
"""

from __future__ import annotations

import hashlib
import math
import os
from typing import Callable, Dict, Iterator, List, Optional, Sequence

import numpy as np

from .logging_utils import progress
from .vocab_resolution import vocab_fit_problem


def check_model_fits(config, tokenizer, max_seq_length: int) -> None:
    """ValueError before any feature is built when the inputs could not go through the model."""
    if max_seq_length > config.max_position_embeddings:
        raise ValueError(f"--max_seq_length {max_seq_length} exceeds the model's max_position_embeddings "
                         f"({config.max_position_embeddings})")
    problem = vocab_fit_problem("of the tokenizer", len(tokenizer.vocab), config.vocab_size, "the model's config")
    if problem:
        raise ValueError(problem)


# ---- batches ------------------------------------------------------------------------------------
def shard_batches(num_examples: int, batch_size: int, epoch: int, seed: int, rank: int = 0, world_size: int = 1,
                  shuffle: bool = True) -> List[List[int]]:
    """This rank's batches of one epoch: one permutation drawn from (seed, epoch) on every rank, dealt out
    round-robin, padded by wrapping so every rank runs the same number of steps."""
    order = np.random.RandomState(seed + epoch).permutation(num_examples) if shuffle else np.arange(num_examples)
    per_rank = int(math.ceil(num_examples / world_size))
    padded = np.resize(order, per_rank * world_size)  # wraps around: the first examples fill the last ranks
    mine = padded[rank::world_size]
    return [mine[i : i + batch_size].tolist() for i in range(0, len(mine), batch_size)]


def pad_batch(features: Sequence[Dict], pad_token_id: int, label_keys: Sequence[str] = (),
              label_dtype: str = "int64") -> Dict[str, "object"]:
    """Tensors of a list of features: ``input_ids``/``token_type_ids`` right-padded to the longest, an
    ``attention_mask``, and the ``label_keys`` stacked."""
    import paddle

    length = max(len(f["input_ids"]) for f in features)
    input_ids = np.full((len(features), length), pad_token_id, dtype="int64")
    token_type_ids = np.zeros((len(features), length), dtype="int64")
    attention_mask = np.zeros((len(features), length), dtype="int64")
    for row, feature in enumerate(features):
        n = len(feature["input_ids"])
        input_ids[row, :n] = feature["input_ids"]
        token_type_ids[row, :n] = feature["token_type_ids"]
        attention_mask[row, :n] = 1
    batch = {"input_ids": paddle.to_tensor(input_ids), "token_type_ids": paddle.to_tensor(token_type_ids),
             "attention_mask": paddle.to_tensor(attention_mask)}
    for key in label_keys:
        batch[key] = paddle.to_tensor(np.asarray([f[key] for f in features], dtype=label_dtype))
    return batch


class FeatureBatches:
    """The loop's batch source over a list of features: each epoch one permutation drawn from
    ``(seed, epoch)`` (:func:`shard_batches`), cut to a whole number of optimizer steps.

    Args:
        features: one dict per training feature.
        collate: a list of features -> a dict of tensors (:func:`pad_batch`).
        batch_size: features per batch on this rank.
        seed: seed of the order.
        rank, world_size: this rank's slice (``Topology.dataset_rank`` / ``dataset_world_size``).
        accumulation: micro-batches per optimizer step (an epoch's batches are cut to a multiple of it).
    """

    def __init__(self, features: Sequence[Dict], collate: Callable[[Sequence[Dict]], Dict], batch_size: int,
                 seed: int, rank: int = 0, world_size: int = 1, accumulation: int = 1):
        if not features:
            raise ValueError("no training features (every training example was skipped?)")
        self.features, self.collate, self.batch_size = features, collate, batch_size
        self.seed, self.rank, self.world_size = seed, rank, world_size
        per_epoch = len(shard_batches(len(features), batch_size, 0, seed, rank, world_size))
        if per_epoch < accumulation:
            raise ValueError(f"{per_epoch} batches per epoch cannot make one step of "
                             f"--gradient_accumulation_steps {accumulation}")
        self.steps_per_epoch = per_epoch - per_epoch % accumulation
        self.epoch, self.batches_in_epoch = 0, 0
        self._order = (None, None)

    def next_batch(self) -> Dict:
        if self.batches_in_epoch >= self.steps_per_epoch:
            self.epoch, self.batches_in_epoch = self.epoch + 1, 0
        if self._order[0] != self.epoch:
            self._order = (self.epoch, shard_batches(len(self.features), self.batch_size, self.epoch, self.seed,
                                                     self.rank, self.world_size))
        indices = self._order[1][self.batches_in_epoch]
        self.batches_in_epoch += 1
        return self.collate([self.features[i] for i in indices])

    def fingerprint(self) -> Dict[str, str]:
        """What decides this data's order, for the run fingerprint a resume compares
        (:func:`paddle_megatronbert.faults.run_fingerprint`): the count and a checksum of the training features
        (token ids, labels ...), so another training file or other preprocessing is refused on resume."""
        digest = hashlib.sha256()
        for feature in self.features:
            for key in sorted(feature):
                value = np.asarray(feature[key])
                digest.update(key.encode())
                digest.update(value.tobytes() if value.dtype.kind in "biuf" else repr(feature[key]).encode())
        return {"training_features": f"{len(self.features)} features, sha256 {digest.hexdigest()[:16]}"}

    def state_dict(self) -> Dict[str, int]:
        epoch, batches = self.epoch, self.batches_in_epoch
        if batches >= self.steps_per_epoch:
            epoch, batches = epoch + 1, 0
        return {"epoch": epoch, "batches_in_epoch": batches, "steps_per_epoch": self.steps_per_epoch,
                "batch_size": self.batch_size}

    def load_state_dict(self, state: Dict[str, int]) -> None:
        if int(state.get("batch_size", self.batch_size)) != self.batch_size:
            raise ValueError(f"the checkpoint's data position was taken with batch_size {state['batch_size']}, "
                             f"this run has {self.batch_size}: resume with the same batch size")
        if int(state.get("steps_per_epoch", self.steps_per_epoch)) != self.steps_per_epoch:
            raise ValueError(f"the training features changed since the checkpoint (an epoch was "
                             f"{state['steps_per_epoch']} batches, now {self.steps_per_epoch})")
        self.epoch, self.batches_in_epoch = int(state["epoch"]), int(state["batches_in_epoch"])

    def close(self) -> None:
        pass


def format_finetune_line(step: int, record: Dict) -> str:
    """PaddleNLP's example line, plus elapsed time and ETA:
    ``global step 100/7000, epoch: 1, batch: 100, loss: 1.234567, lr: 0.0000100000, speed: 3.2100 step/s, ...``."""
    from .training import format_duration

    return (f"global step {step}/{record['max_steps']}, epoch: {record['epoch'] + 1}, batch: {record['batch']}, "
            f"loss: {record['loss']:.6f}, lr: {record['lr']:.10f}, speed: {record['steps_per_sec']:.4f} step/s, "
            f"elapsed: {format_duration(record['elapsed_s'])}, eta: {format_duration(record['eta_s'])}")


def finetune(model, tokenizer, train_features: Sequence[Dict], collate: Callable[[Sequence[Dict]], Dict], args, topo,
             evaluate: Optional[Callable[[], Optional[Dict[str, float]]]] = None, metric_name: Optional[str] = None,
             on_new_best: Optional[Callable[[Dict[str, float]], None]] = None):
    """Train ``model`` on ``train_features`` with the one loop; evaluate at every ``--save_steps`` and at the end,
    keeping the best weights (config, vocab) in ``OUTPUT_DIR/best_model`` (``last_model`` without ``evaluate``).
    Returns the loop's :class:`~paddle_megatronbert.loop.TrainResult`.

    Args:
        model: the unwrapped model; its forward returns ``loss`` given the label keys ``collate`` adds.
        tokenizer: saved beside the kept weights; its vocab goes into every checkpoint.
        train_features, collate: see :class:`FeatureBatches`.
        args, topo: the runner's namespace and topology (:func:`paddle_megatronbert.loop.setup_run`).
        evaluate, metric_name, on_new_best: see :func:`paddle_megatronbert.loop.train`.
    """
    from .loop import BEST_MODEL_DIR, train

    batches = FeatureBatches(train_features, collate, args.batch_size, args.seed, topo.dataset_rank,
                             topo.dataset_world_size, args.gradient_accumulation_steps)

    def keep_model(directory: str) -> None:  # merged weights (gathered over the TP group), config and vocab
        model.save_pretrained(directory)
        if topo.is_main:
            tokenizer.save_pretrained(directory)

    result = train(model, batches, args, topo, line_format=format_finetune_line, evaluate=evaluate,
                   metric_name=metric_name, on_new_best=on_new_best, keep_model=keep_model,
                   checkpoint_files={"vocab.txt": tokenizer.init_kwargs["vocab_file"]},
                   run_summary=f"training: {len(train_features)} features, {batches.steps_per_epoch} batches of "
                               f"{args.batch_size} per epoch per replica x {topo.dataset_world_size} replica(s)",
                   model_origin=f"weights from {args.model_name_or_path}")
    state = result.state
    if topo.is_main and state.best_step is not None:
        print(f"best checkpoint: step {state.best_step} ({metric_name} {state.best_metric:.6f}) in "
              f"{os.path.join(args.output_dir, BEST_MODEL_DIR)}", flush=True)
    return result


def iterate_batches(features: Sequence, batch_size: int) -> Iterator[List]:
    """Consecutive batches in order (evaluation)."""
    for start in range(0, len(features), batch_size):
        yield features[start : start + batch_size]


def predict(model, features: Sequence, collate: Callable[[Sequence], Dict], batch_size: int, output_keys: Sequence[str],
            desc: str = "predicting", show_progress: bool = False) -> Dict[str, object]:
    """The model over ``features`` in order, in eval mode without gradients (train mode again after):
    ``{key: [one float32 array per feature]}`` for each of ``output_keys``, and ``"loss"``, the mean over the
    features, when the batches carry labels."""
    import paddle

    model.eval()
    outputs, loss_sum = {key: [] for key in output_keys}, None
    with paddle.no_grad():
        total = (len(features) + batch_size - 1) // batch_size
        for batch in progress(iterate_batches(features, batch_size), desc, total=total, enabled=show_progress):
            out = model(**collate(batch), return_dict=True)
            for key in output_keys:
                outputs[key].extend(out[key].astype("float32").numpy())
            if out.get("loss") is not None:
                loss_sum = (loss_sum or 0.0) + float(out["loss"]) * len(batch)
    model.train()
    if loss_sum is not None:
        outputs["loss"] = loss_sum / len(features)
    return outputs


def write_json(path: str, value) -> None:
    """``value`` as indented UTF-8 JSON (results and predictions files), written atomically like every other
    file a run leaves, so a run killed while writing never leaves a truncated result."""
    import json

    from .checkpoint.files import atomic_write_text

    atomic_write_text(path, json.dumps(value, ensure_ascii=False, indent=2) + "\n")
