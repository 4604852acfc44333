"""Pretraining data: HDF5 shards in NVIDIA DeepLearningExamples' BERT format, read shard by shard.

Each data-parallel rank reads its own shard files (``files[rank::world]``, as PaddleNLP's BERT runner
does), loads one whole shard into memory and prefetches the next one in a background thread. The order
is a function of ``(seed, epoch)`` only, so a position ``(epoch, batches read in the epoch)`` saved in a
checkpoint resumes exactly: the shard and offset are recomputed from it.

Batches are dicts of numpy arrays named as ``MegatronBertForPreTraining.forward`` takes them::

    input_ids, token_type_ids, attention_mask      int64 (B, S)
    masked_lm_positions, labels                    int64 (B, P)   labels -100 where no prediction
    next_sentence_label                            int64 (B,)     1 = random next sentence
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional, Sequence

import numpy as np

SHARD_KEYS = ("input_ids", "input_mask", "segment_ids", "masked_lm_positions", "masked_lm_ids",
              "next_sentence_labels")
SHARD_SUFFIXES = (".hdf5", ".h5", ".hdf")
IGNORE_INDEX = -100


def list_shards(input_dir: str) -> List[str]:
    """The shard files (``*.hdf5``, ``*.h5``, ``*.hdf``) in ``input_dir``, sorted by name."""
    if not os.path.isdir(input_dir):
        raise FileNotFoundError(f"--input_dir {input_dir} is not a directory")
    files = sorted(os.path.join(input_dir, name) for name in os.listdir(input_dir)
                   if name.endswith(SHARD_SUFFIXES) and os.path.isfile(os.path.join(input_dir, name)))
    if not files:
        raise FileNotFoundError(f"--input_dir {input_dir} has no HDF5 shards (*.hdf5, *.h5); make them with "
                                "tools/create_pretraining_data.py")
    return files


@dataclass(frozen=True)
class ShardInfo:
    """What a shard's header says: its path, sample count, sequence length, predictions per sequence, and
    the vocabulary size recorded by ``tools/create_pretraining_data.py`` (None for shards made elsewhere)."""

    path: str
    num_samples: int
    seq_length: int
    max_predictions_per_seq: int
    vocab_size: Optional[int] = None


def _open(path: str):
    import h5py

    try:
        return h5py.File(path, "r")
    except (OSError, ValueError) as err:  # truncated, not HDF5, unreadable
        raise ValueError(f"cannot open shard {path} as HDF5 (corrupt or truncated?): {err}") from None


def inspect_shard(path: str, max_predictions_per_seq: Optional[int] = None) -> ShardInfo:
    """Check a shard's keys, dtypes and shapes without reading its data; ValueError naming the file."""
    with _open(path) as f:
        missing = [key for key in SHARD_KEYS if key not in f]
        if missing:
            raise ValueError(f"shard {path} lacks the key(s) {', '.join(missing)} (a DLE shard has "
                             f"{', '.join(SHARD_KEYS)})")
        shapes = {key: f[key].shape for key in SHARD_KEYS}
        for key in SHARD_KEYS:
            if f[key].dtype.kind not in "iu":
                raise ValueError(f"shard {path}: {key} has dtype {f[key].dtype}, expected integers")
        vocab_size = f.attrs.get("vocab_size")
    n, seq = shapes["input_ids"][0], shapes["input_ids"][1] if len(shapes["input_ids"]) == 2 else -1
    expected = {"input_ids": (n, seq), "input_mask": (n, seq), "segment_ids": (n, seq),
                "next_sentence_labels": (n,)}
    for key, shape in expected.items():
        if tuple(shapes[key]) != shape:
            raise ValueError(f"shard {path}: {key} has shape {tuple(shapes[key])}, expected {shape} "
                             f"(input_ids is {tuple(shapes['input_ids'])})")
    pred = shapes["masked_lm_positions"]
    if len(pred) != 2 or pred[0] != n or tuple(shapes["masked_lm_ids"]) != tuple(pred):
        raise ValueError(f"shard {path}: masked_lm_positions {tuple(pred)} and masked_lm_ids "
                         f"{tuple(shapes['masked_lm_ids'])} must both be ({n}, max_predictions_per_seq)")
    if max_predictions_per_seq is not None and pred[1] != max_predictions_per_seq:
        raise ValueError(f"shard {path} has {pred[1]} masked positions per sequence but "
                         f"--max_predictions_per_seq is {max_predictions_per_seq}")
    if n == 0:  # known from the header: refuse at start, not when the loader reaches it mid-epoch
        raise ValueError(f"shard {path} holds no samples (input_ids has 0 rows): remove it or remake it")
    return ShardInfo(path, int(n), int(seq), int(pred[1]), None if vocab_size is None else int(vocab_size))


def check_vocab_size(info: ShardInfo, vocab_size: int, tokenizer_vocab_size: Optional[int] = None) -> None:
    """ValueError naming the shard when its recorded vocabulary does not fit the model (or differs from
    the tokenizer's)."""
    if info.vocab_size is None:
        return
    if info.vocab_size > vocab_size:
        raise ValueError(f"shard {info.path} was made with a {info.vocab_size}-token vocabulary but the model's "
                         f"vocab_size is {vocab_size}: the config does not match the vocab")
    if tokenizer_vocab_size is not None and info.vocab_size != tokenizer_vocab_size:
        raise ValueError(f"shard {info.path} was made with a {info.vocab_size}-token vocabulary but the tokenizer "
                         f"has {tokenizer_vocab_size} tokens: remake the shards with the model's vocab")


def read_shard(path: str, max_predictions_per_seq: Optional[int] = None,
               vocab_size: Optional[int] = None) -> Dict[str, np.ndarray]:
    """All arrays of a shard in memory, checked (shapes, id ranges); ValueError naming the file."""
    info = inspect_shard(path, max_predictions_per_seq)
    try:
        with _open(path) as f:
            arrays = {key: np.asarray(f[key][...]) for key in SHARD_KEYS}
    except (OSError, ValueError, RuntimeError) as err:  # a corrupt chunk fails only when read
        raise ValueError(f"cannot read shard {path} (corrupt or truncated?): {err}") from None
    check_shard_values(path, arrays, info.seq_length, vocab_size)
    return arrays


# field: the values a DLE shard may hold there
_BINARY_FIELDS = {"next_sentence_labels": "0 (the real next sentence) or 1 (a random one)",
                  "segment_ids": "0 (sentence A) or 1 (sentence B)",
                  "input_mask": "0 (padding) or 1 (a token)"}


def _first_row(mask: np.ndarray) -> int:
    return int(np.argwhere(mask)[0][0])


def check_shard_values(path: str, arrays: Dict[str, np.ndarray], seq_length: int,
                       vocab_size: Optional[int] = None) -> None:
    """ValueError in one line naming the shard, the field, the bad value and its row, for values no model
    input may hold: labels, segments and mask outside {0, 1} (a mask of 3 would silently become a large
    positive attention bias), negative ids or positions, ids outside the vocabulary, positions past the
    sequence."""
    for key, allowed in _BINARY_FIELDS.items():
        values = arrays[key]
        bad = (values != 0) & (values != 1)
        if bad.any():
            raise ValueError(f"shard {path}: {key} holds {int(values[bad][0])} (row {_first_row(bad)}); it must be "
                             f"{allowed}")
    for key in ("input_ids", "masked_lm_ids", "masked_lm_positions"):
        values = arrays[key]
        if (values < 0).any():
            raise ValueError(f"shard {path}: {key} holds the negative value {int(values.min())} "
                             f"(row {_first_row(values < 0)}); ids and positions are >= 0")
    if vocab_size is not None:
        for key in ("input_ids", "masked_lm_ids"):
            top = int(arrays[key].max())
            if top >= vocab_size:
                raise ValueError(f"shard {path}: {key} reaches id {top} but the model's vocab_size is {vocab_size}: "
                                 "the shard was made with a different (larger) vocab than the config")
    top = int(arrays["masked_lm_positions"].max())
    if top >= seq_length:
        raise ValueError(f"shard {path}: masked_lm_positions reach {top}, outside the sequence length {seq_length}")


def make_batch(arrays: Dict[str, np.ndarray], rows: np.ndarray) -> Dict[str, np.ndarray]:
    """Model inputs for ``rows`` of a shard. DLE pads masked positions with 0 ([CLS] is never masked),
    so position 0 marks a padded prediction: its label becomes -100."""
    positions = arrays["masked_lm_positions"][rows].astype(np.int64)
    labels = np.where(positions > 0, arrays["masked_lm_ids"][rows].astype(np.int64), IGNORE_INDEX)
    return {
        "input_ids": arrays["input_ids"][rows].astype(np.int64),
        "token_type_ids": arrays["segment_ids"][rows].astype(np.int64),
        "attention_mask": arrays["input_mask"][rows].astype(np.int64),
        "masked_lm_positions": positions,
        "labels": labels,
        "next_sentence_label": arrays["next_sentence_labels"][rows].astype(np.int64).reshape([-1]),
    }


def concat_batches(parts: Sequence[Dict[str, np.ndarray]]) -> Dict[str, np.ndarray]:
    if len(parts) == 1:
        return parts[0]
    return {key: np.concatenate([p[key] for p in parts], axis=0) for key in parts[0]}


class PretrainingDataLoader:
    """Batches from the shards of this data-parallel rank, in a seeded order, with the next shard
    prefetched in a background thread.

    One epoch is ``steps_per_epoch`` batches: the same count on every rank (the smallest over the ranks,
    so no rank waits for another at the end of an epoch); samples left over on a rank are skipped that
    epoch and come in another order the next. A batch may span two shards.

    Args:
        files: every shard of the run (each rank takes ``files[rank::world_size]``).
        batch_size: sequences per batch (per rank).
        max_predictions_per_seq: the P of every shard (checked).
        rank, world_size: this rank's slice of the data (``Topology.dataset_rank`` /
            ``dataset_world_size``); tensor-parallel peers pass the same values.
        seed: the order of shards and samples is a function of ``(seed, epoch)``.
        shuffle: shuffle shards and samples each epoch (False: file order, sample order).
        vocab_size: the model's vocabulary; shards with larger ids are refused.
        tokenizer_vocab_size: the tokenizer's vocabulary; shards recording another size are refused.
        prefetch: read the next shard in a thread while this one is consumed.
    """

    def __init__(self, files: Sequence[str], batch_size: int, max_predictions_per_seq: int, rank: int = 0,
                 world_size: int = 1, seed: int = 0, shuffle: bool = True, vocab_size: Optional[int] = None,
                 tokenizer_vocab_size: Optional[int] = None, prefetch: bool = True):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if len(files) < world_size:
            raise ValueError(f"{len(files)} shard file(s) for {world_size} data-parallel ranks: each rank reads its "
                             "own files, so make at least as many shards as ranks (--shards_per_file)")
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size
        self.seed, self.shuffle, self.vocab_size = seed, shuffle, vocab_size
        self.max_predictions_per_seq = max_predictions_per_seq
        self.files = list(files)
        infos = [inspect_shard(path, max_predictions_per_seq) for path in files]
        for info in infos:
            if vocab_size is not None:
                check_vocab_size(info, vocab_size, tokenizer_vocab_size)
        seq_lengths = {info.seq_length for info in infos}
        if len(seq_lengths) > 1:
            raise ValueError(f"shards have different sequence lengths {sorted(seq_lengths)}: "
                             f"{infos[0].path} has {infos[0].seq_length}")
        self.seq_length = infos[0].seq_length
        per_rank = [infos[r::world_size] for r in range(world_size)]
        self.shards: List[ShardInfo] = per_rank[rank]
        self.steps_per_epoch = min(sum(i.num_samples for i in part) for part in per_rank) // batch_size
        if self.steps_per_epoch == 0:
            fewest = min(sum(i.num_samples for i in part) for part in per_rank)
            raise ValueError(f"a data-parallel rank has only {fewest} samples for batch_size {batch_size}: "
                             "make more data or use a smaller batch")
        self.epoch, self.batches_in_epoch = 0, 0
        self._cache: Dict[str, Dict[str, np.ndarray]] = {}
        self._pending: Dict[str, object] = {}
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="shard-prefetch") if prefetch else None

    # ---- order ------------------------------------------------------------------------------------
    def _shard_order(self, epoch: int) -> List[int]:
        if not self.shuffle:
            return list(range(len(self.shards)))
        return [int(i) for i in np.random.default_rng([self.seed, epoch, self.rank]).permutation(len(self.shards))]

    def _sample_order(self, epoch: int, shard_index: int) -> np.ndarray:
        count = self.shards[shard_index].num_samples
        if not self.shuffle:
            return np.arange(count)
        return np.random.default_rng([self.seed, epoch, self.rank, shard_index, 1]).permutation(count)

    def locate(self, epoch: int, batches_in_epoch: int):
        """(position in the epoch's shard order, shard index, offset in that shard) of the next sample."""
        consumed = batches_in_epoch * self.batch_size
        order = self._shard_order(epoch)
        for slot, shard_index in enumerate(order):
            count = self.shards[shard_index].num_samples
            if consumed < count:
                return slot, shard_index, consumed
            consumed -= count
        raise ValueError(f"position {batches_in_epoch} is past the end of epoch {epoch}")

    # ---- shard cache with prefetch ------------------------------------------------------------------
    def _load(self, shard_index: int) -> Dict[str, np.ndarray]:
        return read_shard(self.shards[shard_index].path, self.max_predictions_per_seq, self.vocab_size)

    def _prefetch(self, shard_index: int) -> None:
        path = self.shards[shard_index].path
        if self._executor is None or path in self._cache or path in self._pending:
            return
        self._pending[path] = self._executor.submit(self._load, shard_index)

    def _get(self, shard_index: int) -> Dict[str, np.ndarray]:
        path = self.shards[shard_index].path
        if path not in self._cache:
            future = self._pending.pop(path, None)
            arrays = future.result() if future is not None else self._load(shard_index)
            # keep at most the shard being read and the one after it
            self._cache = {path: arrays}
        return self._cache[path]

    def _next_shard_after(self, epoch: int, slot: int):
        order = self._shard_order(epoch)
        if slot + 1 < len(order):
            return order[slot + 1]
        return self._shard_order(epoch + 1)[0]

    # ---- iteration ----------------------------------------------------------------------------------
    def next_batch(self) -> Dict[str, np.ndarray]:
        """The next batch; moves the position (to the next epoch after ``steps_per_epoch`` batches)."""
        if self.batches_in_epoch >= self.steps_per_epoch:
            self.epoch, self.batches_in_epoch = self.epoch + 1, 0
        slot, shard_index, offset = self.locate(self.epoch, self.batches_in_epoch)
        order = self._shard_order(self.epoch)
        parts, needed = [], self.batch_size
        while needed > 0:
            arrays = self._get(shard_index)
            self._prefetch(self._next_shard_after(self.epoch, slot))
            sample_order = self._sample_order(self.epoch, shard_index)
            take = sample_order[offset:offset + needed]
            parts.append(make_batch(arrays, take))
            needed -= len(take)
            if needed > 0:
                slot += 1
                shard_index, offset = order[slot], 0
        self.batches_in_epoch += 1
        return concat_batches(parts)

    def __iter__(self) -> Iterator[Dict[str, np.ndarray]]:
        while True:
            yield self.next_batch()

    # ---- position ------------------------------------------------------------------------------------
    def state_dict(self) -> Dict[str, object]:
        """The position of the next batch: ``epoch`` and ``batches_in_epoch`` (what resuming needs), plus
        the shard file and offset they point at (for people reading the checkpoint)."""
        epoch, batches = self.epoch, self.batches_in_epoch
        if batches >= self.steps_per_epoch:
            epoch, batches = epoch + 1, 0
        _, shard_index, offset = self.locate(epoch, batches)
        return {"epoch": epoch, "batches_in_epoch": batches, "shard": os.path.basename(self.shards[shard_index].path),
                "offset": int(offset), "steps_per_epoch": self.steps_per_epoch, "batch_size": self.batch_size}

    def load_state_dict(self, state: Dict[str, object]) -> None:
        if int(state.get("batch_size", self.batch_size)) != self.batch_size:
            raise ValueError(f"the checkpoint's data position was taken with batch_size {state['batch_size']}, "
                             f"this run has {self.batch_size}: resume with the same batch size")
        if int(state.get("steps_per_epoch", self.steps_per_epoch)) != self.steps_per_epoch:
            raise ValueError(f"an epoch was {state['steps_per_epoch']} batches per rank when the checkpoint was "
                             f"written and is {self.steps_per_epoch} now: the input shards or the number of "
                             "data-parallel ranks changed since; resume with the same ones")
        self.epoch, self.batches_in_epoch = int(state["epoch"]), int(state["batches_in_epoch"])

    def fingerprint(self) -> Dict[str, object]:
        """What decides this data's order, for the run fingerprint a resume compares
        (:func:`paddle_megatronbert.faults.run_fingerprint`): every shard of the run (name, size, header
        checksum) and the predictions per sequence."""
        from ..faults import file_fingerprint

        return {"files": [file_fingerprint(path) for path in self.files],
                "max_predictions_per_seq": self.max_predictions_per_seq}

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None
