"""Training objectives as pure functions of a batch (and a random generator).

Each returns labels aligned with the model's *output* positions (-100 = no loss), so one loss
function serves all three: cross-entropy over the positions whose label is not -100, with the
prediction head run only there (sparse prediction).

- MLM: labels at the selected positions themselves.
- CLM: the label at i is the token at i+1 of the same document.
- MNTP: the token at masked position i is the label of output position i-1.
"""

from __future__ import annotations

import threading

import torch
import torch.nn.functional as F

IGNORE = -100


def _same_doc_next(doc_ids: torch.Tensor | None, input_ids: torch.Tensor) -> torch.Tensor:
    """[B, L] bool: position i+1 exists and lies in the same document as i."""
    ok = torch.zeros_like(input_ids, dtype=torch.bool)
    if doc_ids is None:
        ok[:, :-1] = True
    else:
        ok[:, :-1] = doc_ids[:, 1:] == doc_ids[:, :-1]
    return ok


def _real(input_ids: torch.Tensor, attention_mask: torch.Tensor | None, pad_id: int | None) -> torch.Tensor:
    real = torch.ones_like(input_ids, dtype=torch.bool)
    if attention_mask is not None:
        real &= attention_mask.bool()
    if pad_id is not None:
        real &= input_ids != pad_id
    return real


def select_for_masking(
    input_ids: torch.Tensor,
    *,
    rate: float,
    special_ids: tuple[int, ...] | list[int],
    generator: torch.Generator | None = None,
    attention_mask: torch.Tensor | None = None,
    eligible: torch.Tensor | None = None,
) -> torch.Tensor:
    """Bernoulli(rate) selection over non-special, non-pad tokens."""
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"mask rate must lie in [0, 1], got {rate}")
    candidates = _real(input_ids, attention_mask, None)
    if special_ids:
        candidates &= ~torch.isin(input_ids, torch.tensor(list(special_ids), device=input_ids.device))
    if eligible is not None:
        candidates &= eligible
    draw = torch.rand(input_ids.shape, generator=generator, device=input_ids.device)
    return candidates & (draw < rate)


def corrupt(
    input_ids: torch.Tensor,
    selected: torch.Tensor,
    *,
    mask_id: int,
    random_ids: int,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """BERT's 80/10/10: of the selected tokens 80% become MASK, 10% a random token, 10% stay."""
    u = torch.rand(input_ids.shape, generator=generator, device=input_ids.device)
    rand_tok = torch.randint(0, random_ids, input_ids.shape, generator=generator, device=input_ids.device)
    out = input_ids.clone()
    out = torch.where(selected & (u < 0.8), torch.full_like(out, mask_id), out)
    out = torch.where(selected & (u >= 0.8) & (u < 0.9), rand_tok, out)
    return out


def mlm(
    input_ids: torch.Tensor,
    *,
    rate: float,
    mask_id: int,
    special_ids,
    random_ids: int,
    generator: torch.Generator | None = None,
    attention_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Masked language modelling: (corrupted inputs, labels at the selected positions)."""
    sel = select_for_masking(input_ids, rate=rate, special_ids=special_ids, generator=generator, attention_mask=attention_mask)
    labels = torch.where(sel, input_ids, torch.full_like(input_ids, IGNORE))
    return corrupt(input_ids, sel, mask_id=mask_id, random_ids=random_ids, generator=generator), labels


def clm(
    input_ids: torch.Tensor,
    *,
    doc_ids: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    pad_id: int | None = None,
) -> torch.Tensor:
    """Causal LM labels: label[i] = token[i+1] when both are real tokens of the same document."""
    real = _real(input_ids, attention_mask, pad_id)
    ok = _same_doc_next(doc_ids, input_ids) & real
    ok[:, :-1] &= real[:, 1:]
    labels = torch.full_like(input_ids, IGNORE)
    labels[:, :-1] = torch.where(ok[:, :-1], input_ids[:, 1:], labels[:, :-1])
    return labels


def mntp(
    input_ids: torch.Tensor,
    *,
    rate: float,
    mask_id: int,
    special_ids,
    random_ids: int,
    doc_ids: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    attention_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Masked next-token prediction: mask like MLM, predict token i from output i-1.

    The first token of a document has no previous position in its document, so it is never
    selected.
    """
    prev_same_doc = torch.zeros_like(input_ids, dtype=torch.bool)
    prev_same_doc[:, 1:] = _same_doc_next(doc_ids, input_ids)[:, :-1]
    sel = select_for_masking(
        input_ids, rate=rate, special_ids=special_ids, generator=generator, attention_mask=attention_mask, eligible=prev_same_doc
    )
    labels = torch.full_like(input_ids, IGNORE)
    labels[:, :-1] = torch.where(sel[:, 1:], input_ids[:, 1:], labels[:, :-1])
    return corrupt(input_ids, sel, mask_id=mask_id, random_ids=random_ids, generator=generator), labels


def loss(model, inputs: torch.Tensor, labels: torch.Tensor, *, doc_ids=None, attention_mask=None, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy with sparse prediction: the head runs only where labels != -100.

    An ettin model computes the loss itself with :func:`linear_cross_entropy` (``labels=``), so
    the [N, vocab] logits are never held at once; any other model gives logits and
    ``F.cross_entropy`` does the rest. Both give the same value (tests/test_perf_equivalence.py).
    """
    where = labels != IGNORE
    if reduction in ("sum", "mean") and getattr(model, "fused_loss", False):
        total = model(inputs, doc_ids=doc_ids, attention_mask=attention_mask, labels=labels)
        return total if reduction == "sum" else total / where.sum()
    logits = model(inputs, doc_ids=doc_ids, attention_mask=attention_mask, predict_mask=where)
    return F.cross_entropy(logits.float(), labels[where], reduction=reduction)


# -- fused output projection + cross-entropy ------------------------------------------------------
def _chunk_rows(vocab: int, device: torch.device) -> int:
    """Rows per chunk, a power of two >= 16.

    CPU: up to 2**25 logits (128 MB in fp32) per chunk, in one buffer kept between calls
    (:func:`_logits_buffer`). Thin chunks re-read the whole [V, H] weight for few rows: 64 rows of 50,368 cost
    the head 15-20% more than 512 with MKL or oneDNN alike. GPU: up to 2**26 logits (the chunk
    only has to keep the full [N, V] from existing).
    """
    limit = 1 << (25 if device.type == "cpu" else 26)
    rows = 16
    while rows * 2 * vocab <= limit:
        rows *= 2
    return rows


_BUFFERS: dict = {}  # (thread, name) -> a fused-head fp32 buffer (logits, [W | b]), kept between calls on a CPU


def _logits_buffer(numel: int, device: torch.device, name: str = "logits") -> torch.Tensor:
    """A flat fp32 buffer of at least ``numel`` elements for one chunk of logits (or another of
    the fused head's per-call arrays, by ``name``).

    On a CPU it is kept between steps: a fresh 100 MB buffer is mmap'ed and page-faulted in on
    every step (glibc serves anything over 32 MB that way), ~10 ms a step at 17m. On a GPU the
    caching allocator already reuses memory, so nothing is kept.
    """
    if device.type != "cpu":
        return torch.empty(numel, device=device, dtype=torch.float32)
    key = (threading.get_ident(), name)  # two threads computing heads at once must not share it
    buf = _BUFFERS.get(key)
    if buf is None or buf.numel() < numel:
        with torch.inference_mode(False):  # a normal tensor: usable outside inference mode later
            buf = torch.empty(numel, dtype=torch.float32)
        _BUFFERS[key] = buf
    return buf


TINY_PROB = 1e-30  # below it -log p(target) loses digits (fp32's normal numbers end at 1.2e-38), or p is 0


def _probs_and_nll(z: torch.Tensor, safe: torch.Tensor, valid: torch.Tensor, row_logits, *, one_exp: bool):
    """Softmax of the fp32 logits ``z`` [C, V], computed in place, and each row's -log p(target).

    ``one_exp`` (CPU): softmax, then -log of the target's probability: one exp per logit, where
    log-softmax followed by exp took two (a 410 x 50,368 chunk: 10.4 -> 4.1 ms on 2 cores). Rows
    whose target probability is below ``TINY_PROB`` (a loss above 69) get logsumexp - logit from
    their logits, recomputed by ``row_logits(rows)``, so the loss stays exact there. Otherwise
    (GPU, where a pass over the chunk is cheap and the check would synchronise): log-softmax,
    then exp.
    """
    if not one_exp:
        logp = torch.log_softmax(z, -1, out=z)
        nll = logp.gather(1, safe).squeeze(1).neg_()
        return logp.exp_(), nll
    p = torch.ops.aten._softmax.out(z, -1, False, out=z)
    pt = p.gather(1, safe).squeeze(1)
    nll = pt.log().neg_()
    low = (pt < TINY_PROB) & valid
    if bool(low.any()):
        rows = low.nonzero().squeeze(1)
        zr = row_logits(rows).float()
        nll[rows] = torch.logsumexp(zr, -1) - zr.gather(1, safe[rows]).squeeze(1)
    return p, nll


class _LinearCrossEntropy(torch.autograd.Function):
    """sum_i CE(hidden_i @ weight.T + bias, target_i), computed in chunks of rows.

    The forward pass computes the loss *and* the gradients w.r.t. hidden, weight and bias one
    chunk of rows at a time (logits -> softmax -> loss; softmax - one-hot -> grads), so the
    [N, vocab] logits and their gradient never exist at once; the backward pass only scales the
    stored gradients by the incoming one. Same math as ``F.cross_entropy(F.linear(...),
    reduction="sum")``; the loss is accumulated in fp32, the softmax is taken in fp32.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk_rows):
        from ettin.model.cpu import mm_nt, use_onednn

        dev = hidden.device
        need = ctx.needs_input_grad
        grads = need[0] or need[1] or need[2]
        autocast = torch.is_autocast_enabled(dev.type)
        mm_dtype = torch.get_autocast_dtype(dev.type) if autocast else hidden.dtype
        N, V = hidden.shape[0], weight.shape[0]
        with torch.autocast(dev.type, enabled=False):
            h = hidden.to(mm_dtype)
            w = weight.to(mm_dtype)
            b = bias.to(mm_dtype) if bias is not None else None
            fp32 = mm_dtype == torch.float32 and weight.dtype == torch.float32 and hidden.dtype == torch.float32
            loss = torch.zeros((), device=dev, dtype=torch.float32)
            gh = torch.empty(hidden.shape, device=dev, dtype=hidden.dtype) if need[0] else None
            # the first chunk writes the weight/bias gradients, later ones add to them
            gw = torch.empty(weight.shape, device=dev, dtype=torch.float32) if need[1] else None
            gb = torch.empty(V, device=dev, dtype=torch.float32) if (need[2] and bias is not None) else None
            if N == 0:
                for g in (gw, gb):
                    if g is not None:
                        g.zero_()
            all_valid = bool((targets != IGNORE).all())
            C = max(1, min(N, chunk_rows))
            C = -(-N // -(-N // C)) if N else C  # equal chunks: no thin last one (1,229 rows: 3 x 410, not 512 + 512 + 205)
            # the plain (aten) fp32 path writes every chunk's products into buffers made once
            plain = fp32 and not use_onednn(h, w)
            buf = _logits_buffer(C * V, dev) if plain and N else None
            wb = hb = None
            if buf is not None and b is not None and dev.type == "cpu":
                # the bias as one more column of the product, [h | 1] @ [W | b]^T: the logits are written
                # once, instead of the bias copied into them and read back by addmm (a 410-row chunk of
                # 50,368: 25.2 -> 22.0 ms); [W | b] is filled once per call, in a kept buffer
                H = w.shape[1]
                wb = _logits_buffer(V * (H + 1), dev, "weight|bias")[: V * (H + 1)].view(V, H + 1)
                wb[:, :H].copy_(w)
                wb[:, H].copy_(b)
                hb = torch.cat((h, h.new_ones(N, 1)), 1)
            for s in range(0, N, C):
                e = min(N, s + C)
                hc, yc = h[s:e], targets[s:e]
                if buf is not None:
                    logits = buf[: (e - s) * V].view(e - s, V)
                    torch.mm(hb[s:e], wb.t(), out=logits) if wb is not None else torch.mm(hc, w.t(), out=logits)
                else:
                    logits = mm_nt(hc, w, b)
                # softmax in place (fp32) and -log p(target): one [C, V] buffer per chunk
                valid = yc != IGNORE
                safe = torch.where(valid, yc, torch.zeros_like(yc))[:, None]
                p, nll = _probs_and_nll(logits.float() if logits.dtype != torch.float32 else logits, safe, valid,
                                        lambda rows, hc=hc: mm_nt(hc[rows], w, b), one_exp=dev.type == "cpu")
                loss += (nll if all_valid else torch.where(valid, nll, torch.zeros_like(nll))).sum()
                if not grads:
                    continue
                if all_valid:
                    p.scatter_add_(1, safe, torch.full_like(nll, -1.0)[:, None])
                else:
                    p.scatter_add_(1, safe, torch.where(valid, -1.0, 0.0).to(p.dtype)[:, None])
                    p.mul_(valid[:, None].to(p.dtype))  # ignored rows: no gradient
                pm = p if fp32 else p.to(mm_dtype)
                if gh is not None:
                    if plain and gh.dtype == torch.float32:
                        torch.mm(pm, w, out=gh[s:e])
                    else:
                        gh[s:e] = mm_nt(pm, w.t()).to(gh.dtype)
                if gw is not None:
                    if fp32:
                        torch.mm(p.t(), hc, out=gw) if s == 0 else gw.addmm_(p.t(), hc)
                    elif s == 0:
                        gw.copy_(pm.t() @ hc)
                    else:
                        gw += (pm.t() @ hc).float()
                if gb is not None:
                    torch.sum(p, 0, out=gb) if s == 0 else gb.add_(p.sum(0))
        ctx.grads = (
            gh,
            gw.to(weight.dtype) if gw is not None else None,
            gb.to(bias.dtype) if gb is not None else None,
        )
        return loss

    @staticmethod
    def backward(ctx, grad_out):
        gh, gw, gb = ctx.grads
        ctx.grads = None
        out = [None if g is None else g.mul_(grad_out.to(g.dtype)) for g in (gh, gw, gb)]
        return out[0], out[1], out[2], None, None


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    *,
    reduction: str = "sum",
    chunk_rows: int | None = None,
) -> torch.Tensor:
    """``F.cross_entropy(F.linear(hidden, weight, bias).float(), targets, reduction=...)`` in chunks.

    ``hidden`` [N, H], ``weight`` [V, H] (the tied embedding), ``targets`` [N] with -100 = no
    loss. ``reduction`` "sum" or "mean" (over targets != -100). Never materialises the full
    [N, V] logits or their gradient: memory is one chunk of rows, and on a CPU the step is
    faster (no 800 MB allocations, one pass less over the logits).
    """
    if reduction not in ("sum", "mean"):
        raise ValueError(f"reduction must be 'sum' or 'mean', got {reduction!r}")
    hidden = hidden.reshape(-1, hidden.shape[-1])
    targets = targets.reshape(-1)
    total = _LinearCrossEntropy.apply(hidden, weight, bias, targets, chunk_rows or _chunk_rows(weight.shape[0], hidden.device))
    if reduction == "mean":
        return total / (targets != IGNORE).sum()
    return total


def make_batch(
    objective: str,
    input_ids: torch.Tensor,
    *,
    config,
    mask_rate: float,
    doc_ids: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    random_ids: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, labels) for ``objective`` in {mlm, clm, mntp} using a model config's special ids."""
    random_ids = random_ids or config.vocab_size
    if objective == "clm":
        return input_ids, clm(input_ids, doc_ids=doc_ids, attention_mask=attention_mask, pad_id=config.pad_id)
    common = dict(rate=mask_rate, mask_id=config.mask_id, special_ids=config.special_ids, random_ids=random_ids, generator=generator, attention_mask=attention_mask)
    if objective == "mlm":
        return mlm(input_ids, **common)
    if objective == "mntp":
        return mntp(input_ids, doc_ids=doc_ids, **common)
    raise ValueError(f"unknown objective {objective!r}")


@torch.no_grad()
def heldout_loss(model, input_ids: torch.Tensor, *, objective: str, mask_rate: float = 0.15, doc_ids=None, seed: int = 0, shift: int | None = None) -> float:
    """Mean loss of ``objective`` on held-out rows, with masks fixed by ``seed`` (eval mode).

    The same rows and masks at every checkpoint make a trajectory that is not the training
    loss's step-to-step noise. ``shift`` (MNTP only) reads masked token i at output i - shift:
    1 is MNTP's reading, 0 reads it at i as MLM does (a control: a model that learned MNTP
    does better with 1).
    """
    g = torch.Generator().manual_seed(seed)
    inputs, labels = make_batch(objective, input_ids, config=model.config, mask_rate=mask_rate, doc_ids=doc_ids, generator=g)
    if objective == "mntp" and shift == 0:  # move each label back onto its masked position
        moved = torch.full_like(labels, IGNORE)
        moved[:, 1:] = labels[:, :-1]
        labels = moved
    was = model.training
    model.eval()
    try:
        return float(loss(model, inputs, labels, doc_ids=doc_ids))
    finally:
        model.train(was)
