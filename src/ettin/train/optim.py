"""The optimiser: StableAdamW from torch-optimi (as ModernBERT trains), two parameter groups.

Weight decay is "fully decoupled" (optimi's ``decouple_lr``): each step multiplies a weight by
``1 - (lr / peak_lr) * weight_decay``, i.e. the decay follows the LR schedule, as in Composer's
DecoupledAdamW that ModernBERT used. Norm weights and biases get no decay.
"""

from __future__ import annotations

import warnings

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
    # optimi picks its triton kernels on a GPU. Elsewhere its default is a per-tensor loop; its
    # foreach path is faster on a CPU (bench/README.md) and is the same math. It is deprecated
    # in favour of triton (hence the silenced warning), and only used where triton is not.
    params = [p for g in groups for p in g["params"]]
    foreach = bool(params) and all(p.device.type == "cpu" and type(p) is torch.nn.Parameter for p in params)
    from optimi import StableAdamW

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Parameter `foreach` is deprecated", category=DeprecationWarning)
        opt = StableAdamW(
            groups, lr=cfg.lr, betas=betas, eps=cfg.eps, weight_decay=cfg.weight_decay, decouple_lr=True, max_lr=cfg.lr,
            foreach=True if foreach else None,
        )
    if foreach:
        opt.register_step_pre_hook(_foreach_where_gradients)
    return opt


def _foreach_where_gradients(opt: torch.optim.Optimizer, args, kwargs) -> None:
    """optimi's foreach step fails on a group with no gradients this step: its plain loop there.

    A step pre-hook rather than a subclass overriding ``step``: torch wraps the ``step`` of every
    optimizer class it instantiates, so a subclass calling ``super().step()`` ran the step hooks
    (and the profiler's step record) twice once optimi's own class had been used too.
    """
    if kwargs.get("param") is not None:
        return
    for g in opt.param_groups:
        if g.get("foreach") or g.get("_foreach"):
            g["_foreach"] = True
            g["foreach"] = any(p.grad is not None for p in g["params"])


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for g in optimizer.param_groups:
        g["lr"] = lr
