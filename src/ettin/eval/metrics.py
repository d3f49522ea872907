"""Metrics computed by hand (no sklearn): classification, ranking, correlation, text normalisation."""

from __future__ import annotations

import math
import re
import string
from collections.abc import Mapping, Sequence


def accuracy(pred: Sequence[int], gold: Sequence[int]) -> float:
    if not gold:
        return float("nan")
    return sum(int(p == g) for p, g in zip(pred, gold)) / len(gold)


def f1_binary(pred: Sequence[int], gold: Sequence[int], positive: int = 1) -> float:
    """F1 of the positive class (GLUE MRPC convention: label 1 = equivalent)."""
    tp = sum(1 for p, g in zip(pred, gold) if p == positive and g == positive)
    fp = sum(1 for p, g in zip(pred, gold) if p == positive and g != positive)
    fn = sum(1 for p, g in zip(pred, gold) if p != positive and g == positive)
    if tp == 0:
        return 0.0
    return 2 * tp / (2 * tp + fp + fn)


def matthews_corrcoef(pred: Sequence[int], gold: Sequence[int]) -> float:
    """Multi-class MCC (Gorodkin's R_K, as sklearn); 0 when undefined."""
    labels = sorted(set(pred) | set(gold))
    idx = {lab: i for i, lab in enumerate(labels)}
    k = len(labels)
    cm = [[0] * k for _ in range(k)]
    for p, g in zip(pred, gold):
        cm[idx[g]][idx[p]] += 1
    n = sum(map(sum, cm))
    t = [sum(cm[i]) for i in range(k)]  # true counts
    p_ = [sum(cm[i][j] for i in range(k)) for j in range(k)]  # predicted counts
    c = sum(cm[i][i] for i in range(k))
    cov_ytyp = c * n - sum(t[i] * p_[i] for i in range(k))
    cov_ypyp = n * n - sum(x * x for x in p_)
    cov_ytyt = n * n - sum(x * x for x in t)
    denom = cov_ypyp * cov_ytyt
    if denom == 0:
        return 0.0
    return cov_ytyp / math.sqrt(denom)


def ndcg_at_k(ranked: Sequence[str], qrels: Mapping[str, int | float], k: int = 10) -> float:
    """trec_eval ``ndcg_cut``: linear gain rel / log2(rank + 1), ideal from every judged document."""
    dcg = 0.0
    for i, doc in enumerate(ranked[:k]):
        rel = qrels.get(doc, 0)
        if rel > 0:
            dcg += rel / math.log2(i + 2)
    ideal = sorted((r for r in qrels.values() if r > 0), reverse=True)[:k]
    idcg = sum(r / math.log2(i + 2) for i, r in enumerate(ideal))
    return dcg / idcg if idcg > 0 else 0.0


def recall_at_k(ranked: Sequence[str], qrels: Mapping[str, int | float], k: int = 100) -> float:
    relevant = {d for d, r in qrels.items() if r > 0}
    if not relevant:
        return 0.0
    return len(relevant & set(ranked[:k])) / len(relevant)


def pearson(x: Sequence[float], y: Sequence[float]) -> float:
    n = len(x)
    if n < 2:
        return float("nan")
    mx, my = sum(x) / n, sum(y) / n
    sxy = sum((a - mx) * (b - my) for a, b in zip(x, y))
    sxx = sum((a - mx) ** 2 for a in x)
    syy = sum((b - my) ** 2 for b in y)
    if sxx == 0 or syy == 0:
        return float("nan")
    return sxy / math.sqrt(sxx * syy)


def mean(xs: Sequence[float]) -> float:
    return sum(xs) / len(xs) if xs else float("nan")


def std(xs: Sequence[float]) -> float:
    """Sample standard deviation (0 for a single value)."""
    if len(xs) < 2:
        return 0.0
    m = mean(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))


# -- SQuAD-style answer normalisation ---------------------------------------------------------
_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)
_PUNCT = set(string.punctuation)


def normalize_answer(s: str) -> str:
    """Lower case, drop punctuation and the articles a/an/the, collapse whitespace (SQuAD v1.1)."""
    s = s.lower()
    s = "".join(ch for ch in s if ch not in _PUNCT)
    s = _ARTICLES.sub(" ", s)
    return " ".join(s.split())


def exact_match(prediction: str, answers: Sequence[str]) -> float:
    p = normalize_answer(prediction)
    return float(any(p == normalize_answer(a) for a in answers))


# -- lm-evaluation-harness exact_match (ignore_case + ignore_punctuation) ----------------------
_NO_PUNCT = str.maketrans("", "", string.punctuation)


def harness_exact_match(prediction: str, answers: Sequence[str]) -> float:
    """1.0 if the prediction equals any answer after lower-casing and deleting
    ``string.punctuation`` (the harness's ``exact_match`` with ``ignore_case`` and
    ``ignore_punctuation``; several targets: any one counts)."""
    p = prediction.lower().translate(_NO_PUNCT)
    return float(any(p == a.lower().translate(_NO_PUNCT) for a in answers))
