"""The ``distill`` data step (GENIE-D) and ``calibrate_synthetic``.

``distill`` synthesises calibration inputs from the float model's own BatchNorm statistics
(see :mod:`qpasses.methods.genie.lib`).  It must run on the float graph, before ``canonicalize``
folds the BatchNorms away.  The synthetic set goes to ``gm.meta["qpasses.synthetic_data"]`` (a
tensor ``[samples, *input shape]``; under ``torch.distributed`` this rank's shard), where
``calibrate_synthetic`` and ``reconstruct`` find it; ``save_to`` also writes it with
``torch.save``.
"""
from __future__ import annotations

import os
from typing import Any, List, Optional

import torch
import torch.fx as fx

from ...errors import OptionError, StepError
from ...frontend import as_inputs, input_arity
from ...lang.registry import data_step
from ..ptq.calibrate import iterate_batches, run_calibration

__all__ = ["distill", "calibrate_synthetic", "SYNTHETIC_KEY", "step_data", "synthetic_data", "GENIE_PRESETS",
           "genie_setting"]

SYNTHETIC_KEY = "qpasses.synthetic_data"

#: what the ``genie`` recipes' ``preset`` fills in for the size options left at null
#: * ``fast`` (the default): a ResNet-18-sized model (224x224) in minutes on a 2-core CPU
#:   (measured in docs/recipes/genie.md); a quick start, not the best result;
#: * ``thorough``: the recipe's defaults before presets (minutes on the small CNNs of the docs'
#:   results table, hours on ResNet-18 on a CPU);
#: * ``paper``: the counts of the GENIE authors' public reference implementation (1024 samples
#:   distilled in batches of 128 for 4000 steps each, 20000 reconstruction steps per block in
#:   batches of 32): GPU-sized work.
GENIE_PRESETS = {
    "fast": {"samples": 16, "distill_batch_size": 16, "distill_iters": 8, "recon_iters": 8, "recon_batch_size": 16},
    "thorough": {"samples": 256, "distill_batch_size": 64, "distill_iters": 300, "recon_iters": 300,
                 "recon_batch_size": 32},
    "paper": {"samples": 1024, "distill_batch_size": 128, "distill_iters": 4000, "recon_iters": 20000,
              "recon_batch_size": 32},
}


def genie_setting(ctx, name: str, default: int) -> int:
    """A size option of the GENIE steps: the value given, else the ``preset``'s, else ``default``."""
    v = ctx.arg(name)
    if v is None:
        preset = ctx.arg("preset")
        if preset is not None:
            if preset not in GENIE_PRESETS:
                raise OptionError(f"preset must be one of {', '.join(GENIE_PRESETS)}, got {preset!r}")
            v = GENIE_PRESETS[preset].get(name)
    if v is None:
        v = default
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise OptionError(f"{name} must be a positive int, got {v!r}")
    return int(v)


def synthetic_data(gm: fx.GraphModule) -> Optional[torch.Tensor]:
    """The synthetic set a ``distill`` step left on ``gm`` (None if none)."""
    return getattr(gm, "meta", {}).get(SYNTHETIC_KEY)


def _input_shape(gm: fx.GraphModule, override: Any) -> List[int]:
    if override:
        if not isinstance(override, (list, tuple)) or not all(isinstance(s, int) and s > 0 for s in override):
            raise OptionError(f"input_shape must be a list of positive ints (one sample, no batch dim), got {override!r}")
        return list(override)
    phs = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(phs) != 1:
        raise StepError(f"distill synthesises one input tensor, but the graph has {len(phs)} inputs")
    ex = getattr(gm, "meta", {}).get("qpasses.example_inputs")
    if ex is not None:
        x = as_inputs(ex)[0]
        if isinstance(x, torch.Tensor) and x.dim() >= 2:
            return list(x.shape[1:])
    from ...frontend import node_shape
    shp = node_shape(phs[0])
    if shp is None or len(shp) < 2:
        raise StepError("distill cannot tell the input shape: trace with qpasses.trace(model, example) or pass "
                        "input_shape=[C, H, W]")
    return list(shp[1:])


def _pos_int(ctx, name: str, default: int) -> int:
    v = ctx.arg(name, default)
    if v is None:
        v = default
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise OptionError(f"{name} must be a positive int, got {v!r}")
    return int(v)


def check_bn_statistics(gm: fx.GraphModule) -> int:
    """Raise :class:`StepError` naming the cause unless ``gm`` has BatchNorm statistics to distill from.

    Refused: no BatchNorm op (none in the model, or already folded by ``canonicalize``); a
    BatchNorm without running statistics (``track_running_stats=False``: it normalises with
    the batch's own); every BatchNorm still at its initial statistics (mean 0, variance 1: the
    model was never trained, so there is nothing to learn from).  Returns the number of layers.
    """
    from ...matcher import Matcher
    m = Matcher(gm)
    bns = m.index(["batch_norm"])
    if not bns:
        raise StepError("GENIE distills its data from BatchNorm statistics, and this graph has no BatchNorm layer "
                        "(none in the model, or canonicalize already folded them: run distill first); use a "
                        "recipe with real data instead (ptq_int8, adaround)")
    initial = 0
    for bn in bns:
        v = m.view(bn)
        rm, rv = v.tensor("running_mean"), v.tensor("running_var")
        if rm is None or rv is None:
            raise StepError(f"GENIE distills its data from BatchNorm statistics, and BatchNorm {bn.name} has no "
                            f"running statistics (track_running_stats=False); use a recipe with real data instead")
        if bool((rm == 0).all()) and bool((rv == 1).all()):
            initial += 1
    if initial == len(bns):
        raise StepError(f"GENIE distills its data from BatchNorm statistics, and all {len(bns)} BatchNorm layers "
                        f"still hold their initial statistics (mean 0, variance 1): the model was never trained "
                        f"(or its statistics were not loaded), so there is nothing to distill from")
    return len(bns)


_SIZE = {"type": int, "min": 1, "default": None}
#: the ``with:`` arguments of ``distill`` (an argument not given is read from the recipe parameter of that name)
DISTILL_ARGS = {
    "preset": {"type": str, "choices": tuple(GENIE_PRESETS), "default": None, "doc": "sizes for the arguments left at null"},
    "samples": dict(_SIZE, max=1000000, doc="synthetic samples (in total over all ranks)"),
    "distill_batch_size": dict(_SIZE, max=4096, doc="samples per generator"),
    "distill_iters": dict(_SIZE, max=100000, doc="optimisation steps per distillation batch"),
    "distill_mode": {"type": str, "choices": ("genie", "generator", "latents"), "default": "genie"},
    "swing": {"type": bool, "default": True, "doc": "distill through swing convolutions"},
    "latent_dim": dict(_SIZE, max=4096), "gen_hidden": dict(_SIZE, max=4096),
    "distill_lr_g": {"type": float, "min": 0.0, "default": None}, "distill_lr_z": {"type": float, "min": 0.0, "default": None},
    "distill_lr_x": {"type": float, "min": 0.0, "default": None},
    "input_weight": {"type": float, "min": 0.0, "default": None},
    "input_mean": {"type": float, "default": None}, "input_std": {"type": float, "min": 0.0, "default": None},
    "input_shape": {"type": list, "default": None, "doc": "one sample's shape (default: from the traced example)"},
    "save_to": {"type": str, "default": None, "doc": "write the synthetic set here"},
    "seed": {"type": int, "min": 0, "default": 0},
}
def reads_real_data(arg, before) -> bool:
    """Whether a step with a ``data_source`` argument reads the run's data (``needs_data``)."""
    source = arg("data_source", "auto")
    return source == "real" or (source == "auto" and "distill" not in before)


#: ``data_source`` of the steps that read the synthetic set or the run's data
DATA_SOURCE_ARG = {"type": str, "choices": ("auto", "synthetic", "real"), "default": "auto",
                   "doc": "the distilled synthetic set, the run's data, or auto (synthetic when there is one)"}


@data_step("distill", args=DISTILL_ARGS, needs_data=False)
def distill(ctx) -> None:
    """GENIE-D: synthesise ``samples`` inputs by matching BatchNorm statistics (generator + latents)."""
    from .lib import synthesize

    gm = ctx.gm
    mode = str(ctx.arg("distill_mode", "genie"))
    if mode not in ("genie", "generator", "latents"):
        raise OptionError(f"distill_mode must be genie, generator or latents, got {mode!r}")
    samples = genie_setting(ctx, "samples", 256)
    batch_size = genie_setting(ctx, "distill_batch_size", 64)
    iters = genie_setting(ctx, "distill_iters", 200)
    check_bn_statistics(gm)
    shape = _input_shape(gm, ctx.arg("input_shape"))
    kw = {}
    for name, key in (("latent_dim", "latent_dim"), ("hidden", "gen_hidden"), ("lr_g", "distill_lr_g"), ("lr_z", "distill_lr_z"),
                      ("lr_x", "distill_lr_x"), ("input_weight", "input_weight"), ("mean", "input_mean"),
                      ("std", "input_std")):
        v = ctx.arg(key)
        if v is not None:
            kw[name] = v
    seed = ctx.arg("seed", 0)
    data, info = synthesize(gm, shape, samples, batch_size, iters, mode=mode,
                            swing=bool(ctx.arg("swing", True)), progress=ctx.progress, seed=seed, **kw)
    if not torch.isfinite(data).all():
        raise StepError("distill produced non-finite samples: lower the learning rates")
    gm.meta[SYNTHETIC_KEY] = data
    path = ctx.arg("save_to")
    if path:
        path = str(path)
        rank = info["rank"]
        if info["world_size"] > 1:
            root, ext = os.path.splitext(path)
            path = f"{root}.rank{rank}{ext or '.pt'}"
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        torch.save({"data": data, "shape": shape, "mode": mode, "info": info}, path)
        info["saved_to"] = path
    info.update(samples=int(data.shape[0]), shape=list(shape), mode=mode, iterations=iters)
    ctx.info.update(info)


def step_data(ctx, source: str = "auto", limit_samples: Optional[int] = None) -> torch.Tensor:
    """The input tensor a GENIE step works on: the synthetic set or the real ``data`` batches.

    ``source``: ``synthetic`` (error without a prior ``distill``), ``real`` (``run(gm, data=...)``)
    or ``auto`` (synthetic when present, else real).
    """
    if source not in ("auto", "synthetic", "real"):
        raise OptionError(f"data_source must be auto, synthetic or real, got {source!r}")
    syn = synthetic_data(ctx.gm)
    if source == "synthetic" or (source == "auto" and syn is not None):
        if syn is None:
            raise StepError("no synthetic data: put a distill step before this one (or use data_source=real)")
        x = syn
    else:
        if ctx.data is None:
            raise StepError("this step needs data: call run(gm, data=batches), or distill synthetic data first")
        xs = []
        n = 0
        for inputs in iterate_batches(ctx.data, None, "data", False, input_arity(ctx.gm)):
            if len(inputs) != 1 or not isinstance(inputs[0], torch.Tensor):
                raise StepError("GENIE steps take batches of one input tensor")
            xs.append(inputs[0])
            n += inputs[0].shape[0]
            if limit_samples is not None and n >= limit_samples:
                break
        if not xs:
            raise StepError("the data iterable is empty")
        x = torch.cat(xs, 0)
        from ...distributed import world
        rank, size = world()
        if size > 1:
            x = x[rank::size]
    if limit_samples is not None:
        x = x[:limit_samples]
    return x.detach()


class _Overlay:
    """A step context with some arguments overridden (the rest read through)."""

    def __init__(self, ctx, **override):
        self._ctx, self._over = ctx, override
        self.gm, self.progress, self.info = ctx.gm, ctx.progress, ctx.info

    def arg(self, name: str, default: Any = None) -> Any:
        if name in self._over:
            return self._over[name]
        return self._ctx.arg(name, default)


@data_step("calibrate_synthetic", needs_data=reads_real_data, args={
    "data_source": DATA_SOURCE_ARG,
    "calib_batch_size": {"type": int, "min": 1, "default": 64, "doc": "batch size of calibration"},
    "distributed": {"type": "any", "choices": ("auto", True, False), "default": "auto"},
})
def calibrate_synthetic(ctx) -> None:
    """``calibrate`` on the synthetic set (``data_source`` auto/synthetic/real), in batches of ``calib_batch_size``.

    Under ``torch.distributed`` each rank already holds its own shard of the set: the observers
    are all-reduced afterwards, as in ``calibrate``."""
    x = step_data(ctx, str(ctx.arg("data_source", "auto")))
    bs = _pos_int(ctx, "calib_batch_size", 64)
    batches = [x[i:i + bs] for i in range(0, x.shape[0], bs)]
    run_calibration(_Overlay(ctx, calib_batches=None, shard_data=False, no_data="error"), batches,
                    "calibrate_synthetic")
    ctx.info["source"] = "synthetic" if synthetic_data(ctx.gm) is not None and ctx.arg("data_source", "auto") != "real" \
        else "real"
