"""torch.distributed helpers shared by the data steps (calibration, GENIE-D / GENIE-M, GPTQ):
no-ops when no process group is initialised, so single-process code calls them unconditionally."""
from __future__ import annotations

import contextlib
from typing import Optional, Sequence, Tuple

import torch
import torch.nn as nn

__all__ = ["world", "average_grads", "broadcast_module", "seeded_global_rng"]


def world() -> Tuple[int, int]:
    """``(rank, world_size)`` of the default process group, ``(0, 1)`` when not distributed."""
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def average_grads(params: Sequence[torch.Tensor]) -> None:
    """All-reduce (mean) the gradients of parameters shared by every rank; no-op when not distributed."""
    rank, size = world()
    if size == 1:
        return
    import torch.distributed as dist
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
        p.grad.div_(size)


def broadcast_module(mod: nn.Module, src: int = 0) -> None:
    """Give every rank rank ``src``'s parameters and (non-bool) buffers; no-op when not distributed."""
    rank, size = world()
    if size == 1:
        return
    import torch.distributed as dist
    with torch.no_grad():
        for t in list(mod.parameters()) + [b for b in mod.buffers()]:
            if t.dtype != torch.bool:
                dist.broadcast(t.data, src)


@contextlib.contextmanager
def seeded_global_rng(seed: Optional[int]):
    """Within the block the global generators (the CPU's and the current CUDA device's) are
    seeded with ``seed`` (None: left as they are); the caller's generator state comes back
    afterwards.  For code that draws from them (module initialisation, ``rand_like`` masks)."""
    with torch.random.fork_rng(devices=[torch.cuda.current_device()] if torch.cuda.is_available() else []):
        if seed is not None:
            torch.manual_seed(int(seed))
        yield
