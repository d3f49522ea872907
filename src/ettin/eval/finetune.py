"""What fine-tuned tasks share: pooling, padded batches, a fresh copy of the backbone, the schedule.

Pooling: encoders ``mean`` (over real tokens) or ``cls`` (position 0); decoders ``last`` (the
last real token, the only one that has seen the whole input) or ``mean``.
"""

from __future__ import annotations

import copy
import math
import random

import torch
import torch.nn as nn

from ettin.model import packing as P

pool = P.pool_padded  # [B, L, H] right-padded -> [B, H]: what glue and retrieval pool with


def pooling_for(config, opts) -> str:
    """``opts.pooling`` if set, else the side's default: encoders ``encoder_pooling`` (mean),
    decoders ``decoder_pooling`` (last), as the authors' sentence-transformers setup pools."""
    if getattr(opts, "pooling", None):
        return opts.pooling
    return opts.decoder_pooling if config.causal else opts.encoder_pooling


def pad_batch(seqs: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    x, am, lengths = P.pad_batch(seqs, pad_id)
    return x.to(device), (am.to(device) if am is not None else None), lengths.to(device)


def frame(ids: list[int], cls_id: int, sep_id: int, max_length: int) -> list[int]:
    """``[CLS] ids [SEP]`` cut to ``max_length``."""
    return [cls_id, *ids[: max(0, max_length - 2)], sep_id]


def frame_pair(a: list[int], b: list[int] | None, cls_id: int, sep_id: int, max_length: int) -> list[int]:
    """``[CLS] a [SEP] (b [SEP])``, truncating the longer text first (longest-first)."""
    if b is None:
        return frame(a, cls_id, sep_id, max_length)
    a, b = list(a), list(b)
    budget = max_length - 3
    while len(a) + len(b) > budget:
        if len(a) >= len(b):
            a.pop()
        else:
            b.pop()
    return [cls_id, *a, sep_id, *b, sep_id]


def fresh_copy(model) -> nn.Module:
    """A trainable deep copy of the backbone (the evaluated model itself is never touched)."""
    m = copy.deepcopy(model)
    m.train()
    for p in m.parameters():
        p.requires_grad_(True)
    return m


def embed(model, seqs: list[list[int]], *, pad_id: int, pooling: str, batch_size: int, normalize: bool = False) -> torch.Tensor:
    """Pooled hidden states of many sequences, [N, H] fp32 on the model's device.

    Through :func:`ettin.model.packing.pooled`: packed rows where attention skips masked blocks
    (flex, CUDA), else padded batches longest first. Each forward pass holds at most
    ``batch_size`` rows of the longest sequence's length (the memory the caller budgeted).
    """
    if not seqs:
        return torch.zeros(0, model.config.hidden)
    longest = max(len(s) for s in seqs)
    return P.pooled(model, seqs, pad_id=pad_id, pooling=pooling, token_budget=batch_size * max(1, longest),
                  max_rows=batch_size, normalize=normalize)


def optimizer(params, lr: float) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.98), eps=1e-6, weight_decay=0.01)


def linear_schedule(opt, total_steps: int, warmup: float = 0.06):
    w = max(1, int(round(total_steps * warmup)))

    def f(step: int) -> float:
        if step < w:
            return (step + 1) / w
        return max(0.0, (total_steps - step) / max(1, total_steps - w))

    return torch.optim.lr_scheduler.LambdaLR(opt, f)


def shuffled(n: int, seed: int) -> list[int]:
    idx = list(range(n))
    random.Random(seed).shuffle(idx)
    return idx


def steps_per_epoch(n: int, batch_size: int) -> int:
    return max(1, math.ceil(n / batch_size))
