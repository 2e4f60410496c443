"""Balancing data steps: ``smooth_scales`` (SmoothQuant) and ``awq_scales`` (AWQ).

Both find the layer groups of the graph from its structure
(:func:`qpasses.methods.balance.find_groups`: a producer whose channels can absorb a
per-channel scale, and the linears it feeds), run the calibration data through the graph to
collect what each group's consumers read, choose one scale per producer channel and record the
plan on the nodes.  The ``smooth`` rule family (rules/smooth.yaml) then folds the scales, in a
stage checked ``verify: exact``.

* ``smooth_scales`` -- SmoothQuant (Xiao et al., 2023, *SmoothQuant: Accurate and Efficient
  Post-Training Quantization for Large Language Models*):
  ``s_j = max|X_j|^alpha / max|W_{:,j}|^(1 - alpha)`` over the calibration tokens and over the
  weight columns of every consumer that reads channel ``j``; outlier channels of the activation
  move into the weights, which quantize more easily per output channel.
* ``awq_scales`` -- AWQ (Lin et al., 2024, *AWQ: Activation-aware Weight Quantization for LLM
  Compression and Acceleration*): ``s_j = mean|X_j|^alpha`` (normalised to geometric mean 1),
  ``alpha`` chosen per group on a grid of ``grid`` points in ``[0, 1)`` to minimise the group's
  output error ``sum_i ||(X_i / s) Q(W_i s)^T - X_i W_i^T||^2`` on calibration rows, with ``Q``
  the same int4 group quantizer the ``weight_int4`` family applies afterwards.  ``alpha = 0``
  (no scaling: round-to-nearest) is on the grid, so the chosen scales never do worse than RTN on
  the calibration rows.  (AWQ's weight-clipping search is not done here.)

Both record, in ``pm.report.steps``, each group (``producer -> consumers``) and each producer
refused with its reason; the rule counters of the ``smooth`` family say the same per node.
"""
from __future__ import annotations

import math
from typing import Dict, List

import torch
import torch.fx as fx

from ..actions.smooth import NODE_KEY, PLAN_KEY, REFUSED_KEY
from ..errors import StepError
from ..frontend import input_arity
from ..lang.registry import data_step
from ..methods.balance import Group, find_groups, run_recording
from ..ops import OpView, get_attr_value
from .calibrate import iterate_batches

__all__ = ["smooth_scales", "awq_scales", "collect_inputs", "smoothquant_scale", "awq_search",
           "int4_group_fake_quant"]


def _weight(gm: fx.GraphModule, node: fx.Node) -> torch.Tensor:
    v = OpView(node, gm, "linear").get("weight")
    if isinstance(v, fx.Node):
        v = get_attr_value(gm, str(v.target))
    return v.detach().float()


class _InputStats:
    """Per input column of a linear: max |x|, sum |x|, row count, and (optionally) sample rows."""

    def __init__(self, K: int, keep_rows: int):
        self.amax = torch.zeros(K)
        self.asum = torch.zeros(K, dtype=torch.float64)
        self.n = 0
        self.keep_rows = keep_rows
        self.rows: List[torch.Tensor] = []
        self.kept = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).float()
        a = x.abs()
        self.amax = torch.maximum(self.amax, a.amax(0))
        self.asum += a.sum(0, dtype=torch.float64)
        self.n += x.shape[0]
        if self.keep_rows and self.kept < 4 * self.keep_rows:
            self.rows.append(x.clone())
            self.kept += x.shape[0]

    def sample(self, seed: int = 0) -> torch.Tensor:
        x = torch.cat(self.rows) if self.rows else torch.zeros(0, self.amax.numel())
        if x.shape[0] > self.keep_rows:
            g = torch.Generator().manual_seed(seed)
            x = x[torch.randperm(x.shape[0], generator=g)[: self.keep_rows]]
        return x


def collect_inputs(ctx, gm: fx.GraphModule, groups: List[Group], keep_rows: int = 0,
                   desc: str = "balance") -> Dict[fx.Node, _InputStats]:
    """Run the calibration data; statistics of every consumer's input, by input node."""
    first: Dict[fx.Node, fx.Node] = {}
    for g in groups:
        for c in g.consumers:
            x = OpView(c.node, gm, "linear").get("input")
            first.setdefault(x, c.node)
    stats: Dict[fx.Node, _InputStats] = {}

    watch = {}
    for x, c in first.items():
        def cb(node, _out, interp, x=x):
            v = interp.env[x]
            st = stats.get(x)
            if st is None:
                st = stats[x] = _InputStats(int(v.shape[-1]), keep_rows)
            st.add(v)
        watch[c] = cb
    n = 0
    for batch in iterate_batches(ctx.data, ctx.arg("calib_batches"), desc=desc, progress=ctx.progress,
                                 arity=input_arity(gm)):
        run_recording(gm, batch, watch=watch)
        n += 1
    if n == 0:
        raise StepError(f"{desc}: the calibration data has no batch")
    ctx.info["batches"] = n
    return stats


def _to_producer(values: torch.Tensor, channels: torch.Tensor, size: int, fill: float = 0.0) -> torch.Tensor:
    """Per-column values -> per producer channel (max over the columns mapped to it)."""
    out = torch.full((size,), fill, dtype=values.dtype)
    return out.scatter_reduce(0, channels, values, reduce="amax", include_self=True)


def smoothquant_scale(group: Group, xmax: torch.Tensor, wmax: torch.Tensor, alpha: float) -> torch.Tensor:
    """``s = max|X|^alpha / max|W|^(1 - alpha)`` on the group's scaled channels, 1 elsewhere."""
    s = torch.ones(group.size, dtype=torch.float64)
    idx = group.scaled
    xm = xmax[idx].double()
    wm = wmax[idx].double().clamp(min=1e-5)
    sub = xm.clamp(min=1e-5).pow(alpha) / wm.pow(1.0 - alpha)
    sub = torch.where(xm > 0, sub, torch.ones_like(sub)).clamp(min=1e-5)
    s[idx] = sub
    return s


def _plan(gm: fx.GraphModule, groups: List[Group], refused, scales: Dict[int, torch.Tensor], ctx) -> None:
    for node in gm.graph.nodes:
        for k in (PLAN_KEY, REFUSED_KEY, NODE_KEY):
            node.meta.pop(k, None)
    for r in refused:
        r.producer.meta[REFUSED_KEY] = r.reason
    for i, g in enumerate(groups):
        if i not in scales:
            continue
        if g.kind == "scale_node":
            plan = {"group": g, "scale": scales[i], "mul": None}
            for c in g.consumers:
                c.node.meta[NODE_KEY] = plan
        else:
            g.producer.meta[PLAN_KEY] = {"group": g, "scale": scales[i]}
    ctx.info["groups"] = [g.describe() for i, g in enumerate(groups) if i in scales]
    ctx.info["refused"] = {r.producer.name: r.reason for r in refused}


def _first_inputs(ctx, gm):
    for batch in iterate_batches(ctx.data, 1, desc="balance", progress=False, arity=input_arity(gm)):
        return batch
    raise StepError("balancing needs data: call run(gm, data=batches)")


@data_step("smooth_scales", args={"alpha": {"type": float, "min": 0.0, "max": 1.0},
                                  "scale_nodes": {"type": bool}, "calib_batches": {"type": int}})
def smooth_scales(ctx) -> None:
    """SmoothQuant's scales for every group of the graph (folded by the ``smooth`` family)."""
    gm = ctx.gm
    alpha = float(ctx.arg("alpha", 0.5))
    groups, refused = find_groups(gm, _first_inputs(ctx, gm), scale_nodes=bool(ctx.arg("scale_nodes", False)))
    stats = collect_inputs(ctx, gm, groups, desc="smooth_scales")
    scales = {}
    for i, g in enumerate(groups):
        xmax = torch.zeros(g.size)
        wmax = torch.zeros(g.size)
        for c in g.consumers:
            x = OpView(c.node, gm, "linear").get("input")
            xmax = torch.maximum(xmax, _to_producer(stats[x].amax, c.channels, g.size))
            wmax = torch.maximum(wmax, _to_producer(_weight(gm, c.node).abs().amax(0), c.channels, g.size))
        scales[i] = smoothquant_scale(g, xmax, wmax, alpha)
    _plan(gm, groups, refused, scales, ctx)
    ctx.info["alpha"] = alpha


def int4_group_fake_quant(w: torch.Tensor, group_size: int, symmetric: bool) -> torch.Tensor:
    """What ``Int4GroupFakeQuantize.fit(w, group_size, symmetric)(w)`` returns, up to the last bit (the quantizer the
    ``weight_int4`` family attaches; same qparams as ``packing.quantize_int4``), without packing the
    codes: the search calls it for every candidate.  ``K`` must be a multiple of ``group_size``."""
    n, k = w.shape
    wg = w.float().reshape(n, k // group_size, group_size)
    if symmetric:
        amax = wg.abs().amax(-1, keepdim=True)
        sc = torch.where(amax > 0, amax / 7.0, torch.ones_like(amax))
        return (torch.clamp(torch.round(wg / sc) + 8, 0, 15) - 8).mul_(sc).reshape(n, k)
    lo = torch.minimum(wg.amin(-1, keepdim=True), torch.zeros(()))
    hi = torch.maximum(wg.amax(-1, keepdim=True), torch.zeros(()))
    sc = torch.where(hi > lo, (hi - lo) / 15.0, torch.ones_like(hi))
    z = torch.clamp(torch.round(-lo / sc), 0, 15)
    return (torch.clamp(torch.round(wg / sc) + z, 0, 15) - z).mul_(sc).reshape(n, k)


def awq_search(group: Group, weights: List[torch.Tensor], inputs: List[torch.Tensor], xmean: torch.Tensor,
               group_size: int, symmetric: bool, grid: int):
    """(best scale [C], best alpha, losses by alpha) of one group."""
    def q(w):
        return int4_group_fake_quant(w, group_size, symmetric)

    refs = [x @ w.t() for x, w in zip(inputs, weights)]
    norm = sum(float(r.pow(2).sum()) for r in refs) or 1.0
    idx = group.scaled
    best = (math.inf, None, 0.0)
    losses = {}
    base = xmean[idx].double().clamp(min=1e-4)
    for k in range(grid):
        a = k / grid
        sub = base.pow(a)
        sub = sub / torch.sqrt(sub.max() * sub.min())
        s = torch.ones(group.size, dtype=torch.float64)
        s[idx] = sub
        loss = 0.0
        for (x, w, r), c in zip(zip(inputs, weights, refs), group.consumers):
            sc = s[c.channels].float()
            out = (x / sc) @ q(w * sc[None, :]).t()
            loss += float((out - r).pow(2).sum())
        losses[round(a, 4)] = loss / norm
        if loss < best[0]:
            best = (loss, s, a)
    return best[1], best[2], losses


@data_step("awq_scales", args={"group_size": {"type": int, "min": 32, "max": 8192},
                               "symmetric": {"type": bool}, "grid": {"type": int, "min": 1, "max": 100},
                               "max_rows": {"type": int, "min": 16}, "scale_nodes": {"type": bool},
                               "calib_batches": {"type": int}})
def awq_scales(ctx) -> None:
    """AWQ's scales: a grid search over alpha per group against the int4 output error."""
    gm = ctx.gm
    gs = int(ctx.arg("group_size", 128))
    sym = bool(ctx.arg("symmetric", True))
    grid = int(ctx.arg("grid", 20))
    max_rows = int(ctx.arg("max_rows", 512))
    groups, refused = find_groups(gm, _first_inputs(ctx, gm), scale_nodes=bool(ctx.arg("scale_nodes", False)))
    stats = collect_inputs(ctx, gm, groups, keep_rows=max_rows, desc="awq_scales")
    scales, alphas = {}, {}
    for i, g in enumerate(groups):
        ws, xs = [], []
        xmean = torch.zeros(g.size)
        for c in g.consumers:
            x = OpView(c.node, gm, "linear").get("input")
            st = stats[x]
            xs.append(st.sample())
            ws.append(_weight(gm, c.node))
            xmean = torch.maximum(xmean, _to_producer((st.asum / max(st.n, 1)).float(), c.channels, g.size))
        if any(w.shape[1] % gs for w in ws):
            from ..methods.balance import Refusal
            refused.append(Refusal(g.producer, f"{g.describe()}: a consumer's {ws[0].shape[1]} inputs are not a "
                                               f"multiple of group_size={gs}"))
            continue
        s, a, _ = awq_search(g, ws, xs, xmean, gs, sym, grid)
        scales[i] = s
        alphas[g.producer.name] = a
    _plan(gm, groups, refused, scales, ctx)
    ctx.info["alpha"] = alphas
