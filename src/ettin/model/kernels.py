"""Fused eager kernels the model calls: linear layers, RoPE on q and k, GeGLU.

Each computes exactly what the plain PyTorch expression in its docstring computes (tested in
``tests/test_perf_equivalence.py``), with fewer passes over memory and fewer temporaries in
eager mode; under ``torch.compile`` the model uses the plain expressions (inductor fuses them
itself). Nothing here depends on the processor's vendor; the one processor-dependent choice
(which library runs the matrix products) is measured in :mod:`ettin.model.cpu`.
"""

from __future__ import annotations

import functools

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


# -- RoPE as complex products ------------------------------------------------------------------
PAIRED_ROPE = True  # fp32 eager: q and k heads as (i, i + D/2) pairs, RoPE one complex product (False: as rope_split)


@functools.lru_cache(maxsize=16)
def _pair_rows(heads: int, head_dim: int, device: str) -> torch.Tensor:
    """The order of a [3 * heads * D, H] QKV weight's rows that puts each q and k head's dims i and
    i + D/2 side by side (0, D/2, 1, D/2 + 1, ...); v's rows stay where they are."""
    half = head_dim // 2
    with torch.inference_mode(False):  # cached: a normal tensor, so training can use it after inference made it
        within = torch.stack((torch.arange(half), torch.arange(half) + half), 1).reshape(-1)
        qk = (torch.arange(2 * heads)[:, None] * head_dim + within[None]).reshape(-1)
        return torch.cat((qk, torch.arange(2 * heads * head_dim, 3 * heads * head_dim))).to(device)


class _RopePairs(torch.autograd.Function):
    """[B, L, 3, heads, D] projections whose q and k heads hold pairs (x_i, x_{i+D/2}) side by side
    -> rotated q, rotated k, v, each [B, heads, L, D] (q and k keep the paired order).

    Rotate-half RoPE turns the pair into (x_i cos - x_{i+D/2} sin, x_{i+D/2} cos + x_i sin):
    the complex product (x_i + i x_{i+D/2}) e^{i theta}, one multiplication per tensor where the
    halves' form takes three operations. Attention cannot tell: q.k sums over the same order in
    both. The backward multiplies by e^{-i theta} and writes the three gradients into one buffer.
    """

    @staticmethod
    def forward(ctx, qkv, freqs):
        B, L, _, h, D = qkv.shape
        outs = []
        for i in range(2):
            o = torch.empty((B, L, h, D), dtype=qkv.dtype, device=qkv.device)
            torch.mul(_complex(qkv[:, :, i]), freqs, out=_complex(o))
            outs.append(o.transpose(1, 2))
        ctx.save_for_backward(freqs)
        ctx.shape = qkv.shape
        return outs[0], outs[1], qkv[:, :, 2].transpose(1, 2)

    @staticmethod
    def backward(ctx, dq, dk, dv):
        (freqs,) = ctx.saved_tensors
        dtype = next((g.dtype for g in (dq, dk, dv) if g is not None), torch.float32)
        dx = torch.empty(ctx.shape, dtype=dtype, device=freqs.device)
        back = freqs.conj().resolve_conj()
        for i, g in enumerate((dq, dk)):
            if g is None:
                dx[:, :, i].zero_()
            else:
                torch.mul(_complex(g.transpose(1, 2)), back, out=_complex(dx[:, :, i]))
        if dv is None:
            dx[:, :, 2].zero_()
        else:
            dx[:, :, 2].copy_(dv.transpose(1, 2))
        return dx, None


def _complex(x: torch.Tensor) -> torch.Tensor:
    """[..., D] real with pairs side by side -> [..., D/2] complex view (a copy if the pairs are not adjacent)."""
    pairs = x.unflatten(-1, (x.shape[-1] // 2, 2))
    if pairs.stride(-1) != 1 or any(st % 2 for st in pairs.stride()[:-1]):
        pairs = pairs.contiguous()
    return torch.view_as_complex(pairs)


def pair_freqs(cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """e^{i theta} [B or 1, L, 1, D/2] (complex) from ``Rotary.cos_sin``'s (cos, signed sin)."""
    half = cos.shape[-1] // 2
    return torch.complex(cos[:, :, 0, 0, :half].float(), sin[:, :, 0, 0, half:].float())[:, :, None]


class Angles(tuple):
    """``(cos, signed sin)`` as ``Rotary.cos_sin`` returns them, with their complex form made on
    first use and kept: one forward's layers share one table (made per layer, it cost a packed
    inference pass of 128 sequences ~7 ms)."""

    def pairs(self) -> torch.Tensor:
        p = self.__dict__.get("pairs_")
        if p is None:
            p = self.__dict__["pairs_"] = pair_freqs(*self)
        return p


def qkv_rope(x: torch.Tensor, weight: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], heads: int):
    """(q, k, v), each [B, heads, L, D]: the QKV projection of ``x`` [B, L, H], RoPE on q and k.

    In fp32 the projection's q and k rows are reordered into pairs (:func:`_pair_rows`; the
    gradient flows back to the weight in its own order) and RoPE is one complex product per
    tensor (a packed inference pass of 128 sequences: 1,021 -> 978 ms) on a CPU or a GPU;
    otherwise (autocast, other devices) :func:`rope_split` in the usual order.
    """
    cos, sin = rope
    B, L, H = x.shape
    D = H // heads
    if (PAIRED_ROPE and x.dtype == weight.dtype == torch.float32 and x.device.type in ("cpu", "cuda")  # (complex kernels)
            and not torch.is_autocast_enabled(x.device.type)):
        rows = _pair_rows(heads, D, str(weight.device))
        qkv = linear(x, weight.index_select(0, rows)).view(B, L, 3, heads, D)
        return _RopePairs.apply(qkv, rope.pairs() if isinstance(rope, Angles) else pair_freqs(cos, sin))
    return rope_split(linear(x, weight).view(B, L, 3, heads, D), cos, sin)


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
