"""The ``gptq`` data step: GPTQ (Frantar et al. 2022) on a graph whose weighted ops already read
their weights through quantizers.

It runs after rules that attached the quantizers (the ``gptq`` recipe: ``weight_int4`` for
linear layers in the w4a16 group form, then ``convert`` for the per-channel form), so the graph's
form is decided by those rules; this step only changes numbers:

1. **Targets.** Every linear and every convolution (``conv1d/2d/3d``, ``conv_transpose1d/2d/3d``)
   whose weight is read as ``quantizer(get_attr W)`` with a per-channel (output channels: axis 0,
   axis 1 for a transposed convolution's ``[C_in, C_out / groups, *k]`` weight) or per-tensor
   :class:`~qpasses.numerics.FakeQuantize`, or, on a linear weight, an
   :class:`~qpasses.kernels.lowering.Int4GroupFakeQuantize`; the quantizer node may be a module
   call or its custom-op form (:func:`qpasses.qnodes.quantizer_module`).  Ops GPTQ cannot take
   keep their round-to-nearest weights and are listed with the reason in ``info["kept_rtn"]``
   (a weight tensor or quantizer shared by several ops, a weight axis that is not the output
   channels, string padding on a transposed convolution).  Convolutions go through im2col
   (:func:`qpasses.numerics.gptq.conv_rows`); a transposed one as its equivalent direct
   convolution (zeros inserted by the stride, the weight flipped with channels swapped), whose
   solved weight maps back to the transposed layout exactly.  A grouped convolution gets one
   Hessian block per group (its output channels see only their inputs).
2. **Layer by layer.** Targets are grouped by the activation they read (q, k and v share one
   Hessian) and visited in graph order.  For each group, a graph cut at that activation runs the
   calibration batches one at a time and each batch's rows (a linear layer's inputs flattened
   over the leading dimensions, a convolution's im2col columns in bounded chunks) go straight
   into ``X X^T`` in float64: one layer's Hessian is alive at a time, and no activation is kept beyond a batch.
3. **Data-parallel.** Under ``torch.distributed`` (see :func:`~.calibrate.calibration_world`)
   each rank runs its shard; ``X X^T`` and the row count are all-reduced before the solve, so
   every rank solves the same problem (``H`` is cast to float32 from the float64 sums).
4. **Solve and write.** :func:`qpasses.numerics.gptq.gptq_quantize` gives grid values ``Q``;
   they overwrite the weight tensor (and, for lazily fitted int4 groups, the quantizer's scales /
   zero points), so the quantizer maps the new weight to itself and the graph keeps its form.
   With ``sequential`` (default) a group's weights are written before the next group's inputs
   are captured: later layers see the outputs of already-quantized ones.  Without it every
   layer sees the float model and all weights are written at the end.  Either way the targets'
   weight quantizers are bypassed while capturing (a written weight is on its grid already, so
   running its quantizer would only cost time); quantizers of other ops stay in place.

Cost: each group's capture runs the graph up to that group's input (dead code after it is cut
away), so the forward work is about ``groups / 2`` passes of the model over the calibration
data; memory is the model, one batch's activations and one ``K x K`` float64 Hessian.

``info`` reports per layer the output error ``||WX - QX||^2`` on the calibration data of GPTQ and
of round-to-nearest, the samples / rows seen, the largest Hessian held, and the world size.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.fx as fx
import torch.nn as nn

from ...errors import OptionError, StepError
from ...frontend import input_arity, set_training
from ...kernels.lowering import Int4GroupFakeQuantize
from ...lang.registry import data_step
from ...numerics import FakeQuantize
from ...numerics.gptq import (ConvGeometry, HessianAccumulator, affine_group_fit, conv_rows, conv_weight_from_matrix,
                             conv_weight_matrix, gptq_quantize, hessian_error, round_to_nearest,
                             symmetric_group_fit)
from ...opclasses import OpView, classify
from ...qnodes import holder_target, quantizer_module
from ..ptq.calibrate import calibration_world, iterate_batches, progress_bar

__all__ = ["gptq", "GPTQTarget", "find_targets"]

_TAKEN = ("linear", "conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d", "conv_transpose3d")
_WEIGHTED = _TAKEN
_QUANT_KINDS = (FakeQuantize, Int4GroupFakeQuantize)


@dataclass
class GPTQTarget:
    """One weighted op GPTQ quantizes."""
    op: fx.Node
    opclass: str
    x: fx.Node                   # the activation input
    weight_target: str           # get_attr target of the float weight
    weight: torch.Tensor         # the weight tensor (overwritten with the result)
    quant_target: str            # module path of the weight quantizer
    quant: nn.Module
    geometry: Any                # a ConvGeometry (convolutions) or ("linear",)
    quant_node: Optional[fx.Node] = None   # the graph node applying the weight quantizer

    def matrix(self) -> torch.Tensor:
        """The weight as the ``[N, K]`` matrix GPTQ solves for (a transposed convolution's as the
        equivalent direct convolution's)."""
        w = self.weight.detach()
        if isinstance(self.geometry, ConvGeometry):
            return conv_weight_matrix(w, self.geometry)
        return w.reshape(w.shape[0], -1)

    @property
    def k(self) -> int:
        """Inputs per output channel (per convolution group)."""
        if isinstance(self.geometry, ConvGeometry) and self.geometry.transposed:
            k = int(self.weight.shape[0]) // self.groups
            for s in self.weight.shape[2:]:
                k *= int(s)
            return k
        return int(self.weight[0].numel())

    @property
    def n_out(self) -> int:
        if isinstance(self.geometry, ConvGeometry) and self.geometry.transposed:
            return int(self.weight.shape[1]) * self.groups
        return int(self.weight.shape[0])

    @property
    def groups(self) -> int:
        return int(self.geometry.groups) if isinstance(self.geometry, ConvGeometry) else 1


def _tuple(v: Any, n: int) -> Tuple[int, ...]:
    if isinstance(v, (list, tuple)):
        t = tuple(int(a) for a in v)
        return t * n if len(t) == 1 else t
    return (int(v),) * n


def _geometry(view: OpView, w: torch.Tensor):
    """``("linear",)`` or the :class:`ConvGeometry` of a convolution (transposed ones as their
    equivalent direct convolution)."""
    oc = view.opclass
    if oc == "linear":
        return ("linear",)
    nd = int(oc[-2])
    kernel = tuple(int(s) for s in w.shape[2:])
    if len(kernel) != nd:
        raise ValueError(f"{oc} weight of shape {tuple(w.shape)}")
    stride = _tuple(view.get("stride", 1), nd)
    dilation = _tuple(view.get("dilation", 1), nd)
    groups = int(view.get("groups", 1) or 1)
    padding = view.get("padding", 0)
    if oc.startswith("conv_transpose"):
        if isinstance(padding, str):
            raise ValueError(f"padding={padding!r}")
        return ConvGeometry.transpose(kernel, stride, _tuple(padding, nd), _tuple(view.get("output_padding", 0), nd),
                                      dilation, groups)
    if isinstance(padding, str):
        if padding == "valid":
            pads = [(0, 0)] * nd
        elif padding == "same":
            pads = []
            for k, d in zip(kernel, dilation):
                total = d * (k - 1)
                pads.append((total // 2, total - total // 2))
        else:
            raise ValueError(f"padding={padding!r}")
    else:
        pads = [(p, p) for p in _tuple(padding, nd)]
    return ConvGeometry.direct(kernel, stride, dilation, pads, groups)


def _row_chunks(x: torch.Tensor, geom, max_elements: int = 1 << 24):
    """The layer's input as chunks of rows ``[m, K]`` (``y = rows @ W.reshape(N, K).T`` up to layout)."""
    if isinstance(geom, ConvGeometry):
        yield from conv_rows(x, geom, max_elements)
    else:
        yield x.reshape(-1, x.shape[-1])


def _rows(x: torch.Tensor, geom) -> torch.Tensor:
    """All of :func:`_row_chunks` in one tensor."""
    return torch.cat(list(_row_chunks(x, geom)), 0)


def _get_attr(gm: fx.GraphModule, target: str):
    obj = gm
    for part in str(target).split("."):
        obj = getattr(obj, part)
    return obj


def _axis_ok(oc: str, axis: Optional[int]) -> bool:
    """The per-channel axis GPTQ takes: output channels (0; 1 for a transposed convolution's
    ``[C_in, C_out / groups, *k]`` weight), or per tensor."""
    if axis is None:
        return True
    return axis == (1 if oc.startswith("conv_transpose") else 0)


def find_targets(gm: fx.GraphModule) -> Tuple[List[GPTQTarget], Dict[str, str]]:
    """(targets in graph order, {op name: why round-to-nearest is kept}) of a quantized graph."""
    modules = dict(gm.named_modules())
    calls: Dict[str, int] = {}
    attr_uses: Dict[int, int] = {}
    for n in gm.graph.nodes:
        if quantizer_module(modules, n, kinds=_QUANT_KINDS) is not None:
            t = holder_target(n)
            calls[t] = calls.get(t, 0) + 1
        if n.op == "get_attr":
            t = _get_attr(gm, n.target)
            if isinstance(t, torch.Tensor):
                attr_uses[id(t)] = attr_uses.get(id(t), 0) + len(n.users)
    targets: List[GPTQTarget] = []
    kept: Dict[str, str] = {}
    for n in gm.graph.nodes:
        if n.op not in ("call_function", "call_module"):
            continue
        oc = classify(n, modules)
        if oc not in _WEIGHTED:
            continue
        view = OpView(n, gm, oc, modules)
        wq = view.get("weight")
        quant = quantizer_module(modules, wq, kinds=_QUANT_KINDS)
        if quant is None:
            continue  # not quantized by the rules: the report's coverage lists it
        qt = holder_target(wq)
        src = wq.args[0] if wq.args else None
        if not (isinstance(src, fx.Node) and src.op == "get_attr"):
            kept[n.name] = "its weight is not a get_attr constant"
            continue
        w = _get_attr(gm, src.target)
        if not isinstance(w, torch.Tensor) or not w.is_floating_point():
            kept[n.name] = "its weight is not a float tensor"
            continue
        if calls.get(qt, 0) != 1 or attr_uses.get(id(w), 0) != 1:
            kept[n.name] = f"weight {src.target} (or its quantizer) is shared with another use: GPTQ would change it"
            continue
        if isinstance(quant, FakeQuantize):
            if not _axis_ok(oc, quant.axis) or not quant.enabled:
                kept[n.name] = (f"weight quantizer axis={quant.axis}, enabled={quant.enabled} (GPTQ needs one scale "
                                f"per output channel or per tensor)")
                continue
        elif oc != "linear":
            kept[n.name] = f"{type(quant).__name__} on a {oc} weight (GPTQ takes int4 groups on linear weights)"
            continue
        x = view.input
        if not isinstance(x, fx.Node):
            kept[n.name] = "its input is not a graph value"
            continue
        try:
            geom = _geometry(view, w)
        except (ValueError, TypeError) as e:
            kept[n.name] = f"unsupported convolution geometry ({e})"
            continue
        targets.append(GPTQTarget(n, oc, x, str(src.target), w, qt, quant, geom, wq))
    return targets, kept


def _solve(t: GPTQTarget, h: torch.Tensor, blocksize: int, damp: float, act_order: bool):
    """GPTQ for one target; returns (Q [N, K] float32, new int4 scales / zeros or None, errors)."""
    w = t.matrix().float()
    q = t.quant
    if isinstance(q, Int4GroupFakeQuantize):
        gs = int(q.group_size)
        zeros = q.zeros if q.zeros is not None else torch.full_like(q.scales, 8.0)
        if act_order:   # static groups: the round-to-nearest scales of the original weight
            kw = dict(scale=q.scales, zero=zeros)
        elif q.zeros is None:
            sym = symmetric_group_fit(7)
            kw = dict(fit=lambda c: (sym(c)[0], torch.full((c.shape[0],), 8.0, device=c.device, dtype=c.dtype)))
        else:
            kw = dict(fit=affine_group_fit(15))
        r = gptq_quantize(w, h, 0, 15, group_size=gs, blocksize=blocksize, damp=damp, act_order=act_order, **kw)
        rtn = round_to_nearest(w, q.scales, zeros, 0, 15, gs)
        new_q = (r.scale, None if q.zeros is None else r.zero)
    else:   # per channel (or per tensor): the static scales convert fitted to the original weight
        n_out = w.shape[0]
        scale = q.scale.detach().float().reshape(-1)
        zp = q.zero_point.detach().float().reshape(-1)
        if q.axis is None:
            scale, zp = scale.expand(n_out), zp.expand(n_out)
        elif scale.numel() != n_out:   # a grouped transposed convolution's axis 1: C_out / groups channels
            reps = n_out // scale.numel()
            scale, zp = scale.repeat(reps), zp.repeat(reps)
        if h.dim() == 3:   # a grouped convolution: output channels of group g see only its inputs (block h[g])
            per = n_out // h.shape[0]
            parts = [(slice(g * per, (g + 1) * per), h[g]) for g in range(h.shape[0])]
        else:
            parts = [(slice(0, n_out), h)]
        qw, rtn = torch.empty_like(w), torch.empty_like(w)
        err = err_rtn = 0.0
        dead = []
        for rows, hg in parts:
            r = gptq_quantize(w[rows], hg, int(q.qmin), int(q.qmax), scale=scale[rows], zero=zp[rows],
                              blocksize=blocksize, damp=damp, act_order=act_order)
            qw[rows] = r.weight.float()
            rtn[rows] = round_to_nearest(w[rows], scale[rows], zp[rows], int(q.qmin), int(q.qmax))
            err += hessian_error(w[rows], qw[rows], hg)
            err_rtn += hessian_error(w[rows], rtn[rows], hg)
            dead += r.dead
        return qw, None, err, err_rtn, dead
    return r.weight.float(), new_q, hessian_error(w, r.weight.float(), h), hessian_error(w, rtn, h), r.dead


def _write(t: GPTQTarget, qw: torch.Tensor, new_q) -> None:
    with torch.no_grad():
        if isinstance(t.geometry, ConvGeometry):
            qw = conv_weight_from_matrix(qw, t.weight.shape, t.geometry)
        t.weight.copy_(qw.reshape(t.weight.shape).to(t.weight.dtype))
        if new_q is not None:
            t.quant.scales.copy_(new_q[0].to(t.quant.scales.dtype))
            if new_q[1] is not None:
                t.quant.zeros.copy_(new_q[1].to(t.quant.zeros.dtype))


def _bool(v: Any, name: str) -> bool:
    if isinstance(v, str):
        low = v.lower()
        if low in ("true", "1", "yes", "on"):
            return True
        if low in ("false", "0", "no", "off"):
            return False
        raise OptionError(f"{name} must be true or false, got {v!r}")
    return bool(v)


#: the arguments the step reads (``with:`` values, else the run's parameters), checked at load
GPTQ_ARGS = {
    "blocksize": {"type": int, "min": 1, "max": 65536, "default": 128, "doc": "columns per lazy batch of updates"},
    "damp": {"type": float, "min": 0.0, "max": 10.0, "default": 0.01,
             "doc": "dampening added to the Hessian diagonal, as a fraction of its mean"},
    "act_order": {"type": bool, "default": False, "doc": "quantize columns in order of decreasing Hessian diagonal"},
    "sequential": {"type": bool, "default": True, "doc": "later layers see the outputs of already-quantized ones"},
    "w_bits": {"type": int, "min": 2, "max": 16, "default": None,
               "doc": "weight bit-width (the int4 group form needs 4)"},
    "calib_batches": {"type": int, "min": 1, "default": None, "doc": "at most this many batches (default all)"},
    "distributed": {"type": "any", "choices": ("auto", True, False), "default": "auto",
                    "doc": "data-parallel over torch.distributed (auto: when a process group is up)"},
    "shard_data": {"type": bool, "default": True, "doc": "distributed: each rank reads its share of the batches"},
}


@data_step("gptq", args=GPTQ_ARGS)
def gptq(ctx) -> None:
    """GPTQ on every quantized linear / convolution weight, layer by layer (see the module docstring)."""
    gm = ctx.gm
    blocksize = int(ctx.arg("blocksize", 128))
    damp = float(ctx.arg("damp", 0.01))
    act_order = _bool(ctx.arg("act_order", False), "act_order")
    sequential = _bool(ctx.arg("sequential", True), "sequential")
    if blocksize < 1:
        raise OptionError(f"gptq: blocksize must be >= 1, got {blocksize}")
    if damp < 0:
        raise OptionError(f"gptq: damp must be >= 0, got {damp}")
    targets, kept = find_targets(gm)
    w_bits = ctx.arg("w_bits")
    if w_bits is not None and int(w_bits) != 4 and any(isinstance(t.quant, Int4GroupFakeQuantize) for t in targets):
        raise OptionError(f"gptq: group_size > 0 gives the int4 group (w4a16) form, which needs w_bits=4 "
                          f"(got w_bits={w_bits}); use group_size=0 for per-channel {w_bits}-bit weights")
    if not targets:
        raise StepError("gptq found no weighted op reading its weight through a quantizer: run it after rules "
                        "that quantize weights (weight_int4 or convert), as the gptq recipe does"
                        + (f"; kept as they are: {kept}" if kept else ""))
    rank, size = calibration_world(ctx)
    shard = _bool(ctx.arg("shard_data", True), "shard_data") if size > 1 else False
    batches = list(iterate_batches(ctx.data, ctx.arg("calib_batches"), "gptq", False, input_arity(gm),
                                   rank if shard else 0, size if shard else 1))
    if size == 1 and not batches:
        raise StepError("gptq got an empty data iterable")

    # group targets by the value they read (one Hessian per value and geometry), in graph order
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    groups: Dict[fx.Node, List[GPTQTarget]] = {}
    for t in targets:
        groups.setdefault(t.x, []).append(t)
    group_list = sorted(groups.items(), key=lambda kv: order[kv[0]])

    t0 = time.perf_counter()
    was_training = gm.training
    set_training(gm, False)
    # the targets' quantizers are bypassed while capturing: a weight GPTQ has written is on its
    # quantizer's grid already (the quantizer maps it to itself), one it has not is float
    bypass = [t.quant_node for t in targets]
    pending: List[Tuple[GPTQTarget, torch.Tensor, Any]] = []
    layers: List[Dict[str, Any]] = []
    n_rows = 0
    max_h_bytes = 0
    bar = progress_bar(ctx.progress, total=len(group_list), desc="gptq", unit="group")
    try:
        for x_node, group in group_list:
            cap = _capture(gm, x_node, bypass)
            # made up front: a rank whose shard is empty still takes part in every all-reduce
            # (one per geometry: layers reading the same value the same way share it)
            accs: Dict[Any, HessianAccumulator] = {}
            first: Dict[Any, GPTQTarget] = {}
            for t in group:
                if t.geometry not in accs:
                    accs[t.geometry] = HessianAccumulator(t.k, device=t.weight.device, groups=t.groups)
                    first[t.geometry] = t
            with torch.no_grad():
                for inputs in batches:
                    x = cap(*inputs)[0]
                    if not (isinstance(x, torch.Tensor) and x.is_floating_point()):
                        raise StepError(f"gptq: the input {x_node.name} of {group[0].op.name} is not a float tensor")
                    for geom, acc in accs.items():
                        t = first[geom]
                        for rows in _row_chunks(x.detach(), geom):
                            if rows.shape[1] != t.k * t.groups:
                                raise StepError(f"gptq: {t.op.name} reads rows of width {rows.shape[1]} but its "
                                                f"weight has {t.k} inputs in each of {t.groups} group(s)")
                            acc.add(rows)
            del cap
            for geom, acc in accs.items():
                max_h_bytes = max(max_h_bytes, acc.sum.numel() * acc.sum.element_size())
                if size > 1:
                    acc.all_reduce()   # every rank checks the reduced sums below: all raise, or none
                if acc.n == 0:
                    raise StepError("gptq got an empty data iterable (on every rank)")
                if not bool(torch.isfinite(acc.sum).all()):
                    raise StepError(f"gptq: the calibration inputs of {first[geom].op.name} ({x_node.name}) are not "
                                    f"finite: the model overflows before this layer (the data itself is finite)")
            for t in group:
                acc = accs[t.geometry]
                h = acc.hessian(torch.float32)
                try:
                    qw, new_q, err, err_rtn, r = _solve(t, h, blocksize, damp, act_order)
                except ValueError as e:
                    raise StepError(f"gptq: {t.op.name}: {e}") from None
                if size > 1:   # every rank holds the same result (it solved the same problem); make sure
                    _broadcast(qw, new_q)
                if sequential:
                    _write(t, qw, new_q)
                else:
                    pending.append((t, qw, new_q))
                form = ("int4_group" if isinstance(t.quant, Int4GroupFakeQuantize)
                        else "per_tensor" if t.quant.axis is None else "per_channel")
                layers.append({"op": t.op.name, "weight": t.weight_target, "form": form,
                               "k": t.k, "n": t.n_out, "opclass": t.opclass, "error": err, "rtn_error": err_rtn,
                               "rows": acc.n, "dead_inputs": len(r)})
                n_rows = max(n_rows, acc.n)
            accs = acc = h = None   # this group's Hessian is freed before the next one is made
            bar.update(1)
    finally:
        bar.close()
        set_training(gm, was_training)
    for t, qw, new_q in pending:
        _write(t, qw, new_q)
    gm.recompile()
    tot = sum(l["error"] for l in layers)
    tot_rtn = sum(l["rtn_error"] for l in layers)
    ctx.info.update(layers=len(layers), kept_rtn=kept, groups=len(group_list), batches=len(batches), rows=n_rows,
                    sequential=sequential, act_order=act_order, blocksize=blocksize, damp=damp,
                    max_hessian_bytes=max_h_bytes, world_size=size, seconds=round(time.perf_counter() - t0, 3),
                    error=tot, rtn_error=tot_rtn, error_ratio=(tot / tot_rtn) if tot_rtn > 0 else 1.0,
                    per_layer=layers)


def _capture(gm: fx.GraphModule, x_node: fx.Node, bypass: List[fx.Node]) -> fx.GraphModule:
    """A GraphModule sharing ``gm``'s modules and tensors that computes ``x_node``, with each node
    of ``bypass`` (a weight quantizer, call_module or custom-op form) replaced by its input.
    ``gm``'s own graph is not changed."""
    g = fx.Graph()
    vmap: Dict[fx.Node, fx.Node] = {}
    g.graph_copy(gm.graph, vmap)
    for n in bypass:
        vmap[n].replace_all_uses_with(vmap[n.args[0]])
    g.output((vmap[x_node],))
    sub = fx.GraphModule(gm, g)
    sub.graph.eliminate_dead_code()
    sub.recompile()
    return sub


def _broadcast(qw: torch.Tensor, new_q) -> None:
    import torch.distributed as dist
    dev = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    ts = [qw] + ([t for t in new_q if t is not None] if new_q is not None else [])
    for t in ts:
        buf = t.to(dev)
        dist.broadcast(buf, 0)
        t.copy_(buf.to(t.device))
