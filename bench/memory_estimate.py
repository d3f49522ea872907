"""Training memory per size, estimated on a CPU (for planning; the GPU figures are measured by
``train_speed.py --device cuda``, which reports ``peak_memory_gib``).

What a bf16-autocast training step holds at its peak, in three parts:

- **state**: fp32 weights + fp32 gradients + StableAdamW's two fp32 moments = 16 bytes/parameter;
- **activations**: every tensor autograd saves for the backward, counted by unique storage with
  ``torch.autograd.graph.saved_tensors_hooks`` during a real forward under bf16 autocast (the
  same dtypes as on a GPU). Measured at micro-batch 1 and 2: the difference is the cost of one
  sequence, the rest (bf16 copies of the weights that autocast keeps) is fixed;
- **backward workspace**: the gradients of one layer's activations in flight, approximated
  as twice one layer's share of the activations.

The attention kernel's own saved state differs between devices (flash attention keeps
``[B, heads, L]`` statistics), which is small next to the rest. Treat the result as an
estimate within ~15%: it tells whether a micro-batch fits and whether activation
checkpointing is needed, not the last GiB.

    python bench/memory_estimate.py --sizes 150m,400m,1b --seq-len 1024 --json
"""

from __future__ import annotations

import argparse
import json

import torch

from ettin.config import preset
from ettin.model import Transformer


def saved_bytes(model: Transformer, batch: int, seq_len: int) -> int:
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        st = t.untyped_storage()
        seen[st.data_ptr()] = max(seen.get(st.data_ptr(), 0), st.nbytes())
        return t

    g = torch.Generator().manual_seed(0)
    x = torch.randint(5, 1000, (batch, seq_len), generator=g)
    y = torch.where(torch.rand(batch, seq_len, generator=g) < 0.3, x, -100)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(x, labels=y)
    del loss
    return sum(n for ptr, n in seen.items() if ptr not in params)  # fp32 weights are counted as state


def estimate(size: str, seq_len: int, micro_batches: list[int], causal: bool) -> list[dict]:
    torch.manual_seed(0)
    model = Transformer(preset(size, causal=causal)).train()
    model.attn_impl = "sdpa"
    n = model.num_params()
    out = []
    full_per_seq = None  # one sequence's activations without checkpointing
    for ac in (False, True):
        model.activation_checkpointing = ac
        s1, s2 = saved_bytes(model, 1, seq_len), saved_bytes(model, 2, seq_len)
        per_seq, fixed = s2 - s1, max(0, 2 * s1 - s2)
        if not ac:
            full_per_seq = per_seq
        for mb in micro_batches:
            state = 16 * n
            acts = fixed + per_seq * mb
            # gradients of one block's activations in flight (with checkpointing: that block's
            # activations rebuilt for its backward, too)
            work = (2 if not ac else 3) * full_per_seq / model.config.layers * mb
            total = state + acts + work
            out.append({"size": size, "kind": "decoder" if causal else "encoder", "params": n, "seq_len": seq_len, "micro_batch": mb,
                        "activation_checkpointing": ac, "state_gib": round(state / 2**30, 2), "activations_gib": round(acts / 2**30, 2),
                        "workspace_gib": round(work / 2**30, 2), "estimated_peak_gib": round(total / 2**30, 2),
                        "activation_bytes_per_token": round(per_seq / seq_len)})
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="150m,400m,1b")
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--micro-batches", default="8,16,32")
    ap.add_argument("--kind", choices=["encoder", "decoder"], default="encoder")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    mbs = [int(x) for x in a.micro_batches.split(",")]
    for size in a.sizes.split(","):
        for r in estimate(size, a.seq_len, mbs, a.kind == "decoder"):
            if a.json:
                print(json.dumps(r), flush=True)
            else:
                ac = "AC" if r["activation_checkpointing"] else "  "
                print(f"{r['size']:5s} {r['kind']} L={r['seq_len']} mb={r['micro_batch']:3d} {ac}  state {r['state_gib']:6.2f}  "
                      f"activations {r['activations_gib']:6.2f}  workspace {r['workspace_gib']:5.2f}  => {r['estimated_peak_gib']:6.2f} GiB", flush=True)


if __name__ == "__main__":
    main()
