"""Correctness of the GPU-only paths, checked on the GPU before any timing is trusted.

Flex attention has no backward on a CPU, so the CPU test suite checks its forward only. Here:

1. flex attention (block masks: documents + sliding window + causality) == SDPA with explicit
   masks: outputs and every parameter gradient, encoder and decoder, fp32 (tight) and bf16
   autocast (loose), sequences longer than the window, packed documents;
2. compiled blocks (``model.compile_blocks()``, what ``model.compile: auto`` does on a GPU) ==
   eager: loss and gradients.

    python bench/gpu_check.py --json bench/results/gpu_check.jsonl

Runs on a CPU too (``--device cpu``: forward only for flex) as a smoke test of the script.
"""

from __future__ import annotations

import argparse
import json

import torch

from ettin.config import preset, small_vocab_specials
from ettin.model import Transformer

V = 512


def packed_docs(B: int, L: int, device, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 5, (B, L), generator=g).sort(dim=1).values.to(device)


def models(causal: bool, device: str) -> tuple[Transformer, Transformer]:
    torch.manual_seed(0)
    a = Transformer(preset("tiny", causal=causal, **small_vocab_specials(V))).to(device)
    b = Transformer(a.config).to(device)
    b.load_state_dict(a.state_dict())
    return a, b


def max_rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item() / max(1.0, b.float().abs().max().item())


def compare(a: Transformer, b: Transformer, device: str, dtype, backward: bool, L: int = 700) -> dict:
    """Loss and gradients of ``a`` against ``b`` on one packed batch (labels on 30% of tokens)."""
    g = torch.Generator().manual_seed(1)
    x = torch.randint(5, V, (2, L), generator=g).to(device)
    y = torch.where(torch.rand(2, L, generator=g) < 0.3, x.cpu(), -100).to(device)
    docs = packed_docs(2, L, device)
    amp = torch.autocast(device, dtype=dtype) if dtype != torch.float32 else torch.autocast(device, enabled=False)
    out = {}
    with torch.set_grad_enabled(backward), amp:
        la = a(x, doc_ids=docs, labels=y)
        lb = b(x, doc_ids=docs, labels=y)
        out["loss_rel_diff"] = abs(la.item() - lb.item()) / abs(lb.item())
        with torch.no_grad():
            out["hidden_max_diff"] = max_rel_diff(a.encode(x, doc_ids=docs), b.encode(x, doc_ids=docs))
    if backward:
        la.backward()
        lb.backward()
        ga = dict(a.named_parameters())
        out["grad_max_rel_diff"] = max(max_rel_diff(ga[n].grad, p.grad) for n, p in b.named_parameters())
    return out


def run(device: str) -> list[dict]:
    rows = []
    backward = device == "cuda"
    for causal in (False, True):
        kind = "decoder" if causal else "encoder"
        for dtype, tol in ((torch.float32, 1e-4), (torch.bfloat16, 5e-2)):
            a, b = models(causal, device)
            a.attn_impl, b.attn_impl = "flex", "sdpa"
            r = compare(a, b, device, dtype, backward)
            ok = all(v <= tol for v in r.values())
            rows.append({"check": "flex_vs_sdpa", "kind": kind, "dtype": str(dtype), **r, "tolerance": tol, "ok": ok})
        a, b = models(causal, device)
        a.compile_blocks()
        a.attn_impl = b.attn_impl = "flex" if device == "cuda" else "sdpa"
        r = compare(a, b, device, torch.float32, True)
        rows.append({"check": "compiled_vs_eager", "kind": kind, "attn_impl": a.attn_impl, **r, "tolerance": 1e-4,
                     "ok": all(v <= 1e-4 for v in r.values())})
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    return [{**r, "device": name, "torch": torch.__version__} for r in rows]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--json", default=None, help="also write the rows here (JSON lines)")
    a = ap.parse_args(argv)
    rows = run(a.device)
    for r in rows:
        print(json.dumps(r), flush=True)
    if a.json:
        with open(a.json, "w") as fh:
            fh.write("".join(json.dumps(r) + "\n" for r in rows))
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
