"""Evaluation metrics of the fine-tuning runners.

SQuAD: the official v1.1 / v2.0 evaluation script's logic (``evaluate-v2.0.py``, which reduces to v1.1's
numbers when every question has an answer): answer normalisation, exact match and token F1 as the maximum
over the gold answers, the no-answer threshold and the best-threshold search over the null odds.
Written here rather than taken from ``paddlenlp.metrics.squad`` because that one inverts ``has_ans`` when
an example carries ``is_impossible`` and strips extra (CJK) punctuation that the official script keeps.

GLUE: each task's official metric (CoLA Matthews correlation, MRPC/QQP accuracy and F1 of the positive
class, STS-B Pearson and Spearman correlation, accuracy elsewhere), in plain numpy.
"""

from __future__ import annotations

import collections
import re
import string
from typing import Dict, List, Mapping, Optional, Sequence

import numpy as np

# ---- SQuAD --------------------------------------------------------------------------------------
_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)
_PUNCTUATION = set(string.punctuation)


def normalize_answer(text: str) -> str:
    """Lower-case, drop ASCII punctuation and the articles a/an/the, collapse whitespace (official order)."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in _PUNCTUATION)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def _answer_tokens(text: str) -> List[str]:
    return normalize_answer(text).split() if text else []


def compute_exact(gold: str, prediction: str) -> int:
    return int(normalize_answer(gold) == normalize_answer(prediction))


def compute_f1(gold: str, prediction: str) -> float:
    gold_tokens, pred_tokens = _answer_tokens(gold), _answer_tokens(prediction)
    if not gold_tokens or not pred_tokens:
        # A no-answer on either side scores 1 only when both are no-answer.
        return float(gold_tokens == pred_tokens)
    common = collections.Counter(gold_tokens) & collections.Counter(pred_tokens)
    num_same = sum(common.values())
    if num_same == 0:
        return 0.0
    precision = num_same / len(pred_tokens)
    recall = num_same / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def squad_raw_scores(gold_answers: Mapping[str, Sequence[str]], predictions: Mapping[str, str]):
    """Exact and F1 of each question, the max over its gold answers. ``gold_answers[qid]`` lists the
    answer texts (empty for an unanswerable question, whose only right answer is the empty string)."""
    missing = [qid for qid in gold_answers if qid not in predictions]
    if missing:
        raise ValueError(
            f"{len(missing)} of {len(gold_answers)} questions have no prediction (first: {missing[:5]}); "
            "the official script would leave them out of the totals"
        )
    exact, f1 = {}, {}
    for qid, answers in gold_answers.items():
        golds = [a for a in answers if normalize_answer(a)] or [""]
        prediction = predictions[qid]
        exact[qid] = max(compute_exact(g, prediction) for g in golds)
        f1[qid] = max(compute_f1(g, prediction) for g in golds)
    return exact, f1


def _apply_no_answer_threshold(scores, na_probs, has_answer, threshold):
    return {qid: float(not has_answer[qid]) if na_probs[qid] > threshold else s for qid, s in scores.items()}


def _mean_dict(exact, f1, qids):
    total = len(qids)
    return collections.OrderedDict(
        [
            ("exact", 100.0 * sum(exact[q] for q in qids) / total),
            ("f1", 100.0 * sum(f1[q] for q in qids) / total),
            ("total", total),
        ]
    )


def find_best_threshold(predictions, scores, na_probs, has_answer):
    """The null-odds threshold that maximises the score, and that score (official ``find_best_thresh``):
    start from predicting no-answer everywhere, then admit questions in increasing order of null odds."""
    score = best_score = sum(1 for q in has_answer if not has_answer[q])
    best_threshold = 0.0
    for qid in sorted(na_probs, key=lambda q: na_probs[q]):
        if qid not in scores:
            continue
        if has_answer[qid]:
            score += scores[qid]
        elif predictions[qid]:
            score -= 1
        if score > best_score:
            best_score, best_threshold = score, na_probs[qid]
    return 100.0 * best_score / len(scores), best_threshold


def squad_evaluate(
    gold_answers: Mapping[str, Sequence[str]],
    predictions: Mapping[str, str],
    na_probs: Optional[Mapping[str, float]] = None,
    na_prob_thresh: float = 1.0,
) -> "collections.OrderedDict[str, float]":
    """The official SQuAD v1.1/v2.0 evaluation.

    Args:
        gold_answers: question id -> gold answer texts (empty list = unanswerable).
        predictions: question id -> predicted text ("" = no answer).
        na_probs: question id -> null odds (``null_odds.json``); when given, ``best_exact``,
            ``best_exact_thresh``, ``best_f1``, ``best_f1_thresh`` are added, as the official script does
            with ``--na-prob-file``.
        na_prob_thresh: questions whose null odds exceed it count as predicted no-answer (official default 1.0).

    Returns:
        ``exact, f1, total`` then ``HasAns_*`` / ``NoAns_*`` where such questions exist, then the best thresholds.
    """
    has_answer = {qid: bool(answers) for qid, answers in gold_answers.items()}
    exact_raw, f1_raw = squad_raw_scores(gold_answers, predictions)
    probs = dict(na_probs) if na_probs else {qid: 0.0 for qid in gold_answers}
    missing = [qid for qid in gold_answers if qid not in probs]
    if missing:
        raise ValueError(f"{len(missing)} questions have no null odds (first: {missing[:5]})")
    exact = _apply_no_answer_threshold(exact_raw, probs, has_answer, na_prob_thresh)
    f1 = _apply_no_answer_threshold(f1_raw, probs, has_answer, na_prob_thresh)
    result = _mean_dict(exact, f1, list(gold_answers))
    for prefix, wanted in (("HasAns", True), ("NoAns", False)):
        qids = [q for q, h in has_answer.items() if h == wanted]
        if qids:
            for key, value in _mean_dict(exact, f1, qids).items():
                result[f"{prefix}_{key}"] = value
    if na_probs:
        result["best_exact"], result["best_exact_thresh"] = find_best_threshold(predictions, exact_raw, probs, has_answer)
        result["best_f1"], result["best_f1_thresh"] = find_best_threshold(predictions, f1_raw, probs, has_answer)
    return result


# ---- GLUE ---------------------------------------------------------------------------------------
def accuracy(predictions, labels) -> float:
    predictions, labels = np.asarray(predictions), np.asarray(labels)
    return float((predictions == labels).mean())


def binary_precision_recall_f1(predictions, labels, positive: int = 1):
    """Precision, recall and F1 of the positive class (0 where undefined, as scikit-learn reports)."""
    predictions, labels = np.asarray(predictions), np.asarray(labels)
    true_pos = float(np.sum((predictions == positive) & (labels == positive)))
    pred_pos = float(np.sum(predictions == positive))
    gold_pos = float(np.sum(labels == positive))
    precision = true_pos / pred_pos if pred_pos else 0.0
    recall = true_pos / gold_pos if gold_pos else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return precision, recall, f1


def matthews_corrcoef(predictions, labels) -> float:
    """Matthews correlation of two binary labelings (0 when a row or column of the confusion matrix is empty)."""
    predictions, labels = np.asarray(predictions), np.asarray(labels)
    tp = float(np.sum((predictions == 1) & (labels == 1)))
    tn = float(np.sum((predictions == 0) & (labels == 0)))
    fp = float(np.sum((predictions == 1) & (labels == 0)))
    fn = float(np.sum((predictions == 0) & (labels == 1)))
    denominator = np.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    return float((tp * tn - fp * fn) / denominator) if denominator else 0.0


def _ranks(values: np.ndarray) -> np.ndarray:
    """Ranks with ties given their average rank (what Spearman's correlation needs)."""
    order = np.argsort(values, kind="mergesort")
    ranks = np.empty(len(values), dtype=np.float64)
    sorted_values = values[order]
    start = 0
    while start < len(values):
        end = start
        while end + 1 < len(values) and sorted_values[end + 1] == sorted_values[start]:
            end += 1
        ranks[order[start : end + 1]] = (start + end) / 2.0 + 1.0
        start = end + 1
    return ranks


def pearson_corrcoef(x, y) -> float:
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    x, y = x - x.mean(), y - y.mean()
    denominator = np.sqrt((x * x).sum() * (y * y).sum())
    return float((x * y).sum() / denominator) if denominator else 0.0


def spearman_corrcoef(x, y) -> float:
    return pearson_corrcoef(_ranks(np.asarray(x, dtype=np.float64)), _ranks(np.asarray(y, dtype=np.float64)))


# task -> metric family; the first key of each family's result is the one a best checkpoint is chosen by.
GLUE_METRICS = {
    "cola": "mcc",
    "sst-2": "acc",
    "mrpc": "acc_and_f1",
    "sts-b": "pearson_and_spearman",
    "qqp": "acc_and_f1",
    "mnli": "acc",
    "qnli": "acc",
    "rte": "acc",
    "wnli": "acc",
}


def glue_metrics(task: str, predictions, labels) -> Dict[str, float]:
    """The task's official metric(s) of ``predictions`` (class ids, or scores for STS-B) against ``labels``.
    The first key is the one to select a checkpoint by."""
    family = GLUE_METRICS.get(task.lower())
    if family is None:
        raise ValueError(f"unknown GLUE task {task!r}; known: {', '.join(GLUE_METRICS)}")
    predictions, labels = np.asarray(predictions), np.asarray(labels)
    if predictions.shape != labels.shape:
        raise ValueError(f"{len(predictions)} predictions for {len(labels)} labels")
    if len(labels) == 0:
        raise ValueError("no examples to evaluate")
    if family == "mcc":
        return {"mcc": matthews_corrcoef(predictions, labels), "acc": accuracy(predictions, labels)}
    if family == "acc_and_f1":
        acc = accuracy(predictions, labels)
        precision, recall, f1 = binary_precision_recall_f1(predictions, labels)
        return {"acc_and_f1": (acc + f1) / 2, "acc": acc, "precision": precision, "recall": recall, "f1": f1}
    if family == "pearson_and_spearman":
        pearson, spearman = pearson_corrcoef(predictions, labels), spearman_corrcoef(predictions, labels)
        return {"pearson_and_spearman": (pearson + spearman) / 2, "pearson": pearson, "spearman": spearman}
    return {"acc": accuracy(predictions, labels)}
