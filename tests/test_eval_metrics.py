"""Metrics against values computed by hand."""

from __future__ import annotations

import math

import pytest

from ettin.eval.metrics import (accuracy, exact_match, f1_binary, matthews_corrcoef, ndcg_at_k, normalize_answer, pearson,
                                recall_at_k, std)


def test_binary_classification_metrics():
    pred = [1, 1, 0, 0, 1]
    gold = [1, 0, 0, 0, 1]
    # TP=2 FP=1 TN=2 FN=0
    assert accuracy(pred, gold) == 0.8
    assert f1_binary(pred, gold) == pytest.approx(2 * 2 / (2 * 2 + 1 + 0))  # 0.8
    assert matthews_corrcoef(pred, gold) == pytest.approx((2 * 2 - 1 * 0) / math.sqrt(3 * 2 * 2 * 3))  # 2/3
    assert matthews_corrcoef([1, 1, 1], [1, 0, 1]) == 0.0  # constant prediction: undefined -> 0
    assert matthews_corrcoef([0, 1, 0, 1], [1, 0, 1, 0]) == pytest.approx(-1.0)
    assert f1_binary([0, 0], [1, 0]) == 0.0


def test_multiclass_matthews():
    # confusion (rows gold, cols pred): [[2,1,0],[0,2,0],[1,0,1]], n=7, c=5
    gold = [0, 0, 0, 1, 1, 2, 2]
    pred = [0, 0, 1, 1, 1, 0, 2]
    t = [3, 2, 2]
    p = [3, 3, 1]
    num = 5 * 7 - sum(a * b for a, b in zip(t, p))
    den = math.sqrt((49 - sum(x * x for x in p)) * (49 - sum(x * x for x in t)))
    assert matthews_corrcoef(pred, gold) == pytest.approx(num / den)  # 14 / sqrt(30 * 32)


def test_ndcg_and_recall():
    qrels = {"d1": 1, "d2": 2}
    ranked = ["d3", "d1", "d2"]
    dcg = 1 / math.log2(3) + 2 / math.log2(4)
    idcg = 2 / math.log2(2) + 1 / math.log2(3)
    assert ndcg_at_k(ranked, qrels, 10) == pytest.approx(dcg / idcg)  # 0.6199
    assert ndcg_at_k(["d2", "d1"], qrels, 10) == pytest.approx(1.0)
    assert ndcg_at_k(["d9"] * 10 + ["d2"], qrels, 10) == 0.0  # beyond the cut-off
    assert recall_at_k(ranked, qrels, 100) == 1.0
    assert recall_at_k(ranked, qrels, 2) == 0.5
    assert recall_at_k(ranked, {"d1": 0, "d4": 1}, 100) == 0.0  # score 0 is not relevant


def test_answer_normalisation_and_stats():
    assert normalize_answer("The  Onion!") == "onion"
    assert exact_match(" the onion.", ["Onion", "Allium cepa"]) == 1.0
    assert exact_match("an onion ring", ["Onion"]) == 0.0
    assert pearson([1, 2, 3], [2, 4, 6]) == pytest.approx(1.0)
    assert math.isnan(pearson([1, 1, 1], [1, 2, 3]))
    assert std([1.0, 3.0]) == pytest.approx(math.sqrt(2))


def test_triviaqa_matching_is_the_harness_exact_match():
    from ettin.eval.metrics import harness_exact_match
    from ettin.eval.qa import prompt

    assert prompt("What type of animal is a dik-dik?") == "Question: What type of animal is a dik-dik??\nAnswer:"
    assert prompt("What was the first hospital soap opera on ITV") == "Question: What was the first hospital soap opera on ITV?\nAnswer:"
    cases = [("Onion", ["Onions", "Onion"]), ("onion!", ["Onion"]), ("the onion", ["Onion"]), ("an onion", ["onion"]),
             ("Dik-dik", ["dikdik"]), ("New  York", ["New York"]), ("Café", ["CAFÉ"]), ("", ["x"]), ("U.S.", ["us"])]
    ours = [harness_exact_match(p, a) for p, a in cases]
    # articles and whitespace count here (SQuAD normalisation would call "the onion" right)
    assert ours == [1.0, 1.0, 0.0, 0.0, 1.0, 0.0, 1.0, 0.0, 1.0]
    assert exact_match("the onion", ["Onion"]) == 1.0
    metrics = pytest.importorskip("lm_eval.api.metrics")
    for (p, golds), got in zip(cases, ours):
        ref = metrics.exact_match_hf_evaluate(predictions=[p] * len(golds), references=golds, ignore_case=True,
                                              ignore_punctuation=True)["exact_match"]
        assert got == (1.0 if ref > 0 else 0.0), (p, golds)
