"""The ``calibrate`` data step: run batches through the graph so observers see real ranges.

Options (recipe parameters or step arguments):

* ``calib_batches``: at most this many batches (counted over all ranks).
* ``no_data``: what to do when ``run(gm)`` got no data: ``error`` (the default) or
  ``first_batch``: the observers get a placeholder range and are marked, so that the
  ``first_batch_init`` step after ``convert`` turns their fake quantizers into ones that take
  their scale from the first batch they see (training recipes: ``qat``, ``bnn``).
* ``distributed``: ``auto`` (the default: data-parallel when a ``torch.distributed`` process
  group is initialised and has more than one rank), ``true`` (initialise the default group
  from the ``torchrun`` environment variables if needed) or ``false``.
* ``shard_data``: under ``distributed``, rank ``r`` of ``W`` calibrates on batches
  ``r, r + W, r + 2W, ...`` of ``data`` (true, the default) or on all of ``data``, which is
  then already this rank's shard (false: e.g. a ``DataLoader`` with a ``DistributedSampler``).

Data-parallel calibration: each rank runs its shard, then the observers' statistics are
all-reduced (:func:`qpasses.numerics.observers.sync_observers`) before ``convert`` computes
qparams, so every rank ends with the same ranges. See ``docs/distributed.md``.
"""
from __future__ import annotations

import os
from typing import Any, List, Optional

import torch
from tqdm.auto import tqdm

from ...errors import OptionError, StepError
from ...frontend import as_inputs, input_arity, set_training
from ...lang.registry import data_step
from ...numerics import Observer
from ...numerics.observers import HistogramObserver, distributed_refusal, sync_observers

__all__ = ["calibrate", "iterate_batches", "progress_bar", "calibration_world", "mark_first_batch",
           "FIRST_BATCH_KEY"]

#: key of an observer's ``qpasses_config`` marking it for first-batch initialisation
FIRST_BATCH_KEY = "first_batch_init"


def progress_bar(progress: bool, **kw):
    """A tqdm bar for a long step (elapsed, rate and time left when the total is known), or a
    disabled one.  Under ``torch.distributed`` only rank 0 draws."""
    from ...distributed import world
    rank, _ = world()
    return tqdm(disable=(not progress) or rank != 0, leave=False, dynamic_ncols=True, **kw)


def iterate_batches(data: Any, limit: Optional[int] = None, desc: str = "", progress: bool = False,
                    arity: Optional[int] = None, rank: int = 0, world_size: int = 1):
    """Yield tuples of positional inputs from ``data`` (an iterable of batches).

    ``arity``: the model's number of positional inputs; longer batches (a ``DataLoader``'s
    ``(inputs, labels)``) give their leading ``arity`` items.  ``rank`` / ``world_size``: yield
    only batches ``rank, rank + world_size, ...`` (``limit`` counts all batches).  A float input
    with NaN or inf raises a StepError that says the data is not finite (every data step reads
    its batches here, so none reports bad data as an overflow of the model).
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
    bar = progress_bar(progress, total=total, desc=desc, unit="batch")
    try:
        for i, batch in enumerate(data):
            if limit is not None and i >= limit:
                break
            bar.update(1)
            if i % world_size != rank:
                continue
            inputs = as_inputs(batch, arity)
            for k, t in enumerate(inputs):
                if _not_finite(t):
                    step = f" ({desc})" if desc else ""
                    raise StepError(f"calibration batch {i} has NaN or inf in input {k}{step}: the data is not "
                                    f"finite (this is not an overflow inside the model)")
            yield inputs
    finally:
        bar.close()


def _not_finite(t: Any) -> bool:
    """Whether ``t`` is a float tensor or array holding NaN or inf."""
    if isinstance(t, torch.Tensor):
        return t.is_floating_point() and not bool(torch.isfinite(t).all())
    kind = getattr(getattr(t, "dtype", None), "kind", None)   # a NumPy array (ONNX calibration data)
    if kind == "f":
        import numpy as np
        return not bool(np.isfinite(t).all())
    return False


def calibration_world(ctx) -> tuple:
    """``(rank, world_size)`` the step calibrates with, from its ``distributed`` option."""
    import torch.distributed as dist
    mode = ctx.arg("distributed", "auto")
    mode = "auto" if mode is None else mode
    if isinstance(mode, str):
        low = mode.lower()
        mode = {"auto": "auto", "true": True, "1": True, "yes": True, "on": True,
                "false": False, "0": False, "no": False, "off": False}.get(low, mode)
    if mode not in ("auto", True, False):
        raise OptionError(f"distributed must be auto, true or false, got {mode!r}")
    if mode is False:
        return 0, 1
    ready = dist.is_available() and dist.is_initialized()
    if mode is True and not ready:
        if not dist.is_available():
            raise StepError("distributed=true, but this torch build has no torch.distributed")
        missing = [k for k in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE") if k not in os.environ]
        if missing:
            raise StepError("distributed=true, but no process group is initialised and the environment lacks "
                            f"{', '.join(missing)}: start the processes with torchrun, or call "
                            "torch.distributed.init_process_group first")
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        ready = True
    if not ready:
        return 0, 1
    return dist.get_rank(), dist.get_world_size()


def mark_first_batch(observers: List[Observer]) -> int:
    """Give observers that saw no data a placeholder range and mark them for ``first_batch_init``.

    The placeholder only lets ``convert`` build a fake quantizer; the scale it gets is replaced
    from the first batch (``qpasses.methods.qat.lib.FirstBatchFakeQuantize``).
    """
    n = 0
    for obs in observers:
        if obs.has_data:
            continue
        if obs.axis is None:
            x = torch.tensor([-1.0, 1.0])
        else:  # a single channel along the observer's axis: the real count comes with the first batch
            nd = (obs.axis + 1 if obs.axis >= 0 else -obs.axis) + 1
            shape = [1] * nd
            shape[1 if obs.axis % nd == 0 else 0] = 2
            x = torch.tensor([-1.0, 1.0]).reshape(shape)
        obs(x.to(obs.min_val.device))
        cfg = getattr(obs, "qpasses_config", None)
        obs.__dict__["qpasses_config"] = dict(cfg or {}, **{FIRST_BATCH_KEY: True})
        n += 1
    return n


#: the ``with:`` arguments of ``calibrate`` (an argument not given is read from the recipe parameter of that name)
CALIBRATE_ARGS = {
    "calib_batches": {"type": int, "min": 1, "default": None, "doc": "at most this many batches (default all)"},
    "no_data": {"type": str, "choices": ("error", "first_batch"), "default": "error",
                "doc": "without data: error, or first_batch (scales from the first training batch)"},
    "distributed": {"type": "any", "choices": ("auto", True, False), "default": "auto",
                    "doc": "data-parallel over torch.distributed (auto: when a process group is up)"},
    "shard_data": {"type": bool, "default": True, "doc": "distributed: each rank calibrates on its share of the batches"},
}


@data_step("calibrate", args=CALIBRATE_ARGS, needs_data=lambda arg, before: arg("no_data", "error") != "first_batch")
def calibrate(ctx) -> None:
    """Run up to ``calib_batches`` batches of ``data`` through the graph in eval mode, no grad
    (data-parallel under ``torch.distributed``; ``no_data=first_batch`` for training recipes)."""
    run_calibration(ctx, ctx.data, "calibrate")


def run_calibration(ctx, data: Any, desc: str) -> None:
    """The body of ``calibrate`` on ``data`` (``ctx`` gives the options, the graph and ``info``)."""
    gm = ctx.gm
    observers = [m for m in gm.modules() if isinstance(m, Observer)]
    no_data = str(ctx.arg("no_data", "error") or "error")
    if no_data not in ("error", "first_batch"):
        raise OptionError(f"no_data must be 'error' or 'first_batch', got {no_data!r}")
    if data is None and no_data == "first_batch":
        n = mark_first_batch(observers)
        ctx.info.update(batches=0, samples=0, observers=len(observers), first_batch_init=n)
        return
    rank, size = calibration_world(ctx)
    if size > 1:
        for o in observers:
            why = distributed_refusal(o)
            if why:
                raise StepError(f"calibrate: {why}")
    shard = bool(ctx.arg("shard_data", True)) if size > 1 else False
    limit = ctx.arg("calib_batches")
    n_batches = n_samples = 0
    was_training = gm.training
    set_training(gm, False)
    hists = [o for o in observers if isinstance(o, HistogramObserver)] if size > 1 else []
    try:
        with torch.no_grad():
            batches = iterate_batches(data, limit, desc, ctx.progress, input_arity(gm),
                                      rank if shard else 0, size if shard else 1)
            # histogram grids: rank 0 bins its first batch (the global first one), then every
            # other rank receives its grids before binning anything
            pending = bool(hists)
            for inputs in batches:
                if pending and rank != 0:
                    _share_histogram_grid(hists, rank)
                    pending = False
                gm(*inputs)
                if pending:
                    _share_histogram_grid(hists, rank)
                    pending = False
                n_batches += 1
                x0 = inputs[0]
                n_samples += int(x0.shape[0]) if isinstance(x0, torch.Tensor) and x0.dim() else 1
            if pending:  # this rank got no batch: it still takes part in the grid exchange
                _share_histogram_grid(hists, rank)
    finally:
        set_training(gm, was_training)
    if size > 1:
        import torch.distributed as dist
        counts = torch.tensor([n_batches, n_samples], dtype=torch.float64,
                              device="cuda" if dist.get_backend() == "nccl" else "cpu")
        dist.all_reduce(counts)
        local_batches = n_batches
        n_batches, n_samples = (int(v) for v in counts.tolist())
        if n_batches == 0:
            raise StepError("calibrate got an empty data iterable (on every rank)")
        try:
            sync_observers(observers)
        except ValueError as e:
            raise StepError(f"calibrate: {e}") from None
        ctx.info.update(world_size=size, rank=rank, local_batches=local_batches)
    elif n_batches == 0:
        raise StepError("calibrate got an empty data iterable")
    ctx.info.update(batches=n_batches, samples=n_samples, observers=len(observers))
    _check_ranges(ctx, gm, observers)


def _check_ranges(ctx, gm, observers: List[Observer]) -> None:
    """Warn about (``strict_calibration``: refuse) observers whose value was constant on all the data: their
    range is empty and the scale falls back to the smallest float32 step, which is rarely what
    was meant (all-zero or constant calibration data, a dead branch)."""
    import warnings
    names: dict = {}
    for n in gm.graph.nodes:
        if n.op == "call_module":
            names.setdefault(n.target, n.name)
    flat = []
    for target, mod in gm.named_modules():
        if isinstance(mod, Observer) and getattr(mod, "has_data", True) and "min_val" in mod._buffers:
            lo, hi = mod.min_val, mod.max_val
            if lo.numel() and bool(torch.equal(lo, hi)):
                flat.append(names.get(target, target))
    if not flat:
        return
    msg = (f"calibrate: {len(flat)} observed value(s) were constant on all the calibration data (empty range): "
           f"{', '.join(flat[:8])}{' ...' if len(flat) > 8 else ''}; check the data (all zeros? constant?)")
    if ctx.strict_calibration:
        raise StepError(msg + " (strict_calibration=True)")
    ctx.report.warnings.append(msg)
    ctx.info["constant_ranges"] = flat
    warnings.warn(msg, stacklevel=2)


def _share_histogram_grid(hists: List[HistogramObserver], rank: int) -> None:
    """After rank 0's first batch (the global first batch), give every rank its histogram grids.

    One process would bin all the data on the first batch's ``[0, max|x|]`` times a power of
    two; with the same starting grid on every rank, the ranks' grids differ by powers of two
    and their histograms merge exactly.  Ranks other than 0 may already have binned their first
    batch on a grid of their own: it is re-binned (exact unless the ratio is not a power of two).
    """
    import torch.distributed as dist
    dev = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    tops = torch.tensor([float(h.hist_max) if (rank == 0 and h.hist_max.numel()) else 0.0 for h in hists],
                        dtype=torch.float32, device=dev)
    dist.broadcast(tops, 0)
    for h, top in zip(hists, tops.tolist()):
        if rank == 0 or top <= 0:
            continue
        if h.histogram.numel():
            _regrid(h, top)
        else:
            h.start_grid(top)


def _regrid(h: HistogramObserver, base: float) -> None:
    cur = float(h.hist_max)
    if cur == base:
        return
    # the smallest base * 2**k at or above the current range, then re-bin onto it
    top = base
    while top < cur:
        top *= 2
    h._rebin(top)
