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
    """The plain computation: SDPA under :func:`sdpa_mask`'s boolean mask (what every faster path
    here is tested against)."""
    if mask is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def additive(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A boolean mask as SDPA's additive one (0 where allowed, -inf elsewhere).

    SDPA's CPU kernels turn a boolean mask into this on every call, forward and backward; a
    mask shared by several layers is converted once (8 x 512 x 512: ~10 ms per call saved on
    2 cores, ``bench/README.md``).
    """
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill_(~allowed, float("-inf"))


class FullMask:
    """Attention over all L keys under :func:`sdpa_mask`'s mask, made additive once per dtype."""

    def __init__(self, allowed: torch.Tensor | None, *, causal: bool):
        self.allowed, self.causal = allowed, causal
        self._masks: dict = {}

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if self.allowed is None:
            return F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)
        m = self._masks.get(q.dtype)
        if m is None:
            m = self._masks[q.dtype] = additive(self.allowed, q.dtype)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=m)


class _Bands(torch.autograd.Function):
    """[B, L, h, D] -> [B * nb, Kb, h, D]: each query block's band of keys (or values) as a view.

    The rows are laid end to end in one zero-gapped buffer (``left`` zeros, each row padded to
    ``nb * block``, ``right`` zeros), so band n starts at flat position ``n * block`` and all
    bands are one overlapping strided view: one copy of x instead of ``Kb / block`` copies (a
    band that reaches into a neighbouring row only meets keys the mask excludes; the gaps are
    zeros, so masked values stay finite). The backward adds each band's gradient back with
    ceil(Kb / block) strided adds into one buffer (through ``unfold``, the backward zero-fills
    a [B * nb, Kb, h, D] buffer and scatters into it: 35 ms of a 17m encoder step on 2 cores).
    """

    @staticmethod
    def forward(ctx, x, left: int, right: int, block: int, nb: int):
        B, L, h, D = x.shape
        Lq, Kb, N = nb * block, block + left + right, B * nb
        flat = x.new_empty((left + B * Lq + right, h, D))
        flat[:left].zero_()
        flat[left + B * Lq:].zero_()
        rows = flat[left:left + B * Lq].view(B, Lq, h, D)
        rows[:, :L].copy_(x)
        rows[:, L:].zero_()
        ctx.dims = (B, L, h, D, left, block, nb, Kb)
        return flat.as_strided((N, Kb, h, D), (block * h * D, h * D, D, 1))

    @staticmethod
    def backward(ctx, g):
        B, L, h, D, left, block, nb, Kb = ctx.dims
        N = B * nb
        parts = -(-Kb // block)
        flat = torch.zeros(((N + parts) * block, h, D), dtype=g.dtype, device=g.device)
        for i in range(parts):  # band n's key o + t sits at flat position n * block + o + t
            o = i * block
            w = min(block, Kb - o)
            flat[o:o + N * block].view(N, block, h, D)[:, :w] += g[:, o:o + w]
        return flat[left:left + N * block].view(B, nb * block, h, D)[:, :L], None, None, None, None


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
            m = self._masks[dtype] = additive(self.allowed, dtype)
        return m

    def _bands(self, x: torch.Tensor) -> torch.Tensor:
        """[B, L, h, D] keys/values -> [B * nb, h, Kb, D] bands."""
        return _Bands.apply(x, self.left, self.right, self.block, self.nb).transpose(1, 2)

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


class SpanPlan:
    """Document-confined attention as attention over key spans (the SDPA path's global layers).

    With packed documents (and a decoder's causality) most of an L x L mask is False, and the
    CPU kernels compute every masked entry anyway. Here queries go in blocks of ``block``; each
    block attends only to the keys its queries may see, one contiguous span
    [first allowed key, last allowed key] (documents are contiguous runs). Blocks are grouped
    by span width (rounded up to ``grain`` keys) so each group is one SDPA call over gathered
    keys, with the exact mask inside the span: the same result as :func:`sdpa_mask` (masked
    entries get no weight either way) with the work of the spans only. Query slots past the
    end see one key (finite; their outputs are dropped).
    """

    def __init__(self, doc_ids: torch.Tensor, B: int, L: int, device, *, causal: bool, window: tuple[int, int] | None,
                 block: int, grain: int):
        self.block = block
        nb = -(-L // block)
        self.nb, self.Lq = nb, nb * block
        pos = torch.arange(L, device=device)
        start = torch.ones(B, L, dtype=torch.bool, device=device)
        start[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
        end = torch.ones(B, L, dtype=torch.bool, device=device)
        end[:, :-1] = start[:, 1:]
        lo = torch.where(start, pos, torch.zeros_like(pos)).cummax(dim=1).values  # first key of q's document
        hi = torch.where(end, pos, torch.full_like(pos, L)).flip(1).cummin(dim=1).values.flip(1)  # its last key
        if causal:
            hi = torch.minimum(hi, pos.expand(B, L))
        if window is not None:
            left, right = window
            lo = torch.maximum(lo, pos - left)
            if not causal:
                hi = torch.minimum(hi, pos + right)
        pad = self.Lq - L
        lo_b = F.pad(lo, (0, pad), value=L).view(B, nb, block).amin(-1)  # [B, nb] first key of each query block
        hi_b = F.pad(hi, (0, pad), value=-1).view(B, nb, block).amax(-1)  # last key
        width = ((hi_b - lo_b + 1 + grain - 1) // grain) * grain
        width = width.clamp(max=-(-L // grain) * grain)
        self.work = int(width.sum()) * block  # query-key pairs computed
        Lk = L + int(width.max())  # key positions a span may reach (past L: masked out)
        lo_b = torch.minimum(lo_b, torch.full_like(lo_b, L))
        widths = width.flatten()
        order = torch.argsort(widths, stable=True)
        self.order = order  # query blocks grouped by width
        self.inverse = torch.argsort(order)
        ws, counts = torch.unique_consecutive(widths[order], return_counts=True)
        self.groups = []  # (blocks n, span width w, mask [n, 1, block, w]) per width
        kidx = []  # every group's keys, flat indices into [B * L]: one gather for all
        qd = F.pad(doc_ids, (0, pad), value=-3).view(B * nb, block)  # query docs per block
        kd_all = F.pad(doc_ids, (0, Lk - L), value=-2)  # key docs, padded slots match nothing
        qpos = (torch.arange(nb, device=device)[:, None] * block + torch.arange(block, device=device)[None, :])  # [nb, block]
        first = 0
        for w, n in zip(ws.tolist(), counts.tolist()):
            blocks = order[first:first + n]
            first += n
            b, i = blocks // nb, blocks % nb
            kpos = lo_b.flatten()[blocks][:, None] + torch.arange(w, device=device)[None, :]  # [n, w]
            kidx.append((b[:, None] * L + kpos.clamp(max=L - 1)).flatten())  # past the end: any key (masked out below)
            qp = qpos[i]  # [n, block]
            ok = qd[blocks][:, :, None] == kd_all[b[:, None], kpos][:, None, :]
            d = kpos[:, None, :] - qp[:, :, None]
            if causal:
                ok &= d <= 0
            if window is not None:
                ok &= (d >= -window[0]) & (d <= window[1])
            beyond = (qp >= L)[:, :, None] & (torch.arange(w, device=device) == 0)[None, None, :]
            ok = ok | beyond
            self.groups.append((n, w, ok[:, None]))
        self.kidx = torch.cat(kidx)
        self.sizes = [n * w for n, w, _ in self.groups]
        self._masks: dict = {}

    def masks(self, dtype: torch.dtype) -> list[torch.Tensor]:
        m = self._masks.get(dtype)
        if m is None:
            m = self._masks[dtype] = [additive(ok, dtype) for _, _, ok in self.groups]
        return m

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """One gather for the query blocks, one for all keys, one for all values (so the backward
        is one index_add each, not one zero-filled buffer per group)."""
        B, h, L, D = q.shape
        ql = q.transpose(1, 2)  # [B, L, h, D]
        if self.Lq != L:
            ql = F.pad(ql, (0, 0, 0, 0, 0, self.Lq - L))
        qb = ql.reshape(B * self.nb, self.block, h, D).index_select(0, self.order)  # blocks grouped by span width
        kg = k.transpose(1, 2).reshape(B * L, h, D).index_select(0, self.kidx).split(self.sizes)
        vg = v.transpose(1, 2).reshape(B * L, h, D).index_select(0, self.kidx).split(self.sizes)
        outs, first = [], 0
        for (n, w, _), kk, vv, mask in zip(self.groups, kg, vg, self.masks(q.dtype)):
            qq = qb[first:first + n].transpose(1, 2)  # [n, h, block, D]
            first += n
            kk, vv = (t.view(n, w, h, D).transpose(1, 2) for t in (kk, vv))
            outs.append(F.scaled_dot_product_attention(qq, kk, vv, attn_mask=mask).transpose(1, 2))  # [n, block, h, D]
        o = torch.cat(outs).index_select(0, self.inverse).reshape(B, self.Lq, h, D)
        return o[:, :L].transpose(1, 2)


class ChunkedSpans:
    """Span attention over groups of rows (at most ~4,096 tokens each), one :class:`SpanPlan` per
    group: the gathered keys of a group stay in cache (one plan over 16k tokens was measured
    slower than the full mask; the same rows in groups of 4k tokens were faster)."""

    def __init__(self, plans: list[SpanPlan], rows: list[int]):
        self.plans, self.rows = plans, rows
        self.work = sum(p.work for p in plans)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if len(self.plans) == 1:
            return self.plans[0].attend(q, k, v)
        parts = zip(self.plans, q.split(self.rows), k.split(self.rows), v.split(self.rows))
        return torch.cat([p.attend(qq, kk, vv) for p, qq, kk, vv in parts])


SPAN_TOKENS = 4096  # tokens per span plan (rows are grouped up to this)


def span_plan(doc_ids: torch.Tensor | None, B: int, L: int, device, *, causal: bool, window: tuple[int, int] | None = None,
              block: int = 64) -> ChunkedSpans | None:
    """Span attention when it removes enough of the full mask's work, else None.

    Needs document ids whose every document is one contiguous run in its row (packing and
    right or left padding give that); anything else keeps the full mask. Used at up to 60% of
    the full work: the break-even measured between 55% and 67% (8-16 rows of 512-1,024 tokens,
    forward + backward and forward only, 2 threads; ``bench/README.md``).
    """
    if doc_ids is None or L <= block:
        return None
    starts = 1 + (doc_ids[:, 1:] != doc_ids[:, :-1]).sum(1)
    srt = doc_ids.sort(dim=1).values
    distinct = 1 + (srt[:, 1:] != srt[:, :-1]).sum(1)
    if bool((starts != distinct).any()):  # a document in two pieces: spans would miss keys
        return None
    grain = max(block, -(-L // 16 // block) * block)  # at most ~16 span widths: at most ~16 kernel calls per plan
    per = max(1, SPAN_TOKENS // L)
    rows = [min(per, B - r) for r in range(0, B, per)]
    plans = [SpanPlan(d, len(d), L, device, causal=causal, window=window, block=block, grain=grain) for d in doc_ids.split(rows)]
    plan = ChunkedSpans(plans, rows)
    if plan.work > 0.6 * B * L * L:  # the full masked SDPA computes every entry
        return None
    return plan


def rows_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keep: torch.Tensor, doc_ids: torch.Tensor | None,
                   *, causal: bool, window: tuple[int, int] | None) -> torch.Tensor:
    """Attention for the queries at ``keep`` [B, L] only: q [N, h, D] (``keep``'s row-major order),
    keys and values [B, h, L, D] from every position. Returns [N, h, D].

    The same mask as :func:`sdpa_mask` (documents, causality, window), for the kept rows: each
    batch row's queries are gathered into M slots (M = the most any row keeps); empty slots see
    key 0 (finite, dropped).
    """
    B, h, L, D = k.shape
    b_idx, pos = keep.nonzero(as_tuple=True)
    counts = keep.sum(1)
    M = max(1, int(counts.max()))
    slot = torch.arange(b_idx.numel(), device=k.device) - (counts.cumsum(0) - counts)[b_idx]
    qp = q.new_zeros((B, M, h, D)).index_put((b_idx, slot), q)
    qpos = torch.full((B, M), -1, dtype=torch.long, device=k.device).index_put((b_idx, slot), pos)
    kpos = torch.arange(L, device=k.device)
    d = kpos[None, None, :] - qpos[:, :, None]  # key - query, [B, M, L]
    ok = torch.ones((B, M, L), dtype=torch.bool, device=k.device)
    if doc_ids is not None:
        qd = doc_ids.gather(1, qpos.clamp(min=0))
        ok &= qd[:, :, None] == doc_ids[:, None, :]
    if causal:
        ok &= d <= 0
    if window is not None:
        ok &= (d >= -window[0]) & (d <= window[1])
    ok = torch.where((qpos < 0)[:, :, None], (kpos == 0)[None, None, :], ok)
    o = F.scaled_dot_product_attention(qp.transpose(1, 2), k, v, attn_mask=ok[:, None])  # [B, h, M, D]
    return o.transpose(1, 2)[b_idx, slot]


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
