"""GLUE: the nine tasks' files in the official directory layout (``DATA_DIR/<Task>/{train,dev}.tsv``), read
strictly, and their features.

Columns are found by the header's names (CoLA has no header: fixed positions), so MNLI's 12-column train
and 16-column dev files read alike. Every row must have the header's number of columns: a row with a
different count is an error naming the file and line, never a silently shifted label.
"""

from __future__ import annotations

import csv
import io
import os
import sys
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple, Union

from ..logging_utils import progress
from .text_files import read_utf8_text


@dataclass(frozen=True)
class GlueTask:
    """How one GLUE task is laid out and scored.

    Args:
        name: lower-case key (``sst-2``); ``directory``: its folder in the GLUE data dir (``SST-2``).
        text_columns: header names of the one or two text columns (CoLA: column positions).
        label_column: header name (CoLA: position) of the label.
        labels: label strings in class-id order (PaddleNLP's order); None for regression (STS-B).
        dev_splits: dev file stems; MNLI has matched and mismatched.
        has_header: whether the first line names the columns.
        num_columns: columns of a header-less file (CoLA: 4).
    """

    name: str
    directory: str
    text_columns: Tuple[Union[str, int], ...]
    label_column: Union[str, int]
    labels: Optional[Tuple[str, ...]]
    dev_splits: Tuple[str, ...] = ("dev",)
    has_header: bool = True
    num_columns: Optional[int] = None

    @property
    def num_labels(self) -> int:
        return 1 if self.labels is None else len(self.labels)

    @property
    def is_regression(self) -> bool:
        return self.labels is None


GLUE_TASKS: Dict[str, GlueTask] = {
    task.name: task
    for task in (
        GlueTask("cola", "CoLA", (3,), 1, ("0", "1"), has_header=False, num_columns=4),
        GlueTask("sst-2", "SST-2", ("sentence",), "label", ("0", "1")),
        GlueTask("mrpc", "MRPC", ("#1 String", "#2 String"), "Quality", ("0", "1")),
        GlueTask("sts-b", "STS-B", ("sentence1", "sentence2"), "score", None),
        GlueTask("qqp", "QQP", ("question1", "question2"), "is_duplicate", ("0", "1")),
        GlueTask("mnli", "MNLI", ("sentence1", "sentence2"), "gold_label", ("contradiction", "entailment", "neutral"),
                 dev_splits=("dev_matched", "dev_mismatched")),
        GlueTask("qnli", "QNLI", ("question", "sentence"), "label", ("entailment", "not_entailment")),
        GlueTask("rte", "RTE", ("sentence1", "sentence2"), "label", ("entailment", "not_entailment")),
        GlueTask("wnli", "WNLI", ("sentence1", "sentence2"), "label", ("0", "1")),
    )
}


def get_glue_task(name: str) -> GlueTask:
    """The task of a case-insensitive name: ``SST-2``, ``sst2``, ``mnli``, ``STS-B``, ``stsb`` ..."""
    key = name.strip().lower()
    aliases = {t.name.replace("-", ""): t.name for t in GLUE_TASKS.values()}
    key = aliases.get(key.replace("-", ""), key)
    if key not in GLUE_TASKS:
        raise ValueError(f"unknown GLUE task {name!r}; choose one of {', '.join(t.directory for t in GLUE_TASKS.values())}")
    return GLUE_TASKS[key]


@dataclass
class GlueExample:
    """One row: ``text_a`` (and ``text_b`` for pair tasks) and its label (class id, or float for STS-B)."""

    text_a: str
    text_b: Optional[str]
    label: Union[int, float]


def read_glue_tsv(path: str, task: GlueTask) -> List[GlueExample]:
    """Examples of one official GLUE TSV file (tab-separated, no quoting: sentences contain quotes)."""
    text = read_utf8_text(path, f"GLUE {task.directory}")
    csv.field_size_limit(sys.maxsize)
    examples = []
    with io.StringIO(text, newline="") as f:
        reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        if task.has_header:
            header = next(reader, None)
            if header is None:
                raise ValueError(f"{path} is empty (expected a header line)")
            missing = [c for c in (*task.text_columns, task.label_column) if c not in header]
            if missing:
                raise ValueError(f"{path}: header lacks the column(s) {missing} of {task.directory}; it has {header}")
            text_index = [header.index(c) for c in task.text_columns]
            label_index = header.index(task.label_column)
            num_columns = len(header)
        else:
            text_index, label_index, num_columns = list(task.text_columns), task.label_column, task.num_columns
        for row in reader:
            line = reader.line_num
            if not row or row == [""]:
                continue
            if len(row) != num_columns:
                raise ValueError(
                    f"{path}:{line}: expected {num_columns} tab-separated columns for {task.directory}, found {len(row)}"
                )
            raw_label = row[label_index].strip()
            if task.is_regression:
                try:
                    label: Union[int, float] = float(raw_label)
                except ValueError:
                    raise ValueError(f"{path}:{line}: label {raw_label!r} is not a number") from None
            elif raw_label in task.labels:
                label = task.labels.index(raw_label)
            else:
                raise ValueError(f"{path}:{line}: label {raw_label!r} is not one of {list(task.labels)}")
            texts = [row[i] for i in text_index]
            examples.append(GlueExample(texts[0], texts[1] if len(texts) > 1 else None, label))
    if not examples:
        raise ValueError(f"{path} has no examples")
    return examples


def glue_task_dir(data_dir: str, task: GlueTask) -> str:
    """The directory of ``task``'s TSV files: ``data_dir`` may be the GLUE root (``glue_data``, holding
    ``MNLI/``, as PaddleNLP takes it) or the task's own directory (``glue_data/MNLI``, as NVIDIA
    DeepLearningExamples and HF's old run_glue.py take it). Task directories match case-insensitively."""
    if not os.path.isdir(data_dir):
        raise FileNotFoundError(f"--data_dir {data_dir} is not a directory")
    entries = {name.lower(): name for name in os.listdir(data_dir)}
    if task.directory.lower() in entries and os.path.isdir(os.path.join(data_dir, entries[task.directory.lower()])):
        return os.path.join(data_dir, entries[task.directory.lower()])
    own_files = [f"{split}.tsv" for split in ("train", *task.dev_splits)]
    if any(name in entries for name in own_files):
        named = os.path.basename(os.path.normpath(data_dir)).lower()
        others = [t.directory for t in GLUE_TASKS.values() if t.directory.lower() == named and t is not task]
        if others:  # SST-2's train.tsv/dev.tsv would read as another task's
            raise ValueError(f"--data_dir {data_dir} is the {others[0]} directory but --task_name is {task.directory}")
        return data_dir
    raise FileNotFoundError(f"--data_dir {data_dir} has neither a {task.directory}/ directory (the GLUE root) nor "
                            f"{task.directory}'s {' / '.join(own_files)} (its task directory)")


def load_glue_split(task: GlueTask, split: str, data_dir: Optional[str] = None) -> List[GlueExample]:
    """``split`` (``train``, ``dev``, ``dev_matched`` ...) from ``<split>.tsv`` of the task's directory in
    ``data_dir`` (:func:`glue_task_dir`), or without ``data_dir`` from PaddleNLP's ``glue`` dataset
    (downloaded once; needs a network)."""
    if data_dir:
        return read_glue_tsv(os.path.join(glue_task_dir(data_dir, task), f"{split}.tsv"), task)
    try:
        from paddlenlp.datasets import load_dataset

        dataset = load_dataset("glue", task.name, splits=split)
    except Exception as err:  # offline: a requests/urllib error deep inside PaddleNLP
        raise OSError(
            f"cannot load PaddleNLP's glue/{task.name} {split} ({type(err).__name__}: {err}); without a network "
            f"pass --data_dir with the official GLUE layout ({task.directory}/{split}.tsv)"
        ) from None
    examples = []
    for record in dataset:
        text_a = record.get("sentence", record.get("sentence1"))
        raw = record["labels"]
        label = float(raw) if task.is_regression else (task.labels.index(raw) if isinstance(raw, str) else int(raw))
        examples.append(GlueExample(text_a, record.get("sentence2"), label))
    return examples


def build_glue_features(examples: Sequence[GlueExample], tokenizer, max_seq_length: int = 128,
                        show_progress: bool = True) -> List[Dict[str, object]]:
    """``[CLS] a [SEP] (b [SEP])`` ids, truncated longest-first to ``max_seq_length``, with the label."""
    features = []
    for example in progress(examples, "building GLUE features", enabled=show_progress):
        encoded = tokenizer(example.text_a, text_pair=example.text_b, max_length=max_seq_length, truncation=True)
        features.append({"input_ids": encoded["input_ids"], "token_type_ids": encoded["token_type_ids"],
                         "labels": example.label})
    return features
