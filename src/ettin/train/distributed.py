"""torchrun support: process group set-up, DDP or FSDP2 wrapping, full state dicts.

Every rank reads the whole global batch (a cheap memmap slice) and keeps rows
``rank::world``; the loss is normalised by the global count of loss tokens, so the update is
the same sum whatever the world size. Checkpoints gather full (unsharded) state to rank 0 and
are written as safetensors, so they load at any world size.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    launched: bool = False  # under torchrun: a process group exists (even with one process)

    @property
    def enabled(self) -> bool:
        return self.launched or self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def all_reduce_sum(self, x: torch.Tensor) -> torch.Tensor:
        if self.enabled:
            dist.all_reduce(x, op=dist.ReduceOp.SUM)
        return x


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    return torch.device(name)


def launched_by_torchrun() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ or int(os.environ.get("WORLD_SIZE", "1")) > 1


def init(device_name: str = "auto", backend: str = "auto") -> Dist:
    """Join the torchrun process group, else a single plain process.

    ``torchrun --nproc_per_node 1`` also wraps the model (DDP or FSDP2), so the cost of each
    strategy on one GPU can be measured against a plain run.
    """
    launched = launched_by_torchrun()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(device_name)
    if device.type == "cuda":
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    if launched and not dist.is_initialized():
        be = backend if backend != "auto" else ("nccl" if device.type == "cuda" else "gloo")
        dist.init_process_group(backend=be)
    return Dist(rank=rank, world=world, local_rank=local, device=device, launched=launched)


def shutdown(d: Dist, clean: bool) -> None:
    """Leave the process group before the interpreter exits.

    Without this, a rank that finishes first tears its gloo/NCCL threads down at exit while a
    peer still talks to it, which aborts the process ("terminate called without an active
    exception") after a run that succeeded. On a clean finish the ranks meet first; after an
    error they do not (a peer may be gone), they only let go.
    """
    if not (d.launched and dist.is_initialized()):
        return
    try:
        if clean:
            dist.barrier()
    finally:
        dist.destroy_process_group()


def wrap(model: torch.nn.Module, strategy: str, d: Dist) -> torch.nn.Module:
    """DDP or FSDP2 (``fully_shard`` per block, then the root) under torchrun; as is otherwise."""
    if not d.enabled:
        return model
    if strategy == "fsdp2":
        from torch.distributed.fsdp import fully_shard

        for block in model.blocks:
            fully_shard(block)
        fully_shard(model)
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP

    return DDP(model, device_ids=[d.device.index] if d.device.type == "cuda" else None)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if hasattr(model, "module") and not hasattr(model, "blocks") else model


@contextlib.contextmanager
def grad_sync(model: torch.nn.Module, sync: bool):
    """Skip the gradient all-reduce on all but the last micro-batch of a step."""
    if hasattr(model, "no_sync") and not sync:
        with model.no_sync():
            yield
        return
    if hasattr(model, "set_requires_gradient_sync"):
        model.set_requires_gradient_sync(sync)
    yield


def full_model_state(model: torch.nn.Module, d: Dist) -> dict:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    if not d.enabled:
        return unwrap(model).state_dict()
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def full_optim_state(model: torch.nn.Module, optim: torch.optim.Optimizer, d: Dist) -> dict:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(model, optim, options=StateDictOptions(full_state_dict=True, cpu_offload=d.enabled))


def load_full_model_state(model: torch.nn.Module, state: dict, d: Dist) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    if not d.enabled:
        unwrap(model).load_state_dict(state, strict=True)
        return
    set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True))


def load_full_optim_state(model: torch.nn.Module, optim: torch.optim.Optimizer, state: dict, d: Dist) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(model, optim, state, options=StateDictOptions(full_state_dict=True))
