"""A/B of this round's switchable CPU levers, on and off in one process (issue 17).

Each lever is toggled around the same work, alternating which goes first, and the median of
each side is printed; ratios within one run are what to read (the machines are noisy). The
levers, all exact (``tests/test_perf_equivalence.py``):

- ``paired_rope``: RoPE as one complex product per tensor (``kernels.PAIRED_ROPE``) vs the
  halves form in tiles (``kernels.rope_split``);
- ``one_exp``: the fused head's softmax + -log p (CPU) vs log-softmax then exp (the GPU form).

Workloads: ``infer`` (one packed pass over ``bench/infer_speed.py``'s corpus of 128 sequences,
mean pooling) and ``encoder`` / ``decoder`` (one training step of ``bench/model_speed.py``).

    python bench/cpu_levers.py --size 17m --json
    bench/as_intel_mkl.sh python bench/cpu_levers.py --size 17m --json   # MKL as on an Intel CPU
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
from machine import machine  # (bench/ is on sys.path)


def levers():
    """name -> (workloads it touches, a context manager that turns it off)."""
    from ettin import objectives as O
    from ettin.model import kernels as K

    @contextlib.contextmanager
    def patched(obj, name, value):
        old = getattr(obj, name)
        setattr(obj, name, value)
        try:
            yield
        finally:
            setattr(obj, name, old)

    probs = O._probs_and_nll
    return {
        "paired_rope": (("infer", "encoder", "decoder"), lambda: patched(K, "PAIRED_ROPE", False)),
        "one_exp": (("encoder", "decoder"), lambda: patched(O, "_probs_and_nll", lambda *a, **k: probs(*a, **{**k, "one_exp": False}))),
    }


def workload(name: str, size: str, rows: int, seqs: int):
    """(a function doing the work once, the grad context it runs in)."""
    if name == "infer":
        import infer_speed as I

        from ettin.model.packing import pooled

        ours, _ = I.make_models(size)
        cfg = ours.config
        corpus = I.make_corpus(seqs, 16, 512, cfg, full=False)
        return (lambda: pooled(ours, corpus, pad_id=cfg.pad_id, pooling="mean", strategy="packed", row_len=512,
                               token_budget=rows * 512, max_rows=rows)), torch.no_grad
    from model_speed import make_batch, make_pair, step_fns

    ours, theirs = make_pair(name, size)
    inputs, labels = make_batch(name, 8, 512 if size != "tiny" else 64, ours.config)
    return step_fns(name, ours, theirs, inputs, labels)["ettin"], contextlib.nullcontext


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="17m")
    p.add_argument("--workloads", default="infer,encoder,decoder")
    p.add_argument("--levers", default="paired_rope,one_exp")
    p.add_argument("--reps", type=int, default=10, help="timed runs per side (after two warmup runs each)")
    p.add_argument("--rows", type=int, default=32, help="packed rows per inference forward")
    p.add_argument("--seqs", type=int, default=128, help="sequences in the inference corpus")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    from ettin.model.cpu import tune_cpu_allocator

    tune_cpu_allocator()  # as the trainer and ettin embed run
    table = levers()
    wanted = a.levers.split(",")
    unknown = [x for x in wanted if x not in table]
    if unknown:
        p.error(f"--levers: unknown {unknown}; expected some of {sorted(table)}")
    for wl in a.workloads.split(","):
        names = [x for x in wanted if wl in table[x][0]]
        if not names:
            continue
        fn, grad = workload(wl, a.size, a.rows, a.seqs)
        for lever in names:
            off = table[lever][1]
            times = {"on": [], "off": []}
            with grad():
                for i in range(a.reps + 2):
                    for side in (("on", "off") if i % 2 == 0 else ("off", "on")):
                        with off() if side == "off" else contextlib.nullcontext():
                            t0 = time.perf_counter()
                            fn()
                            dt = time.perf_counter() - t0
                        if i >= 2:
                            times[side].append(dt)
            on, off_ms = (1e3 * statistics.median(times[s]) for s in ("on", "off"))
            rec = {"lever": lever, "workload": wl, "size": a.size, "on_ms": round(on, 1), "off_ms": round(off_ms, 1),
                   "saved": round(1 - on / off_ms, 4), "reps": a.reps, **machine("cpu")}
            print(json.dumps(rec) if a.json else f"{wl:8s} {lever:12s} on {on:8.1f} ms  off {off_ms:8.1f} ms  saved {100 * (1 - on / off_ms):5.1f}%",
                  flush=True)


if __name__ == "__main__":
    main()
