"""Encoder inference (pooled embeddings) on variable-length inputs: ours vs transformers' ModernBERT.

The inputs are a small corpus of ``--batch x --batches`` sequences, lengths drawn uniformly
between ``--min-len`` and ``--max-len`` with a fixed seed (``--full``: all ``--max-len``), random
tokens framed as ``[CLS] ... [SEP]``. One timed unit is a pass over the whole corpus, since
sorting and packing are decisions over the corpus, not over one batch:

- ettin, ``packed``: :func:`ettin.model.packing.pooled` packs the sequences into rows of
  ``--max-len`` (first-fit decreasing), ``--batch`` rows per forward, documents masked;
- ettin, ``padded``: the same function with sequences sorted by length, padded per batch of
  ``--batch``, ``attention_mask``: the same batches as transformers';
- transformers: ``ModernBertModel`` (SDPA) from ``ettin.convert.hf.hf_config_for`` with the same
  weights, sorted by length, padded batches of ``--batch`` with ``attention_mask``, mean over
  the real tokens (what users do; sentence-transformers' mean pooling).

``--pooling cls|last`` pools one position per sequence instead: ours then runs the last block
at those positions only (``Transformer.encode`` with ``keep``), transformers takes that row of
its full output. ``tokens_per_s`` counts real (non-pad) tokens; ``padded_tokens_per_s`` counts
what the forward passes processed, pads included; ``pad_share`` is the pad part of it. Host work (packing,
sorting, building tensors) is inside the timing. fp32 on a CPU, the implementations' passes
interleaved (alternating who goes first) after a warmup pass, median pass time; bf16 autocast
on a GPU, each implementation alone (its own weights on the device, clean ``peak_memory_gib``).
``best_tokens_per_s`` is from the fastest pass (on a shared machine the medians swing with
background load; compare implementations within one run). ``auto`` says whether that strategy
is what ``strategy="auto"`` picks on this device.

``--precision both`` (CPU) adds ours packed and transformers under bf16 autocast, with the
smallest cosine of our bf16 embeddings to our fp32 ones (``cos_vs_fp32_min``); bf16 on a CPU is
meant for CPUs with AVX512-BF16 / AMX (the record's ``cpu_flags``).

    python bench/infer_speed.py --device cpu --size 17m --batch 32 --max-len 512 --json
    python bench/infer_speed.py --device cpu --size 17m --precision both --strategy packed --json
    python bench/infer_speed.py --device cuda --size 150m --batch 256 --max-len 512 --json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import machine  # noqa: E402  (one machine record for every benchmark)


def make_corpus(n: int, min_len: int, max_len: int, cfg, *, full: bool, seed: int = 0) -> list[list[int]]:
    """``n`` framed sequences of random tokens; lengths uniform in [min_len, max_len] (or all max_len)."""
    g = torch.Generator().manual_seed(seed)
    lens = [max_len] * n if full else torch.randint(min_len, max_len + 1, (n,), generator=g).tolist()
    seqs = []
    for k in lens:
        body = torch.randint(0, cfg.cls_id, (k - 2,), generator=g).tolist()
        seqs.append([cfg.cls_id, *body, cfg.sep_id])
    return seqs


def make_models(size: str, seed: int = 0):
    """Our encoder (random init) and transformers' ``ModernBertModel`` holding the same weights."""
    from transformers import ModernBertModel

    from ettin.config import MODERNBERT_VOCAB, preset
    from ettin.convert.hf import hf_config_for, to_hf_state_dict
    from ettin.model import Transformer

    cfg = preset(size, causal=False, vocab_size=MODERNBERT_VOCAB)
    torch.manual_seed(seed)
    ours = Transformer(cfg).eval()
    hf_cfg = hf_config_for(cfg)
    hf_cfg._attn_implementation = "sdpa"
    theirs = ModernBertModel(hf_cfg).eval()
    state = {k[len("model."):]: v for k, v in to_hf_state_dict(ours).items() if k.startswith("model.")}
    theirs.load_state_dict(state, strict=True)
    return ours, theirs


def theirs_pass(model, seqs: list[list[int]], batch: int, pad_id: int, dev: torch.device, pooling: str = "mean") -> torch.Tensor:
    """transformers as users run it: sort by length, pad per batch, attention_mask, masked mean
    (or the first / last real token's state)."""
    out = torch.zeros(len(seqs), model.config.hidden_size, device=dev)
    order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i]))
    with torch.inference_mode():
        for s in range(0, len(order), batch):
            idx = order[s:s + batch]
            L = len(seqs[idx[0]])
            x = torch.full((len(idx), L), pad_id, dtype=torch.long)
            am = torch.zeros((len(idx), L), dtype=torch.long)
            for j, i in enumerate(idx):
                x[j, : len(seqs[i])] = torch.as_tensor(seqs[i])
                am[j, : len(seqs[i])] = 1
            x, am = x.to(dev), am.to(dev)
            h = model(input_ids=x, attention_mask=am).last_hidden_state.float()
            rows = torch.as_tensor(idx, device=dev)
            if pooling == "cls":
                out[rows] = h[:, 0]
            elif pooling == "last":
                out[rows] = h[torch.arange(len(idx), device=dev), am.sum(1) - 1]
            else:
                m = am[..., None].float()
                out[rows] = (h * m).sum(1) / m.sum(1)
    return out


def processed_tokens(seqs: list[list[int]], strategy: str, batch: int, max_len: int, pad_id: int) -> tuple[int, int]:
    """(tokens the forward passes see, pads included; number of forward passes)."""
    from ettin.model import packing as P

    if strategy == "packed":
        p = P.pack(seqs, max_len, pad_id=pad_id)
        return p.input_ids.numel(), -(-p.input_ids.shape[0] // batch)
    n = steps = 0
    for _, x, _, _ in P.pad_batches(seqs, batch * max_len, pad_id=pad_id, max_rows=batch):
        n += x.numel()
        steps += 1
    return n, steps


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize()


def run(a) -> list[dict]:
    from ettin.model import packing as P

    dev = torch.device(a.device)
    ours, theirs = make_models(a.size)
    cfg = ours.config
    seqs = make_corpus(a.batch * a.batches, a.min_len, a.max_len, cfg, full=a.full)
    real = sum(map(len, seqs))
    strategies = ["packed", "padded"] if a.strategy == "both" else [P.choose_strategy(ours, dev, a.strategy, longest=max(map(len, seqs)))]
    auto = P.choose_strategy(ours, dev, "auto", longest=max(map(len, seqs)))

    def ours_fn(strategy):
        return lambda: P.pooled(ours, seqs, pad_id=cfg.pad_id, pooling=a.pooling, strategy=strategy, row_len=a.max_len,
                                token_budget=a.batch * a.max_len, max_rows=a.batch)

    fns = {f"ettin/{s}": ours_fn(s) for s in strategies}
    fns["transformers/padded"] = lambda: theirs_pass(theirs, seqs, a.batch, cfg.pad_id, dev, a.pooling)
    if dev.type == "cpu" and a.precision in ("bf16", "both"):
        from ettin.model.cpu import check_precision

        check_precision("bf16", "cpu")  # refuses on a CPU without bf16 (ETTIN_ALLOW_BF16=1 overrides)
        fns.update({f"{k}/bf16": fns[k] for k in list(fns) if k in ("ettin/packed", "transformers/padded")})
        if a.precision == "bf16":
            fns = {k: v for k, v in fns.items() if k.endswith("/bf16")}
    models = {name: (ours if name.startswith("ettin") else theirs) for name in fns}

    def amp(name):
        if dev.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return torch.autocast("cpu", dtype=torch.bfloat16) if name.endswith("/bf16") else contextlib.nullcontext()

    def timed(name) -> tuple[float, torch.Tensor]:
        sync(dev)
        t0 = time.perf_counter()
        with amp(name):
            y = fns[name]()
        sync(dev)
        return time.perf_counter() - t0, y

    times: dict[str, list[float]] = {n: [] for n in fns}
    outs: dict[str, torch.Tensor] = {}
    peak: dict[str, float | None] = {n: None for n in fns}
    if dev.type == "cpu":  # interleaved passes: background load hits every implementation alike
        for r in range(a.warmup + a.rounds):
            for name in (list(fns) if r % 2 == 0 else list(fns)[::-1]):
                t, y = timed(name)
                outs[name] = y
                if r >= a.warmup:
                    times[name].append(t)
    else:  # one implementation at a time, only its weights on the device
        for name in fns:
            models[name].to(dev)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            for r in range(a.warmup + a.rounds):
                t, y = timed(name)
                outs[name] = y.cpu()
                if r >= a.warmup:
                    times[name].append(t)
            peak[name] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
            models[name].to("cpu")
    ref = outs.get("transformers/padded", outs.get("transformers/padded/bf16"))
    import transformers

    base = {
        "kind": "encoder", "size": a.size, "device": a.device, "pooling": a.pooling, "batch": a.batch, "seq_len": a.max_len,
        "min_len": None if a.full else a.min_len, "lengths": "full" if a.full else "uniform", "n_seqs": len(seqs),
        "real_tokens": real, "rounds": a.rounds,
        "transformers": transformers.__version__, **machine(a.device),
    }
    recs = []
    for name, ts in times.items():
        impl, strategy, *prec = name.split("/")
        precision = "bf16-autocast" if dev.type == "cuda" or prec else "fp32"
        cos = None
        if prec and name[: -len("/bf16")] in outs:
            cos = float(torch.nn.functional.cosine_similarity(outs[name].float().cpu(), outs[name[: -len("/bf16")]].float().cpu(), dim=-1).min())
        seen, passes = processed_tokens(seqs, strategy, a.batch, a.max_len, cfg.pad_id)
        t = statistics.median(ts)
        diff = float((outs[name].float().cpu() - ref.float()).abs().max())
        recs.append({
            "impl": impl, **base, "strategy": strategy, "precision": precision, "cos_vs_fp32_min": cos, "auto": strategy == auto if impl == "ettin" else None,
            "tokens_per_s": round(real / t, 1), "best_tokens_per_s": round(real / min(ts), 1),
            "padded_tokens_per_s": round(seen / t, 1), "pad_share": round(1 - real / seen, 4),
            "forward_passes": passes, "seconds_per_pass": round(t, 4), "pass_seconds": [round(x, 3) for x in ts],
            "peak_memory_gib": peak[name], "max_abs_diff_vs_transformers": float(f"{diff:.3g}"),
        })
    return recs


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--size", default="17m")
    p.add_argument("--batch", type=int, default=32, help="sequences (padded) or packed rows per forward pass")
    p.add_argument("--batches", type=int, default=4, help="corpus size in batches: batch x batches sequences")
    p.add_argument("--max-len", type=int, default=512)
    p.add_argument("--min-len", type=int, default=16)
    p.add_argument("--pooling", default="mean", choices=["mean", "cls", "last"],
                   help="mean over the real tokens; cls / last: one position per sequence (ours: the last block runs there only)")
    p.add_argument("--full", action="store_true", help="every sequence max-len long (no padding anywhere)")
    p.add_argument("--strategy", default="both", choices=["both", "auto", "packed", "padded"],
                   help="ours; 'both' times packed and padded")
    p.add_argument("--rounds", type=int, default=5, help="timed passes over the corpus (after warmup)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "both"],
                   help="CPU: fp32, bf16 autocast, or both side by side (a GPU always runs bf16 autocast)")
    p.add_argument("--json", action="store_true", help="one JSON object per line instead of a table")
    a = p.parse_args(argv)
    if a.min_len < 2 or a.max_len < a.min_len:
        p.error("need 2 <= --min-len <= --max-len")
    if a.device == "cpu":
        torch.set_num_threads(a.threads)
        from ettin.model.cpu import tune_cpu_allocator

        tune_cpu_allocator()  # process-wide, as model_speed.py: both implementations get it
    recs = run(a)
    for r in recs:
        theirs = next(t for t in recs if t["impl"] == "transformers" and t["precision"] == r["precision"])
        if a.json:
            print(json.dumps(r), flush=True)
        else:
            mem = f"  peak {r['peak_memory_gib']} GiB" if r["peak_memory_gib"] is not None else ""
            cos = f"  cos vs fp32 >= {r['cos_vs_fp32_min']:.5f}" if r["cos_vs_fp32_min"] is not None else ""
            print(f"{a.size:5s} {r['impl']:13s} {r['strategy']:7s} {r['precision']:13s} {r['tokens_per_s']:10,.0f} real tokens/s  "
                  f"pads {100 * r['pad_share']:4.1f}%  {r['tokens_per_s'] / theirs['tokens_per_s']:.2f}x transformers{mem}{cos}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
