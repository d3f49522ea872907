"""Training-step speed of our Transformer vs transformers' ModernBERT at the same config.

One step = forward + loss + backward + optimizer step, on the same weights and the same batch.
Ours is the trainer's compute (``Learner.step``): ``model(x, labels=y)`` (sparse prediction,
fused chunked head + cross-entropy), gradient-norm computation, and the trainer's optimizer
(StableAdamW, ``ettin.train.optim.build_optimizer``). Transformers: ``ModernBertForMaskedLM`` /
``ModernBertDecoderForCausalLM`` with their own loss and ``torch.optim.AdamW`` with its defaults,
as users run it (``--same-optimizer`` gives ours AdamW too). Encoder: MLM at 30% with sparse
prediction on both sides (transformers: ``config.sparse_prediction=True``). Decoder: CLM with
logits at every position on both sides. Steps of the two implementations are interleaved
(after a warmup), alternating who goes first, so background load hits both alike; the median
step time is reported. On a shared machine single steps vary a lot: compare the two
implementations of one run, not runs.

    python bench/model_speed.py                       # 17m, batch 8 x 512, fp32, CPU, 2 threads
    python bench/model_speed.py --kind encoder --steps 3 --json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch

from ettin.config import MODERNBERT_VOCAB, preset
from ettin.convert.hf import to_hf_state_dict
from ettin.model import Transformer
from ettin.objectives import IGNORE, clm, mlm


def make_pair(kind: str, size: str, seed: int = 0):
    """Our model and transformers' model holding the same weights."""
    from transformers import ModernBertDecoderForCausalLM, ModernBertForMaskedLM

    from ettin.convert.hf import hf_config_for

    causal = kind == "decoder"
    cfg = preset(size, causal=causal, vocab_size=MODERNBERT_VOCAB)
    torch.manual_seed(seed)
    ours = Transformer(cfg)
    hf_cfg = hf_config_for(cfg)
    hf_cfg._attn_implementation = "sdpa"
    if not causal:
        hf_cfg.sparse_prediction = True
    theirs = (ModernBertDecoderForCausalLM if causal else ModernBertForMaskedLM)(hf_cfg)
    missing, unexpected = theirs.load_state_dict(to_hf_state_dict(ours), strict=False)
    assert set(missing) == {"decoder.weight"} and not unexpected, (missing, unexpected)
    theirs.tie_weights()
    return ours.train(), theirs.train()


def make_batch(kind: str, batch: int, seq_len: int, cfg, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, cfg.cls_id, (batch, seq_len), generator=g)
    ids[:, 0], ids[:, -1] = cfg.cls_id, cfg.sep_id
    if kind == "decoder":
        return ids, clm(ids)
    return mlm(ids, rate=0.3, mask_id=cfg.mask_id, special_ids=cfg.special_ids, random_ids=cfg.vocab_size, generator=g)


def step_fns(kind: str, ours, theirs, inputs, labels, fused: bool = False, same_optimizer: bool = False):
    """One training step for each implementation, as closures."""
    from ettin.train.optim import build_optimizer
    from ettin.train.recipe import OptimSection

    if same_optimizer:
        opt_o = torch.optim.AdamW(ours.parameters(), lr=1e-4, fused=fused or None)
    else:
        opt_o = build_optimizer(ours, OptimSection(lr=1e-4))
    opt_t = torch.optim.AdamW(theirs.parameters(), lr=1e-4, fused=fused or None)
    n_loss = int((labels != IGNORE).sum())

    def ours_step() -> float:
        # what Learner.step computes: summed CE over labelled positions (fused head + loss),
        # scaled to the mean, gradient norm, optimizer step
        loss = ours(inputs, labels=labels) / n_loss
        loss.backward()
        with torch.profiler.record_function("grad_norm"):  # (train_speed.py --profile groups it with the optimizer)
            torch.nn.utils.get_total_norm([p.grad for p in ours.parameters() if p.grad is not None])  # no clipping (the recipe's)
        opt_o.step()
        opt_o.zero_grad(set_to_none=True)
        return loss.item()

    def theirs_step() -> float:
        # transformers' causal LM shifts labels itself: pass the inputs as labels.
        loss = theirs(input_ids=inputs, labels=labels if kind == "encoder" else inputs).loss
        loss.backward()
        opt_t.step()
        opt_t.zero_grad(set_to_none=True)
        return loss.item()

    return {"ettin": ours_step, "transformers": theirs_step}


def optimizer_names(fused: bool, same_optimizer: bool) -> dict[str, str]:
    theirs = "AdamW(fused)" if fused else "AdamW"
    return {"ettin": theirs if same_optimizer else "StableAdamW(ettin)", "transformers": theirs}


def bench(kind: str, size: str, batch: int, seq_len: int, steps: int, warmup: int, fused: bool = False,
          same_optimizer: bool = False) -> dict[str, float]:
    ours, theirs = make_pair(kind, size)
    inputs, labels = make_batch(kind, batch, seq_len, ours.config)
    fns = step_fns(kind, ours, theirs, inputs, labels, fused, same_optimizer)
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for i in range(steps):
        order = list(fns) if i % 2 == 0 else list(fns)[::-1]  # alternate who goes first
        for name in order:
            t0 = time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - t0)
    return {name: batch * seq_len / statistics.median(ts) for name, ts in times.items()}


from machine import cpu_model, machine  # noqa: E402,F401  (bench/ is on sys.path: one machine record everywhere)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", default="17m")
    p.add_argument("--kind", choices=["encoder", "decoder", "both"], default="both")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--steps", type=int, default=5, help="timed steps per implementation (after warmup)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--fused-optimizer", action="store_true", help="transformers (and --same-optimizer ours) with AdamW(fused=True)")
    p.add_argument("--same-optimizer", action="store_true", help="ours with transformers' AdamW instead of the trainer's StableAdamW")
    p.add_argument("--json", action="store_true", help="one JSON object per line instead of a table")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    # what the trainer does on a CPU (process-wide, so transformers' steps get it too)
    from ettin.model.cpu import tune_cpu_allocator

    tune_cpu_allocator()
    kinds = ["encoder", "decoder"] if a.kind == "both" else [a.kind]
    for kind in kinds:
        tps = bench(kind, a.size, a.batch, a.seq_len, a.steps, a.warmup, a.fused_optimizer, a.same_optimizer)
        names = optimizer_names(a.fused_optimizer, a.same_optimizer)
        for impl, v in tps.items():
            rec = {"impl": impl, "kind": kind, "size": a.size, "device": "cpu", "batch": a.batch, "seq_len": a.seq_len,
                   "optimizer": names[impl], "tokens_per_s": round(v, 1), **machine("cpu")}
            if a.json:
                print(json.dumps(rec), flush=True)
            else:
                print(f"{kind:8s} {a.size:5s} {impl:13s} {v:10,.0f} tokens/s", flush=True)
        if not a.json:
            print(f"{kind:8s} {a.size:5s} ratio ettin/transformers = {tps['ettin'] / tps['transformers']:.2f}x", flush=True)


if __name__ == "__main__":
    sys.exit(main())
