"""The ModernBERT-style transformer: an encoder or a decoder by ``config.causal`` alone.

Read top to bottom: rotary embedding, one block (attention + GeGLU MLP, pre-norm, no biases),
the model (embedding + norm, blocks, final norm, prediction head, tied output projection).
Objectives live in :mod:`ettin.objectives`; the model only maps tokens to logits.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from ettin.config import ModelConfig
from ettin.model import attention as A
from ettin.model.cpu import tune_cpu_allocator  # noqa: F401  (re-exported for older imports)
from ettin.model.kernels import (  # noqa: F401  (fused kernels live beside the model)
    Angles,
    _RopeQKV,
    apply_rotary,
    geglu,
    linear,
    mm_nt,
    qkv_rope,
    rope_split,
)


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
        return Angles((cos.to(dtype)[:, :, None, None], sin.to(dtype)[:, :, None, None]))


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

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], attend, keep: torch.Tensor | None = None) -> torch.Tensor:
        if keep is not None:  # through the module call, so FSDP2 gathers the weights for it too
            return self.forward_at(x, rope, keep, attend)
        B, L, H = x.shape
        if not torch.compiler.is_compiling():
            q, k, v = qkv_rope(self.attn_norm(x), self.qkv.weight, rope, self.heads)  # eager: fused kernels (torch.compile fuses the plain ops)
        else:
            cos, sin = rope
            qkv = linear(self.attn_norm(x), self.qkv.weight).view(B, L, 3, self.heads, H // self.heads)
            qkv = torch.cat((apply_rotary(qkv[:, :, :2], cos, sin), qkv[:, :, 2:]), dim=2)
            q, k, v = (t.transpose(1, 2) for t in qkv.unbind(2))  # each [B, heads, L, D], memory [B, L, heads, D]
        y = attend(q, k, v).transpose(1, 2).reshape(B, L, H)
        y = linear(y, self.out.weight)
        if self.training and self.out_dropout > 0:
            y = F.dropout(y, self.out_dropout, training=True)
        x = x + y
        return x + linear(geglu(linear(self.mlp_norm(x), self.wi.weight)), self.wo.weight)

    def forward_at(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], keep: torch.Tensor, attend_rows) -> torch.Tensor:
        """The block's output at the positions ``keep`` [B, L] only, [N, H] (the last block under
        MLM: the loss reads 30% of the positions). Keys and values still come from every position;
        queries, the output projection and the MLP run on the kept rows alone."""
        B, L, H = x.shape
        hd = H // self.heads
        n = self.attn_norm(x)
        kv = linear(n, self.qkv.weight[H:]).view(B, L, 2, self.heads, hd)
        q = linear(n[keep], self.qkv.weight[:H]).view(-1, self.heads, hd)
        cos, sin = (t[:, :, 0] for t in rope)  # [B or 1, L, 1, D]
        k = apply_rotary(kv[:, :, 0], cos, sin)
        q = apply_rotary(q, cos.expand(B, L, 1, hd)[keep], sin.expand(B, L, 1, hd)[keep])
        y = attend_rows(q, k.transpose(1, 2), kv[:, :, 1].transpose(1, 2)).reshape(-1, H)
        y = linear(y, self.out.weight)
        if self.training and self.out_dropout > 0:  # the mask the whole block would draw, at the kept rows
            y = y * F.dropout(torch.ones((B, L, H), dtype=y.dtype, device=y.device), self.out_dropout, training=True)[keep]
        x = x[keep] + y
        return x + linear(geglu(linear(self.mlp_norm(x), self.wi.weight)), self.wo.weight)


class Transformer(nn.Module):
    """Token ids -> logits. ``config.causal`` is the only encoder/decoder switch."""

    def __init__(self, config: ModelConfig, *, init: bool = True):
        super().__init__()
        self.config = config
        self.attn_impl = "auto"  # "auto" | "sdpa" | "flex"
        self.band_block = 64  # local layers on the SDPA path: query block of the banded attention
        self.span_block = 64  # global layers on the SDPA path, with documents: query block of the span attention
        self.fused_loss = True  # forward(..., labels=) computes the loss (ettin.objectives.loss uses it)
        self.sparse_last_layer = True  # with labels on at most half the positions, the last block runs there only
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
        keep: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Backbone output after the final norm, [B, L, hidden] (what embeddings and classifiers use).

        With ``keep`` [B, L] (bool) only the kept positions' outputs, [N, hidden]: the last block
        computes nothing else (:meth:`Block.forward_at`).
        """
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
        blocks = list(self.blocks)
        last = blocks.pop() if keep is not None else None
        ckpt = self.activation_checkpointing and self.training
        for block in blocks:
            rope, attend = (rope_g, attend_g) if block.is_global else (rope_l, attend_l)
            x = checkpoint(block, x, rope, attend, use_reentrant=False) if ckpt else block(x, rope, attend)
        if last is not None:
            window = None if last.is_global else c.window()
            rope = rope_g if last.is_global else rope_l

            def attend_rows(q, k, v):
                return A.rows_attention(q, k, v, keep, docs, causal=c.causal, window=window)

            x = checkpoint(last, x, rope, attend_rows, keep, use_reentrant=False) if ckpt else last(x, rope, attend_rows, keep)
        return self.final_norm(x)

    def _attention_fns(self, docs, B: int, L: int, dev):
        c = self.config
        causal, window = c.causal, c.window()
        need_local = any(not b.is_global for b in self.blocks)
        if A.use_flex(self.attn_impl, dev):
            bm_g = A.flex_block_mask(docs, B, L, dev, causal=causal, window=None)
            bm_l = A.flex_block_mask(docs, B, L, dev, causal=causal, window=window) if need_local else None
            return (lambda q, k, v: A.flex(q, k, v, bm_g)), (lambda q, k, v: A.flex(q, k, v, bm_l))
        span = A.span_plan(docs, B, L, dev, causal=causal, block=self.span_block) if self.span_block else None
        if span is not None:
            attend_g = span.attend
        else:
            attend_g = A.FullMask(A.sdpa_mask(docs, L, dev, causal=causal, window=None), causal=causal).attend
        if not need_local:
            return attend_g, None
        band = A.band_plan(docs, B, L, dev, causal=causal, window=window, block=self.band_block)
        if band is not None:
            return attend_g, band.attend
        return attend_g, A.FullMask(A.sdpa_mask(docs, L, dev, causal=causal, window=window), causal=causal).attend

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
        if labels is not None:
            from ettin.objectives import IGNORE, linear_cross_entropy

            where = labels != IGNORE
            if self.sparse_last_layer and 2 * int(where.sum()) <= where.numel():  # MLM, MNTP: the last block at the labels only
                hidden = self.encode(input_ids, doc_ids=doc_ids, attention_mask=attention_mask, position_ids=position_ids, keep=where)
            else:
                hidden = self.encode(input_ids, doc_ids=doc_ids, attention_mask=attention_mask, position_ids=position_ids)[where]
            h = self.head_norm(F.gelu(linear(hidden, self.head_dense.weight)))
            return linear_cross_entropy(h, self.embed.weight, self.out_bias, labels[where], reduction="sum")
        hidden = self.encode(input_ids, doc_ids=doc_ids, attention_mask=attention_mask, position_ids=position_ids)
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
        self.sparse_last_layer = False  # a data-dependent row count would break the compiled graph
        for b in self.blocks:
            b.compile(**kwargs)
