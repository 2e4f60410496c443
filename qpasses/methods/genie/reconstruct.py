"""The ``reconstruct`` data step: BRECQ-style block reconstruction with GENIE-M quantizers and QDrop.

Runs on a converted graph (weights read through ``weight_fq*`` FakeQuantize modules,
activations through ``act_fq*`` ones).  For the duration of the step:

* every weight FakeQuantize becomes a :class:`~qpasses.methods.genie.lib.GenieWeightQuantizer`
  (AdaRound soft bits with a rectified sigmoid, the step size learned jointly, ``floor(w/s0)``
  fixed at initialisation; ``learn_w_scale=false`` gives plain AdaRound);
* every activation FakeQuantize becomes a :class:`~qpasses.methods.genie.lib.GenieActQuantizer`
  (LSQ-learned step size, QDrop with probability ``qdrop``).

Blocks are single-entry / single-exit regions of the graph (:mod:`qpasses.methods.genie.blocks`).  In
graph order, each block's output on the quantized model's input to it is fitted to the float
block's output on the float model's input (``||.||^2`` per sample) plus the annealed rounding
regulariser ``lambda * sum(1 - |2h - 1|^beta)``.  Afterwards the rounding is hard: the float
weight tensor is overwritten with the chosen grid points and plain FakeQuantize modules (with
the learned scales) take the quantizers' places, so the result looks like any converted graph
(export, kernels) -- only its numbers changed.

Under ``torch.distributed`` each rank reconstructs on its own shard of the data; the quantizer
parameters start from rank 0's values and their gradients are averaged each step.
"""
from __future__ import annotations

import contextlib
from typing import Dict, List, Tuple

import torch
import torch.fx as fx
import torch.nn as nn

from ...errors import OptionError, StepError
from ...lang.registry import data_step
from ...numerics import FakeQuantize
from ...numerics.rounding import BetaSchedule
from ...context import RewriteContext
from ...qnodes import as_module_call, as_quantizer_call, holder_target
from .distill import DATA_SOURCE_ARG, GENIE_PRESETS, genie_setting, reads_real_data, step_data

__all__ = ["reconstruct", "install_quantizers", "bake_quantizers"]


def _const_tensor(gm: fx.GraphModule, node: fx.Node):
    if isinstance(node, fx.Node) and node.op == "get_attr":
        obj = gm
        for part in str(node.target).split("."):
            obj = getattr(obj, part)
        if isinstance(obj, torch.Tensor):
            return obj
    return None


def install_quantizers(gm: fx.GraphModule, learn_w_scale: bool = True) -> Tuple[Dict[str, nn.Module], Dict[str, nn.Module]]:
    """Swap weight / activation FakeQuantize modules for GENIE-M quantizers; returns ``(weights, acts)`` by target."""
    from .lib import GenieActQuantizer, GenieWeightQuantizer
    weights, acts = {}, {}
    calls: Dict[str, List[fx.Node]] = {}
    for n in gm.graph.nodes:
        h = holder_target(n)
        if h is not None:
            calls.setdefault(h, []).append(n)
    rc = RewriteContext(gm)
    for target, nodes in calls.items():
        try:
            mod = gm.get_submodule(target)
        except AttributeError:
            continue
        if not isinstance(mod, FakeQuantize):
            continue
        w = _const_tensor(gm, nodes[0].args[0]) if nodes[0].args else None
        if w is not None:
            if len(nodes) > 1:
                continue  # a shared weight quantizer: leave it as it is
            q = GenieWeightQuantizer(mod, w.detach(), learn_scale=learn_w_scale)
            weights[target] = q
        else:
            q = GenieActQuantizer(mod)
            acts[target] = q
        gm.set_submodule(target, q)
        for n in nodes:   # the stand-in is a stateful module: its nodes call it for the step
            as_module_call(rc, n)
    return weights, acts


def bake_quantizers(gm: fx.GraphModule) -> int:
    """Replace GENIE-M quantizers by plain FakeQuantize modules (hard rounding written into the weights)."""
    from .lib import GenieActQuantizer, GenieWeightQuantizer
    n_baked = 0
    rc = RewriteContext(gm)
    for n in list(gm.graph.nodes):
        if n.op != "call_module":
            continue
        mod = gm.get_submodule(str(n.target))
        if isinstance(mod, GenieWeightQuantizer):
            fq, w = mod.bake()
            t = _const_tensor(gm, n.args[0])
            with torch.no_grad():
                t.copy_(w.to(t.dtype))
            gm.set_submodule(str(n.target), fq)
            as_quantizer_call(rc, n)
            n_baked += 1
        elif isinstance(mod, GenieActQuantizer):
            gm.set_submodule(str(n.target), mod.bake())
            as_quantizer_call(rc, n)
            n_baked += 1
    return n_baked


@contextlib.contextmanager
def quant_enabled(mods, value: bool):
    old = [m.enabled for m in mods]
    for m in mods:
        m.enabled = value
    try:
        yield
    finally:
        for m, o in zip(mods, old):
            m.enabled = o


def _capture(gm: fx.GraphModule, nodes: List[fx.Node]) -> fx.GraphModule:
    """A GraphModule sharing ``gm``'s modules whose output is the tuple of ``nodes``' values."""
    g = fx.Graph()
    vmap: Dict[fx.Node, fx.Node] = {}
    g.graph_copy(gm.graph, vmap)
    g.output(tuple(vmap[n] for n in nodes))
    sub = fx.GraphModule(gm, g)
    sub.graph.eliminate_dead_code()
    sub.recompile()
    return sub


def _run(mod: nn.Module, x: torch.Tensor, bs: int) -> List[torch.Tensor]:
    outs: List[List[torch.Tensor]] = []
    with torch.no_grad():
        for i in range(0, x.shape[0], bs):
            r = mod(x[i:i + bs])
            outs.append(list(r) if isinstance(r, (tuple, list)) else [r])
    return [torch.cat([o[k] for o in outs], 0) for k in range(len(outs[0]))]


@data_step("reconstruct", needs_data=reads_real_data, args={
    "preset": {"type": str, "choices": tuple(GENIE_PRESETS), "default": None, "doc": "sizes for the arguments left at null"},
    "recon_iters": {"type": int, "min": 1, "max": 100000, "default": None, "doc": "optimisation steps per block"},
    "recon_batch_size": {"type": int, "min": 1, "max": 4096, "default": None, "doc": "reconstruction mini-batch"},
    "recon_samples": {"type": int, "min": 1, "default": None, "doc": "at most this many samples"},
    "data_source": DATA_SOURCE_ARG,
    "qdrop": {"type": float, "min": 0.0, "max": 0.99, "default": 0.5},
    "round_weight": {"type": float, "min": 0.0, "default": 0.01},
    "lr_round": {"type": float, "min": 0.0, "default": 0.003},
    "lr_scale": {"type": float, "min": 0.0, "default": 0.00004},
    "learn_w_scale": {"type": bool, "default": True},
    "learn_a_scale": {"type": bool, "default": True},
    "seed": {"type": int, "min": 0, "default": 0},
})
def reconstruct(ctx) -> None:
    """Block-wise reconstruction (BRECQ + QDrop) of the converted graph with GENIE-M quantizers."""
    from .blocks import extract_block, find_blocks
    from .lib import GenieActQuantizer, GenieWeightQuantizer
    from ...distributed import average_grads, broadcast_module, seeded_global_rng, world
    from ...frontend import set_training

    gm = ctx.gm
    iters = genie_setting(ctx, "recon_iters", 200)
    bs = genie_setting(ctx, "recon_batch_size", 32)
    qdrop = float(ctx.arg("qdrop", 0.5))
    if not 0.0 <= qdrop < 1.0:
        raise OptionError(f"qdrop must be in [0, 1), got {qdrop}")
    lam = float(ctx.arg("round_weight", 0.01))
    lr_round = float(ctx.arg("lr_round", 3e-3))
    lr_scale = float(ctx.arg("lr_scale", 4e-5))
    learn_w_scale = bool(ctx.arg("learn_w_scale", True))
    learn_a_scale = bool(ctx.arg("learn_a_scale", True))
    x_all = step_data(ctx, str(ctx.arg("data_source", "auto")), ctx.arg("recon_samples"))
    if x_all.shape[0] == 0:
        raise StepError("reconstruct got no samples")
    weights, acts = install_quantizers(gm, learn_w_scale)
    if not weights:
        raise StepError("reconstruct found no weight FakeQuantize modules: run it after the convert rules")
    quants = list(weights.values()) + list(acts.values())
    for q in quants:
        broadcast_module(q)
    blocks = find_blocks(gm)
    if not blocks:
        raise StepError("reconstruct found no single-entry/single-exit block with a weighted op")
    entries = [b.entry for b in blocks]
    exits = [b.exit for b in blocks]
    cap = _capture(gm, entries + exits)
    set_training(gm, False)
    with quant_enabled(quants, False):
        fp = _run(cap, x_all, 256)
    fp_out = fp[len(blocks):]
    rank, size = world()
    g = torch.Generator().manual_seed(int(ctx.arg("seed", 0) or 0) * 7919 + rank)
    sched = BetaSchedule(start=20.0, end=2.0, warmup=0.2, iters=iters)
    from ..ptq.calibrate import progress_bar
    bar = progress_bar(ctx.progress, total=len(blocks) * iters, desc="reconstruct", unit="it")
    losses = []
    # QDrop draws its masks from the global generator: seeded here (and the caller's state restored
    # afterwards), so a run is repeatable from its ``seed``
    try:
        with seeded_global_rng(int(ctx.arg("seed", 0) or 0) * 7919 + rank + 1):
            for bi, block in enumerate(blocks):
                bar.set_postfix_str(f"block {bi + 1}/{len(blocks)}", refresh=False)
                q_in = _run(_capture(gm, [block.entry]), x_all, 256)[0]
                sub = extract_block(gm, block)
                ws = [m for m in sub.modules() if isinstance(m, GenieWeightQuantizer)]
                as_ = [m for m in sub.modules() if isinstance(m, GenieActQuantizer)]
                if not ws:
                    bar.update(iters)
                    continue
                round_params = [m.q.alpha for m in ws]
                scale_params = ([m.q.scale for m in ws] if learn_w_scale else []) + \
                               ([m.fq.scale for m in as_] if learn_a_scale else [])
                groups = [{"params": round_params, "lr": lr_round}]
                if scale_params:
                    groups.append({"params": scale_params, "lr": lr_scale})
                opt = torch.optim.Adam(groups)
                for m in as_:
                    m.drop_prob = qdrop
                for m in as_:
                    m.train(True)  # QDrop only; everything else (e.g. an unfolded BatchNorm) stays in eval mode
                target = fp_out[bi]
                n = q_in.shape[0]
                last = float("nan")
                for it in range(iters):
                    idx = torch.randint(0, n, (min(bs, n),), generator=g)
                    out = sub(q_in[idx])
                    rec = (out - target[idx]).pow(2).reshape(out.shape[0], -1).sum(1).mean()
                    loss = rec
                    if sched.active(it):
                        beta = sched(it)
                        loss = loss + lam * sum(m.regularizer(beta) for m in ws)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    average_grads([p for grp in groups for p in grp["params"]])
                    opt.step()
                    last = float(rec.detach())
                    bar.update(1)
                for m in ws:
                    m.q.hard = True
                for m in as_:
                    m.drop_prob = 0.0
                for m in as_:
                    m.train(False)
                losses.append(last)
    finally:
        bar.close()
        set_training(gm, False)
    n_baked = bake_quantizers(gm)
    gm.recompile()
    ctx.info.update(blocks=len(blocks), block_sizes=[len(b.nodes) for b in blocks], samples=int(x_all.shape[0]),
                    iterations=iters, weight_quantizers=len(weights), act_quantizers=len(acts), baked=n_baked,
                    final_rec_loss=[round(v, 5) for v in losses], world_size=size)
