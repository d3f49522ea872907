"""The ModernBERT-style transformer: an encoder or a decoder by ``config.causal`` alone.

Read top to bottom: rotary embedding, one block (attention + GeGLU MLP, pre-norm, no biases),
the model (embedding + norm, blocks, final norm, prediction head, tied output projection).
Objectives live in :mod:`ettin.objectives`; the model only maps tokens to logits.
"""

from __future__ import annotations

import functools
import math
import os
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from ettin.config import ModelConfig
from ettin.model import attention as A


# -- matrix products on a CPU --------------------------------------------------------------------
# PyTorch's CPU linear layers call MKL's sgemm. oneDNN's JIT kernels (the ones torch.compile's
# CPU backend uses, reachable eagerly as ``torch.ops.mkldnn._linear_pointwise``) reach about
# twice its fp32 throughput on AVX-512 machines (bench/README.md). Same fp32 math, another
# summation order. Used for fp32 on a CPU outside autocast and torch.compile; ETTIN_ONEDNN=0
# turns it off.
@functools.lru_cache(maxsize=1)
def onednn_available() -> bool:
    if os.environ.get("ETTIN_ONEDNN", "1") == "0":
        return False
    try:
        if not torch.backends.mkldnn.is_available():
            return False
        g = torch.Generator().manual_seed(0)  # not the global RNG: this probe must not move dropout's stream
        x, w, b = torch.randn(5, 8, generator=g), torch.randn(3, 8, generator=g), torch.randn(3, generator=g)
        y = torch.ops.mkldnn._linear_pointwise(x, w, b, "none", [], "")
        return bool(torch.allclose(y, torch.addmm(b, x, w.t()), atol=1e-5))
    except Exception:  # pragma: no cover - torch without oneDNN
        return False


def use_onednn(x: torch.Tensor, w: torch.Tensor) -> bool:
    return (
        x.device.type == "cpu"
        and x.dtype == torch.float32
        and w.dtype == torch.float32
        and type(x) in (torch.Tensor, nn.Parameter)
        and type(w) in (torch.Tensor, nn.Parameter)
        and not torch.is_autocast_enabled("cpu")
        and not torch.compiler.is_compiling()
        and onednn_available()
    )


def mm_nt(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ w.T (+ b)`` without autograd, through oneDNN where :func:`use_onednn` says so."""
    if use_onednn(x, w):
        return torch.ops.mkldnn._linear_pointwise(x, w, b, "none", [], "")
    return F.linear(x, w, b)


_MALLOC_TUNED = False


def tune_cpu_allocator() -> bool:
    """Keep freed CPU tensors up to 32 MB in glibc's heap instead of returning them to the OS.

    glibc serves large allocations with mmap and gives them back on free, so each training step
    page-faults its activations in afresh (tens of thousands of faults, ~7% of a 17m CPU step).
    With a fixed 32 MB mmap threshold (glibc's maximum) and no heap trimming, the blocks are
    reused. Process-wide and idempotent; glibc/Linux only; ETTIN_MALLOPT=0 turns it off.
    """
    global _MALLOC_TUNED
    if _MALLOC_TUNED:
        return True
    _MALLOC_TUNED = True
    if os.environ.get("ETTIN_MALLOPT", "1") == "0" or not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
        ok = libc.mallopt(M_MMAP_THRESHOLD, 32 * 1024 * 1024) == 1
        return bool(libc.mallopt(M_TRIM_THRESHOLD, 1 << 30) == 1 and ok)
    except Exception:  # not glibc
        return False


class _Linear(torch.autograd.Function):
    """``F.linear(x, w, b)`` with all three products through oneDNN."""

    @staticmethod
    def forward(ctx, x, w, b):
        ctx.save_for_backward(x, w)
        ctx.has_bias = b is not None
        return torch.ops.mkldnn._linear_pointwise(x, w, b, "none", [], "")

    @staticmethod
    def backward(ctx, g):
        x, w = ctx.saved_tensors
        op = torch.ops.mkldnn._linear_pointwise
        N, K = w.shape
        g2 = g.reshape(-1, N)
        gx = gw = gb = None
        if ctx.needs_input_grad[0]:
            gx = op(g2, w.t(), None, "none", [], "").view(x.shape)
        if ctx.needs_input_grad[1]:
            x2 = x.reshape(-1, K)
            if N >= K:  # transpose the smaller operand: dW^T = x^T g
                gw = op(x2.t().contiguous(), g2.t(), None, "none", [], "").t().contiguous()
            else:
                gw = op(g2.t().contiguous(), x2.t(), None, "none", [], "")
        if ctx.has_bias and ctx.needs_input_grad[2]:
            gb = g2.sum(0)
        return gx, gw, gb


def linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, w, b)``; through oneDNN on a CPU in fp32 (see :func:`use_onednn`)."""
    if use_onednn(x, w) and (b is None or b.dtype == torch.float32):
        return _Linear.apply(x, w, b)
    return F.linear(x, w, b)


class Rotary(nn.Module):
    """RoPE with the non-interleaved (rotate-half) layout transformers uses."""

    def __init__(self, head_dim: int, theta: float):
        super().__init__()
        self.head_dim = head_dim
        self.theta = theta

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype):
        """(cos, signed sin), each [B or 1, L, 1, 1, D] for q/k laid out [B, L, (q|k), heads, D].

        The sin carries rotate-half's sign (-sin on the first half), so the rotation is
        ``x * cos + x.roll(D/2) * sin``: one roll instead of chunk + neg + cat.
        """
        if positions.dim() == 2 and positions.shape[0] > 1 and positions.stride(0) == 0:
            positions = positions[:1]  # the same positions in every row: compute once
        inv_freq = 1.0 / (self.theta ** (torch.arange(0, self.head_dim, 2, device=positions.device, dtype=torch.float) / self.head_dim))
        freqs = positions[..., None].float() * inv_freq
        cos, sin = freqs.cos(), freqs.sin()
        cos = torch.cat((cos, cos), dim=-1)
        sin = torch.cat((-sin, sin), dim=-1)
        return cos.to(dtype)[:, :, None, None], sin.to(dtype)[:, :, None, None]


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` [..., D] with a (cos, signed sin) pair from :meth:`Rotary.cos_sin` (broadcast)."""
    return torch.addcmul(x * cos, x.roll(x.shape[-1] // 2, -1), sin)


class _RopeQKV(torch.autograd.Function):
    """[B, L, 3, heads, D] projections -> the same layout with q and k rotated (v copied).

    One output buffer; the backward writes the input gradient into one buffer too
    (d/dx of ``x*c + roll(x)*s`` is ``g*c - roll(g)*s`` since roll by D/2 is its own inverse
    and ``roll(s) = -s``).
    """

    @staticmethod
    def forward(ctx, qkv, cos, sin):
        half = qkv.shape[-1] // 2
        out = torch.empty(qkv.shape, dtype=qkv.dtype, device=qkv.device)
        x = qkv[:, :, :2]
        rot = out[:, :, :2]
        torch.mul(x, cos, out=rot)
        rot.addcmul_(x.roll(half, -1), sin)
        out[:, :, 2].copy_(qkv[:, :, 2])
        ctx.save_for_backward(cos, sin)
        return out

    @staticmethod
    def backward(ctx, g):
        cos, sin = ctx.saved_tensors
        half = g.shape[-1] // 2
        dx = torch.empty(g.shape, dtype=g.dtype, device=g.device)
        gqk = g[:, :, :2]
        rot = dx[:, :, :2]
        torch.mul(gqk, cos, out=rot)
        rot.addcmul_(gqk.roll(half, -1), sin, value=-1)
        dx[:, :, 2].copy_(g[:, :, 2])
        return dx, None, None


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
    if torch.is_grad_enabled() and x.requires_grad and not torch.compiler.is_compiling():
        return _GeGLU.apply(x)
    a, gate = x.chunk(2, dim=-1)
    return F.gelu(a) * gate


class Block(nn.Module):
    def __init__(self, config: ModelConfig, index: int):
        super().__init__()
        h = config.hidden
        self.heads = config.heads
        self.is_global = config.is_global_layer(index)
        self.attn_norm = nn.Identity() if index == 0 else nn.LayerNorm(h, eps=config.norm_eps, bias=False)
        self.qkv = nn.Linear(h, 3 * h, bias=False)
        self.out = nn.Linear(h, h, bias=False)
        self.out_dropout = config.attn_out_dropout  # applied in training mode only
        self.mlp_norm = nn.LayerNorm(h, eps=config.norm_eps, bias=False)
        self.wi = nn.Linear(h, 2 * config.intermediate, bias=False)
        self.wo = nn.Linear(config.intermediate, h, bias=False)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], attend) -> torch.Tensor:
        B, L, H = x.shape
        qkv = linear(self.attn_norm(x), self.qkv.weight).view(B, L, 3, self.heads, H // self.heads)
        cos, sin = rope
        if not torch.compiler.is_compiling():
            qkv = _RopeQKV.apply(qkv, cos, sin)  # eager: one buffer each way (torch.compile fuses the plain ops)
        else:
            qkv = torch.cat((apply_rotary(qkv[:, :, :2], cos, sin), qkv[:, :, 2:]), dim=2)
        q, k, v = (t.transpose(1, 2) for t in qkv.unbind(2))  # each [B, heads, L, D], memory [B, L, heads, D]
        y = attend(q, k, v).transpose(1, 2).reshape(B, L, H)
        y = linear(y, self.out.weight)
        if self.training and self.out_dropout > 0:
            y = F.dropout(y, self.out_dropout, training=True)
        x = x + y
        return x + linear(geglu(linear(self.mlp_norm(x), self.wi.weight)), self.wo.weight)


class Transformer(nn.Module):
    """Token ids -> logits. ``config.causal`` is the only encoder/decoder switch."""

    def __init__(self, config: ModelConfig, *, init: bool = True):
        super().__init__()
        self.config = config
        self.attn_impl = "auto"  # "auto" | "sdpa" | "flex"
        self.band_block = 64  # local layers on the SDPA path: query block of the banded attention
        self.fused_loss = True  # forward(..., labels=) computes the loss (ettin.objectives.loss uses it)
        self.activation_checkpointing = False
        self.embed = nn.Embedding(config.vocab_size, config.hidden)
        self.embed_norm = nn.LayerNorm(config.hidden, eps=config.norm_eps, bias=False)
        self.blocks = nn.ModuleList(Block(config, i) for i in range(config.layers))
        self.final_norm = nn.LayerNorm(config.hidden, eps=config.norm_eps, bias=False)
        self.head_dense = nn.Linear(config.hidden, config.hidden, bias=False)
        self.head_norm = nn.LayerNorm(config.hidden, eps=config.norm_eps, bias=False)
        self.out_bias = nn.Parameter(torch.zeros(config.vocab_size))
        self.rope_global = Rotary(config.head_dim, config.rope_theta_global)
        self.rope_local = Rotary(config.head_dim, config.rope_theta_local)
        if init:
            self.reset_parameters()

    # -- initialisation ---------------------------------------------------------------------
    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Megatron-style: truncated normal, output projections scaled by 1/sqrt(2 * layers)."""
        c = self.config
        std_in = c.init_std
        std_out = c.init_std / math.sqrt(2.0 * c.layers)

        def tn(w: torch.Tensor, std: float) -> None:
            nn.init.trunc_normal_(w, mean=0.0, std=std, a=-c.init_cutoff * std, b=c.init_cutoff * std)

        tn(self.embed.weight, std_in)
        for b in self.blocks:
            tn(b.qkv.weight, std_in)
            tn(b.wi.weight, std_in)
            tn(b.out.weight, std_out)
            tn(b.wo.weight, std_out)
        tn(self.head_dense.weight, std_out)
        self.out_bias.zero_()
        for m in self.modules():
            if isinstance(m, nn.LayerNorm):
                m.weight.fill_(1.0)

    # -- forward ----------------------------------------------------------------------------
    def encode(
        self,
        input_ids: torch.Tensor,
        *,
        doc_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Backbone output after the final norm, [B, L, hidden] (what embeddings and classifiers use)."""
        c = self.config
        B, L = input_ids.shape
        dev = input_ids.device
        docs = A.fold_padding(doc_ids, attention_mask, (B, L), dev)
        if position_ids is None:
            position_ids = A.positions_from_docs(doc_ids, (B, L), dev)
        x = self.embed_norm(self.embed(input_ids))
        dtype = torch.get_autocast_dtype(dev.type) if torch.is_autocast_enabled(dev.type) else x.dtype
        rope_g = self.rope_global.cos_sin(position_ids, dtype)
        rope_l = rope_g if c.rope_theta_local == c.rope_theta_global else self.rope_local.cos_sin(position_ids, dtype)
        attend_g, attend_l = self._attention_fns(docs, B, L, dev)
        for block in self.blocks:
            rope, attend = (rope_g, attend_g) if block.is_global else (rope_l, attend_l)
            if self.activation_checkpointing and self.training:
                x = checkpoint(block, x, rope, attend, use_reentrant=False)
            else:
                x = block(x, rope, attend)
        return self.final_norm(x)

    def _attention_fns(self, docs, B: int, L: int, dev):
        c = self.config
        causal, window = c.causal, c.window()
        need_local = any(not b.is_global for b in self.blocks)
        if A.use_flex(self.attn_impl, dev):
            bm_g = A.flex_block_mask(docs, B, L, dev, causal=causal, window=None)
            bm_l = A.flex_block_mask(docs, B, L, dev, causal=causal, window=window) if need_local else None
            return (lambda q, k, v: A.flex(q, k, v, bm_g)), (lambda q, k, v: A.flex(q, k, v, bm_l))
        m_g = A.sdpa_mask(docs, L, dev, causal=causal, window=None)
        attend_g = lambda q, k, v: A.sdpa(q, k, v, m_g, causal=causal)  # noqa: E731
        if not need_local:
            return attend_g, None
        band = A.band_plan(docs, B, L, dev, causal=causal, window=window, block=self.band_block)
        if band is not None:
            return attend_g, band.attend
        m_l = A.sdpa_mask(docs, L, dev, causal=causal, window=window)
        return attend_g, (lambda q, k, v: A.sdpa(q, k, v, m_l, causal=causal))

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        """Prediction head and tied output projection: hidden -> vocabulary logits."""
        h = self.head_norm(F.gelu(linear(hidden, self.head_dense.weight)))
        return linear(h, self.embed.weight, self.out_bias)

    def forward(
        self,
        input_ids: torch.Tensor,
        *,
        doc_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        predict_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits [B, L, V]; with ``predict_mask`` only at those positions, [N, V] (sparse prediction).

        With ``labels`` [B, L] (-100 = no loss) the result is instead the *summed* cross-entropy
        over the labelled positions (fp32 scalar): the head runs only there and the output
        projection + loss are fused and chunked (:func:`ettin.objectives.linear_cross_entropy`),
        so the [N, vocab] logits are never held at once. This is the training path.
        """
        hidden = self.encode(input_ids, doc_ids=doc_ids, attention_mask=attention_mask, position_ids=position_ids)
        if labels is not None:
            from ettin.objectives import IGNORE, linear_cross_entropy

            where = labels != IGNORE
            h = self.head_norm(F.gelu(linear(hidden[where], self.head_dense.weight)))
            return linear_cross_entropy(h, self.embed.weight, self.out_bias, labels[where], reduction="sum")
        if predict_mask is not None:
            hidden = hidden[predict_mask]
        return self.head(hidden)

    # -- utilities --------------------------------------------------------------------------
    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def set_causal(self, causal: bool, objective: str | None = None, origin: str | None = None) -> None:
        """Switch attention direction in place (cross-objective conversion keeps every weight)."""
        changes = {"causal": causal, "objective": objective or ("clm" if causal else "mlm")}
        if origin is not None:
            changes["origin"] = origin
        self.config = self.config.replace(**changes)

    def set_attn_out_dropout(self, p: float) -> None:
        """The training-time dropout on attention outputs (a recipe sets it per stage)."""
        self.config = self.config.replace(attn_out_dropout=float(p))
        for b in self.blocks:
            b.out_dropout = float(p)

    def set_rope_theta(self, global_theta: float, local_theta: float) -> None:
        self.config = self.config.replace(rope_theta_global=global_theta, rope_theta_local=local_theta)
        self.rope_global.theta = global_theta
        self.rope_local.theta = local_theta

    def compile_blocks(self, **kwargs) -> None:
        """torch.compile each block separately (faster to compile, same speed as whole-model).

        Static shapes: a new micro-batch size or stage length compiles once more instead of
        switching to dynamic-shape kernels (slower, and flex attention's CPU template fails on them).
        """
        kwargs.setdefault("dynamic", False)
        for b in self.blocks:
            b.compile(**kwargs)
