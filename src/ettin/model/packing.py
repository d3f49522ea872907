"""Encoder inference (pooled embeddings) on variable-length inputs, without computing on pads.

Two ways to batch many sequences of different lengths:

- **packed**: first-fit-decreasing packing of the sequences into rows of ``row_len`` tokens;
  each sequence is its own document (``doc_ids``), so attention stays inside it and RoPE
  positions restart at its first token (:func:`ettin.model.attention.positions_from_docs`).
  Almost no pad tokens. Pays off where attention skips masked work: flex attention's block
  masks (CUDA) skip blocks outside every document.
- **padded**: sequences sorted by length, padded per batch, ``attention_mask``. On the SDPA
  path (CPU) a packed row still costs a full L x L product in the global layers (masked entries
  are computed, then dropped), which is more than padding similar lengths together costs.

:func:`pooled` picks one (``strategy="auto"``) and returns one pooled vector per sequence in
input order; both give the same vectors within float tolerance.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np

import torch
import torch.nn.functional as F

from ettin.errors import EttinError
from ettin.model import attention as A

POOLINGS = ("mean", "cls", "last")
STRATEGIES = ("auto", "packed", "padded")
PAD_DOC = -1  # the document id of pad positions: attention.fold_padding's convention


@dataclass
class Packed:
    """Packed rows: ``input_ids`` / ``doc_ids`` [R, L]; ``spans`` [N, 3] = (row, start, length) per sequence.

    ``doc_ids`` holds each sequence's input index (distinct, so neighbours never merge) and
    ``PAD_DOC`` at pads: pads form their own document and never attend to real tokens.
    """

    input_ids: torch.Tensor
    doc_ids: torch.Tensor
    spans: torch.Tensor

    @property
    def real_tokens(self) -> int:
        return int(self.spans[:, 2].sum()) if len(self.spans) else 0


class _FirstFit:
    """Leftmost row with at least ``need`` free tokens, in O(log rows) (a max segment tree).

    A plain scan over the open rows is quadratic in the number of sequences (a corpus of 100k
    documents would take minutes); the tree keeps first-fit's exact choice.
    """

    def __init__(self, n: int, row_len: int):
        self.size = 1
        while self.size < max(1, n):
            self.size *= 2
        self.free = [row_len] * (2 * self.size)  # every row (opened or not) starts empty

    def take(self, need: int) -> int:
        """Place ``need`` tokens in the leftmost row that has room; returns the row."""
        i = 1
        while i < self.size:
            i = 2 * i if self.free[2 * i] >= need else 2 * i + 1
        row = i - self.size
        self.free[i] -= need
        i //= 2
        while i:
            self.free[i] = max(self.free[2 * i], self.free[2 * i + 1])
            i //= 2
        return row


def pack(seqs: list[list[int]], row_len: int, *, pad_id: int) -> Packed:
    """First-fit-decreasing packing of ``seqs`` into rows of at most ``row_len`` tokens.

    Longest first (ties by input index, so the result is deterministic), each into the first
    row with room. Rows are trimmed to the longest filled row rounded up to a multiple of 8
    (never past ``row_len``). Sequences must be non-empty and at most ``row_len`` long.
    """
    if row_len < 1:
        raise EttinError(f"pack: row_len must be at least 1, got {row_len}")
    for i, s in enumerate(seqs):
        if len(s) > row_len:
            raise EttinError(f"pack: sequence {i} has {len(s)} tokens, more than the row length {row_len}")
        if len(s) == 0:
            raise EttinError(f"pack: sequence {i} is empty (nothing to embed)")
    order = sorted(range(len(seqs)), key=lambda i: (-len(seqs[i]), i))
    fit = _FirstFit(len(seqs), row_len)
    fill: list[int] = []  # tokens placed per opened row
    spans = [(0, 0, 0)] * len(seqs)
    for i in order:
        r = fit.take(len(seqs[i]))
        if r == len(fill):
            fill.append(0)
        spans[i] = (r, fill[r], len(seqs[i]))
        fill[r] += len(seqs[i])
    L = min(row_len, -(-max(fill, default=0) // 8) * 8)
    span_t = torch.as_tensor(spans, dtype=torch.long).view(-1, 3)
    ids = torch.full((len(fill), L), pad_id, dtype=torch.long)
    docs = torch.full((len(fill), L), PAD_DOC, dtype=torch.long)
    # scatter all tokens at once (a tensor per sequence is slow for many short ones)
    lens = span_t[:, 2]
    total = int(lens.sum())
    seq_of = torch.repeat_interleave(torch.arange(len(seqs)), lens)  # input index of every token
    offset = torch.arange(total) - torch.repeat_interleave(lens.cumsum(0) - lens, lens)
    flat = (span_t[:, 0] * L + span_t[:, 1])[seq_of] + offset
    ids.view(-1)[flat] = torch.from_numpy(np.fromiter(itertools.chain.from_iterable(seqs), dtype=np.int64, count=total))
    docs.view(-1)[flat] = seq_of
    return Packed(ids, docs, span_t)


def pad_batch(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Right-padded ``input_ids`` [B, L], ``attention_mask`` (None when nothing is padded), ``lengths`` [B]."""
    lens = [len(s) for s in seqs]
    L = max(lens)
    x = torch.full((len(seqs), L), pad_id, dtype=torch.long)
    for i, s in enumerate(seqs):
        x[i, : len(s)] = torch.as_tensor(s, dtype=torch.long)
    lengths = torch.as_tensor(lens)
    am = None if min(lens) == L else torch.arange(L)[None, :] < lengths[:, None]
    return x, am, lengths


def pad_batches(seqs: list[list[int]], token_budget: int, *, pad_id: int, max_rows: int | None = None):
    """Longest-first padded batches: yields (indices, input_ids [B, L], attention_mask or None, lengths [B]).

    A batch takes sequences while ``rows x its longest <= token_budget`` (at least one row), so
    batches of short sequences hold more of them; ``max_rows`` caps the rows as well.
    """
    order = sorted(range(len(seqs)), key=lambda i: (-len(seqs[i]), i))
    s = 0
    while s < len(order):
        n = max(1, token_budget // max(1, len(seqs[order[s]])))  # the batch's longest: sorted
        if max_rows is not None:
            n = min(n, max_rows)
        chunk = order[s:s + n]
        s += n
        yield (chunk, *pad_batch([seqs[i] for i in chunk], pad_id))


def pool_padded(hidden: torch.Tensor, lengths: torch.Tensor, how: str) -> torch.Tensor:
    """[B, L, H] right-padded -> [B, H] (``mean`` over the real tokens, ``cls`` first, ``last`` last)."""
    B, L, _ = hidden.shape
    if how == "cls":
        return hidden[:, 0]
    if how == "last":
        return hidden[torch.arange(B, device=hidden.device), lengths - 1]
    m = (torch.arange(L, device=hidden.device)[None, :] < lengths[:, None]).to(hidden.dtype)
    return (hidden * m[..., None]).sum(1) / lengths[:, None].to(hidden.dtype)


def choose_strategy(model, device, strategy: str = "auto", longest: int | None = None) -> str:
    """``auto``: packed where attention skips masked blocks (flex), and on the SDPA path for
    rows of at most 512 tokens (measured on a CPU, ``bench/infer_speed.py``: packed 1.10x padded
    at lengths 16-512, 0.90x at lengths up to 2048, where the full L x L global layers dominate)."""
    if strategy not in STRATEGIES:
        raise EttinError(f"pooled: unknown strategy '{strategy}': expected one of {', '.join(STRATEGIES)}")
    if strategy != "auto":
        return strategy
    if A.use_flex(getattr(model, "attn_impl", "auto"), torch.device(device)):
        return "packed"
    return "packed" if longest is not None and longest <= 512 else "padded"


def pooled(
    model,
    seqs: list[list[int]],
    *,
    pad_id: int,
    pooling: str = "mean",
    strategy: str = "auto",
    row_len: int | None = None,
    token_budget: int = 32768,
    max_rows: int | None = None,
    normalize: bool = False,
) -> torch.Tensor:
    """One pooled vector per sequence, [N, hidden] fp32 on the model's device, in input order.

    ``pooling``: ``mean`` over the sequence's tokens, ``cls`` (its first token) or ``last`` (its
    last token: a decoder's only position that has seen the whole input). Each forward pass
    holds at most ``token_budget`` tokens (pads included) and ``max_rows`` rows. ``row_len``
    (packed only) defaults to the longest sequence, and at least 512 (rows are trimmed to what
    they hold, so few short sequences still give short rows).
    """
    if pooling not in POOLINGS:
        raise EttinError(f"pooled: unknown pooling '{pooling}': expected one of {', '.join(POOLINGS)}")
    dev = next(model.parameters()).device
    for i, s in enumerate(seqs):
        if len(s) == 0:
            raise EttinError(f"pooled: sequence {i} is empty (nothing to embed)")
    strategy = choose_strategy(model, dev, strategy, longest=max((len(s) for s in seqs), default=0))
    out = torch.zeros(len(seqs), model.config.hidden, device=dev)
    if not seqs:
        return out
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            if strategy == "packed":
                _run_packed(model, seqs, out, pad_id, pooling, row_len, token_budget, max_rows, dev)
            else:
                for idx, x, am, lengths in pad_batches(seqs, token_budget, pad_id=pad_id, max_rows=max_rows):
                    x, am, lengths = x.to(dev), am.to(dev) if am is not None else None, lengths.to(dev)
                    rows = torch.as_tensor(idx, device=dev)
                    if pooling == "mean":
                        out[rows] = pool_padded(model.encode(x, attention_mask=am).float(), lengths, pooling)
                    else:  # one position per row: the last block runs there only
                        keep = torch.zeros(x.shape, dtype=torch.bool, device=dev)
                        keep[torch.arange(len(idx), device=dev), 0 if pooling == "cls" else lengths - 1] = True
                        out[rows] = model.encode(x, attention_mask=am, keep=keep).float()
    finally:
        model.train(was_training)
    return F.normalize(out, dim=-1) if normalize else out


def _run_packed(model, seqs, out, pad_id, pooling, row_len, token_budget, max_rows, dev) -> None:
    longest = max(len(s) for s in seqs)
    p = pack(seqs, row_len or max(longest, 512), pad_id=pad_id)
    R, L = p.input_ids.shape
    per = max(1, token_budget // L)
    if max_rows is not None:
        per = min(per, max_rows)
    N = len(seqs)
    spans = p.spans.to(dev)
    # the flat position (row * L + offset) of each sequence's first and last token
    first = spans[:, 0] * L + spans[:, 1]
    last = first + spans[:, 2] - 1
    acc = torch.zeros(N + 1, out.shape[1], device=dev) if pooling == "mean" else None  # slot N: pads
    for r0 in range(0, R, per):
        r1 = min(R, r0 + per)
        ids, docs = p.input_ids[r0:r1].to(dev), p.doc_ids[r0:r1].to(dev)
        if pooling == "mean":
            h = model.encode(ids, doc_ids=docs).flatten(0, 1).float()  # [(r1 - r0) * L, H]
            seg = docs.flatten()
            acc.index_add_(0, torch.where(seg == PAD_DOC, torch.full_like(seg, N), seg), h)
        else:  # the last block runs at each sequence's pooled position only
            mine = ((spans[:, 0] >= r0) & (spans[:, 0] < r1)).nonzero().squeeze(1)
            at = (first if pooling == "cls" else last)[mine] - r0 * L  # flat positions in this chunk, distinct
            keep = torch.zeros((r1 - r0) * L, dtype=torch.bool, device=dev)
            keep[at] = True
            h = model.encode(ids, doc_ids=docs, keep=keep.view(r1 - r0, L)).float()  # [len(mine), H], by flat position
            out[mine[torch.argsort(at)]] = h
    if pooling == "mean":
        out.copy_(acc[:N] / spans[:, 2, None].float())
