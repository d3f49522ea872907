"""Scoring primitives every zero-shot task is built from.

- :func:`split_pair`: the lm-evaluation-harness context/continuation tokenisation.
- :func:`loglikelihood`: decoders, log P(continuation | context) and "greedy" (every
  continuation token is the argmax), many requests batched by length.
- :func:`masked_loglikelihood`: encoders, pseudo-log-likelihood of a span (each span token
  masked in turn, every masked variant of every request batched together), or the joint
  prediction of a fully masked span. MNTP models predict the token at i from output i-1, so
  their scores read the shifted position.
- :func:`masked_ltr_loglikelihood`: encoders on generative tasks as the Ettin authors score them
  (the default): left to right, continuation token k read at the first of three [MASK]s (k
  and two future positions) followed by [SEP], with the context and tokens < k visible and
  nothing of the continuation after k; MNTP models read one position earlier.
- :func:`greedy_generate`: decoders, batched greedy decoding with stop strings.

All of them run the prediction head only where a score is read (sparse prediction), and the
last block only there too (:func:`read_forward`: every position's keys and values, but queries,
attention output and MLP only at the read positions), so the cost is the backbone minus most of
its last block plus one vocabulary projection per scored token.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(slots=True)
class Row:
    """One sequence to run: ``ids`` (may be shared between rows), positions to replace by MASK,
    output positions to read (ascending) and the target id at each."""

    ids: list
    mask: tuple
    pred: tuple
    tgt: tuple
    req: int


def split_pair(tok, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Token ids of (context, continuation) exactly as the harness's ``_encode_pair`` makes them:
    trailing spaces of the context move to the continuation, the whole string is encoded and the
    continuation is what follows the separately encoded context."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces > 0:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    whole = tok.encode(context + continuation)
    ctx = tok.encode(context) if context else []
    return ctx, whole[len(ctx):]


def split_pairs(tok, pairs: list[tuple[str, str]]) -> list[tuple[list[int], list[int]]]:
    """:func:`split_pair` for many pairs (batched tokenizer calls, contexts encoded once)."""
    ctxs, wholes = [], []
    for context, continuation in pairs:
        n_spaces = len(context) - len(context.rstrip())
        if n_spaces > 0:
            continuation = context[-n_spaces:] + continuation
            context = context[:-n_spaces]
        ctxs.append(context)
        wholes.append(context + continuation)
    uniq = list(dict.fromkeys(c for c in ctxs if c))
    enc_ctx = dict(zip(uniq, tok.encode_batch(uniq)))
    enc_whole = tok.encode_batch(wholes)
    out = []
    for c, w in zip(ctxs, enc_whole):
        ce = enc_ctx.get(c, []) if c else []
        out.append((ce, w[len(ce):]))
    return out


def _batches(order: list[int], batch_size: int):
    """Chunks of ``order`` (rows sorted longest first) of at most ``batch_size`` rows."""
    for i in range(0, len(order), batch_size):
        yield order[i:i + batch_size]


def _can_read_sparse(model) -> bool:
    """The model computes its last block at chosen rows (``encode(..., keep=)``, ettin's Transformer)."""
    return hasattr(model, "encode") and hasattr(model, "head") and hasattr(model, "blocks") and len(model.blocks) > 0 and all(
        hasattr(b, "forward_at") for b in model.blocks)


def read_forward(model, x: torch.Tensor, attention_mask: torch.Tensor | None, predict_mask: torch.Tensor) -> torch.Tensor:
    """``model(x, attention_mask=..., predict_mask=...)`` (logits at the read positions, row-major)
    with the last block computed only where it is read (:meth:`Block.forward_at`: its keys and
    values need every position, its queries, attention output and MLP only the read ones). Same
    numbers up to float rounding (tested); models without it take the plain forward."""
    if not _can_read_sparse(model):
        return model(x, attention_mask=attention_mask, predict_mask=predict_mask)
    return model.head(model.encode(x, attention_mask=attention_mask, keep=predict_mask))


@torch.inference_mode()
def run_rows(model, rows: list[Row], *, pad_id: int, mask_id: int, batch_size: int,
             argmax_out: list | None = None) -> list[tuple[float, bool]]:
    """(sum of target log-probabilities, every target is the argmax) for each row.

    ``argmax_out``: filled with one list per row, the argmax id at each read position."""
    if argmax_out is not None:
        argmax_out[:] = [[] for _ in rows]
    if not rows:
        return []
    dev = next(model.parameters()).device
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i].ids))
    out: list[tuple[float, bool]] = [(0.0, True)] * len(rows)
    as_tensor: dict[int, torch.Tensor] = {}  # masked variants share their base sequence
    for chunk in _batches(order, batch_size):
        lens = [len(rows[i].ids) for i in chunk]
        L = max(lens)
        B = len(chunk)
        x = torch.full((B, L), pad_id, dtype=torch.long)
        pm = torch.zeros((B, L), dtype=torch.bool)
        mb, mp, tgts, counts = [], [], [], []
        for b, i in enumerate(chunk):
            r = rows[i]
            base = as_tensor.get(id(r.ids))
            if base is None:
                base = as_tensor[id(r.ids)] = torch.as_tensor(r.ids, dtype=torch.long)
            x[b, : len(r.ids)] = base
            for p in r.mask:
                mb.append(b)
                mp.append(p)
            pm[b, list(r.pred)] = True
            tgts.extend(r.tgt)
            counts.append(len(r.tgt))
        if mb:
            x[mb, mp] = mask_id
        am = None
        if min(lens) != L:
            am = torch.arange(L)[None, :] < torch.as_tensor(lens)[:, None]
            am = am.to(dev)
        logits = read_forward(model, x.to(dev), am, pm.to(dev))
        if logits.dtype in (torch.float16, torch.bfloat16):
            logits = logits.float()
        lp = F.log_softmax(logits, dim=-1)
        t = torch.as_tensor(tgts, dtype=torch.long, device=dev)
        tok_lp = lp.gather(1, t[:, None])[:, 0].double().cpu()
        best = lp.argmax(dim=-1)
        greedy = (best == t).cpu()
        best = best.tolist() if argmax_out is not None else None
        s = 0
        for b, i in enumerate(chunk):
            n = counts[b]
            out[i] = (float(tok_lp[s:s + n].sum()), bool(greedy[s:s + n].all()))
            if best is not None:
                argmax_out[i] = best[s:s + n]
            s += n
    return out


def _gather(rows: list[Row], results: list[tuple[float, bool]], n: int, argmax: list | None = None,
            argmax_out: list | None = None) -> list[tuple[float, bool]]:
    acc = [[0.0, True] for _ in range(n)]
    if argmax_out is not None:
        argmax_out[:] = [[] for _ in range(n)]
    for k, (r, (lp, g)) in enumerate(zip(rows, results)):
        acc[r.req][0] += lp
        acc[r.req][1] = acc[r.req][1] and g
        if argmax_out is not None and argmax is not None:
            argmax_out[r.req].extend(argmax[k])
    return [(a, b) for a, b in acc]


def _run_gather(model, rows: list[Row], n: int, *, pad_id: int, mask_id: int, batch_size: int,
                argmax_out: list | None) -> list[tuple[float, bool]]:
    am: list | None = [] if argmax_out is not None else None
    res = run_rows(model, rows, pad_id=pad_id, mask_id=mask_id, batch_size=batch_size, argmax_out=am)
    return _gather(rows, res, n, am, argmax_out)


def loglikelihood(model, requests: list[tuple[list[int], list[int]]], *, pad_id: int, batch_size: int,
                  max_length: int, argmax_out: list | None = None) -> list[tuple[float, bool]]:
    """Decoder: (log P(cont | ctx), greedy) per (ctx ids, cont ids); the sequence is cut from the
    left to ``max_length`` input tokens, as the harness does. ``argmax_out``: filled with the
    argmax id at each continuation position, per request (teacher-forced greedy tokens)."""
    rows = []
    for i, (ctx, cont) in enumerate(requests):
        full = (list(ctx) + list(cont))[-(max_length + 1):]
        inp = full[:-1]
        n = min(len(cont), len(inp))
        rows.append(Row(inp, (), tuple(range(len(inp) - n, len(inp))), tuple(full[len(full) - n:]), i))
    return _run_gather(model, rows, len(requests), pad_id=pad_id, mask_id=pad_id, batch_size=batch_size, argmax_out=argmax_out)


def _can_pack(model) -> bool:
    need = ("embed", "embed_norm", "blocks", "final_norm", "head", "rope_global", "rope_local")
    return all(hasattr(model, n) for n in need) and all(hasattr(b, "is_global") for b in model.blocks)


@torch.inference_mode()
def _packed_forward(model, x: torch.Tensor, pos: torch.Tensor, branch: torch.Tensor, predict: torch.Tensor) -> torch.Tensor:
    """Logits at ``predict`` for rows packing one shared context and several continuations.

    Token t may see token s when s is context (branch 0) or in t's own branch, and
    pos[s] <= pos[t] (plus the sliding window on local layers, measured in positions). That is
    exactly what each continuation sees when it follows the context in a sequence of its own.
    """
    cfg = model.config
    left, _ = cfg.window()
    pq, pk = pos[:, :, None], pos[:, None, :]
    bq, bk = branch[:, :, None], branch[:, None, :]
    allowed = ((bk == 0) | (bk == bq)) & (pk <= pq)
    allowed |= torch.eye(x.shape[1], dtype=torch.bool, device=x.device)[None]  # pads see themselves
    m_g = allowed[:, None]
    m_l = (allowed & (pq - pk <= left))[:, None]
    h = model.embed_norm(model.embed(x))
    rope_g = model.rope_global.cos_sin(pos, h.dtype)
    rope_l = rope_g if cfg.rope_theta_local == cfg.rope_theta_global else model.rope_local.cos_sin(pos, h.dtype)
    att_g = lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=m_g)  # noqa: E731
    att_l = lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=m_l)  # noqa: E731
    for block in model.blocks:
        h = block(h, rope_g, att_g) if block.is_global else block(h, rope_l, att_l)
    return model.head(model.final_norm(h)[predict])


def loglikelihood_shared(model, groups: list[tuple[list[int], list[list[int]]]], *, pad_id: int, batch_size: int,
                         max_length: int) -> list[list[tuple[float, bool]]]:
    """Decoder: like :func:`loglikelihood` for groups of continuations sharing one context
    (multiple-choice options), computed with the context once per group (tree packing).
    Groups that do not fit ``max_length`` unpacked, or models without the standard layout,
    take the plain path. ``batch_size`` counts sequences the plain path would have run."""
    out: list[list[tuple[float, bool]] | None] = [None] * len(groups)
    plain = [i for i, (ctx, conts) in enumerate(groups)
             if not _can_pack(model) or not ctx or any(not c for c in conts) or len(ctx) + max(len(c) for c in conts) - 1 > max_length]
    if plain:
        flat = [(groups[i][0], c) for i in plain for c in groups[i][1]]
        res = loglikelihood(model, flat, pad_id=pad_id, batch_size=batch_size, max_length=max_length)
        k = 0
        for i in plain:
            n = len(groups[i][1])
            out[i] = res[k:k + n]
            k += n
    packed = [i for i in range(len(groups)) if out[i] is None]
    dev = next(model.parameters()).device
    lengths = {i: len(groups[i][0]) + sum(len(c) - 1 for c in groups[i][1]) for i in packed}
    order = sorted(packed, key=lambda i: -lengths[i])
    s = 0
    while s < len(order):
        # as many groups as the plain path's batch would hold sequences
        chunk, seqs = [], 0
        while s < len(order) and (not chunk or seqs + len(groups[order[s]][1]) <= batch_size):
            chunk.append(order[s])
            seqs += len(groups[order[s]][1])
            s += 1
        L = max(lengths[i] for i in chunk)
        B = len(chunk)
        xs, ps, bs = [], [], []
        rows, cols, tgts, owners = [], [], [], []
        for b, i in enumerate(chunk):
            ctx, conts = groups[i]
            n = len(ctx)
            xr, pr, br = list(ctx), list(range(n)), [0] * n
            for j, c in enumerate(conts):
                at = len(xr)
                body = c[:-1]
                xr.extend(body)
                pr.extend(range(n, n + len(body)))
                br.extend([j + 1] * len(body))
                # the first token is predicted by the last context position, the rest in-branch
                rows.extend([b] * len(c))
                cols.append(n - 1)
                cols.extend(range(at, at + len(body)))
                tgts.extend(c)
                owners.extend([(i, j)] * len(c))
            pad = L - len(xr)
            pr.extend(range(n, n + pad))
            xr.extend([pad_id] * pad)
            br.extend([-1] * pad)
            xs.append(xr)
            ps.append(pr)
            bs.append(br)
        x = torch.tensor(xs, dtype=torch.long, device=dev)
        pos = torch.tensor(ps, dtype=torch.long, device=dev)
        branch = torch.tensor(bs, dtype=torch.long, device=dev)
        keys = sorted(set(zip(rows, cols)))  # row-major order: how logits come back for ``predict``
        predict = torch.zeros((B, L), dtype=torch.bool, device=dev)
        predict[[r for r, _ in keys], [c for _, c in keys]] = True
        flat_index = {rc: k for k, rc in enumerate(keys)}
        logits = _packed_forward(model, x, pos, branch, predict)
        if logits.dtype in (torch.float16, torch.bfloat16):
            logits = logits.float()
        lp = F.log_softmax(logits, dim=-1)
        best = lp.argmax(dim=-1)
        # the shared last-context position is read once and used by every continuation of its group
        sel = torch.as_tensor([flat_index[rc] for rc in zip(rows, cols)], device=dev)
        t = torch.as_tensor(tgts, dtype=torch.long, device=dev)
        tok_lp = lp[sel, t].double().cpu().tolist()
        greedy = (best[sel] == t).cpu().tolist()
        acc: dict[tuple[int, int], list] = {}
        for owner, a, g in zip(owners, tok_lp, greedy):
            cur = acc.setdefault(owner, [0.0, True])
            cur[0] += a
            cur[1] = cur[1] and g
        for i in chunk:
            out[i] = [(acc[(i, j)][0], acc[(i, j)][1]) for j in range(len(groups[i][1]))]
    return out  # type: ignore[return-value]


def masked_rows(requests: list[tuple[list[int], list[int], list[int]]], *, shift: int, max_length: int,
                joint: bool = False) -> list[Row]:
    """Rows for :func:`masked_loglikelihood`. ``left`` starts with [CLS], ``right`` usually is [SEP]."""
    rows: list[Row] = []
    for i, (left, span, right) in enumerate(requests):
        left, span, right = list(left), list(span), list(right)
        over = len(left) + len(span) + len(right) - max_length
        if over > 0:  # cut the context from the left, keeping the first ([CLS]) token
            drop = min(over, max(0, len(left) - 1))
            left = left[:1] + left[1 + drop:]
            over -= drop
            if over > 0:  # the span alone is too long: score its beginning
                span = span[: max(0, len(span) - over)]
        ids = left + span + right
        start = len(left)
        pos = tuple(range(start, start + len(span)))
        if not span:
            continue
        if joint:
            rows.append(Row(ids, pos, tuple(p - shift for p in pos), tuple(span), i))
        else:
            for p, t in zip(pos, span):
                rows.append(Row(ids, (p,), (p - shift,), (t,), i))
    return rows


LTR_MASKS = 3  # the token itself plus two future positions


def ltr_rows(requests: list[tuple[list[int], list[int], list[int]]], *, shift: int, max_length: int,
             n_masks: int = LTR_MASKS) -> list[Row]:
    """Rows for :func:`masked_ltr_loglikelihood`: for token k of ``span``, the sequence
    ``left + span[:k] + [MASK] * n_masks + right``, read at the first mask (``- shift``)."""
    rows: list[Row] = []
    for i, (left, span, right) in enumerate(requests):
        left, span, right = list(left), list(span), list(right)
        for k, t in enumerate(span):
            head = left + span[:k]
            over = len(head) + n_masks + len(right) - max_length
            if over > 0:  # cut the context from the left, keeping the first ([CLS]) token
                head = head[:1] + head[1 + over:] if len(head) > over + 1 else head[:1]
            p = len(head)
            ids = head + [t] * n_masks + right  # the n_masks placeholders become [MASK] in run_rows
            rows.append(Row(ids, tuple(range(p, p + n_masks)), (p - shift,), (t,), i))
    return rows


def masked_ltr_loglikelihood(model, requests: list[tuple[list[int], list[int], list[int]]], *, pad_id: int, mask_id: int,
                             batch_size: int, max_length: int, mntp: bool = False, n_masks: int = LTR_MASKS,
                             argmax_out: list | None = None) -> list[tuple[float, bool]]:
    """Encoder: sum over the span's tokens of log P(token k | left, span[:k]) read at the first
    of ``n_masks`` [MASK]s standing for k and the positions after it, followed by ``right``
    (usually [SEP]); and whether every token is the argmax. ``mntp``: read at the position
    before the first mask (MNTP predicts token i from output i-1). One row per span token,
    every row of every request batched together."""
    rows = ltr_rows(requests, shift=1 if mntp else 0, max_length=max_length, n_masks=n_masks)
    return _run_gather(model, rows, len(requests), pad_id=pad_id, mask_id=mask_id, batch_size=batch_size, argmax_out=argmax_out)


def masked_loglikelihood(model, requests: list[tuple[list[int], list[int], list[int]]], *, pad_id: int, mask_id: int,
                         batch_size: int, max_length: int, mntp: bool = False, joint: bool = False,
                         batched: bool = True, argmax_out: list | None = None) -> list[tuple[float, bool]]:
    """Encoder: pseudo-log-likelihood of ``span`` in ``left + span + right`` (each span token
    masked in turn, all variants batched; ``joint``: the whole span masked at once) and whether
    every span token is the argmax. ``mntp``: read the prediction for position i at i-1.
    ``batched=False`` runs one masked variant per forward pass (the slow reference)."""
    rows = masked_rows(requests, shift=1 if mntp else 0, max_length=max_length, joint=joint)
    return _run_gather(model, rows, len(requests), pad_id=pad_id, mask_id=mask_id,
                       batch_size=batch_size if batched else 1, argmax_out=argmax_out)


@torch.inference_mode()
def greedy_generate(model, tok, prompts: list[list[int]], *, pad_id: int, eos_id: int | None, batch_size: int,
                    max_new_tokens: int, stop: tuple[str, ...] = (), max_length: int = 1024) -> list[str]:
    """Greedy continuation text of each prompt, cut at the first stop string (harness ``until``)."""
    dev = next(model.parameters()).device
    outs = [""] * len(prompts)
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    for s in range(0, len(order), batch_size):
        chunk = order[s:s + batch_size]
        keep = max(1, max_length - max_new_tokens)
        seqs = {i: list(prompts[i])[-keep:] for i in chunk}
        gen: dict[int, list[int]] = {i: [] for i in chunk}
        active = list(chunk)
        for _ in range(max_new_tokens):
            if not active:
                break
            lens = [len(seqs[i]) for i in active]
            L = max(lens)
            x = torch.full((len(active), L), pad_id, dtype=torch.long)
            pm = torch.zeros((len(active), L), dtype=torch.bool)
            for b, i in enumerate(active):
                x[b, : lens[b]] = torch.as_tensor(seqs[i])
                pm[b, lens[b] - 1] = True
            am = None if min(lens) == L else (torch.arange(L)[None, :] < torch.as_tensor(lens)[:, None]).to(dev)
            nxt = model(x.to(dev), attention_mask=am, predict_mask=pm.to(dev)).argmax(dim=-1).tolist()
            still = []
            for i, t in zip(active, nxt):
                if eos_id is not None and t == eos_id:
                    continue
                gen[i].append(t)
                seqs[i].append(t)
                text = tok.decode(gen[i])
                if any(st in text for st in stop):
                    continue
                still.append(i)
            active = still
        for i in chunk:
            text = tok.decode(gen[i])
            cut = len(text)
            for st in stop:
                j = text.find(st)
                if j != -1:
                    cut = min(cut, j)
            outs[i] = text[:cut]
    return outs
