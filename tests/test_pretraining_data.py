"""tools/create_pretraining_data.py and paddle_megatronbert/data/pretraining.py: the DLE HDF5 format,
the 80/10/10 masking, byte-identical shards for a seed, and the loader's per-rank split and exact position."""

import importlib.util
import json
import os
import sys

import h5py
import numpy as np
import pytest

from paddle_megatronbert.data.pretraining import (
    IGNORE_INDEX,
    SHARD_KEYS,
    PretrainingDataLoader,
    inspect_shard,
    list_shards,
    make_batch,
    read_shard,
)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAMPLE_TEXT = os.path.join(REPO, "data", "sample_text.txt")
DLE_DTYPES = {"input_ids": np.int32, "input_mask": np.int8, "segment_ids": np.int8, "masked_lm_positions": np.int32,
              "masked_lm_ids": np.int32, "next_sentence_labels": np.int8}


def load_tool():
    spec = importlib.util.spec_from_file_location(
        "create_pretraining_data", os.path.join(REPO, "tools", "create_pretraining_data.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses and the worker pool look the module up by name
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tool():
    return load_tool()


def sample_documents():
    with open(SAMPLE_TEXT, encoding="utf-8") as f:
        return [doc.split("\n") for doc in f.read().strip().split("\n\n")]


@pytest.fixture(scope="module")
def uncased_shard(tool, tmp_path_factory):
    """The shipped text (12 documents, 3045 sentences) as one shard: seq 128, 20 predictions, vocab 30522."""
    out = tmp_path_factory.mktemp("uncased")
    tool.main(["--input_file", SAMPLE_TEXT, "--output_dir", str(out), "--max_seq_length", "128",
               "--max_predictions_per_seq", "20", "--dupe_factor", "2", "--seed", "7", "--num_workers", "1"])
    return os.path.join(out, "pretraining_00000.hdf5")


def test_sample_text_is_real_prose_in_the_input_format():
    docs = sample_documents()
    assert len(docs) == 12  # the translator's note and the 11 chapters of Botchan (1919 translation)
    sentences = [s for d in docs for s in d]
    assert len(sentences) == 3034 and all(s.strip() == s and s for s in sentences)
    assert sum(len(s.split()) for s in sentences) > 45000
    assert not any("gutenberg" in s.lower() for s in sentences)


def test_shard_has_dle_keys_dtypes_shapes_and_padding(uncased_shard):
    with h5py.File(uncased_shard, "r") as f:
        assert sorted(f.keys()) == sorted(SHARD_KEYS)
        arrays = {k: f[k][...] for k in SHARD_KEYS}
        assert f.attrs["vocab_size"] == 30522 and bool(f.attrs["do_lower_case"])
    n = arrays["input_ids"].shape[0]
    assert n > 1000
    for key, dtype in DLE_DTYPES.items():
        assert arrays[key].dtype == dtype, key
    assert arrays["input_ids"].shape == arrays["input_mask"].shape == arrays["segment_ids"].shape == (n, 128)
    assert arrays["masked_lm_positions"].shape == arrays["masked_lm_ids"].shape == (n, 20)
    assert arrays["next_sentence_labels"].shape == (n,)
    lengths = arrays["input_mask"].sum(1)
    for row in range(n):
        length = lengths[row]
        ids, mask = arrays["input_ids"][row], arrays["input_mask"][row]
        assert mask[:length].all() and not mask[length:].any() and not ids[length:].any()  # zero padding
        assert ids[0] == 101 and ids[length - 1] == 102 and (ids[:length] == 102).sum() == 2  # [CLS] A [SEP] B [SEP]
        first_sep = int(np.argmax(ids == 102))
        segments = arrays["segment_ids"][row]
        assert not segments[:first_sep + 1].any() and segments[first_sep + 1:length].all() and not segments[length:].any()
        positions = arrays["masked_lm_positions"][row]
        count = int((positions > 0).sum())
        assert count == min(20, max(1, int(round(length * 0.15))))  # Google BERT's num_to_predict
        assert (positions[:count] > 0).all() and not positions[count:].any() and not arrays["masked_lm_ids"][row, count:].any()
        assert (np.diff(positions[:count]) > 0).all() and positions[count - 1] < length - 1
    labels = arrays["next_sentence_labels"]
    # 50% random B, plus every one-sentence chunk (it has no true continuation to take): 0.5-0.6 here.
    assert 0.5 <= labels.mean() <= 0.6, labels.mean()


def test_masking_is_80_10_10_and_labels_are_the_original_tokens(uncased_shard):
    from paddle_megatronbert.tokenizer import MegatronBertTokenizer

    tokenizer = MegatronBertTokenizer.from_pretrained("megatronbert-uncased")
    arrays = read_shard(uncased_shard)
    positions, labels = arrays["masked_lm_positions"], arrays["masked_lm_ids"]
    valid = positions > 0
    shown = np.take_along_axis(arrays["input_ids"], positions, axis=1)[valid]
    originals = labels[valid]
    mask_fraction = float((shown == 103).mean())
    kept_fraction = float((shown == originals).mean())
    random_fraction = 1.0 - mask_fraction - kept_fraction
    assert valid.sum() > 20000
    # 3 standard deviations of a binomial over >20k predictions are below 0.009
    assert abs(mask_fraction - 0.8) < 0.01 and abs(kept_fraction - 0.1) < 0.01 and abs(random_fraction - 0.1) < 0.01
    # The labels are the original tokens: put them back and segment A / B are runs of the tokenized text.
    doc_strings = []
    for doc in sample_documents():
        ids = [i for sentence in doc for i in tokenizer.convert_tokens_to_ids(tokenizer.tokenize(sentence))]
        doc_strings.append(" " + " ".join(map(str, ids)) + " ")
    rng = np.random.default_rng(0)
    checked = {0: 0, 1: 0}
    random_b_from_another_document = 0
    for row in rng.choice(len(positions), 60, replace=False):
        ids = arrays["input_ids"][row].copy()
        count = int(valid[row].sum())
        ids[positions[row, :count]] = labels[row, :count]
        length = int(arrays["input_mask"][row].sum())
        first_sep = int(np.argmax(ids == 102))
        segment_a, segment_b = ids[1:first_sep], ids[first_sep + 1:length - 1]
        docs_a = {d for d, s in enumerate(doc_strings) if " " + " ".join(map(str, segment_a)) + " " in s}
        docs_b = {d for d, s in enumerate(doc_strings) if " " + " ".join(map(str, segment_b)) + " " in s}
        assert docs_a and docs_b, f"row {row}: a segment is not a run of the original text"
        is_random = int(arrays["next_sentence_labels"][row])
        if len(docs_a) == 1:  # A's document is known
            checked[is_random] += 1
            if not is_random:
                assert docs_a & docs_b, f"row {row}: label 0 (true continuation) but B is not from A's document"
            random_b_from_another_document += bool(is_random and not docs_a & docs_b)
    assert checked[0] > 10 and checked[1] > 10
    assert random_b_from_another_document == checked[1]


def test_same_seed_gives_identical_bytes_whatever_the_worker_count(tool, tmp_path):
    docs = sample_documents()
    inputs = []
    for name, part in (("a.txt", docs[1:3]), ("b.txt", docs[3:5])):
        path = tmp_path / name
        path.write_text("\n\n".join("\n".join(d) for d in part) + "\n", encoding="utf-8")
        inputs.append(str(path))
    common = ["--input_file", *inputs, "--max_seq_length", "64", "--max_predictions_per_seq", "10",
              "--dupe_factor", "1", "--shards_per_file", "2"]
    tool.main(common + ["--output_dir", str(tmp_path / "one"), "--seed", "3", "--num_workers", "1"])
    tool.main(common + ["--output_dir", str(tmp_path / "two"), "--seed", "3", "--num_workers", "2"])
    tool.main(common + ["--output_dir", str(tmp_path / "other"), "--seed", "4", "--num_workers", "1"])
    names = sorted(os.listdir(tmp_path / "one"))
    assert names == [f"pretraining_{i:05d}.hdf5" for i in range(4)] == sorted(os.listdir(tmp_path / "two"))
    for name in names:
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes()
        assert (tmp_path / "one" / name).read_bytes() != (tmp_path / "other" / name).read_bytes()


def test_json_lines_input_with_text_key(tool, tmp_path):
    docs = sample_documents()[1:4]
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"id": i, "body": " ".join(d[:40])}) + "\n" for i, d in enumerate(docs)))
    tool.main(["--input_file", str(path), "--output_dir", str(tmp_path / "out"), "--text_key", "body",
               "--max_seq_length", "64", "--max_predictions_per_seq", "10", "--dupe_factor", "1"])
    info = inspect_shard(str(tmp_path / "out" / "pretraining_00000.hdf5"), 10)
    assert info.num_samples > 20 and info.seq_length == 64
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"body": "One. Two."}) + "\n" + json.dumps({"text": "no body"}) + "\n")
    with pytest.raises(ValueError, match=r"bad\.jsonl:2 has no 'body' key"):
        tool.main(["--input_file", str(bad), "--output_dir", str(tmp_path / "bad"), "--text_key", "body"])


def test_split_sentences_keeps_abbreviations_and_initials(tool):
    text = ('Mr. K. Natsume wrote it. "Who is there?" he asked. It cost 3 yen, e.g. a lot! '
            'Revised by J. R. Kennedy in 1919. The end')
    assert tool.split_sentences(text) == [
        "Mr. K. Natsume wrote it.", '"Who is there?" he asked.', "It cost 3 yen, e.g. a lot!",
        "Revised by J. R. Kennedy in 1919.", "The end"]


# ---- the loader ---------------------------------------------------------------------------------------
def write_shard(path, n, seq=16, pred=4, start=0):
    """A synthetic DLE shard whose input_ids[:, 1] numbers the samples (start, start+1, ...)."""
    ids = np.zeros((n, seq), dtype=np.int32)
    ids[:, 0], ids[:, 1], ids[:, 2] = 101, np.arange(start, start + n) + 1000, 102
    positions = np.zeros((n, pred), dtype=np.int32)
    positions[:, 0], positions[:, 1] = 1, 2
    masked = np.zeros((n, pred), dtype=np.int32)
    masked[:, 0], masked[:, 1] = 7, 8
    with h5py.File(path, "w") as f:
        f["input_ids"], f["input_mask"] = ids, (ids > 0).astype(np.int8)
        f["segment_ids"] = np.zeros((n, seq), dtype=np.int8)
        f["masked_lm_positions"], f["masked_lm_ids"] = positions, masked
        f["next_sentence_labels"] = (np.arange(n) % 2).astype(np.int8)
    return str(path)


@pytest.fixture
def synthetic_shards(tmp_path):
    sizes = [10, 7, 12, 9]
    starts = np.cumsum([0] + sizes[:-1])
    return [write_shard(tmp_path / f"s{i}.hdf5", n, start=int(s)) for i, (n, s) in enumerate(zip(sizes, starts))]


def sample_ids(batch):
    return [int(x) - 1000 for x in batch["input_ids"][:, 1]]


def test_make_batch_gives_model_inputs_with_ignored_padding(synthetic_shards):
    arrays = read_shard(synthetic_shards[0], 4)
    batch = make_batch(arrays, np.array([3, 1]))
    assert sorted(batch) == sorted(["input_ids", "token_type_ids", "attention_mask", "masked_lm_positions", "labels",
                                    "next_sentence_label"])
    assert all(v.dtype == np.int64 for v in batch.values())
    assert batch["labels"].tolist() == [[7, 8, IGNORE_INDEX, IGNORE_INDEX]] * 2
    assert batch["masked_lm_positions"].tolist() == [[1, 2, 0, 0]] * 2
    assert batch["next_sentence_label"].tolist() == [1, 1] and sample_ids(batch) == [3, 1]


def test_each_rank_reads_its_own_files_and_the_same_number_of_batches(synthetic_shards):
    loaders = [PretrainingDataLoader(synthetic_shards, 4, 4, rank=r, world_size=2, seed=1) for r in range(2)]
    assert [s.path for s in loaders[0].shards] == synthetic_shards[0::2]
    assert [s.path for s in loaders[1].shards] == synthetic_shards[1::2]
    # rank 0 holds 10 + 12 = 22 samples, rank 1 7 + 9 = 16: both run 16 // 4 = 4 batches an epoch
    assert loaders[0].steps_per_epoch == loaders[1].steps_per_epoch == 4
    seen = [set(), set()]
    for rank, loader in enumerate(loaders):
        for _ in range(4):
            seen[rank].update(sample_ids(loader.next_batch()))
        loader.close()
    assert not seen[0] & seen[1]
    assert seen[1] == set(range(10, 17)) | set(range(29, 38))  # all of rank 1's samples, each once
    assert len(seen[0]) == 16 and seen[0] <= set(range(0, 10)) | set(range(17, 29))


def test_position_resumes_exactly_across_shards_and_epochs(synthetic_shards):
    reference = PretrainingDataLoader(synthetic_shards, 5, 4, seed=3)
    assert reference.steps_per_epoch == 38 // 5 == 7
    batches, states = [], []
    for _ in range(17):  # two epochs and a bit; batches span shard boundaries
        states.append(reference.state_dict())
        batches.append(sample_ids(reference.next_batch()))
    assert len(set(sum(batches[:7], []))) == 35  # no sample twice within an epoch
    assert batches[:7] != batches[7:14]  # a new order each epoch
    for k in (0, 3, 7, 12):
        resumed = PretrainingDataLoader(synthetic_shards, 5, 4, seed=3, prefetch=False)
        resumed.load_state_dict(json.loads(json.dumps(states[k])))  # as stored in trainer_state.json
        assert [sample_ids(resumed.next_batch()) for _ in range(17 - k)] == batches[k:]
    assert states[3]["shard"].startswith("s") and states[3]["epoch"] == 0 and states[12]["epoch"] == 1
    with pytest.raises(ValueError, match="batch_size 5, this run has 4"):
        PretrainingDataLoader(synthetic_shards, 4, 4, seed=3).load_state_dict(states[3])


def test_header_checks_name_the_file(tmp_path, synthetic_shards):
    os.makedirs(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="empty has no HDF5 shards"):
        list_shards(str(tmp_path / "empty"))
    with pytest.raises(ValueError, match=r"s0\.hdf5 has 4 masked positions per sequence but --max_predictions_per_seq is 20"):
        inspect_shard(synthetic_shards[0], 20)
    with pytest.raises(ValueError, match=r"s1\.hdf5: input_ids reaches id 1016 but the model's vocab_size is 1000"):
        read_shard(synthetic_shards[1], 4, vocab_size=1000)
