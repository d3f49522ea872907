"""Speed of the real trainer (``ettin train``'s loop) vs transformers' ModernBERT at one size.

Ours: ``ettin.train.trainer.train`` on a prepared data directory (the shipped demo corpus with a
small BPE tokenizer; the model keeps the size's full vocabulary, 50,368 by default): loader
(prefetch thread, memmaps), objective (MLM 30% / CLM on packed documents with document
masking), the trainer's forward/backward/optimizer (``Learner.step``), metrics logging. The
wall time of each step counts everything between two steps; ``overhead_share`` is the part of
it spent outside ``Learner.step`` (loader wait, batch hashing, logging).

Transformers: ``ModernBertForMaskedLM`` (``sparse_prediction=True``, MLM labels from the same
objective function on the same rows) / ``ModernBertDecoderForCausalLM`` (CLM over every
position), random init at the same config, ``torch.optim.AdamW`` (default on a CPU; fused, as the
issue's anchors, on a GPU), bf16 autocast on a GPU. It has no document masking (its API takes
none); the work per token is the same.

On a CPU the two run interleaved in one process (each trainer step is followed by one
transformers step on the same rows), so background load hits both alike; medians after a
warmup. ``--sequential`` (default on a GPU) runs ours then theirs, each alone (clean peak memory).
MFU = 6 x parameters x tokens/s / the GPU's bf16 peak (the trainer's table of peaks).

Variants for the issue's matrix: ``--impl ettin|transformers`` (one side only),
``--their-compile`` (transformers under torch.compile), ``--no-doc-mask`` (ours without document
masking: the mask's cost), ``--activation-checkpointing`` (memory of the large sizes),
``--compile on|off|auto`` and ``--attn-impl`` for ours. ``bench/gpu_matrix.py`` runs them all.

    python bench/train_speed.py --device cpu --size 17m --json
    python bench/train_speed.py --profile                 # where a 17m CPU step spends its time, ours and theirs
    python bench/train_speed.py --device cuda --size 150m --batch 32 --seq-len 1024 --json
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import machine  # noqa: E402  (one machine record for every benchmark)


def prepare_data(root: Path, docs: int = 404) -> Path:
    """Tokenizer (BPE, 1024) + data directory from the shipped demo corpus (cached in ``root``)."""
    from ettin.data import demo_corpus_path
    from ettin.data.prepare import prepare
    from ettin.data.tokenizer import train_tokenizer

    data = root / "data"
    if (data / "manifest.json").exists() or any(data.glob("*.json")):
        return data
    root.mkdir(parents=True, exist_ok=True)
    texts = []
    with gzip.open(demo_corpus_path(), "rt", encoding="utf-8") as fh:
        for line in fh:
            texts.append(json.loads(line)["text"])
            if len(texts) == docs:
                break
    corpus = root / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    train_tokenizer(iter(texts), root / "tok", 1024)
    prepare([corpus], root / "tok", data, workers=1)
    return data


def write_recipe(path: Path, data: Path, *, size: str, kind: str, vocab: int, batch: int, micro: int, seq_len: int,
                 steps: int, device: str, precision: str, compile_blocks, attn_impl: str = "auto",
                 document_masking: bool = True, activation_checkpointing: bool = False) -> Path:
    d = {
        "name": "bench",
        "model": {"size": size, "kind": kind, "vocab_size": vocab, "compile": compile_blocks, "attn_impl": attn_impl,
                  "activation_checkpointing": activation_checkpointing},
        "data": {"sources": [{"path": str(data), "weight": 1.0}]},
        "train": {"tokens": steps * batch * seq_len, "seq_len": seq_len, "global_batch": batch, "micro_batch": micro,
                  "mask_rate": 0.3, "seed": 0, "rope_theta": 10000, "device": device, "precision": precision,
                  "document_masking": document_masking},
        "optim": {"lr": 1e-4, "schedule": {"kind": "warmup_constant", "warmup_tokens": 0}},
        "checkpoint": {"every_tokens": 10**15},
        "logging": {"tensorboard": False},
    }
    path.write_text(yaml.safe_dump(d))
    return path


class TheirStep:
    """One transformers training step on the rows the trainer just used."""

    def __init__(self, cfg, kind: str, dev: torch.device, compile_model: bool = False):
        from transformers import ModernBertDecoderForCausalLM, ModernBertForMaskedLM

        from ettin.convert.hf import hf_config_for

        hf_cfg = hf_config_for(cfg)
        hf_cfg._attn_implementation = "sdpa"
        if kind == "encoder":
            hf_cfg.sparse_prediction = True
        torch.manual_seed(0)
        self.model = (ModernBertDecoderForCausalLM if kind == "decoder" else ModernBertForMaskedLM)(hf_cfg).to(dev).train()
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-4, fused=True if dev.type == "cuda" else None)
        if compile_model:
            self.model.compile()
        self.cfg, self.kind, self.dev = cfg, kind, dev

    def __call__(self, ids: torch.Tensor, docs: torch.Tensor, mask_rate: float, step: int, micro: int) -> None:
        from ettin import objectives as O

        if self.kind == "encoder":
            g = torch.Generator().manual_seed(step)
            inputs, labels = O.make_batch("mlm", ids, config=self.cfg, mask_rate=mask_rate, doc_ids=docs, generator=g)
        else:
            inputs, labels = ids, ids  # the model shifts the labels itself
        amp = torch.autocast("cuda", dtype=torch.bfloat16) if self.dev.type == "cuda" else contextlib.nullcontext()
        n = inputs.shape[0]
        for c in range(0, n, micro):
            x, y = inputs[c:c + micro].to(self.dev), labels[c:c + micro].to(self.dev)
            with amp:
                loss = self.model(input_ids=x, labels=y).loss * (min(micro, n - c) / n)
            loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        loss.item()


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize()


def peak_flops(dev: torch.device) -> float | None:
    """bf16 dense peak of the GPU (for MFU), as the trainer knows it; None on a CPU."""
    if dev.type != "cuda":
        return None
    from ettin.train.trainer import _device_peak

    return _device_peak(dev)


def run_theirs(a, kind: str, cfg, dev: torch.device) -> tuple[list[float], float]:
    """Transformers alone (``--sequential``): step times and peak memory."""
    import gc

    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    theirs = TheirStep(cfg, kind, dev, compile_model=a.their_compile)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, min(cfg.vocab_size, 1024), (a.batch, a.seq_len), generator=g)
    docs = torch.zeros_like(ids)
    times, peak = [], 0.0
    for i in range(a.warmup + a.steps):
        sync(dev)
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        theirs(ids, docs, 0.3, i, a.micro_batch or a.batch)
        sync(dev)
        times.append(time.perf_counter() - t0)
        if dev.type == "cuda":
            peak = max(peak, torch.cuda.max_memory_allocated() / 2**30)
    del theirs
    return times[a.warmup:], peak


def run_kind(a, kind: str, data: Path, work: Path) -> list[dict]:
    """Ours (the real trainer) and/or transformers for one kind; one record per implementation."""
    from ettin.config import preset, small_vocab_specials
    from ettin.train import trainer as T

    dev = torch.device(a.device)
    steps = a.warmup + a.steps
    tokens = a.batch * a.seq_len
    ours: list[tuple[float, float, float]] = []  # (enter, ours done, theirs done)
    theirs_t: list[float] = []
    peak = {"ettin": 0.0, "transformers": float("nan")}
    state: dict = {"cfg": preset(a.size, causal=kind == "decoder", **small_vocab_specials(a.vocab_size))}
    recs = []
    base = {"kind": kind, "size": a.size, "device": a.device, "batch": a.batch, "seq_len": a.seq_len, "vocab_size": a.vocab_size,
            "threads": torch.get_num_threads() if dev.type == "cpu" else None,
            "mode": "sequential" if a.sequential else "interleaved", **machine(a.device)}
    flops = peak_flops(dev)

    def mfu(tok_s: float, params: int) -> float | None:
        return round(6 * params * tok_s / flops, 4) if flops else None

    if a.impl in ("both", "ettin"):
        recipe = write_recipe(work / f"{kind}.yaml", data, size=a.size, kind=kind, vocab=a.vocab_size, batch=a.batch,
                              micro=a.micro_batch or a.batch, seq_len=a.seq_len, steps=steps + 1, device=a.device,
                              precision="auto", compile_blocks=a.compile, attn_impl=a.attn_impl,
                              document_masking=not a.no_doc_mask, activation_checkpointing=a.activation_checkpointing)
        orig = T.Learner.step
        interleave = a.impl == "both" and not a.sequential

        def wrapped(self, plan, ids, docs):
            sync(dev)
            if dev.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
            r = orig(self, plan, ids, docs)
            sync(dev)
            t1 = time.perf_counter()
            if dev.type == "cuda":
                peak["ettin"] = max(peak["ettin"], torch.cuda.max_memory_allocated() / 2**30)
            t2 = t1
            if interleave:
                if "theirs" not in state:
                    state["theirs"] = TheirStep(self.model.config, kind, dev, compile_model=a.their_compile)
                state["theirs"](ids, docs, plan.mask_rate, plan.step, a.micro_batch or a.batch)
                sync(dev)
                t2 = time.perf_counter()
                theirs_t.append(t2 - t1)
            ours.append((t0, t1, t2))
            state["cfg"] = self.model.config
            state["params"] = self.model.num_params()
            return r

        import shutil

        shutil.rmtree(work / f"run-{kind}", ignore_errors=True)  # a leftover run would be resumed
        T.Learner.step = wrapped
        try:
            T.train(recipe, work / f"run-{kind}", progress=False, max_steps=steps + 1)
        finally:
            T.Learner.step = orig
            state.pop("theirs", None)
        # step i's wall = its Learner.step + the trainer's time between the end of the previous
        # step's work and this step's start (loader, logging, hashing); theirs is excluded
        walls, computes, over = [], [], []
        for i in range(1, len(ours)):
            gap = ours[i][0] - ours[i - 1][2]
            comp = ours[i][1] - ours[i][0]
            walls.append(gap + comp)
            computes.append(comp)
            over.append(gap)
        keep = slice(a.warmup, a.warmup + a.steps)
        walls, computes, over = walls[keep], computes[keep], over[keep]
        if interleave:
            theirs_t = theirs_t[1:][keep]
        tok_s = tokens / statistics.median(walls)
        recs.append({"impl": "ettin", **base, "steps": len(walls), "tokens_per_s": round(tok_s, 1),
                     "compute_tokens_per_s": round(tokens / statistics.median(computes), 1),
                     "overhead_share": round(sum(over) / sum(walls), 4), "params": state["params"], "mfu": mfu(tok_s, state["params"]),
                     "optimizer": "StableAdamW(ettin)", "document_masking": not a.no_doc_mask,
                     "compile": a.compile, "attn_impl": a.attn_impl, "activation_checkpointing": a.activation_checkpointing,
                     "peak_memory_gib": round(peak["ettin"], 3) if dev.type == "cuda" else None})
    if a.impl == "transformers" or (a.impl == "both" and a.sequential):
        if dev.type == "cuda":
            torch.cuda.empty_cache()
        theirs_t, peak["transformers"] = run_theirs(a, kind, state["cfg"], dev)
    if a.impl in ("both", "transformers"):
        tok_s = tokens / statistics.median(theirs_t)
        params = state.get("params") or state["cfg"].num_params()
        recs.append({"impl": "transformers", **base, "steps": len(theirs_t), "tokens_per_s": round(tok_s, 1),
                     "params": params, "mfu": mfu(tok_s, params),
                     "optimizer": "AdamW(fused)" if dev.type == "cuda" else "AdamW", "document_masking": False,
                     "compile": a.their_compile, "attn_impl": "sdpa",
                     "peak_memory_gib": round(peak["transformers"], 3) if dev.type == "cuda" and peak["transformers"] == peak["transformers"] else None})
    return recs


# -- --profile: where a step's time goes ---------------------------------------------------------
GROUPS = ("linears/matmul", "head+loss", "attention", "norms", "activation", "elementwise", "embedding",
          "optimizer", "copies/alloc", "other")


def op_group(name: str, shapes, vocab: int, scopes: tuple[str, ...] = ()) -> str:
    """The group of one profiled op: by the regions around it (optimizer, gradient norm), then by
    its shapes (anything touching a vocabulary-sized dimension is the head + loss), then its name."""
    if any(s.startswith("Optimizer.") or s == "grad_norm" for s in scopes):
        return "optimizer"
    n = name.lower()
    if "_foreach" in n:
        return "optimizer"
    if "embedding" in n:
        return "embedding"
    flat = [d for s in (shapes or []) if isinstance(s, (list, tuple)) for d in s if isinstance(d, int)]
    if vocab in flat or any(k in n for k in ("log_softmax", "nll_loss", "cross_entropy", "logsumexp")):
        return "head+loss"
    if any(k in n for k in ("mm", "linear", "matmul", "_linear_pointwise", "addmv")):
        return "linears/matmul"
    if any(k in n for k in ("attention", "flash", "sdpa", "softmax", "masked_fill", "unfold")):
        return "attention"
    if "norm" in n:
        return "norms"
    if "gelu" in n or "silu" in n or "tanh" in n:
        return "activation"
    if any(k in n for k in ("copy", "clone", "contiguous", "cat", "empty", "zero", "fill", "_to_copy", "index", "stack",
                            "pad", "as_strided", "resize", "where", "full", "ones", "roll")):
        return "copies/alloc"
    if any(k in n for k in ("mul", "add", "sub", "div", "neg", "sum", "addcmul", "rsqrt", "sqrt", "pow", "lerp")):
        return "elementwise"
    return "other"


def profile(a) -> list[dict]:
    """One profiled training step per implementation (after a warmup), grouped by kind of work.

    Same compute as ``Learner.step`` on our side (``bench/model_speed.py``'s step: fused head +
    loss, gradient norm, StableAdamW) and transformers' own loss + AdamW on theirs, same batch
    and weights. Self CPU time per op, so nothing is counted twice.
    """
    from torch.profiler import ProfilerActivity, profile as torch_profile

    from model_speed import make_batch, make_pair, step_fns

    kinds = ["encoder", "decoder"] if a.kind == "both" else [a.kind]
    out = []
    for kind in kinds:
        ours, theirs = make_pair(kind, a.size)
        inputs, labels = make_batch(kind, a.batch, a.seq_len, ours.config)
        fns = step_fns(kind, ours, theirs, inputs, labels)
        vocab = ours.config.vocab_size
        for name, fn in fns.items():
            for _ in range(max(1, a.warmup)):
                fn()
            t0 = time.perf_counter()
            with torch_profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
                fn()
            wall = time.perf_counter() - t0
            groups = dict.fromkeys(GROUPS, 0.0)
            ops = []
            for ev in prof.events():
                us = ev.self_cpu_time_total
                if us <= 0:
                    continue
                scopes, par = [], ev.cpu_parent
                while par is not None:
                    scopes.append(par.name)
                    par = par.cpu_parent
                g = op_group(ev.name, ev.input_shapes, vocab, tuple(scopes))
                groups[g] += us / 1e3
                ops.append((us / 1e3, ev.name, g))
            total = sum(groups.values())
            top: dict[str, float] = {}
            for ms, key, g in ops:
                top[f"{key} [{g}]"] = top.get(f"{key} [{g}]", 0.0) + ms
            out.append({"profile": True, "impl": name, "kind": kind, "size": a.size, "batch": a.batch, "seq_len": a.seq_len,
                        "step_ms": round(1e3 * wall, 1), "self_cpu_ms": round(total, 1),
                        "groups_ms": {k: round(v, 1) for k, v in groups.items()},
                        "top_ops_ms": dict(sorted(((k, round(v, 1)) for k, v in top.items()), key=lambda kv: -kv[1])[:12]),
                        **machine("cpu")})
        del ours, theirs, fns
    return out


def print_profile(recs: list[dict]) -> None:
    for kind in dict.fromkeys(r["kind"] for r in recs):
        pair = [r for r in recs if r["kind"] == kind]
        print(f"\n{kind} {pair[0]['size']} step, self CPU time by group (ms, share); "
              + ", ".join(f"{r['impl']} {r['step_ms']:.0f} ms wall" for r in pair))
        print(f"  {'group':16s}" + "".join(f"{r['impl']:>24s}" for r in pair))
        for g in GROUPS:
            cells = "".join(f"{r['groups_ms'][g]:14.1f} ({100 * r['groups_ms'][g] / max(r['self_cpu_ms'], 1e-9):4.1f}%)" + " " * 1 for r in pair)
            print(f"  {g:16s}{cells}")
        for r in pair:
            print(f"  top ops, {r['impl']}:")
            for k, v in r["top_ops_ms"].items():
                print(f"    {v:9.1f} ms  {k}")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--size", default="17m")
    p.add_argument("--kind", choices=["encoder", "decoder", "both"], default="both")
    p.add_argument("--impl", choices=["both", "ettin", "transformers"], default="both")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--micro-batch", type=int, default=None, help="default: the whole batch in one pass")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--vocab-size", type=int, default=50368)
    p.add_argument("--steps", type=int, default=6, help="timed steps (after warmup)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--compile", default="auto", choices=["auto", "on", "off"],
                   help="ours: torch.compile per block (auto: on a GPU only, as the trainer)")
    p.add_argument("--their-compile", action="store_true", help="transformers' model under torch.compile")
    p.add_argument("--attn-impl", default="auto", choices=["auto", "sdpa", "flex"])
    p.add_argument("--no-doc-mask", action="store_true", help="ours without document masking (its cost)")
    p.add_argument("--activation-checkpointing", action="store_true")
    p.add_argument("--sequential", action="store_true", default=None, help="ours then theirs (default on a GPU)")
    p.add_argument("--interleaved", dest="sequential", action="store_false")
    p.add_argument("--workdir", default=None, help="where the data and runs go (default: a temporary directory)")
    p.add_argument("--profile", action="store_true",
                   help="profile one step of each implementation (torch.profiler) and print where the time goes")
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    a.compile = {"auto": "auto", "on": True, "off": False}[a.compile]
    if a.sequential is None:
        a.sequential = a.device == "cuda"
    if a.device == "cpu":
        torch.set_num_threads(a.threads)
        from ettin.model.cpu import tune_cpu_allocator

        tune_cpu_allocator()  # what the trainer does on a CPU (process-wide), so the records say so
    if a.profile:
        if a.device != "cpu":
            p.error("--profile profiles the CPU step")
        recs = profile(a)
        if a.json:
            for r in recs:
                print(json.dumps(r), flush=True)
        else:
            print_profile(recs)
        return
    kinds = ["encoder", "decoder"] if a.kind == "both" else [a.kind]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(a.workdir or tmp)
        data = prepare_data(work / "demo")
        for kind in kinds:
            recs = run_kind(a, kind, data, work)
            for r in recs:
                if a.json:
                    print(json.dumps(r), flush=True)
                else:
                    extra = f"  (loader+logging {100 * r['overhead_share']:.1f}%)" if "overhead_share" in r else ""
                    mem = f"  peak {r['peak_memory_gib']} GiB" if r.get("peak_memory_gib") else ""
                    mfu = f"  MFU {100 * r['mfu']:.1f}%" if r.get("mfu") else ""
                    print(f"{kind:8s} {a.size:5s} {r['impl']:13s} {r['tokens_per_s']:12,.0f} tokens/s{mfu}{extra}{mem}", flush=True)
            if not a.json and len(recs) == 2:
                print(f"{kind:8s} {a.size:5s} ratio ettin/transformers = {recs[0]['tokens_per_s'] / recs[1]['tokens_per_s']:.2f}x", flush=True)


if __name__ == "__main__":
    sys.exit(main())
