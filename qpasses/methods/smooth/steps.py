"""Balancing data steps: ``smooth_scales`` (SmoothQuant) and ``awq_scales`` (AWQ).

Both find the layer groups of the graph from its structure
(:func:`qpasses.methods.smooth.balance.find_groups`: a producer whose channels can absorb a
per-channel scale, and the linears it feeds), run the calibration data through the graph to
collect what each group's consumers read, choose one scale per producer channel and record the
plan on the nodes.  The ``smooth`` rule family (qpasses/methods/smooth/smooth.yaml) then folds the scales, in a
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
  the calibration rows.
* AWQ's weight clipping (option ``clip``, default on; the second search of Lin et al. and of
  AutoAWQ / llm-compressor): for every consumer of a balanced group, after its scale, a clipping
  ratio ``r`` per output channel and per int4 group, on a grid of ``clip_grid`` points from 1
  down to ``clip_min`` (0.5), chosen to minimise that group's share of the layer's output error
  ``mean_t (x_t,g . (w_o,g - Q(clamp(w_o,g, r lo, r hi))))^2`` on ``clip_samples`` calibration rows
  of the scaled input; ``r = 1`` (no clipping) is on the grid, so each chosen range does no worse
  than the full one on those rows.  ``awq_scales`` records the ranges on the consumers, and the
  ``awq_clip`` step clamps the folded weights to them after the ``smooth`` family, before
  ``weight_int4`` fits its int4 scales (which then are ``r`` times the full range's).  A consumer
  that is also the producer of another group (``v`` of ``v -> o``, ``up`` of ``up -> down``) has
  its rows scaled by that group's ``1/s`` too: the best ratio of a scaled row is the same, so the
  ratios are searched once and applied to the range of the folded weight.  Linears whose
  output reaches attention scores as a query or key are not clipped (AutoAWQ's practice: their
  error is amplified by the softmax, which the linear's output error does not see); they are found
  from the graph, not by name.

Both record, in ``pm.report.steps``, each group (``producer -> consumers``) and each producer
refused with its reason; the rule counters of the ``smooth`` family say the same per node.
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional, Tuple

import torch
import torch.fx as fx
import torch.nn as nn

from .actions import NODE_KEY, PLAN_KEY, REFUSED_KEY
from ...errors import StepError
from ...frontend import input_arity
from ...lang.registry import data_step
from .balance import Group, find_groups, run_recording
from ...opclasses import OpView, classify, get_attr_value, matches_any
from ..ptq.calibrate import iterate_batches

__all__ = ["smooth_scales", "awq_scales", "awq_clip", "collect_inputs", "smoothquant_scale", "awq_search",
           "int4_group_fake_quant", "clip_ratios", "clip_search", "attention_score_input"]

CLIP_KEY = "qpasses.awq_clip"   # on a consumer: the clipping range awq_scales chose for its scaled weight


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
    ``weight_int4`` family attaches; same qparams as ``packing.quantize_int4``, codes rounded as
    ``qpasses::fake_quant_per_group`` rounds them, ``round(w * (1 / s))``), without packing the
    codes: the search calls it for every candidate.  ``K`` must be a multiple of ``group_size``."""
    n, k = w.shape
    wg = w.float().reshape(n, k // group_size, group_size)
    if symmetric:
        amax = wg.abs().amax(-1, keepdim=True)
        sc = torch.where(amax > 0, amax / 7.0, torch.ones_like(amax))
        return (torch.clamp(torch.round(wg * torch.reciprocal(sc)) + 8, 0, 15) - 8).mul_(sc).reshape(n, k)
    lo = torch.minimum(wg.amin(-1, keepdim=True), torch.zeros(()))
    hi = torch.maximum(wg.amax(-1, keepdim=True), torch.zeros(()))
    sc = torch.where(hi > lo, (hi - lo) / 15.0, torch.ones_like(hi))
    z = torch.clamp(torch.round(-lo / sc), 0, 15)
    return (torch.clamp(torch.round(wg * torch.reciprocal(sc)) + z, 0, 15) - z).mul_(sc).reshape(n, k)


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


def clip_ratios(grid: int, lowest: float) -> List[float]:
    """The clipping candidates: ``grid`` ratios from 1 down to ``lowest``, evenly spaced."""
    if grid < 1 or not 0.0 < lowest <= 1.0:
        raise ValueError(f"clip grid needs grid >= 1 and 0 < clip_min <= 1, got {grid}, {lowest}")
    if grid == 1:
        return [1.0]
    return [1.0 - i * (1.0 - lowest) / (grid - 1) for i in range(grid)]


def _group_range(wg: torch.Tensor, symmetric: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """(lo, hi) [N, G] of weights grouped [N, G, group_size]: the range the int4 quantizer spans."""
    if symmetric:
        hi = wg.abs().amax(-1)
        return -hi, hi
    return wg.amin(-1).clamp(max=0.0), wg.amax(-1).clamp(min=0.0)


def clip_search(w: torch.Tensor, x: torch.Tensor, group_size: int, symmetric: bool, ratios: List[float],
                max_elems: int = 1 << 22) -> Dict[str, torch.Tensor]:
    """AWQ's clipping search for one linear ``y = x w^T`` (weight ``w`` [N, K], rows ``x`` [T, K]).

    For every output channel ``o`` and int4 group ``g`` of inputs, the ratio ``r`` of ``ratios``
    whose clamped range ``[r lo, r hi]`` minimises ``mean_t (x_t,g . w_o,g - x_t,g . Q(clamp(w_o,g)))^2``
    (the group's share of the output error; ``Q``: the ``weight_int4`` quantizer).  Output channels
    go in chunks so that the partial outputs held at once stay under ``max_elems`` elements.
    Returns ``lo``, ``hi`` (the clamp bounds [N, G]), ``ratio`` [N, G], ``err`` (the chosen error)
    and ``err_full`` (the error of the full range, ``r = 1``), both [N, G]."""
    n, k = w.shape
    if k % group_size:
        raise ValueError(f"{k} inputs are not a multiple of group_size={group_size}")
    g = k // group_size
    wg = w.detach().float().reshape(n, g, group_size)
    xg = x.detach().float().reshape(-1, g, group_size).transpose(0, 1).contiguous()   # [G, T, gs]
    t = xg.shape[1]
    lo0, hi0 = _group_range(wg, symmetric)
    out = {name: torch.empty(n, g) for name in ("lo", "hi", "ratio", "err", "err_full")}
    chunk = max(1, min(n, max_elems // max(1, g * t)))
    for a in range(0, n, chunk):
        b = min(n, a + chunk)
        wc, lo, hi = wg[a:b], lo0[a:b], hi0[a:b]
        ref = torch.bmm(xg, wc.permute(1, 2, 0))                                      # [G, T, c]
        best = torch.full((b - a, g), math.inf)
        best_r = torch.ones(b - a, g)
        full = None
        for r in ratios:
            clamped = torch.minimum(torch.maximum(wc, (lo * r)[..., None]), (hi * r)[..., None])
            q = int4_group_fake_quant(clamped.reshape(b - a, k), group_size, symmetric).reshape(b - a, g, group_size)
            err = (torch.bmm(xg, q.permute(1, 2, 0)) - ref).pow(2).mean(1).t()          # [c, G]
            if r == 1.0:
                full = err
            better = err < best
            best = torch.where(better, err, best)
            best_r = torch.where(better, torch.full_like(best_r, r), best_r)
        out["lo"][a:b], out["hi"][a:b] = lo * best_r, hi * best_r
        out["ratio"][a:b], out["err"][a:b] = best_r, best
        out["err_full"][a:b] = full if full is not None else torch.nan
    return out


_PASS_THROUGH_STOP = ("linear", "conv1d", "conv2d", "conv3d", "layer_norm", "rms_norm", "batch_norm",
                      "group_norm", "softmax")


def _from_softmax(v, modules, hops: int = 6) -> bool:
    for _ in range(hops):
        if not isinstance(v, fx.Node):
            return False
        cls = classify(v, modules)
        if cls == "softmax":
            return True
        ins = v.all_input_nodes
        if len(ins) != 1:
            return False
        v = ins[0]
    return False


def attention_score_input(gm: fx.GraphModule, node: fx.Node, modules=None) -> Optional[str]:
    """Where ``node``'s output reaches attention scores as a query or key (``sdpa``'s ``query`` /
    ``key``, a ``matmul`` / ``bmm`` that is not ``softmax(...) @ v``), the name of that op, else None.
    Followed forward through anything but weighted ops, norms and softmax."""
    modules = modules if modules is not None else dict(gm.named_modules())
    seen, stack = {node}, [node]
    while stack and len(seen) < 4096:
        n = stack.pop()
        for u in n.users:
            cls = classify(u, modules)
            if cls == "scaled_dot_product_attention":
                ins = OpView(u, gm, cls, modules).inputs()
                if n is ins[0] or n is ins[1]:
                    return u.name
                continue
            if cls in ("matmul", "bmm"):
                ins = OpView(u, gm, cls, modules).inputs()
                if n is ins[1] and n is not ins[0] and _from_softmax(ins[0], modules):
                    continue      # the value side of probs @ v
                return u.name
            if cls in _PASS_THROUGH_STOP or u.op == "output" or u in seen:
                continue
            seen.add(u)
            stack.append(u)
    return None


@data_step("awq_scales", args={"group_size": {"type": int, "min": 32, "max": 8192},
                               "symmetric": {"type": bool}, "grid": {"type": int, "min": 1, "max": 100},
                               "max_rows": {"type": int, "min": 16}, "scale_nodes": {"type": bool},
                               "clip": {"type": bool}, "clip_grid": {"type": int, "min": 1, "max": 100},
                               "clip_min": {"type": float, "min": 0.05, "max": 1.0},
                               "clip_samples": {"type": int, "min": 16},
                               "calib_batches": {"type": int}})
def awq_scales(ctx) -> None:
    """AWQ's scales: a grid search over alpha per group against the int4 output error; with
    ``clip``, then the clipping ranges of the scaled weights (applied by ``awq_clip``)."""
    gm = ctx.gm
    gs = int(ctx.arg("group_size", 128))
    sym = bool(ctx.arg("symmetric", True))
    grid = int(ctx.arg("grid", 20))
    max_rows = int(ctx.arg("max_rows", 512))
    clip = bool(ctx.arg("clip", True))
    ratios = clip_ratios(int(ctx.arg("clip_grid", 20)), float(ctx.arg("clip_min", 0.5))) if clip else []
    clip_rows = int(ctx.arg("clip_samples", 512))
    for node in gm.graph.nodes:
        node.meta.pop(CLIP_KEY, None)
    groups, refused = find_groups(gm, _first_inputs(ctx, gm), scale_nodes=bool(ctx.arg("scale_nodes", False)))
    stats = collect_inputs(ctx, gm, groups, keep_rows=max_rows, desc="awq_scales")
    modules = dict(gm.named_modules())
    scales, alphas, clips, unclipped = {}, {}, {}, {}
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
            from .balance import Refusal
            refused.append(Refusal(g.producer, f"{g.describe()}: a consumer's {ws[0].shape[1]} inputs are not a "
                                               f"multiple of group_size={gs}"))
            continue
        s, a, _ = awq_search(g, ws, xs, xmean, gs, sym, grid)
        scales[i] = s
        alphas[g.producer.name] = a
        if not clip:
            continue
        for c, w, x in zip(g.consumers, ws, xs):
            qk = attention_score_input(gm, c.node, modules)
            if qk is not None:
                unclipped[c.node.name] = f"its output is a query or key of {qk}"
                continue
            sc = s[c.channels].float()
            ws_ = w * sc[None, :]                       # the weight as the smooth family folds it
            if x.shape[0] > clip_rows:                  # evenly spaced rows of the (shuffled) sample
                x = x[torch.linspace(0, x.shape[0] - 1, clip_rows).round().long()]
            rows = x / sc[None, :]                      # the rows it reads once the scale is folded
            res = clip_search(ws_, rows, gs, sym, ratios)
            lo, hi = _group_range(ws_.reshape(ws_.shape[0], -1, gs), sym)
            c.node.meta[CLIP_KEY] = {"ratio": res["ratio"], "range": (lo, hi), "absum": ws_.abs().sum(1),
                                     "group_size": gs, "symmetric": sym}
            full = float(res["err_full"].sum())
            clips[c.node.name] = {"mean_ratio": round(float(res["ratio"].mean()), 4),
                                  "clipped": round(float((res["ratio"] < 1).float().mean()), 4),
                                  "error_vs_full": round(float(res["err"].sum()) / full, 4) if full > 0 else 1.0}
    _plan(gm, groups, refused, scales, ctx)
    ctx.info["alpha"] = alphas
    if clip:
        ctx.info["clip"] = clips
        ctx.info["not_clipped"] = unclipped


def _weight_slot(gm: fx.GraphModule, node: fx.Node):
    """(owner object, attribute name) holding ``node``'s linear weight."""
    if node.op == "call_module":
        return gm.get_submodule(str(node.target)), "weight"
    v = OpView(node, gm, "linear").get("weight")
    if not (isinstance(v, fx.Node) and v.op == "get_attr"):
        return None, None
    path = str(v.target).rsplit(".", 1)
    owner = gm.get_submodule(path[0]) if len(path) == 2 else gm
    return owner, path[-1]


@data_step("awq_clip", args={"skip": {"type": "any"}}, needs_data=False)
def awq_clip(ctx) -> None:
    """Clamp the weights ``awq_scales`` chose clipping ranges for (after the ``smooth`` family has
    folded the scales, before ``weight_int4``).  A weight that no longer spans the range the search
    saw (its group was not folded, or it changed since) is left as it is, with the reason."""
    gm = ctx.gm
    skip = ctx.arg("skip") or ()
    skip = [skip] if isinstance(skip, str) else list(skip)
    writes, skipped = [], {}
    for node in gm.graph.nodes:
        plan = node.meta.get(CLIP_KEY)
        if plan is None:
            continue
        hit = matches_any(node, skip)
        if hit:
            skipped[node.name] = f"matches skip pattern {hit!r}: its weight stays float, unclipped"
            continue
        owner, name = _weight_slot(gm, node)
        w = getattr(owner, name, None) if owner is not None else None
        if not isinstance(w, torch.Tensor) or w.dim() != 2:
            skipped[node.name] = "its weight is not a constant matrix"
            continue
        gs = plan["group_size"]
        n, k = w.shape
        ratio = plan["ratio"]
        if k % gs or ratio.shape != (n, k // gs):
            skipped[node.name] = f"its weight {tuple(w.shape)} does not match the clipping ratios {tuple(ratio.shape)}"
            continue
        wg = w.detach().float().reshape(n, k // gs, gs)
        elo, ehi = plan["range"]
        glo, ghi = _group_range(wg, bool(plan["symmetric"]))
        # the weight as searched, up to a positive factor per output row (the row scale of a group
        # it produces for, folded by the same smooth stage): the int4 grid and the best ratio are
        # the same for a scaled row
        den = (ehi - elo).sum(1, keepdim=True)
        row = torch.where(den > 0, (ghi - glo).sum(1, keepdim=True) / den.clamp(min=1e-30), torch.ones_like(den))
        tol = 1e-5 * float((ghi - glo).abs().max().clamp(min=1e-12))
        if not (bool((row > 0).all()) and torch.allclose(glo, elo * row, rtol=1e-4, atol=tol)
                and torch.allclose(ghi, ehi * row, rtol=1e-4, atol=tol)
                and torch.allclose(wg.abs().sum((1, 2)), plan["absum"] * row[:, 0], rtol=1e-4, atol=tol * k)):
            skipped[node.name] = "its weight changed since awq_scales searched it (its group was not folded?)"
            continue
        new = torch.minimum(torch.maximum(wg, (glo * ratio)[..., None]), (ghi * ratio)[..., None])
        new = new.reshape(n, k).to(w.dtype)
        writes.append((node, owner, name, w, new))
    for node, owner, name, old, new in writes:          # all computed first: nothing half-written
        if isinstance(old, nn.Parameter):
            setattr(owner, name, nn.Parameter(new, requires_grad=old.requires_grad))
        elif name in getattr(owner, "_buffers", {}):
            owner._buffers[name] = new
        else:
            setattr(owner, name, new)
        node.meta.pop(CLIP_KEY, None)
    for node in gm.graph.nodes:
        node.meta.pop(CLIP_KEY, None)
    ctx.info["clipped"] = [w[0].name for w in writes]
    ctx.info["not_clipped"] = skipped
