#!/usr/bin/env python
"""Raw text -> HDF5 pretraining shards in NVIDIA DeepLearningExamples' (DLE) BERT format.

Input: plain text with one sentence per line and a blank line between documents, or loose JSON lines
(``.json``/``.jsonl``: one object per line, one document each, its text under ``--text_key``, split into
sentences here). Google BERT's ``create_pretraining_data.py`` algorithm: sentence pairs packed up to
``--max_seq_length`` (shorter with ``--short_seq_prob``), a random B segment from another document half of
the time (``next_sentence_labels`` 1 = random), ``--masked_lm_prob`` of the tokens masked (at most
``--max_predictions_per_seq``): 80% [MASK], 10% a random token, 10% unchanged. The text is repeated
``--dupe_factor`` times with different masks.

Output: one or more shards per input file (``--shards_per_file``), each with the DLE keys::

    input_ids int32 [N, S]   input_mask int8 [N, S]   segment_ids int8 [N, S]     (zero padded)
    masked_lm_positions int32 [N, P]   masked_lm_ids int32 [N, P]                  (zero padded)
    next_sentence_labels int8 [N]

plus file attributes (``vocab_size``, ``do_lower_case``, ...) that DLE readers ignore and ``run_pretrain.py``
checks against the model. Input files are processed in parallel (``--num_workers``); the same inputs and
``--seed`` give byte-identical shards.

    python tools/create_pretraining_data.py --input_file data/sample_text.txt --output_dir shards \
        --vocab_file megatronbert-uncased --max_seq_length 128 --max_predictions_per_seq 20
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import random
import re
import sys
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

SHARD_SUFFIX = ".hdf5"
JSON_SUFFIXES = (".json", ".jsonl")

# ---- sentence splitting (for JSON documents; plain-text input is one sentence per line already) ------
_ABBREVIATIONS = {
    "mr", "mrs", "ms", "dr", "prof", "st", "sr", "jr", "messrs", "mt", "no", "vs", "etc", "e.g", "i.e",
    "fig", "gen", "gov", "col", "capt", "lt", "sgt", "rev", "hon", "inc", "ltd", "co", "jan", "feb", "mar",
    "apr", "jun", "jul", "aug", "sep", "sept", "oct", "nov", "dec", "u.s", "a.m", "p.m",
}
# A sentence ends at . ! ? (and closing quotes/brackets after it) followed by space and a capital, a digit
# or an opening quote.
_BOUNDARY = re.compile(r"([.!?][\"'\u2019\u201d)\]]*)\s+(?=[\"'\u2018\u201c(\[]?[A-Z0-9])")


def split_sentences(text: str) -> List[str]:
    """Rule-based English sentence splitter: good enough for pretraining pairs, with no model to download.

    Does not split after common abbreviations (``Mr.``, ``e.g.``) or single initials (``J. R. Kennedy``).
    """
    text = " ".join(text.split())
    sentences, start = [], 0
    for match in _BOUNDARY.finditer(text):
        end = match.end(1)
        words = text[start:end].split()
        last = words[-1].rstrip(".!?\"')]\u2019\u201d").lower() if words else ""
        if match.group(1).startswith(".") and (last in _ABBREVIATIONS or (len(last) == 1 and last.isalpha())):
            continue
        sentences.append(text[start:end].strip())
        start = match.end()
    tail = text[start:].strip()
    if tail:
        sentences.append(tail)
    return [s for s in sentences if s]


# ---- reading documents --------------------------------------------------------------------------------
def read_documents(path: str, text_key: str = "text", input_format: str = "auto",
                   progress: Optional[Callable[[int], None]] = None) -> List[List[str]]:
    """Documents (lists of sentences) of one input file. ``progress`` is called with bytes read."""
    is_json = input_format == "jsonl" or (input_format == "auto" and path.endswith(JSON_SUFFIXES))
    documents: List[List[str]] = [[]]
    with open(path, "rb") as f:
        for number, raw in enumerate(f, 1):
            if progress is not None:
                progress(len(raw))
            try:
                line = raw.decode("utf-8").strip()
            except UnicodeDecodeError as err:
                raise ValueError(f"{path}:{number} is not UTF-8 ({err})") from None
            if is_json:
                if not line:
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as err:
                    raise ValueError(f"{path}:{number} is not a JSON object ({err})") from None
                if not isinstance(record, dict) or text_key not in record:
                    raise ValueError(f"{path}:{number} has no {text_key!r} key (set --text_key)")
                documents.append(split_sentences(str(record[text_key])))
            elif not line:
                documents.append([])
            else:
                documents[-1].append(line)
    return [doc for doc in documents if doc]


# ---- instances (Google BERT's create_pretraining_data.py, on token ids) -----------------------------
@dataclass
class SpecialIds:
    cls: int
    sep: int
    mask: int
    vocab_size: int
    subword: Optional[np.ndarray] = None  # bool per id: a "##" continuation piece (whole-word masking)


@dataclass
class Instance:
    tokens: List[int]
    segment_ids: List[int]
    masked_lm_positions: List[int]
    masked_lm_ids: List[int]
    is_random_next: bool


def truncate_seq_pair(tokens_a: List[int], tokens_b: List[int], max_num_tokens: int, rng: random.Random) -> None:
    """Trim the longer segment, from the front or the back at random, until the pair fits."""
    while len(tokens_a) + len(tokens_b) > max_num_tokens:
        trunc = tokens_a if len(tokens_a) > len(tokens_b) else tokens_b
        if rng.random() < 0.5:
            del trunc[0]
        else:
            trunc.pop()


def create_masked_lm_predictions(tokens: List[int], masked_lm_prob: float, max_predictions_per_seq: int,
                                 special: SpecialIds, rng: random.Random, whole_word: bool = False):
    """(masked tokens, positions, original ids): 80% [MASK], 10% random id, 10% unchanged."""
    cand_indexes: List[List[int]] = []
    for i, token in enumerate(tokens):
        if token in (special.cls, special.sep):
            continue
        if whole_word and cand_indexes and special.subword is not None and special.subword[token]:
            cand_indexes[-1].append(i)
        else:
            cand_indexes.append([i])
    rng.shuffle(cand_indexes)
    output = list(tokens)
    num_to_predict = min(max_predictions_per_seq, max(1, int(round(len(tokens) * masked_lm_prob))))
    masked = []
    for index_set in cand_indexes:
        if len(masked) >= num_to_predict:
            break
        if len(masked) + len(index_set) > num_to_predict:
            continue
        for index in index_set:
            if rng.random() < 0.8:
                replacement = special.mask
            elif rng.random() < 0.5:
                replacement = tokens[index]
            else:
                replacement = rng.randint(0, special.vocab_size - 1)
            output[index] = replacement
            masked.append((index, tokens[index]))
    masked.sort()
    return output, [m[0] for m in masked], [m[1] for m in masked]


def create_instances_from_document(all_documents: List[List[List[int]]], document_index: int, max_seq_length: int,
                                   short_seq_prob: float, masked_lm_prob: float, max_predictions_per_seq: int,
                                   special: SpecialIds, rng: random.Random, whole_word: bool = False) -> List[Instance]:
    """Sentence-pair instances from one document (segment A, then its true continuation or a random B)."""
    document = all_documents[document_index]
    max_num_tokens = max_seq_length - 3  # [CLS] A [SEP] B [SEP]
    target_seq_length = max_num_tokens
    if rng.random() < short_seq_prob:
        target_seq_length = rng.randint(2, max_num_tokens)
    instances: List[Instance] = []
    current_chunk: List[List[int]] = []
    current_length = 0
    i = 0
    while i < len(document):
        segment = document[i]
        current_chunk.append(segment)
        current_length += len(segment)
        if i == len(document) - 1 or current_length >= target_seq_length:
            if current_chunk:
                a_end = rng.randint(1, len(current_chunk) - 1) if len(current_chunk) >= 2 else 1
                tokens_a = [t for chunk in current_chunk[:a_end] for t in chunk]
                tokens_b: List[int] = []
                is_random_next = len(current_chunk) == 1 or rng.random() < 0.5
                if is_random_next:
                    target_b_length = target_seq_length - len(tokens_a)
                    for _ in range(10):
                        random_document_index = rng.randint(0, len(all_documents) - 1)
                        if random_document_index != document_index:
                            break
                    random_document = all_documents[random_document_index]
                    random_start = rng.randint(0, len(random_document) - 1)
                    for j in range(random_start, len(random_document)):
                        tokens_b.extend(random_document[j])
                        if len(tokens_b) >= target_b_length:
                            break
                    i -= len(current_chunk) - a_end  # the unused segments start the next instance
                else:
                    tokens_b = [t for chunk in current_chunk[a_end:] for t in chunk]
                truncate_seq_pair(tokens_a, tokens_b, max_num_tokens, rng)
                if tokens_a and tokens_b:
                    tokens = [special.cls] + tokens_a + [special.sep] + tokens_b + [special.sep]
                    segment_ids = [0] * (len(tokens_a) + 2) + [1] * (len(tokens_b) + 1)
                    tokens, positions, labels = create_masked_lm_predictions(
                        tokens, masked_lm_prob, max_predictions_per_seq, special, rng, whole_word)
                    instances.append(Instance(tokens, segment_ids, positions, labels, is_random_next))
            current_chunk, current_length = [], 0
        i += 1
    return instances


def instances_to_arrays(instances: Sequence[Instance], max_seq_length: int,
                        max_predictions_per_seq: int) -> Dict[str, np.ndarray]:
    """The DLE arrays, zero padded, with DLE's dtypes."""
    n = len(instances)
    arrays = {
        "input_ids": np.zeros((n, max_seq_length), dtype=np.int32),
        "input_mask": np.zeros((n, max_seq_length), dtype=np.int8),
        "segment_ids": np.zeros((n, max_seq_length), dtype=np.int8),
        "masked_lm_positions": np.zeros((n, max_predictions_per_seq), dtype=np.int32),
        "masked_lm_ids": np.zeros((n, max_predictions_per_seq), dtype=np.int32),
        "next_sentence_labels": np.zeros((n,), dtype=np.int8),
    }
    for row, inst in enumerate(instances):
        length, num_masked = len(inst.tokens), len(inst.masked_lm_positions)
        arrays["input_ids"][row, :length] = inst.tokens
        arrays["input_mask"][row, :length] = 1
        arrays["segment_ids"][row, :length] = inst.segment_ids
        arrays["masked_lm_positions"][row, :num_masked] = inst.masked_lm_positions
        arrays["masked_lm_ids"][row, :num_masked] = inst.masked_lm_ids
        arrays["next_sentence_labels"][row] = int(inst.is_random_next)
    return arrays


def write_shard(path: str, arrays: Dict[str, np.ndarray], attrs: Dict[str, object]) -> None:
    """One HDF5 shard, gzip-compressed as DLE writes them. ``track_times=False`` keeps the bytes a function
    of the data only (HDF5 otherwise stamps each dataset with its creation time); written under a
    temporary name and renamed, so an interrupted run leaves no half-written shard."""
    import h5py

    tmp = f"{path}.tmp.{os.getpid()}"
    with h5py.File(tmp, "w", track_order=False) as f:
        for name, value in arrays.items():
            f.create_dataset(name, data=value, dtype=value.dtype, compression="gzip", track_times=False)
        for key, value in attrs.items():
            f.attrs[key] = value
    os.replace(tmp, path)


# ---- one input file -> shards ---------------------------------------------------------------------
@dataclass
class Options:
    max_seq_length: int
    max_predictions_per_seq: int
    masked_lm_prob: float
    dupe_factor: int
    short_seq_prob: float
    seed: int
    shards_per_file: int
    whole_word_mask: bool
    text_key: str
    input_format: str
    output_dir: str
    output_prefix: str


_TOKENIZER = None  # per process: loaded once in the parent and inherited by forked workers


def load_tokenizer(vocab: str, do_lower_case: Optional[bool]):
    """MegatronBertTokenizer from a registered name, a directory with vocab.txt or a vocab file."""
    from paddle_megatronbert.tokenizer import MegatronBertTokenizer

    kwargs = {} if do_lower_case is None else {"do_lower_case": do_lower_case}
    return MegatronBertTokenizer.from_pretrained(vocab, **kwargs)


def special_ids(tokenizer) -> SpecialIds:
    vocab_size = len(tokenizer)
    tokens = tokenizer.convert_ids_to_tokens(list(range(vocab_size)))
    subword = np.array([t.startswith("##") for t in tokens], dtype=bool)
    return SpecialIds(tokenizer.cls_token_id, tokenizer.sep_token_id, tokenizer.mask_token_id, vocab_size, subword)


def shard_paths(options: Options, file_index: int) -> List[str]:
    first = file_index * options.shards_per_file
    return [os.path.join(options.output_dir, f"{options.output_prefix}_{first + k:05d}{SHARD_SUFFIX}")
            for k in range(options.shards_per_file)]


def process_file(file_index: int, path: str, options: Options, tokenizer=None,
                 progress: Optional[Callable[[int], None]] = None) -> Dict[str, object]:
    """Tokenize one input file, build its instances and write its shards. Each file has its own RNG
    (``seed`` and the file's index), so the result does not depend on the number of workers."""
    tokenizer = tokenizer or _TOKENIZER
    special = special_ids(tokenizer)
    documents = []
    for doc in read_documents(path, options.text_key, options.input_format, progress):
        ids = [tokenizer.convert_tokens_to_ids(tokenizer.tokenize(sentence)) for sentence in doc]
        ids = [s for s in ids if s]
        if ids:
            documents.append(ids)
    rng = random.Random(options.seed * 1_000_003 + file_index)
    rng.shuffle(documents)
    instances: List[Instance] = []
    for _ in range(options.dupe_factor):
        for document_index in range(len(documents)):
            instances.extend(create_instances_from_document(
                documents, document_index, options.max_seq_length, options.short_seq_prob, options.masked_lm_prob,
                options.max_predictions_per_seq, special, rng, options.whole_word_mask))
    rng.shuffle(instances)
    written = []
    if instances:
        parts = np.array_split(np.arange(len(instances)), options.shards_per_file)
        attrs = {
            "vocab_size": special.vocab_size,
            "do_lower_case": bool(getattr(tokenizer, "do_lower_case", True)),
            "max_seq_length": options.max_seq_length,
            "max_predictions_per_seq": options.max_predictions_per_seq,
            "masked_lm_prob": options.masked_lm_prob,
            "dupe_factor": options.dupe_factor,
            "seed": options.seed,
            "source": os.path.basename(path),
        }
        for shard_path, rows in zip(shard_paths(options, file_index), parts):
            if len(rows) == 0:
                continue
            arrays = instances_to_arrays([instances[r] for r in rows], options.max_seq_length,
                                         options.max_predictions_per_seq)
            write_shard(shard_path, arrays, attrs)
            written.append(shard_path)
    return {"input": path, "documents": len(documents), "instances": len(instances), "shards": written,
            "bytes": os.path.getsize(path)}


def _process_job(job):
    return process_file(*job)


# ---- command line ---------------------------------------------------------------------------------
def expand_inputs(patterns: Sequence[str]) -> List[str]:
    """Files named directly, by glob, or inside directories; sorted, so the order (and seeds) are stable."""
    files: List[str] = []
    for pattern in patterns:
        for item in pattern.split(","):
            item = item.strip()
            if not item:
                continue
            if os.path.isdir(item):
                files.extend(sorted(os.path.join(item, n) for n in os.listdir(item)
                                    if os.path.isfile(os.path.join(item, n)) and not n.startswith(".")))
            elif any(ch in item for ch in "*?["):
                files.extend(sorted(p for p in glob.glob(item) if os.path.isfile(p)))
            elif os.path.isfile(item):
                files.append(item)
            else:
                raise FileNotFoundError(f"input file not found: {item}")
    if not files:
        raise FileNotFoundError(f"no input files match {', '.join(patterns)}")
    return files


def _str2bool(value: str) -> bool:
    if value.lower() in ("1", "true", "yes", "y"):
        return True
    if value.lower() in ("0", "false", "no", "n"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {value!r}")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input_file", nargs="+", required=True,
                        help="text or JSON-lines files, globs, comma lists or directories")
    parser.add_argument("--output_dir", required=True, help="directory for the .hdf5 shards")
    parser.add_argument("--output_prefix", default="pretraining", help="shards are PREFIX_00000.hdf5, ...")
    parser.add_argument("--vocab_file", default="megatronbert-uncased",
                        help="registered name (megatronbert-uncased / -cased), directory with vocab.txt, or a vocab file")
    parser.add_argument("--do_lower_case", type=_str2bool, default=None,
                        help="default: the registered name's casing, else true")
    parser.add_argument("--max_seq_length", type=int, default=128,
                        help="tokens per sequence, at most --max_position_embeddings")
    parser.add_argument("--max_position_embeddings", type=int, default=512,
                        help="the position table of the model the shards are for (512: every MegatronBERT and BERT "
                             "config): longer sequences are refused, as that model could not read them")
    parser.add_argument("--max_predictions_per_seq", type=int, default=20)
    parser.add_argument("--masked_lm_prob", type=float, default=0.15)
    parser.add_argument("--dupe_factor", type=int, default=10, help="times the text is repeated with new masks")
    parser.add_argument("--short_seq_prob", type=float, default=0.1)
    parser.add_argument("--do_whole_word_mask", action="store_true", help="mask every piece of a word together")
    parser.add_argument("--seed", "--random_seed", dest="seed", type=int, default=12345)
    parser.add_argument("--shards_per_file", type=int, default=1, help="shards written for each input file")
    parser.add_argument("--text_key", default="text", help="key of the text in JSON-lines input")
    parser.add_argument("--input_format", choices=("auto", "text", "jsonl"), default="auto",
                        help="auto: .json/.jsonl files are JSON lines, others plain text")
    parser.add_argument("--num_workers", type=int, default=None, help="processes (default: all cores)")
    args = parser.parse_args(argv)
    problems = []
    if args.max_seq_length < 8:
        problems.append(f"--max_seq_length must be >= 8, got {args.max_seq_length}")
    elif args.max_seq_length > args.max_position_embeddings:
        problems.append(f"--max_seq_length {args.max_seq_length} exceeds --max_position_embeddings "
                        f"{args.max_position_embeddings} (the model's position table); pass "
                        "--max_position_embeddings N for a model with a longer one")
    if not 1 <= args.max_predictions_per_seq <= args.max_seq_length:
        problems.append(f"--max_predictions_per_seq must be in [1, max_seq_length], got {args.max_predictions_per_seq}")
    if not 0.0 < args.masked_lm_prob <= 1.0:
        problems.append(f"--masked_lm_prob must be in (0, 1], got {args.masked_lm_prob}")
    if not 0.0 <= args.short_seq_prob <= 1.0:
        problems.append(f"--short_seq_prob must be in [0, 1], got {args.short_seq_prob}")
    if args.dupe_factor < 1 or args.shards_per_file < 1:
        problems.append("--dupe_factor and --shards_per_file must be >= 1")
    if problems:
        parser.error("; ".join(problems))
    return args


def main(argv=None) -> List[Dict[str, object]]:
    global _TOKENIZER
    args = parse_args(argv)
    from tqdm import tqdm

    if os.path.exists(args.output_dir) and not os.path.isdir(args.output_dir):
        raise ValueError(f"--output_dir {args.output_dir} exists and is not a directory")
    files = expand_inputs(args.input_file)
    _TOKENIZER = load_tokenizer(args.vocab_file, args.do_lower_case)  # before any output: a bad vocab does no work
    os.makedirs(args.output_dir, exist_ok=True)
    options = Options(args.max_seq_length, args.max_predictions_per_seq, args.masked_lm_prob, args.dupe_factor,
                      args.short_seq_prob, args.seed, args.shards_per_file, args.do_whole_word_mask, args.text_key,
                      args.input_format, args.output_dir, args.output_prefix)
    workers = min(args.num_workers or os.cpu_count() or 1, len(files))
    total_bytes = sum(os.path.getsize(f) for f in files)
    results = []
    # disable=None: a bar on a terminal, nothing in a log file (tqdm's carriage-return updates become a line each)
    with tqdm(total=total_bytes, unit="B", unit_scale=True, desc="create_pretraining_data", disable=None) as bar:
        if workers <= 1:
            for index, path in enumerate(files):
                results.append(process_file(index, path, options, progress=bar.update))
        else:
            import multiprocessing

            # fork: workers inherit the loaded tokenizer instead of importing paddlenlp again
            with multiprocessing.get_context("fork").Pool(workers) as pool:
                for result in pool.imap(_process_job, [(i, p, options) for i, p in enumerate(files)]):
                    bar.update(result["bytes"])
                    results.append(result)
    for result in results:
        if not result["shards"]:
            print(f"warning: {result['input']} gave no instances (no document long enough)", file=sys.stderr)
    instances = sum(r["instances"] for r in results)
    if instances == 0:
        raise SystemExit(f"error: no training instances from {len(files)} input file(s); is the text empty?")
    shards = sum(len(r["shards"]) for r in results)
    print(f"wrote {instances} instances in {shards} shard(s) to {args.output_dir} "
          f"(seq {args.max_seq_length}, {args.max_predictions_per_seq} predictions, vocab {len(_TOKENIZER)})")
    return results


if __name__ == "__main__":
    try:
        main()
    except (ValueError, OSError) as err:  # OSError: FileNotFoundError, PermissionError, a full disk ...
        sys.exit(f"error: {err}")
