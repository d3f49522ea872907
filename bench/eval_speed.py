"""Evaluation speed.

1. Encoder masked scoring (pseudo-log-likelihood): every masked variant of every choice batched
   together vs one masked variant per forward pass (same code path, batch size 1; and the naive
   form that also projects every position onto the vocabulary). Same numbers, different speed.
2. Encoder pseudo-perplexity on WikiText-2 (``--parts wikitext``) with a demo-size encoder (the
   ``tiny`` preset, vocabulary 2,048, as ``ettin demo`` trains): before = one masked copy per
   forward pass through the full model (how the issue found it), after = ``--batch-size``
   masked copies per forward pass with the last block run only at the read positions
   (:func:`ettin.eval.scoring.read_forward`); the middle column separates the two effects.
   Same numbers (max |diff| printed), interleaved repeats in one process, median times.
3. A model of the given size (default 17m, vocabulary 50,368) evaluated on every multiple-choice
   validation set of the data directory: time per task and in total (``--limit`` per task if the
   full run is too long for the machine).

    python bench/eval_speed.py --data ../shared/data                   # both parts
    python bench/eval_speed.py --data ../shared/data --mc-limit 200 --kinds decoder,encoder
    python bench/eval_speed.py --data ../shared/data --parts wikitext --wikitext-tokens 508

Weights are random (speed does not depend on them); the tokenizer is a byte-level BPE trained
here on a slice of the pretraining sample, with the model vocabulary kept at ModernBERT's 50,368
so the prediction head costs what it costs in the real model.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F


def build(size: str, kind: str, tok_dir: Path, vocab: int, objective: str | None = None):
    from ettin.config import preset
    from ettin.data.tokenizer import special_ids
    from ettin.model import Transformer

    torch.manual_seed(0)
    over = dict(special_ids(tok_dir), vocab_size=vocab)
    if objective:
        over["objective"] = objective
    return Transformer(preset(size, causal=(kind == "decoder"), **over)).eval()


def train_tok(data: Path, out: Path, vocab: int) -> Path:
    from ettin.data.tokenizer import train_tokenizer

    texts = []
    with gzip.open(data / "pretrain" / "gutenberg-00000.jsonl.gz", "rt") as fh:
        for i, line in enumerate(fh):
            texts.append(json.loads(line)["text"])
            if i >= 120:
                break
    train_tokenizer(texts, out, vocab)
    return out


@torch.inference_mode()
def naive_pll(model, reqs, mask_id: int) -> list[float]:
    """One masked variant per forward pass, full [L, V] logits (how one would write it first)."""
    out = []
    for left, span, right in reqs:
        ids = left + span + right
        total = 0.0
        for j, t in enumerate(span):
            p = len(left) + j
            x = torch.tensor([ids])
            x[0, p] = mask_id
            total += F.log_softmax(model(x)[0], -1)[p, t].item()
        out.append(total)
    return out


def bench_pll(args, tok_dir: Path) -> dict:
    from ettin.eval import EvalModel, EvalOptions, mc, prepare, scoring

    model = build(args.size, "encoder", tok_dir, args.vocab)
    em = EvalModel.from_model(model, tok_dir)
    [(spec, items)] = prepare("arc_easy", args.data, "validation", EvalOptions(limit=args.pll_items))
    cfg = model.config
    pairs = scoring.split_pairs(em.tokenizer, [r for it in items for r in it.requests])
    reqs = [([cfg.cls_id] + c, s, [cfg.sep_id]) for c, s in pairs]
    n_var = sum(len(s) for _, s, _ in reqs)
    kw = dict(pad_id=cfg.pad_id, mask_id=cfg.mask_id, max_length=1024)
    scoring.masked_loglikelihood(model, reqs[:4], batch_size=args.batch_size, **kw)  # warm-up
    t0 = time.perf_counter()
    batched = scoring.masked_loglikelihood(model, reqs, batch_size=args.batch_size, **kw)
    t_batched = time.perf_counter() - t0
    t0 = time.perf_counter()
    single = scoring.masked_loglikelihood(model, reqs, batch_size=args.batch_size, batched=False, **kw)
    t_single = time.perf_counter() - t0
    t0 = time.perf_counter()
    naive = naive_pll(model, reqs, cfg.mask_id)
    t_naive = time.perf_counter() - t0
    diff = max(max(abs(a[0] - b[0]) for a, b in zip(batched, single)), max(abs(a[0] - b) for a, b in zip(batched, naive)))
    avg_len = sum(len(l) + len(s) + len(r) for l, s, r in reqs) / len(reqs)
    return {
        "items": len(items), "choices": len(reqs), "masked_variants": n_var, "mean_sequence_tokens": round(avg_len, 1),
        "batch_size": args.batch_size,
        "batched_s": round(t_batched, 3), "one_at_a_time_sparse_head_s": round(t_single, 3), "one_at_a_time_full_logits_s": round(t_naive, 3),
        "speedup_vs_one_at_a_time": round(t_single / t_batched, 1), "speedup_vs_naive": round(t_naive / t_batched, 1),
        "variants_per_s_batched": round(n_var / t_batched, 1), "max_abs_diff": diff,
    }


def bench_wikitext(args, tok_dir: Path) -> dict:
    """Pseudo-perplexity of the first ``--wikitext-tokens`` tokens of WikiText-2 (chunks of 254
    tokens framed by [CLS]/[SEP], as ``ettin eval`` scores it): before vs after, same process."""
    import statistics

    from ettin.eval import EvalModel, lm, scoring

    tok_dir = train_tok(args.data, tok_dir.parent / "tok2048", 2048)  # the demo's vocabulary size
    model = build("tiny", "encoder", tok_dir, 2048)
    em = EvalModel.from_model(model, tok_dir)
    cfg = model.config
    with open(args.data / "lm_eval" / "wikitext2" / "validation.jsonl", encoding="utf-8") as fh:
        text = " ".join(json.loads(line)["text"] for line in fh if json.loads(line)["text"].strip())
    ids = em.tokenizer.encode(text[: args.wikitext_tokens * 20])[: args.wikitext_tokens]
    chunk = 254
    reqs = [([cfg.cls_id], ids[s:s + chunk], [cfg.sep_id]) for s in range(0, len(ids), chunk)]
    kw = dict(pad_id=cfg.pad_id, mask_id=cfg.mask_id, max_length=chunk + 2)
    sparse = scoring.read_forward

    def full(m, x, am, pm):  # the plain forward (every position through every block)
        return m(x, attention_mask=am, predict_mask=pm)

    def run(bs: int, read_sparse: bool):
        scoring.read_forward = sparse if read_sparse else full
        try:
            t0 = time.perf_counter()
            res = scoring.masked_loglikelihood(model, reqs, batch_size=bs, **kw)
            return time.perf_counter() - t0, sum(ll for ll, _ in res)
        finally:
            scoring.read_forward = sparse

    run(args.batch_size, True)  # warm-up
    times = {"before": [], "batched": [], "after": []}
    lls = {}
    for _ in range(args.repeats):
        for name, bs, rs in (("before", 1, False), ("batched", args.batch_size, False), ("after", args.batch_size, True)):
            t, ll = run(bs, rs)
            times[name].append(t)
            lls[name] = ll
    med = {k: statistics.median(v) for k, v in times.items()}
    n = len(ids)
    return {
        "model": "tiny encoder (demo size), vocabulary 2048", "params": sum(p.numel() for p in model.parameters()),
        "tokens": n, "masked_copies": n, "copy_length": chunk + 2, "batch_size": args.batch_size, "repeats": args.repeats,
        "before_s": round(med["before"], 3), "batched_full_forward_s": round(med["batched"], 3), "after_s": round(med["after"], 3),
        "copies_per_s_before": round(n / med["before"], 1), "copies_per_s_after": round(n / med["after"], 1),
        "ratio_after_vs_before": round(med["before"] / med["after"], 2),
        "ratio_batching_only": round(med["before"] / med["batched"], 2),
        "pseudo_perplexity": lm._exp(-lls["after"] / n),
        "max_abs_diff_total_ll": max(abs(lls["after"] - lls["before"]), abs(lls["batched"] - lls["before"])),
    }


def bench_mc(args, tok_dir: Path, kind: str) -> dict:
    from ettin.eval import EvalModel, EvalOptions, prepare, run_prepared

    model = build(args.size, kind, tok_dir, args.vocab)
    em = EvalModel.from_model(model, tok_dir)
    opts = EvalOptions(limit=args.mc_limit, batch_size=args.batch_size)
    t0 = time.perf_counter()
    prepared = prepare("mc", args.data, "validation", opts)
    t_prep = time.perf_counter() - t0
    times: dict[str, float] = {}
    t0 = time.perf_counter()
    res = run_prepared(em, prepared, opts, on_task=lambda t, r, s: (times.__setitem__(t, round(s, 2)),
                                                                       print(f"  {kind} {t}: n={r['n']} {s:.1f}s", flush=True)))
    total = time.perf_counter() - t0
    return {"kind": kind, "limit_per_task": args.mc_limit, "examples": sum(r["n"] for r in res.values()),
            "prepare_s": round(t_prep, 2), "total_s": round(total, 1), "per_task_s": times,
            "acc": {t: round(r["acc"], 4) for t, r in res.items()}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data")
    ap.add_argument("--size", default="17m")
    ap.add_argument("--vocab", type=int, default=50368)
    ap.add_argument("--tok-vocab", type=int, default=4096)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--pll-items", type=int, default=25, help="arc_easy items for the masked-scoring comparison")
    ap.add_argument("--mc-limit", type=int, default=None, help="examples per mc task (default: all)")
    ap.add_argument("--kinds", default="decoder", help="which sides run part 2: decoder, encoder or both")
    ap.add_argument("--parts", default="pll,mc", help="comma list of pll, wikitext, mc")
    ap.add_argument("--wikitext-tokens", type=int, default=508, help="WikiText-2 tokens (masked copies) for the wikitext part")
    ap.add_argument("--repeats", type=int, default=3, help="interleaved repeats of the wikitext part (median)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if not (args.data / "mc").is_dir():
        sys.exit(f"{args.data}: no mc/ directory (pass --data)")
    out = {"torch": torch.__version__, "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(), "size": args.size,
           "device": "cpu"}
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        tok_dir = train_tok(args.data, Path(tmp) / "tok", args.tok_vocab)
        print(f"tokenizer trained in {time.perf_counter() - t0:.1f}s", flush=True)
        if "pll" in args.parts:
            out["masked_scoring"] = r = bench_pll(args, tok_dir)
            print(f"masked scoring, {args.size} encoder, {r['masked_variants']} variants of {r['choices']} choices: "
                  f"batched {r['batched_s']}s, one at a time {r['one_at_a_time_sparse_head_s']}s "
                  f"({r['speedup_vs_one_at_a_time']}x), naive full logits {r['one_at_a_time_full_logits_s']}s "
                  f"({r['speedup_vs_naive']}x); max |diff| {r['max_abs_diff']:.2e}", flush=True)
        if "wikitext" in args.parts:
            out["wikitext_pseudo_perplexity"] = r = bench_wikitext(args, tok_dir)
            print(f"WikiText-2 pseudo-perplexity, {r['model']}, {r['tokens']} masked copies of {r['copy_length']} tokens: "
                  f"before (one copy per forward, full model) {r['before_s']}s, batched {r['batched_full_forward_s']}s, "
                  f"after (batch {r['batch_size']} + last block at read positions) {r['after_s']}s: "
                  f"{r['ratio_after_vs_before']}x ({r['ratio_batching_only']}x from batching alone); "
                  f"max |diff| of the total log-likelihood {r['max_abs_diff_total_ll']:.2e}", flush=True)
        if "mc" in args.parts:
            out["mc"] = []
            for kind in [k.strip() for k in args.kinds.split(",") if k.strip()]:
                r = bench_mc(args, tok_dir, kind)
                out["mc"].append(r)
                print(f"{args.size} {kind} on all mc validation sets ({r['examples']} examples, limit {r['limit_per_task']}): "
                      f"{r['total_s']}s", flush=True)
    if args.json:
        args.json.write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
