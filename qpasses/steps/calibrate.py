"""The ``calibrate`` data step: run batches through the graph so observers see real ranges."""
from __future__ import annotations

from typing import Any, Optional

import torch
from tqdm.auto import tqdm

from ..errors import StepError
from ..frontend import as_inputs, input_arity, set_training
from ..lang.registry import data_step
from ..numerics import Observer

__all__ = ["calibrate", "iterate_batches"]


def iterate_batches(data: Any, limit: Optional[int] = None, desc: str = "", progress: bool = False,
                    arity: Optional[int] = None):
    """Yield tuples of positional inputs from ``data`` (an iterable of batches).

    ``arity``: the model's number of positional inputs; longer batches (a ``DataLoader``'s
    ``(inputs, labels)``) give their leading ``arity`` items.
    """
    if data is None:
        raise StepError(f"{desc or 'this step'} needs data: call run(gm, data=batches) with an iterable of "
                        f"batches (tensors or tuples of inputs)")
    if isinstance(data, torch.Tensor):
        raise StepError("data must be an iterable of batches, not one tensor: wrap it as [tensor]")
    total = None
    try:
        total = len(data)
        if limit is not None:
            total = min(total, limit)
    except TypeError:
        total = limit
    it = tqdm(data, total=total, desc=desc, disable=not progress, leave=False)
    for i, batch in enumerate(it):
        if limit is not None and i >= limit:
            break
        yield as_inputs(batch, arity)


@data_step("calibrate")
def calibrate(ctx) -> None:
    """Run up to ``calib_batches`` batches of ``data`` through the graph in eval mode, no grad."""
    gm = ctx.gm
    observers = [m for m in gm.modules() if isinstance(m, Observer)]
    limit = ctx.arg("calib_batches")
    n_batches = n_samples = 0
    was_training = gm.training
    set_training(gm, False)
    try:
        with torch.no_grad():
            for inputs in iterate_batches(ctx.data, limit, "calibrate", ctx.progress, input_arity(gm)):
                gm(*inputs)
                n_batches += 1
                first = inputs[0]
                n_samples += int(first.shape[0]) if isinstance(first, torch.Tensor) and first.dim() else 1
    finally:
        set_training(gm, was_training)
    if n_batches == 0:
        raise StepError("calibrate got an empty data iterable")
    ctx.info.update(batches=n_batches, samples=n_samples, observers=len(observers))
