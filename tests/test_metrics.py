"""The official SQuAD v1.1/v2.0 evaluation and the GLUE metrics, on hand-checked cases."""

import json
import os

import numpy as np
import pytest

from paddle_megatronbert.metrics import (
    GLUE_METRICS,
    compute_exact,
    compute_f1,
    glue_metrics,
    matthews_corrcoef,
    normalize_answer,
    pearson_corrcoef,
    spearman_corrcoef,
    squad_evaluate,
)

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "squad")


# ---- SQuAD ----------------------------------------------------------------------------------------
def test_normalize_answer_follows_the_official_rules():
    assert normalize_answer("The  Cat's hat!") == "cats hat"  # lower, punctuation, articles, whitespace
    assert normalize_answer("An apple a day") == "apple day"
    assert normalize_answer("theatre\tthe\nend") == "theatre end"  # articles only as whole words
    assert normalize_answer("Crème  Brûlée") == "crème brûlée"  # accents are kept, as in the official script
    assert normalize_answer("“quoted”") == "“quoted”"  # only ASCII punctuation is dropped


def test_exact_and_f1_hand_checked():
    # gold tokens [cat, sat, on, mat], predicted [cat, sat]: precision 1, recall 1/2
    assert compute_f1("the cat sat on the mat", "cat sat") == pytest.approx(2 / 3)
    assert compute_exact("The Cat.", "cat") == 1
    assert compute_f1("blue whale", "whale blue") == 1.0 and compute_exact("blue whale", "whale blue") == 0
    assert compute_f1("", "") == 1.0 and compute_f1("", "something") == 0.0 and compute_f1("a", "x") == 0.0


def test_max_over_gold_answers_and_no_answer_cases():
    gold = {"multi": ["1912", "in 1912"], "none": [], "none_wrong": [], "article_only": ["the"]}
    preds = {"multi": "opened in 1912", "none": "", "none_wrong": "London", "article_only": ""}
    result = squad_evaluate(gold, preds)
    # multi: vs "1912" F1 = 2*(1/3)*1/(4/3) = 0.5; vs "in 1912" F1 = 2*(2/3)*1/(5/3) = 0.8 -> 0.8, exact 0.
    # article_only: the gold normalises to "", so only the empty answer is right (official rule).
    assert result["exact"] == pytest.approx(100 * (0 + 1 + 0 + 1) / 4)
    assert result["f1"] == pytest.approx(100 * (0.8 + 1 + 0 + 1) / 4)
    assert result["HasAns_total"] == 2 and result["NoAns_total"] == 2
    assert result["HasAns_f1"] == pytest.approx(100 * (0.8 + 1) / 2)
    assert "best_f1" not in result  # only with null odds, as the official script with --na-prob-file


def _v2_case():
    gold = {"a": ["Paris"], "b": ["blue whale"], "c": [], "d": []}
    preds = {"a": "Paris", "b": "whale", "c": "", "d": "London"}
    null_odds = {"a": -3.0, "b": -1.0, "c": 2.0, "d": 0.5}
    return gold, preds, null_odds


def test_squad_v2_with_best_thresholds_hand_checked():
    gold, preds, null_odds = _v2_case()
    result = squad_evaluate(gold, preds, null_odds)
    expected = {
        "exact": 50.0, "f1": 100 * (1 + 2 / 3 + 1 + 0) / 4, "total": 4,
        "HasAns_exact": 50.0, "HasAns_f1": 100 * (1 + 2 / 3) / 2, "HasAns_total": 2,
        "NoAns_exact": 50.0, "NoAns_f1": 50.0, "NoAns_total": 2,
        # Start from "null everywhere" (2 right), admit in order of odds: a (+1 -> 3, thresh -3), b (+0 exact,
        # +2/3 f1 -> thresh -1), d (-1: predicted an answer to an unanswerable question), c (+0).
        "best_exact": 75.0, "best_exact_thresh": -3.0,
        "best_f1": 100 * (3 + 2 / 3) / 4, "best_f1_thresh": -1.0,
    }
    assert list(result) == list(expected)
    for key, value in expected.items():
        assert result[key] == pytest.approx(value), key
    # A stricter threshold turns b and d into "no answer": d becomes right, b wrong.
    strict = squad_evaluate(gold, preds, null_odds, na_prob_thresh=-2.0)
    assert strict["exact"] == pytest.approx(100 * (1 + 0 + 1 + 1) / 4)
    assert strict["f1"] == pytest.approx(100 * (1 + 0 + 1 + 1) / 4)


def _paddlenlp_examples(gold):
    # Without "is_impossible": PaddleNLP's make_qid_to_has_ans then decides from answer_start (with the key it
    # uses is_impossible itself as has_ans, which is inverted).
    return [{"id": qid, "answers": {"text": list(a), "answer_start": [0] * len(a)}} for qid, a in gold.items()]


def test_agrees_with_paddlenlp_squad_evaluate():
    from paddlenlp.metrics.squad import squad_evaluate as paddlenlp_squad_evaluate

    gold, preds, null_odds = _v2_case()
    theirs = paddlenlp_squad_evaluate(_paddlenlp_examples(gold), preds, null_odds)
    ours = squad_evaluate(gold, preds, null_odds)
    assert set(theirs) == set(ours)
    for key in ours:
        assert ours[key] == pytest.approx(theirs[key]), key

    # v1 on the fixture file: every question answered with a variant of its gold answer.
    with open(os.path.join(FIXTURES, "squad_v1.json"), encoding="utf-8") as f:
        data = json.load(f)
    gold = {qa["id"]: [a["text"] for a in qa["answers"]] for art in data["data"] for p in art["paragraphs"]
            for qa in p["qas"]}
    preds = {qid: (answers[0] + " extra" if i % 2 else answers[-1].upper()) for i, (qid, answers) in enumerate(gold.items())}
    theirs = paddlenlp_squad_evaluate(_paddlenlp_examples(gold), preds)
    ours = squad_evaluate(gold, preds)
    assert set(theirs) == set(ours) == {"exact", "f1", "total", "HasAns_exact", "HasAns_f1", "HasAns_total"}
    for key in ours:
        assert ours[key] == pytest.approx(theirs[key]), key
    assert 0 < ours["exact"] < 100


def test_paddlenlp_is_impossible_trap_is_real():
    """Why the runner never feeds PaddleNLP's metric ``is_impossible``: its HasAns/NoAns swap."""
    from paddlenlp.metrics.squad import squad_evaluate as paddlenlp_squad_evaluate

    gold, preds, null_odds = _v2_case()
    examples = _paddlenlp_examples(gold)
    for example in examples:
        example["is_impossible"] = not example["answers"]["text"]
    swapped = paddlenlp_squad_evaluate(examples, preds, null_odds)
    ours = squad_evaluate(gold, preds, null_odds)
    # a and b (answerable, odds below 1) are counted as NoAns there; c, d as HasAns.
    assert swapped["NoAns_f1"] == pytest.approx(ours["HasAns_f1"]) and swapped["HasAns_f1"] != ours["HasAns_f1"]


def test_missing_predictions_are_an_error_not_a_smaller_total():
    with pytest.raises(ValueError, match="1 of 2 questions have no prediction.*'q2'"):
        squad_evaluate({"q1": ["x"], "q2": ["y"]}, {"q1": "x"})


# ---- GLUE -----------------------------------------------------------------------------------------
LABELS = [1, 1, 1, 0, 0, 0, 1, 0]
PREDS = [1, 0, 1, 0, 1, 0, 1, 0]  # tp 3, fn 1, fp 1, tn 3


def test_binary_metrics_hand_checked():
    assert matthews_corrcoef(PREDS, LABELS) == pytest.approx((3 * 3 - 1 * 1) / np.sqrt(4 * 4 * 4 * 4))
    assert matthews_corrcoef([1, 1, 1], [1, 0, 1]) == 0.0  # a constant prediction: undefined -> 0
    assert matthews_corrcoef([0, 1, 0, 1], [1, 0, 1, 0]) == pytest.approx(-1.0)


def test_correlations_hand_checked():
    scipy_stats = pytest.importorskip("scipy.stats")
    preds, labels = [0.5, 2.0, 3.5, 1.0], [1.0, 2.0, 4.0, 3.0]
    assert spearman_corrcoef(preds, labels) == pytest.approx(1 - 6 * (0 + 1 + 0 + 1) / (4 * (16 - 1)))  # 0.8
    assert pearson_corrcoef(preds, labels) == pytest.approx(np.corrcoef(preds, labels)[0, 1])
    tied_preds, tied_labels = [1.0, 1.0, 2.0, 3.0, 3.0, 0.5], [0.2, 0.4, 0.4, 5.0, 1.0, 0.1]
    assert spearman_corrcoef(tied_preds, tied_labels) == pytest.approx(scipy_stats.spearmanr(tied_preds, tied_labels)[0])


@pytest.mark.parametrize("task", sorted(GLUE_METRICS))
def test_each_glue_task_reports_its_official_metric(task):
    if task == "sts-b":
        result = glue_metrics("STS-B", [0.5, 2.0, 3.5, 1.0], [1.0, 2.0, 4.0, 3.0])
        assert list(result) == ["pearson_and_spearman", "pearson", "spearman"]
        assert result["spearman"] == pytest.approx(0.8)
        assert result["pearson_and_spearman"] == pytest.approx((result["pearson"] + 0.8) / 2)
        return
    result = glue_metrics(task.upper(), PREDS, LABELS)
    if task == "cola":
        assert list(result) == ["mcc", "acc"] and result["mcc"] == pytest.approx(0.5)
    elif task in ("mrpc", "qqp"):
        assert list(result) == ["acc_and_f1", "acc", "precision", "recall", "f1"]
        assert result["acc"] == pytest.approx(0.75) and result["f1"] == pytest.approx(0.75)
        assert result["precision"] == pytest.approx(0.75) and result["recall"] == pytest.approx(0.75)
        assert result["acc_and_f1"] == pytest.approx(0.75)
    else:
        assert list(result) == ["acc"] and result["acc"] == pytest.approx(0.75)


def test_f1_is_of_the_positive_class():
    result = glue_metrics("mrpc", [1, 1, 1, 1], [1, 0, 0, 0])  # precision 1/4, recall 1
    assert result["f1"] == pytest.approx(2 * 0.25 / 1.25) and result["acc"] == pytest.approx(0.25)


def test_mnli_accuracy_over_three_classes():
    assert glue_metrics("mnli", [0, 1, 2, 2, 1], [0, 1, 2, 1, 0]) == {"acc": pytest.approx(0.6)}


def test_glue_metric_rejects_bad_input():
    with pytest.raises(ValueError, match="unknown GLUE task 'squad'"):
        glue_metrics("squad", [1], [1])
    with pytest.raises(ValueError, match="3 predictions for 2 labels"):
        glue_metrics("sst-2", [1, 0, 1], [1, 0])
