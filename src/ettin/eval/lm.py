"""Language-modelling tasks under ``lm_eval/`` (or ``lm/``), generic by the fields of their lines.

- Lines with ``context`` + ``continuation`` (LAMBADA): last-word prediction. Decoders: ``acc``
  (every continuation token is the greedy choice, the harness's definition) and ``perplexity``
  (exp of minus the mean log-likelihood of the word). Encoders, by default the Ettin authors'
  left-to-right scoring (``"scoring": "ltr"``, see :mod:`ettin.eval.scoring`): ``acc`` and
  ``perplexity`` of the same definitions; with ``encoder_scoring="pll"`` the word's tokens are
  masked together and predicted jointly: ``acc`` and ``pseudo_perplexity``.
- Lines with ``text`` (WikiText-2, any held-out text): decoders get exact ``perplexity`` (per
  token), ``word_perplexity``, ``byte_perplexity`` and ``bits_per_byte`` from a rolling window
  (disjoint windows as the harness's ``loglikelihood_rolling``, or sliding with
  ``lm_stride``); every token is predicted exactly once, the first from [CLS]. Encoders get
  the same quantities from the pseudo-log-likelihood (each token masked in turn, in chunks of
  ``pll_window`` tokens framed by [CLS] ... [SEP]), named ``pseudo_*``.

``--limit N`` bounds every mode: the first N lines; on text (perplexity) tasks each of those N
documents is also cut to its first ``max_length`` tokens, so a limited run scores at most
N x max_length tokens (an encoder: that many masked copies). The result then carries a
``note`` saying so.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

from ettin.errors import EttinError
from ettin.eval import scoring
from ettin.eval.data import example_id, load_records, read_jsonl, require_split

KNOWN = ("lambada_openai", "wikitext2")
FAMILY_DIRS = ("lm_eval", "lm")


@dataclass
class LMData:
    mode: str  # "lastword" | "text"
    docs: list[dict]


def load(spec, task_dir: Path, split: str, opts) -> LMData:
    files = require_split(task_dir, split, spec.name)
    first = None
    for f in files:
        rows = read_jsonl(f)
        if rows:
            first = rows[0][1]
            break
    if first is None:
        raise EttinError(f"{files[0]}: no lines (task '{spec.name}')")
    if "text" in first:
        docs = load_records(files, {"text": str}, what="language-modelling text")
        docs = [d for d in docs if d["text"].strip()]
        mode = "text"
    elif "context" in first and "continuation" in first:
        docs = load_records(files, {"context": str, "continuation": str}, what="last-word")
        mode = "lastword"
    else:
        raise EttinError(f"{files[0]}:1: expected a 'text' field (perplexity) or 'context' + 'continuation' (last word)")
    for d in docs:
        d["_id"] = example_id(d, len(files))
    if opts.limit:
        docs = docs[: opts.limit]
    return LMData(mode, docs)


def run(em, spec, data: LMData, opts, samples: list | None = None) -> dict:
    if data.mode == "lastword":
        return _lastword(em, data.docs, opts, samples)
    return _perplexity(em, data.docs, opts, samples)


def _lastword(em, docs: list[dict], opts, samples: list | None = None) -> dict:
    cfg = em.config
    pairs = scoring.split_pairs(em.tokenizer, [(d["context"], " " + d["continuation"]) for d in docs])
    best: list = []  # argmax ids at the continuation's positions (the "prediction")
    if em.is_encoder and opts.encoder_scoring == "ltr":
        reqs = [([cfg.cls_id] + ctx, cont, [cfg.sep_id]) for ctx, cont in pairs]
        res = scoring.masked_ltr_loglikelihood(em.model, reqs, pad_id=cfg.pad_id, mask_id=cfg.mask_id, batch_size=opts.batch_size,
                                               max_length=opts.max_length, mntp=cfg.objective == "mntp", argmax_out=best)
        ppl_name = "perplexity"
    elif em.is_encoder:
        reqs = [([cfg.cls_id] + ctx, cont, [cfg.sep_id]) for ctx, cont in pairs]
        res = scoring.masked_loglikelihood(em.model, reqs, pad_id=cfg.pad_id, mask_id=cfg.mask_id, batch_size=opts.batch_size,
                                           max_length=opts.max_length, mntp=cfg.objective == "mntp", joint=True, argmax_out=best)
        ppl_name = "pseudo_perplexity"
    else:
        reqs = [([cfg.cls_id] + ctx if opts.bos or not ctx else ctx, cont) for ctx, cont in pairs]
        res = scoring.loglikelihood(em.model, reqs, pad_id=cfg.pad_id, batch_size=opts.batch_size, max_length=opts.max_length,
                                    argmax_out=best)
        ppl_name = "perplexity"
    if samples is not None:
        for d, (ll, g), b in zip(docs, res, best):
            samples.append({"id": d["_id"], "label": d["continuation"], "prediction": em.tokenizer.decode(b).strip(),
                            "metrics": {"acc": float(g), "nll": -ll}})
    n = len(docs)
    how = (opts.encoder_scoring if em.is_encoder else "causal")
    if n == 0:
        return {"acc": float("nan"), ppl_name: float("nan"), "n": 0, "scoring": how}
    acc = sum(float(g) for _, g in res) / n
    ppl = _exp(-sum(ll for ll, _ in res) / n)
    return {"acc": acc, ppl_name: ppl, "n": n, "scoring": how}


def _exp(x: float) -> float:
    return math.exp(x) if x < 700 else float("inf")


def rolling_requests(tokens: list[int], bos: int, window: int, stride: int) -> list[tuple[list[int], list[int]]]:
    """(context, continuation) windows predicting every token once, each input <= ``window``."""
    full = [bos] + list(tokens)
    n = len(tokens)
    reqs = []
    a, b = 0, min(window, n)
    while a < n:
        lo = max(0, b - window)
        reqs.append((full[lo:a + 1], full[a + 1:b + 1]))
        a, b = b, min(b + stride, n)
    return reqs


def _perplexity(em, docs: list[dict], opts, samples: list | None = None) -> dict:
    cfg = em.config
    texts = [d["text"] for d in docs]
    encs = em.tokenizer.encode_batch(texts)
    cut = False
    if opts.limit:  # bound the cost: at most max_length tokens of each of the first N documents
        for k, ids in enumerate(encs):
            if len(ids) > opts.max_length:
                cut = True
                encs[k] = ids = ids[: opts.max_length]
                texts[k] = em.tokenizer.decode(ids)  # what words / bytes are counted on
    words = sum(len(re.split(r"\s+", t)) for t in texts)
    nbytes = sum(len(t.encode("utf-8")) for t in texts)
    if em.is_encoder:
        chunk = max(1, min(opts.pll_window, opts.max_length) - 2)
        reqs, owner = [], []
        for k, ids in enumerate(encs):
            for s in range(0, len(ids), chunk):
                reqs.append(([cfg.cls_id], ids[s:s + chunk], [cfg.sep_id]))
                owner.append(k)
        res = scoring.masked_loglikelihood(em.model, reqs, pad_id=cfg.pad_id, mask_id=cfg.mask_id, batch_size=opts.batch_size,
                                           max_length=chunk + 2, mntp=cfg.objective == "mntp")
        prefix = "pseudo_"
    else:
        window = min(opts.lm_window, opts.max_length)
        stride = opts.lm_stride or window
        reqs, owner = [], []
        for k, ids in enumerate(encs):
            got = rolling_requests(ids, cfg.cls_id, window, min(stride, window))
            reqs.extend(got)
            owner.extend([k] * len(got))
        res = scoring.loglikelihood(em.model, reqs, pad_id=cfg.pad_id, batch_size=opts.batch_size, max_length=window)
        prefix = ""
    if samples is not None:
        doc_ll = [0.0] * len(docs)
        for k, (ll, _) in zip(owner, res):
            doc_ll[k] += ll
        for d, t, ids, ll in zip(docs, texts, encs, doc_ll):
            samples.append({"id": d["_id"], "label": None, "prediction": None,
                            "metrics": {"nll": -ll, "tokens": len(ids), "words": len(re.split(r"\s+", t)),
                                        "bytes": len(t.encode("utf-8"))}})
    total_ll = sum(ll for ll, _ in res)
    total_tokens = sum(len(ids) for ids in encs)
    if total_tokens == 0:
        raise EttinError("perplexity: the texts contain no tokens")
    out = {
        f"{prefix}perplexity": _exp(-total_ll / total_tokens),
        f"{prefix}word_perplexity": _exp(-total_ll / words),
        f"{prefix}byte_perplexity": _exp(-total_ll / nbytes),
        f"{prefix}bits_per_byte": -total_ll / nbytes / math.log(2),
        "tokens": total_tokens,
        "n": len(docs),
    }
    if opts.limit:
        out["note"] = (f"--limit {opts.limit}: the first {len(docs)} documents, each cut to its first {opts.max_length} tokens"
                       + ("" if cut else " (none was longer)"))
    return out
