"""Honest error bars: bootstrap intervals from per-example evaluation samples.

Per-example samples follow the eval "samples" contract: dicts with ``task``, ``id``, ``label``,
``prediction``, ``metrics`` ({metric: per-example value}) and, for fine-tuned tasks, ``seed``.
A task metric is recomputed from them by one *aggregator* (mean of per-example values; the
perplexity family from summed nll over summed tokens; MCC and F1 from label/prediction), so a
bootstrap replicate is the same computation on resampled examples.

- zero-shot and retrieval: percentile bootstrap over examples;
- fine-tuned (samples carry ``seed``): seeds x bootstrap, a two-level resampling (seeds with
  replacement, then examples with replacement, the same examples for every seed) of the mean
  over seeds;
- a difference between two models: a *paired* bootstrap over the examples both have.

Everything is a function of an explicit seed, so intervals are reproducible.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

CONF = 0.95
# metrics that are not scores (counts, settings, spreads): never given an interval
NOT_SCORES = {"n", "tokens", "lr", "seeds", "train_n", "dev_score", "finetuned", "train_pairs", "note"}
CORPUS_METRICS = {"mcc", "matthews", "matthews_corr", "matthews_corrcoef", "f1"}


def is_score(metric: str, value) -> bool:
    if metric in NOT_SCORES or metric.endswith("_std"):
        return False
    return isinstance(value, (int, float)) and not isinstance(value, bool)


# -- aggregators ---------------------------------------------------------------------------------
@dataclass
class Table:
    """One task's per-example data as arrays: rows are (seed, example) when seeded."""

    ids: list  # example ids, in a fixed order
    seeds: list  # [None] when unseeded
    cols: dict  # name -> array [n_seeds, n_examples] (float; nan where absent)


def _key(s: dict):
    return str(s.get("id"))


def to_table(samples: list[dict], fields: list[str]) -> Table:
    seeds = sorted({s.get("seed") for s in samples}, key=lambda v: (v is None, v))
    ids, pos = [], {}
    for s in samples:
        k = _key(s)
        if k not in pos:
            pos[k] = len(ids)
            ids.append(k)
    spos = {sd: i for i, sd in enumerate(seeds)}
    cols = {f: np.full((len(seeds), len(ids)), np.nan) for f in fields}
    for s in samples:
        i, j = spos[s.get("seed")], pos[_key(s)]
        m = s.get("metrics") or {}
        for f in fields:
            v = m.get(f, s.get(f))
            if isinstance(v, bool):
                v = float(v)
            if isinstance(v, (int, float)):
                cols[f][i, j] = float(v)
    return Table(ids, seeds, cols)


def _ratio_fields(metric: str, sample: dict) -> tuple[str, str, float] | None:
    """(numerator, denominator, scale) for the perplexity family, when the samples carry them."""
    low = metric.lower()
    if "perplexity" not in low and "bits_per_byte" not in low:
        return None
    have = set(sample) | set(sample.get("metrics") or {})
    if "nll" not in have:
        return None
    den = "bytes" if ("byte" in low and "bytes" in have) else "words" if ("word" in low and "words" in have) else "tokens"
    if den not in have:
        if "byte" in low or "word" in low:
            return None
        return "nll", None, 1.0  # per-example nll without a length (LAMBADA): exp(mean nll)
    return "nll", den, (1.0 / math.log(2)) if "bits_per_byte" in low else 1.0


class Aggregator:
    """Computes one metric from a Table on resampled example indices (vectorised over replicates)."""

    def __init__(self, metric: str, samples: list[dict]):
        self.metric = metric
        first = samples[0]
        self.ratio = _ratio_fields(metric, first)
        m = first.get("metrics") or {}
        if self.ratio is not None:
            self.kind, fields = "ratio", [f for f in self.ratio[:2] if f is not None]
        elif metric in m:
            self.kind, fields = "mean", [metric]
        elif metric.lower() in CORPUS_METRICS and "label" in first and "prediction" in first:
            self.kind, fields = "corpus", ["label", "prediction"]
        else:
            raise KeyError(metric)
        self.table = to_table(samples, fields)

    @property
    def n(self) -> int:
        return len(self.table.ids)

    def stat(self, idx: np.ndarray, seed_idx: np.ndarray | None = None) -> np.ndarray:
        """Metric for each replicate: ``idx`` [R, n] example indices, ``seed_idx`` [R, S] seed indices."""
        t = self.table
        S = len(t.seeds)
        if seed_idx is None:
            seed_idx = np.tile(np.arange(S), (idx.shape[0], 1))
        per_seed = np.stack([self._one(s, idx) for s in range(S)], axis=1)  # [R, S]
        return np.take_along_axis(per_seed, seed_idx, axis=1).mean(axis=1)

    def _one(self, s: int, idx: np.ndarray) -> np.ndarray:
        t = self.table
        if self.kind == "mean":
            v = t.cols[self.metric][s][idx]
            return np.nanmean(v, axis=1)
        if self.kind == "ratio":
            num, den, scale = self.ratio
            if den is None:
                x = np.nanmean(t.cols[num][s][idx], axis=1)
            else:
                a = np.nansum(t.cols[num][s][idx], axis=1)
                b = np.nansum(t.cols[den][s][idx], axis=1)
                x = a / np.maximum(b, 1e-300)
            if "perplexity" in self.metric.lower():
                return np.exp(np.minimum(x, 700.0))
            return x * scale
        y, p = t.cols["label"][s][idx], t.cols["prediction"][s][idx]
        if self.metric.lower() == "f1":
            tp = ((y == 1) & (p == 1)).sum(1)
            fp = ((y != 1) & (p == 1)).sum(1)
            fn = ((y == 1) & (p != 1)).sum(1)
            return np.where(tp > 0, 2 * tp / np.maximum(2 * tp + fp + fn, 1), 0.0)
        tp = ((y == 1) & (p == 1)).sum(1).astype(float)
        tn = ((y == 0) & (p == 0)).sum(1).astype(float)
        fp = ((y == 0) & (p == 1)).sum(1).astype(float)
        fn = ((y == 1) & (p == 0)).sum(1).astype(float)
        den = np.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
        return np.where(den > 0, (tp * tn - fp * fn) / np.where(den > 0, den, 1), 0.0)

    def point(self) -> float:
        idx = np.arange(self.n)[None, :]
        return float(self.stat(idx)[0])


# -- intervals -----------------------------------------------------------------------------------
def _percentile(x: np.ndarray, conf: float = CONF) -> list[float]:
    x = x[np.isfinite(x)]
    if x.size == 0:
        return [float("nan"), float("nan")]
    a = (1 - conf) / 2
    lo, hi = np.quantile(x, [a, 1 - a])
    return [float(lo), float(hi)]


def _draws(rng: np.random.Generator, n: int, n_seeds: int, n_boot: int) -> tuple[np.ndarray, np.ndarray | None]:
    idx = rng.integers(0, n, size=(n_boot, n))
    sidx = rng.integers(0, n_seeds, size=(n_boot, n_seeds)) if n_seeds > 1 else None
    return idx, sidx


def bootstrap_mean(values, n_boot: int = 1000, seed: int = 0, conf: float = CONF) -> list[float]:
    """Percentile bootstrap interval of the mean of ``values`` (the basic case)."""
    v = np.asarray(values, dtype=float)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(v), size=(n_boot, len(v)))
    return _percentile(v[idx].mean(axis=1), conf)


def interval(samples: list[dict], metric: str, n_boot: int = 1000, seed: int = 0, conf: float = CONF) -> dict | None:
    """``{"value", "ci": [lo, hi], "n", "seeds"}`` for one metric of one task, or None when the
    samples cannot give it (the metric is not per-example and has no known aggregator)."""
    if not samples:
        return None
    try:
        agg = Aggregator(metric, samples)
    except KeyError:
        return None
    n, S = agg.n, len(agg.table.seeds)
    rng = np.random.default_rng(seed)
    idx, sidx = _draws(rng, n, S, n_boot)
    reps = agg.stat(idx, sidx)
    return {"value": agg.point(), "ci": _percentile(reps, conf), "n": n, "seeds": S if agg.table.seeds != [None] else 0}


def paired_difference(a: list[dict], b: list[dict], metric: str, n_boot: int = 1000, seed: int = 0,
                      conf: float = CONF, keep_replicates: bool = False) -> dict | None:
    """Metric(a) - metric(b) on the examples both have, with a paired bootstrap interval: every
    replicate resamples the *same* example ids for both (seeds resampled per model)."""
    if not a or not b:
        return None
    common = sorted({_key(s) for s in a} & {_key(s) for s in b})
    if not common:
        return None
    keep = set(common)
    try:
        aa = Aggregator(metric, [s for s in a if _key(s) in keep])
        ab = Aggregator(metric, [s for s in b if _key(s) in keep])
    except KeyError:
        return None
    # the same example order on both sides
    order_b = {k: i for i, k in enumerate(ab.table.ids)}
    perm = np.array([order_b[k] for k in aa.table.ids])
    n = len(common)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, n, size=(n_boot, n))
    Sa, Sb = len(aa.table.seeds), len(ab.table.seeds)
    sa = rng.integers(0, Sa, size=(n_boot, Sa)) if Sa > 1 else None
    sb = rng.integers(0, Sb, size=(n_boot, Sb)) if Sb > 1 else None
    reps = aa.stat(idx, sa) - ab.stat(perm[idx], sb)
    full = np.arange(n)[None, :]
    diff = float(aa.stat(full)[0] - ab.stat(perm[full])[0])
    lo, hi = _percentile(reps, conf)
    out = {"diff": diff, "ci": [lo, hi], "n": n, "excludes_zero": bool(lo > 0 or hi < 0) if math.isfinite(lo) else False}
    if keep_replicates:
        out["replicates"] = reps
    return out


def mean_of_differences(diffs: list[dict], conf: float = CONF) -> dict | None:
    """The mean of several tasks' paired differences (a task family's gap), with an interval from
    the mean of their bootstrap replicates (tasks are independent example sets)."""
    diffs = [d for d in diffs if d is not None and "replicates" in d]
    if not diffs:
        return None
    R = min(len(d["replicates"]) for d in diffs)
    reps = np.mean([d["replicates"][:R] for d in diffs], axis=0)
    lo, hi = _percentile(reps, conf)
    return {"diff": float(np.mean([d["diff"] for d in diffs])), "ci": [lo, hi], "tasks": len(diffs),
            "excludes_zero": bool(lo > 0 or hi < 0) if math.isfinite(lo) else False}


def task_intervals(result: dict, samples: list[dict], n_boot: int = 1000, seed: int = 0) -> dict:
    """Every score of a task result with its interval: ``{metric: {"ci": [lo, hi]}, ...}`` plus a
    ``"check"`` list naming metrics whose recomputed value differs from the reported one."""
    out: dict = {}
    mismatch = []
    for m, v in result.items():
        if not is_score(m, v) or not math.isfinite(float(v)):
            continue
        iv = interval(samples, m, n_boot=n_boot, seed=seed)
        if iv is None:
            continue
        if not math.isclose(iv["value"], float(v), rel_tol=1e-4, abs_tol=1e-6):
            mismatch.append(m)
        out[m] = iv
    if mismatch:
        out["_mismatch"] = mismatch
    return out
