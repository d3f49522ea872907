"""One prepared GPU check (run through the device tool when a session has a GPU).

1. Flex attention (block masks: documents + sliding window) equals the SDPA path, encoder and
   decoder, fp32 and bf16, sequences longer than the window, packed documents.
2. A bf16 training step of each requested size at sequence 1024 (tokens/s, MFU, peak memory),
   with flex attention and with SDPA.

    python bench/gpu_check.py --sizes 150m,400m --json bench/results/gpu_check.json

Runs on CPU too (``--device cpu --sizes tiny``) as a smoke test of the script itself.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F

from ettin.config import preset, small_vocab_specials
from ettin.model import Transformer
from ettin.objectives import IGNORE, make_batch
from ettin.train.optim import build_optimizer
from ettin.train.recipe import OptimSection

PEAK = 790e12


def packed_docs(B: int, L: int, device) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    docs = torch.zeros(B, L, dtype=torch.long)
    for b in range(B):
        cuts = sorted(torch.randint(1, L, (5,), generator=g).tolist())
        for c in cuts:
            docs[b, c:] += 1
    return docs.to(device)


def check_equality(device: str) -> list[dict]:
    out = []
    for causal in (False, True):
        for dtype in (torch.float32, torch.bfloat16):
            torch.manual_seed(0)
            m = Transformer(preset("tiny", causal=causal, **small_vocab_specials(512))).to(device).eval()
            x = torch.randint(4, 512, (2, 700), device=device)
            docs = packed_docs(2, 700, device)
            amp = torch.autocast(device, dtype=dtype) if dtype != torch.float32 else torch.autocast(device, enabled=False)
            with torch.no_grad(), amp:
                m.attn_impl = "sdpa"
                a = m(x, doc_ids=docs).float()
                m.attn_impl = "flex"
                b = m(x, doc_ids=docs).float()
            diff = (a - b).abs().max().item()
            tol = 1e-4 if dtype == torch.float32 else 5e-2
            out.append({"check": "flex_vs_sdpa", "kind": "decoder" if causal else "encoder", "dtype": str(dtype), "max_abs_diff": diff, "ok": diff <= tol})
    return out


def train_step_speed(size: str, device: str, batch: int, seq: int, impl: str, steps: int) -> list[dict]:
    res = []
    for causal in (False, True):
        torch.manual_seed(0)
        cfg = preset(size, causal=causal) if size not in ("tiny", "micro") else preset(size, causal=causal, **small_vocab_specials(50368))
        m = Transformer(cfg).to(device)
        m.attn_impl = impl
        opt = build_optimizer(m, OptimSection(lr=1e-4))
        x = torch.randint(0, 50000, (batch, seq), device=device)
        docs = packed_docs(batch, seq, device)
        obj = "clm" if causal else "mlm"
        inp, lab = make_batch(obj, x.cpu(), config=cfg, mask_rate=0.3, doc_ids=docs.cpu(), generator=torch.Generator().manual_seed(0))
        inp, lab = inp.to(device), lab.to(device)
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        times = []
        for i in range(steps + 2):
            if device == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            with torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
                where = lab != IGNORE
                logits = m(inp, doc_ids=docs, predict_mask=where)
                loss = F.cross_entropy(logits.float(), lab[where])
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if device == "cuda":
                torch.cuda.synchronize()
            if i >= 2:
                times.append(time.perf_counter() - t)
        times.sort()
        tps = batch * seq / times[len(times) // 2]
        res.append(
            {
                "check": "train_step",
                "impl": f"ettin-{impl}",
                "kind": "decoder" if causal else "encoder",
                "size": size,
                "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
                "batch": batch,
                "seq_len": seq,
                "tokens_per_s": tps,
                "mfu": 6 * cfg.num_params() * tps / PEAK if device == "cuda" else None,
                "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None,
            }
        )
        del m, opt
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--sizes", default="150m")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    rows = check_equality(a.device)
    for size in a.sizes.split(","):
        for impl in (("flex", "sdpa") if a.device == "cuda" else ("sdpa",)):  # flex has no CPU backward
            rows += train_step_speed(size, a.device, a.batch, a.seq_len, impl, a.steps)
    for r in rows:
        print(json.dumps(r))
    if a.json:
        with open(a.json, "w") as fh:
            fh.write("".join(json.dumps(r) + "\n" for r in rows))


if __name__ == "__main__":
    main()
