"""Attention masks and kernels.

Two paths compute the same thing: PyTorch SDPA with explicit boolean masks (CPU, and any
device without flex attention) and flex attention with block masks (CUDA). Both confine
attention to a document, apply the sliding window on local layers and causality on a
decoder. Padding is folded into document ids (pad positions form their own "document"), so
real tokens never see pads and pad rows never become empty (no NaN).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

try:  # flex attention exists from torch 2.5 on; guard anyway
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    HAVE_FLEX = True
except Exception:  # pragma: no cover - old torch
    HAVE_FLEX = False


def fold_padding(doc_ids: torch.Tensor | None, attention_mask: torch.Tensor | None, shape, device) -> torch.Tensor | None:
    """Document ids with pads mapped to -1; None when neither is given (one document per row)."""
    if doc_ids is None and attention_mask is None:
        return None
    if doc_ids is None:
        doc_ids = torch.zeros(shape, dtype=torch.long, device=device)
    if attention_mask is not None:
        doc_ids = torch.where(attention_mask.bool(), doc_ids, torch.full_like(doc_ids, -1))
    return doc_ids


def positions_from_docs(doc_ids: torch.Tensor | None, shape, device) -> torch.Tensor:
    """RoPE positions that restart at 0 at every document start."""
    B, L = shape
    idx = torch.arange(L, device=device).expand(B, L)
    if doc_ids is None:
        return idx
    start = torch.ones_like(doc_ids, dtype=torch.bool)
    start[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    first = torch.where(start, idx, torch.zeros_like(idx)).cummax(dim=1).values
    return idx - first


def sdpa_mask(doc_ids: torch.Tensor | None, L: int, device, *, causal: bool, window: tuple[int, int] | None) -> torch.Tensor | None:
    """Boolean mask [B or 1, 1, L, L] (True = attend), or None when plain SDPA suffices."""
    if doc_ids is None and window is None and not causal:
        return None
    q = torch.arange(L, device=device)[:, None]
    k = torch.arange(L, device=device)[None, :]
    allowed = torch.ones(L, L, dtype=torch.bool, device=device)
    if causal:
        allowed &= k <= q
    if window is not None:
        left, right = window
        allowed &= (q - k <= left) & (k - q <= right)
    allowed = allowed[None, None]
    if doc_ids is not None:
        allowed = allowed & (doc_ids[:, None, :, None] == doc_ids[:, None, None, :])
    return allowed


def sdpa(q, k, v, mask: torch.Tensor | None, *, causal: bool) -> torch.Tensor:
    if mask is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


class BandPlan:
    """Sliding-window attention as attention inside bands (the SDPA path's local layers).

    Queries in blocks of ``block`` attend only to their band of keys, ``block + left + right``
    wide, instead of all L keys through an L x L mask: the same result (masked entries get no
    weight either way) with a fraction of the work when L is several windows long. The mask
    inside the bands carries the window, causality, documents and padding exactly as
    :func:`sdpa_mask` does; queries past the end (block padding) see only themselves (finite,
    and their outputs are dropped).
    """

    def __init__(self, doc_ids: torch.Tensor | None, B: int, L: int, device, *, causal: bool, window: tuple[int, int], block: int):
        left, right = window
        if causal:
            right = 0
        self.B, self.L, self.block, self.left, self.right = B, L, block, left, right
        self.nb = -(-L // block)
        self.Lq = self.nb * block
        self.Kb = block + left + right
        qpos = torch.arange(self.nb, device=device)[:, None] * block + torch.arange(block, device=device)[None, :]  # [nb, block]
        kpos = torch.arange(self.nb, device=device)[:, None] * block - left + torch.arange(self.Kb, device=device)[None, :]  # [nb, Kb]
        d = kpos[:, None, :] - qpos[:, :, None]  # key - query, [nb, block, Kb]
        ok = (d >= -left) & (d <= right) & (kpos[:, None, :] >= 0) & (kpos[:, None, :] < L)
        if causal:
            ok &= d <= 0
        if doc_ids is not None:
            kd = F.pad(doc_ids, (left, self.Lq - L + right), value=-2).unfold(1, self.Kb, block)  # [B, nb, Kb]
            qd = F.pad(doc_ids, (0, self.Lq - L), value=-3).view(B, self.nb, block)
            ok = ok[None] & (qd[..., None] == kd[:, :, None, :])
        else:
            ok = ok[None].expand(B, -1, -1, -1)
        beyond = (qpos >= L)[:, :, None] & (d == 0)  # block padding: attend to itself only
        ok = ok | beyond[None]
        self.allowed = ok.reshape(B * self.nb, 1, block, self.Kb)
        self._masks: dict = {}

    def mask(self, dtype: torch.dtype) -> torch.Tensor:
        m = self._masks.get(dtype)
        if m is None:
            m = torch.zeros(self.allowed.shape, dtype=dtype, device=self.allowed.device)
            m.masked_fill_(~self.allowed, float("-inf"))
            self._masks[dtype] = m
        return m

    def _bands(self, x: torch.Tensor) -> torch.Tensor:
        """[B, L, h, D] keys/values -> [B * nb, h, Kb, D] bands."""
        B, L, h, D = x.shape
        xp = F.pad(x, (0, 0, 0, 0, self.left, self.Lq - L + self.right))  # [B, Lp, h, D]
        xb = xp.unfold(1, self.Kb, self.block)  # [B, nb, h, D, Kb]
        return xb.permute(0, 1, 4, 2, 3).reshape(B * self.nb, self.Kb, h, D).transpose(1, 2)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        B, h, L, D = q.shape
        ql = q.transpose(1, 2)  # [B, L, h, D]
        if self.Lq != L:
            ql = F.pad(ql, (0, 0, 0, 0, 0, self.Lq - L))
        qb = ql.reshape(B * self.nb, self.block, h, D).transpose(1, 2)
        kb, vb = self._bands(k.transpose(1, 2)), self._bands(v.transpose(1, 2))
        o = F.scaled_dot_product_attention(qb, kb, vb, attn_mask=self.mask(q.dtype))  # [B * nb, h, block, D]
        o = o.transpose(1, 2).reshape(B, self.Lq, h, D)
        return o[:, :L].transpose(1, 2)


def band_plan(doc_ids: torch.Tensor | None, B: int, L: int, device, *, causal: bool, window: tuple[int, int], block: int = 128) -> BandPlan | None:
    """A :class:`BandPlan` when bands save work over the full L x L mask, else None."""
    left, right = window
    width = block + left + (0 if causal else right)
    if -(-L // block) * block * width > 0.75 * L * L:  # bands would cover (nearly) everything
        return None
    return BandPlan(doc_ids, B, L, device, causal=causal, window=window, block=block)


@functools.lru_cache(maxsize=1)
def _compiled_flex():
    return torch.compile(flex_attention, dynamic=False)


@functools.lru_cache(maxsize=1)
def _compiled_block_mask():
    """``create_block_mask`` compiled: 40 ms -> 2 ms for 8 x 1024 with documents (CPU), run every step.

    One graph per (batch, length, causal, window, documents or not): a pair run with three
    stage lengths and a short last micro-batch needs more than dynamo's default 8 recompiles.
    """
    cfg = torch._dynamo.config
    name = "recompile_limit" if hasattr(cfg, "recompile_limit") else "cache_size_limit"
    setattr(cfg, name, max(getattr(cfg, name), 64))
    return torch.compile(create_block_mask, dynamic=False)


def flex_block_mask(doc_ids: torch.Tensor | None, B: int, L: int, device, *, causal: bool, window: tuple[int, int] | None):
    left, right = window if window is not None else (None, None)

    def mask_mod(b, h, q_idx, kv_idx):
        m = q_idx >= 0  # all-true tensor of the right shape
        if causal:
            m = m & (kv_idx <= q_idx)
        if left is not None:
            m = m & (q_idx - kv_idx <= left) & (kv_idx - q_idx <= right)
        if doc_ids is not None:
            m = m & (doc_ids[b, q_idx] == doc_ids[b, kv_idx])
        return m

    return _compiled_block_mask()(mask_mod, B if doc_ids is not None else None, None, L, L, device=device)


def flex(q, k, v, block_mask) -> torch.Tensor:
    if torch.compiler.is_compiling():  # inside a compiled block: traced into its graph
        return flex_attention(q, k, v, block_mask=block_mask)
    return _compiled_flex()(q, k, v, block_mask=block_mask)


def use_flex(impl: str, device: torch.device) -> bool:
    if impl == "sdpa":
        return False
    if impl == "flex":
        return HAVE_FLEX
    return HAVE_FLEX and device.type == "cuda"  # auto
