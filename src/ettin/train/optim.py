"""The optimiser: StableAdamW from torch-optimi (as ModernBERT trains), two parameter groups.

Weight decay is "fully decoupled" (optimi's ``decouple_lr``): each step multiplies a weight by
``1 - (lr / peak_lr) * weight_decay``, i.e. the decay follows the LR schedule, as in Composer's
DecoupledAdamW that ModernBERT used. Norm weights and biases get no decay.
"""

from __future__ import annotations

import torch

from ettin.train.recipe import OptimSection


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Decay 2-D weights (linear layers and the embedding); never norms or biases."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.ndim >= 2 else no_decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_optimizer(model: torch.nn.Module, cfg: OptimSection) -> torch.optim.Optimizer:
    groups = param_groups(model, cfg.weight_decay)
    betas = (float(cfg.betas[0]), float(cfg.betas[1]))
    if cfg.name == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=betas, eps=cfg.eps, weight_decay=cfg.weight_decay)
    from optimi import StableAdamW

    # foreach on CPU keeps the per-tensor loop cheap; triton is picked by optimi on GPU when present.
    return StableAdamW(groups, lr=cfg.lr, betas=betas, eps=cfg.eps, weight_decay=cfg.weight_decay, decouple_lr=True, max_lr=cfg.lr)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for g in optimizer.param_groups:
        g["lr"] = lr
