"""Training objectives as pure functions of a batch (and a random generator).

Each returns labels aligned with the model's *output* positions (-100 = no loss), so one loss
function serves all three: cross-entropy over the positions whose label is not -100, with the
prediction head run only there (sparse prediction).

- MLM: labels at the selected positions themselves.
- CLM: the label at i is the token at i+1 of the same document.
- MNTP: the token at masked position i is the label of output position i-1.
"""

from __future__ import annotations

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
    """Cross-entropy with sparse prediction: the head runs only where labels != -100."""
    where = labels != IGNORE
    logits = model(inputs, doc_ids=doc_ids, attention_mask=attention_mask, predict_mask=where)
    return F.cross_entropy(logits.float(), labels[where], reduction=reduction)


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
