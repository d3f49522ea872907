"""Fused eager kernels the model calls: linear layers, RoPE on q and k, GeGLU.

Each computes exactly what the plain PyTorch expression in its docstring computes (tested in
``tests/test_perf_equivalence.py``), with fewer passes over memory and fewer temporaries in
eager mode; under ``torch.compile`` the model uses the plain expressions (inductor fuses them
itself). Nothing here depends on the processor's vendor; the one processor-dependent choice
(which library runs the matrix products) is measured in :mod:`ettin.model.cpu`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ettin.model.cpu import linear, mm_nt  # noqa: F401  (re-exported: the model's linear layers)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` [..., D] with a (cos, signed sin) pair from ``Rotary.cos_sin`` (broadcast)."""
    return torch.addcmul(x * cos, x.roll(x.shape[-1] // 2, -1), sin)


ROPE_CHUNK = 2048  # tokens per rotation step: the chunk's x and out stay in cache across its three ops


def _spans(B: int, L: int, tokens: int):
    """(b0, b1, l0, l1) tiles of a [B, L] grid, about ``tokens`` positions each: whole rows
    together when rows are short, pieces of one row when they are long."""
    if L >= tokens:
        return [(b, b + 1, l0, min(L, l0 + tokens)) for b in range(B) for l0 in range(0, L, tokens)]
    rows = max(1, tokens // max(L, 1))
    return [(b0, min(B, b0 + rows), 0, L) for b0 in range(0, B, rows)]


def _rotate_into(out: torch.Tensor, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, sign: int = 1) -> None:
    """``out = x * cos + sign * roll(x, D/2) * sin`` without a rolled copy of x; x, out [B, L, ..., D].

    roll by D/2 swaps the halves: one multiply over whole rows, then one fused multiply-add per
    half, reading the other half of ``x``. The same operations, element by element, as the
    rolled expression. Done in tiles of ~``ROPE_CHUNK`` positions, so the two multiply-adds
    re-read ``x`` and ``out`` from cache rather than memory (a packed inference pass of 128
    sequences: 1,138 ms with whole-tensor passes, 1,096 ms in tiles; ``bench/README.md``).
    """
    half = x.shape[-1] // 2
    for b0, b1, l0, l1 in _spans(x.shape[0], x.shape[1], ROPE_CHUNK):
        c = (cos if cos.shape[0] == 1 else cos[b0:b1])[:, l0:l1]
        s = (sin if sin.shape[0] == 1 else sin[b0:b1])[:, l0:l1]
        o, xx = out[b0:b1, l0:l1], x[b0:b1, l0:l1]
        torch.mul(xx, c, out=o)
        o[..., :half].addcmul_(xx[..., half:], s[..., :half], value=sign)
        o[..., half:].addcmul_(xx[..., :half], s[..., half:], value=sign)


class _RopeQKV(torch.autograd.Function):
    """[B, L, 3, heads, D] projections -> the same layout with q and k rotated (v copied).

    One output buffer; the backward writes the input gradient into one buffer too
    (d/dx of ``x*c + roll(x)*s`` is ``g*c - roll(g)*s`` since roll by D/2 is its own inverse
    and ``roll(s) = -s``).
    """

    @staticmethod
    def forward(ctx, qkv, cos, sin):
        out = torch.empty(qkv.shape, dtype=qkv.dtype, device=qkv.device)
        _rotate_into(out[:, :, :2], qkv[:, :, :2], cos, sin)
        out[:, :, 2].copy_(qkv[:, :, 2])
        ctx.save_for_backward(cos, sin)
        return out

    @staticmethod
    def backward(ctx, g):
        cos, sin = ctx.saved_tensors
        dx = torch.empty(g.shape, dtype=g.dtype, device=g.device)
        _rotate_into(dx[:, :, :2], g[:, :, :2], cos, sin, sign=-1)
        dx[:, :, 2].copy_(g[:, :, 2])
        return dx, None, None


class _RopeSplit(torch.autograd.Function):
    """[B, L, 3, heads, D] projections -> rotated q, rotated k, v, each [B, heads, L, D].

    q and k are written into a buffer of their own each; v is returned as a view of the
    projections (no copy). The backward takes the three gradients as attention returns them and
    writes the input gradient in one buffer: no stacking of dq, dk, dv first.
    """

    @staticmethod
    def forward(ctx, qkv, cos, sin):
        B, L, _, h, D = qkv.shape
        q, k = (torch.empty((B, L, h, D), dtype=qkv.dtype, device=qkv.device) for _ in range(2))
        _rotate_into(q, qkv[:, :, 0], cos[:, :, 0], sin[:, :, 0])
        _rotate_into(k, qkv[:, :, 1], cos[:, :, 0], sin[:, :, 0])
        ctx.save_for_backward(cos, sin)
        ctx.shape = qkv.shape
        return q.transpose(1, 2), k.transpose(1, 2), qkv[:, :, 2].transpose(1, 2)

    @staticmethod
    def backward(ctx, dq, dk, dv):
        cos, sin = ctx.saved_tensors
        dtype = next((g.dtype for g in (dq, dk, dv) if g is not None), cos.dtype)
        dx = torch.empty(ctx.shape, dtype=dtype, device=cos.device)
        c, s = cos[:, :, 0], sin[:, :, 0]  # [B or 1, L, 1, D]
        for i, g in enumerate((dq, dk)):
            dst = dx[:, :, i]
            if g is None:
                dst.zero_()
                continue
            _rotate_into(dst, g.transpose(1, 2), c, s, sign=-1)  # g as [B, L, heads, D]
        if dv is None:
            dx[:, :, 2].zero_()
        else:
            dx[:, :, 2].copy_(dv.transpose(1, 2))
        return dx, None, None


def rope_split(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """(q, k, v), each [B, heads, L, D]: ``qkv`` [B, L, 3, heads, D] with q and k rotated."""
    return _RopeSplit.apply(qkv, cos, sin)


class _GeGLU(torch.autograd.Function):
    """gelu(a) * gate for ``[a | gate]`` = the Wi output; the backward fills one [.., 2I] buffer (no cat)."""

    @staticmethod
    def forward(ctx, x):
        a, gate = x.chunk(2, dim=-1)
        ga = F.gelu(a)
        ctx.save_for_backward(x, ga)
        return ga * gate

    @staticmethod
    def backward(ctx, g):
        x, ga = ctx.saved_tensors
        a, gate = x.chunk(2, dim=-1)
        dx = torch.empty(x.shape, dtype=x.dtype, device=x.device)
        da, dgate = dx.chunk(2, dim=-1)
        torch.ops.aten.gelu_backward.grad_input(g * gate, a, grad_input=da)
        torch.mul(g, ga, out=dgate)
        return dx


def geglu(x: torch.Tensor) -> torch.Tensor:
    """GeGLU on the Wi output ``[a | gate]``: gelu(a) * gate (exact erf GELU, as transformers)."""
    if torch.is_grad_enabled() and x.requires_grad:
        if not torch.compiler.is_compiling():
            return _GeGLU.apply(x)
        a, gate = x.chunk(2, dim=-1)
        return F.gelu(a) * gate
    a, gate = x.chunk(2, dim=-1)
    return F.gelu(a).mul_(gate)  # no gradient: the product goes into gelu's output (one [.., I] buffer less)
