"""The whole performance matrix of the performance issue in one command, for one GPU session.

A session with a GPU gets about 15 minutes of device time, start-up included, so this runs the
items in order of importance, each in its own process (clean memory, its own timeout), appends
every result to one JSON-lines file as soon as it exists, and starts nothing it cannot finish
inside ``--budget-s``. Items:

==============  =============================================================================
``check``       flex vs SDPA and compiled vs eager, values and gradients (``gpu_check.py``)
``train``       150m encoder + decoder, batch 32 x 1024: ours (trainer, compiled blocks, flex,
                document masking) vs transformers eager (``train_speed.py``)
``compiled``    transformers under torch.compile, same shapes (the anchor's second column)
``nodocmask``   ours without document masking (the mask's cost)
``infer``       encoder inference, batch 256 x 512, variable lengths (``infer_speed.py``)
``large``       400m, batch 16: ours vs transformers eager
``memory``      1b encoder, batch 16 x 1024, without and with activation checkpointing: peak memory
``parallel``    one-process torchrun: plain vs DDP vs FSDP2 (150m), from the trainer's metrics
``sdpa``        ours with SDPA instead of flex attention
==============  =============================================================================

    python bench/gpu_matrix.py --out bench/results/gpu_matrix.jsonl            # on the GPU
    python bench/gpu_matrix.py --smoke --out /tmp/m.jsonl --only train,parallel  # CPU, tiny

``--smoke`` swaps every size for ``tiny`` and the shapes for small ones on the CPU, to check the
script itself. Each line carries ``item``; failures are lines with ``error``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ORDER = ["check", "train", "compiled", "nodocmask", "infer", "large", "memory", "parallel", "sdpa"]


def items(smoke: bool, work: Path) -> dict[str, list]:
    """Item name -> list of argument lists for ``train_speed.py`` / ``infer_speed.py`` / special."""
    if smoke:
        dev, s150, s400, s1b = "cpu", "tiny", "tiny", "tiny"
        b32, b16, L, bi, Li, steps = 2, 2, 64, 8, 64, ["--steps", "2", "--warmup", "1"]
    else:
        dev, s150, s400, s1b = "cuda", "150m", "400m", "1b"
        b32, b16, L, bi, Li, steps = 32, 16, 1024, 256, 512, ["--steps", "10", "--warmup", "3"]
    ts = ["train_speed.py", "--device", dev, "--seq-len", str(L), "--json", "--workdir", str(work), *steps]
    return {
        "check": [["gpu_check.py", "--device", dev]],
        "train": [[*ts, "--size", s150, "--batch", str(b32)]],
        "compiled": [[*ts, "--size", s150, "--batch", str(b32), "--impl", "transformers", "--their-compile"]],
        "nodocmask": [[*ts, "--size", s150, "--batch", str(b32), "--impl", "ettin", "--no-doc-mask"]],
        "infer": [["infer_speed.py", "--device", dev, "--size", s150, "--batch", str(bi), "--max-len", str(Li), "--json"]],
        "large": [[*ts, "--size", s400, "--batch", str(b16)]],
        "memory": [[*ts, "--size", s1b, "--batch", str(b16), "--kind", "encoder", "--impl", "ettin", *ac, "--steps", "3", "--warmup", "2"]
                   for ac in ([], ["--activation-checkpointing"])],
        "parallel": [["parallel", dev, s150, b32 if not smoke else 2, L]],
        "sdpa": [[*ts, "--size", s150, "--batch", str(b32), "--impl", "ettin", "--attn-impl", "sdpa"]],
    }


def run_script(args: list[str], timeout: float) -> list[dict]:
    cmd = [sys.executable, str(HERE / args[0]), *args[1:]]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    rows = []
    for line in r.stdout.splitlines():
        if line.startswith("{"):
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                pass
    if r.returncode != 0:
        rows.append({"error": f"exit {r.returncode}", "command": " ".join(args), "stderr_tail": r.stderr[-2000:]})
    return rows


def run_parallel(dev: str, size: str, batch: int, seq_len: int, timeout: float, work: Path) -> list[dict]:
    """The trainer itself: no torchrun, then torchrun --nproc_per_node 1 with DDP and with FSDP2."""
    sys.path.insert(0, str(HERE))
    from train_speed import prepare_data, write_recipe

    data = prepare_data(work / "demo")
    steps, warm = (8, 3) if dev == "cuda" else (3, 1)
    rows = []
    for parallel in ("none", "ddp", "fsdp2"):
        recipe = write_recipe(work / f"par-{parallel}.yaml", data, size=size, kind="encoder", vocab=50368, batch=batch, micro=batch,
                              seq_len=seq_len, steps=steps, device=dev, precision="auto", compile_blocks="auto")
        if parallel != "none":
            import yaml

            d = yaml.safe_load(recipe.read_text())
            d["distributed"] = {"strategy": parallel}
            recipe.write_text(yaml.safe_dump(d))
        out = work / f"par-{parallel}"
        launch = [sys.executable, "-m", "ettin"] if parallel == "none" else [
            sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=1", "--master_port=29533", "-m", "ettin"]
        r = subprocess.run([*launch, "train", str(recipe), "--out", str(out), "--no-progress"], capture_output=True, text=True, timeout=timeout)
        if r.returncode != 0:
            rows.append({"item": "parallel", "parallel": parallel, "error": f"exit {r.returncode}", "stderr_tail": r.stderr[-2000:]})
            continue
        m = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        tps = [x["tokens_per_s"] for x in m[warm:]]
        mem = [x.get("gpu_memory_gib") for x in m[warm:] if x.get("gpu_memory_gib") is not None]
        rows.append({"impl": "ettin", "kind": "encoder", "size": size, "device": dev, "batch": batch, "seq_len": seq_len,
                     "parallel": parallel, "steps": len(tps), "tokens_per_s": round(statistics.median(tps), 1),
                     "mfu": statistics.median(x["mfu"] for x in m[warm:]) if m[warm].get("mfu") else None,
                     "peak_memory_gib": max(mem) if mem else None})
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="JSON-lines file (appended)")
    ap.add_argument("--only", default=None, help=f"comma-separated items (default all, in this order: {','.join(ORDER)})")
    ap.add_argument("--budget-s", type=float, default=540, help="start nothing after this many seconds")
    ap.add_argument("--item-timeout-s", type=float, default=300)
    ap.add_argument("--smoke", action="store_true", help="tiny sizes and shapes on the CPU: checks the script")
    ap.add_argument("--workdir", default="/tmp/ettin-gpu-matrix")
    a = ap.parse_args(argv)
    chosen = a.only.split(",") if a.only else ORDER
    unknown = [c for c in chosen if c not in ORDER]
    if unknown:
        ap.error(f"unknown item(s) {', '.join(unknown)}; known: {', '.join(ORDER)}")
    work = Path(a.workdir)
    plan = items(a.smoke, work)
    work.mkdir(parents=True, exist_ok=True)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    sys.path.insert(0, str(HERE))
    from machine import machine

    host = machine("cuda" if not a.smoke else "cpu", kernels=False)  # the items' own records add theirs
    t0 = time.monotonic()
    failed = 0
    for name in chosen:
        left = a.budget_s - (time.monotonic() - t0)
        if left < 20:
            print(f"[matrix] {name}: skipped, {left:.0f} s of budget left", flush=True)
            continue
        for args in plan[name]:
            t = time.monotonic()
            timeout = min(a.item_timeout_s, left)
            try:
                rows = run_parallel(*args[1:], timeout=timeout, work=work) if args[0] == "parallel" else run_script(args, timeout)
            except subprocess.TimeoutExpired:
                rows = [{"error": f"timed out after {timeout:.0f} s", "command": " ".join(map(str, args))}]
            secs = round(time.monotonic() - t, 1)
            with out.open("a") as fh:
                for r in rows:
                    r = {"item": name, **host, **r, "item_seconds": secs}
                    failed += "error" in r or r.get("ok") is False
                    fh.write(json.dumps(r) + "\n")
                    brief = {k: r[k] for k in ("impl", "kind", "size", "parallel", "tokens_per_s", "mfu", "peak_memory_gib", "check", "ok", "error") if k in r}
                    print(f"[matrix] {name} ({secs} s): {json.dumps(brief)}", flush=True)
    print(f"[matrix] done in {time.monotonic() - t0:.0f} s; {failed} failed row(s); results in {out}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
