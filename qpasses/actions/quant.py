"""Quantization actions: observers on activation inputs, fake-quantized weights, observer -> fake quant.

Representation (shared by every later rule, the integer back-ends and ONNX export):

* prepare: ``call_module`` :class:`~qpasses.numerics.Observer` nodes between an
  activation and the weighted ops that read it (one observer per value and config,
  shared by every weighted consumer; other consumers keep reading the float value), or,
  where a plain conv / linear module call is the value's only weighted reader, the observer
  held by that module as ``input_q`` (its compact form, :mod:`qpasses.compact`);
* convert: each observer module is replaced (at its name, or as ``input_q``) by a
  :class:`~qpasses.numerics.FakeQuantize` (per-tensor affine by default) and each weighted op
  reads its weight through a per-channel symmetric ``FakeQuantize``: a plain conv / linear
  module call keeps its node and its module becomes the compact ``FakeQuantConv2d`` & co.
  (:mod:`qpasses.compact`); other weighted ops get the decomposed form
  ``F.conv2d(x_fq, weight_fq_N(get_attr weight), bias, ...)``, which the compact form is
  expanded to before any later stage, so later rules see one representation.
"""
from __future__ import annotations

from typing import Any, Dict, Optional

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from ..errors import StepError
from ..lang.registry import action, constraint
from ..manager import Refuse
from ..matcher import MatchContext
from ..fxfast import new_node, set_submodule
from ..numerics import FakeQuantize, Observer, absmax_qparams, absmax_qparams_many, make_observer, qrange
from ..numerics.observers import calculate_qparams_many
from ..ops import register_module_class, resolve_names
from ..compact import compact_class, compact_module, input_quantizer, is_compact, weight_quantizer, with_input_quantizer
from .graphutil import add_module, copy_meta, is_shared_module

register_module_class(Observer, "observer")
register_module_class(FakeQuantize, "fake_quant")

QUANT_KEY = "qpasses.quant"

_FUNCTIONAL = {
    "conv1d": F.conv1d, "conv2d": F.conv2d, "conv3d": F.conv3d,
    "conv_transpose1d": F.conv_transpose1d, "conv_transpose2d": F.conv_transpose2d,
    "conv_transpose3d": F.conv_transpose3d, "linear": F.linear,
}


def _is_quant_module(ctx: MatchContext, node: Any, kinds=(Observer, FakeQuantize)) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_module" and isinstance(
        ctx.modules.get(node.target) or _get(ctx, node.target), kinds)


def _get(ctx: MatchContext, target: str):
    try:
        return ctx.gm.get_submodule(target)
    except AttributeError:
        return None


def bits_for(ctx: MatchContext, node: fx.Node, kind: str, default: int) -> int:
    """Bit-width for ``node``: a per-node annotation (``assign_bits``) wins over the recipe default."""
    ann = node.meta.get("qpasses.bits")
    if isinstance(ann, dict) and ann.get(kind) is not None:
        return int(ann[kind])
    return int(default)


@constraint("input_quantized", compact=True, args={"index": {"min": 0}})
def input_quantized(ctx: MatchContext, node: fx.Node, index: int = 0):
    """The op's activation input ``index`` already passes through an observer or fake quant."""
    v = ctx.view(node)
    if index == 0 and input_quantizer(v.module) is not None:
        return True, f"input {index} of {node.name} is already observed/quantized (inside its module)"
    ins = v.inputs()
    if index >= len(ins):
        return False
    return (_is_quant_module(ctx, ins[index]), f"input {index} of {node.name} is already observed/quantized")


@constraint("weight_quantized", compact=True)
def weight_quantized(ctx: MatchContext, node: fx.Node):
    """The op already reads its weight through a fake quant (or was marked quantized)."""
    if node.meta.get(QUANT_KEY, {}).get("weight"):
        return True, f"{node.name} already has a quantized weight"
    v = ctx.view(node)
    if weight_quantizer(v.module) is not None:
        return True, f"{node.name} already has a quantized weight"
    w = v.get("weight")
    return (_is_quant_module(ctx, w, (FakeQuantize,)), f"{node.name} already has a quantized weight")


@constraint("float_input", args={"index": {"min": 0}})
def float_input(ctx: MatchContext, node: fx.Node, index: int = 0):
    """Input ``index`` is a floating-point tensor (integer indices are never quantized)."""
    from ..frontend import node_dtype
    ins = ctx.view(node).inputs()
    if index >= len(ins) or not isinstance(ins[index], fx.Node):
        return False, "no such input"
    dt = node_dtype(ins[index])
    return (dt is None or dt.is_floating_point, f"input dtype is {dt}")


def _observer_config(kind: str, bits: int, symmetric: bool, signed: Optional[bool] = None,
                     axis: Optional[int] = None, narrow: bool = False, **extra) -> Dict[str, Any]:
    cfg = dict(kind=str(kind), bits=int(bits), symmetric=bool(symmetric), axis=axis, narrow=bool(narrow))
    if signed is not None:
        cfg["signed"] = bool(signed)
    cfg.update(extra)
    return cfg


def new_observer(cfg: Dict[str, Any]) -> Observer:
    kw = {k: v for k, v in cfg.items() if k != "kind"}
    try:
        obs = make_observer(cfg["kind"], **kw)
    except ValueError as e:
        raise StepError(str(e)) from None
    obs.__dict__["qpasses_config"] = dict(cfg)  # a plain attribute (nn.Module.__setattr__ is slow)
    return obs


@action("observe_input", args={"index": {"min": 0}, "bits": {"min": 2, "max": 16}, "kind": {"choices": ("minmax", "moving_average", "percentile", "mse", "entropy", "histogram", "aciq")}})
def observe_input(ctx: MatchContext, op: fx.Node, index: int = 0, kind: str = "minmax", bits: int = 8,
                  symmetric: bool = False, signed: Optional[bool] = None, **extra):
    """Put an observer between activation input ``index`` of ``op`` and ``op``.

    One observer per (value, configuration) is shared by every op that asks for it, so
    a value feeding two convolutions gets one set of qparams.
    """
    ins = ctx.view(op).inputs()
    if index >= len(ins) or not isinstance(ins[index], fx.Node):
        raise Refuse(f"{op.name} has no node input {index}")
    x = ins[index]
    bits = bits_for(ctx, op, "a_bits", bits)
    cfg = _observer_config(kind, bits, symmetric, signed, **extra)
    for u in x.users:  # an existing observer of this value with this configuration?
        if u.op == "call_module":
            m = ctx.modules.get(u.target)
            if isinstance(m, Observer) and getattr(m, "qpasses_config", None) == cfg:
                op.replace_input_with(x, u)
                return
    if index == 0 and _observes_inside(ctx, op, x):
        # the compact form: the op's module observes its own input (qpasses/compact.py)
        set_submodule(ctx.gm, op.target, with_input_quantizer(ctx.modules[op.target], new_observer(cfg)),
                      ctx.modules)
        ctx.matcher.forget(op)
        quant = dict(op.meta.get(QUANT_KEY) or {})
        quant["input"] = {"rule": getattr(ctx.rule, "name", None)}
        op.meta[QUANT_KEY] = quant
        ctx.state["compact"] = True
        return
    insert_input_quantizer(ctx, op, x, new_observer(cfg))


def insert_input_quantizer(ctx: MatchContext, op: fx.Node, x: fx.Node, module: nn.Module) -> fx.Node:
    """Register ``module`` as ``act_q_N`` and make ``op`` read ``x`` through its call (a new
    node right after ``x``, with ``x``'s meta); returns that node."""
    target = add_module(ctx, "act_q", module)
    with ctx.graph.inserting_after(x):
        q = new_node(ctx.graph, "call_module", target, (x,))
    copy_meta(x, q)
    op.replace_input_with(x, q)
    return q


_WEIGHTED = frozenset(resolve_names("weighted"))  # the op classes observe_weighted_inputs matches


def _observes_inside(ctx: MatchContext, op: fx.Node, x: fx.Node) -> bool:
    """Whether ``op``'s module can observe its input ``x`` itself: a plain call (one argument,
    ``x``) of a module with a compact form that no other node calls and that has no input
    quantizer yet, and no other weighted op reads ``x`` (that one would share the observer)."""
    if op.op != "call_module" or op.args != (x,) or op.kwargs:
        return False
    mod = ctx.modules.get(op.target)
    if compact_class(mod) is None or input_quantizer(mod) is not None or is_shared_module(ctx.gm, op):
        return False
    return not any(u is not op and ctx.classify(u) in _WEIGHTED for u in x.users)


@action("observe_output", args={"bits": {"min": 2, "max": 16}, "kind": {"choices": ("minmax", "moving_average", "percentile", "mse", "entropy", "histogram", "aciq")}})
def observe_output(ctx: MatchContext, op: fx.Node, kind: str = "minmax", bits: int = 8, symmetric: bool = False,
                   signed: Optional[bool] = None, **extra):
    """Put an observer after ``op``: every user of ``op`` reads the observed value."""
    for u in op.users:
        if u.op == "call_module" and isinstance(ctx.modules.get(u.target), (Observer, FakeQuantize)):
            raise Refuse(f"{op.name} is already observed by {u.name}")
        if u.op == "call_module" and u.args[:1] == (op,) and input_quantizer(ctx.modules.get(u.target)) is not None:
            raise Refuse(f"{op.name} is already observed (inside {u.name}'s module)")
    bits = bits_for(ctx, op, "a_bits", bits)
    cfg = _observer_config(kind, bits, symmetric, signed, **extra)
    target = add_module(ctx, "out_q", new_observer(cfg))
    users = list(op.users)
    with ctx.graph.inserting_after(op):
        obs = ctx.graph.call_module(target, (op,))
    copy_meta(op, obs)
    for u in users:
        u.replace_input_with(op, obs)


def _batched_observer_qparams(ctx: MatchContext, mod: Observer):
    """``mod.calculate_qparams()`` if the stage's batch has it, else None.

    The stage's first call computes the qparams of every observer of the graph module at
    once (:func:`calculate_qparams_many`); later calls look them up, checking the
    observer's statistics are the tensors they were computed from, unchanged since.
    """
    batch = ctx.matcher.scratch.get("quant.observer_qparams")
    if batch is None:
        observers = [m for m in ctx.modules.values() if isinstance(m, Observer)]
        qp = calculate_qparams_many(observers)
        batch = {}
        for o in observers:
            if id(o) in qp:
                lo, hi = o._buffers["min_val"], o._buffers["max_val"]
                batch[id(o)] = (o, lo, hi, lo._version, hi._version) + qp[id(o)]
        ctx.matcher.scratch["quant.observer_qparams"] = batch
    hit = batch.get(id(mod))
    if hit is None or hit[0] is not mod:
        return None
    buffers = mod._buffers  # where min_val / max_val live (read without nn.Module.__getattr__)
    lo, hi = buffers.get("min_val"), buffers.get("max_val")
    if hit[1] is lo and hit[2] is hi and hit[3] == lo._version and hit[4] == hi._version:
        return hit[5], hit[6]
    return None


@action("to_fake_quant", compact=True)
def to_fake_quant(ctx: MatchContext, obs: fx.Node, learnable: bool = False):
    """Replace a calibrated observer by a FakeQuantize carrying its qparams."""
    mod = ctx.modules.get(obs.target)
    if not isinstance(mod, Observer):
        raise Refuse(f"{obs.name} is not an observer")
    fq = _fake_quant_of(ctx, mod, f"{obs.target} ({obs.name})", learnable)
    # the observer's call now calls the fake quant: the graph (and its code) stay as they are
    set_submodule(ctx.gm, obs.target, fq, ctx.modules)
    ctx.matcher.forget(obs)


@constraint("observed_inside", compact=True)
def observed_inside(ctx: MatchContext, op: fx.Node):
    """The op's (compact) module observes its own input (qpasses/compact.py)."""
    q = input_quantizer(ctx.view(op).module)
    return isinstance(q, Observer), f"{op.name}'s module holds no input observer"


@action("input_to_fake_quant", compact=True)
def input_to_fake_quant(ctx: MatchContext, op: fx.Node, learnable: bool = False):
    """Replace the calibrated input observer inside a compact module by a FakeQuantize."""
    mod = ctx.modules.get(op.target)
    q = input_quantizer(mod)
    if not isinstance(q, Observer):
        raise Refuse(f"{op.name}'s module holds no input observer")
    # the module is the run's own (compact modules are never shared): its child is replaced in place
    set_submodule(ctx.gm, f"{op.target}.input_q", _fake_quant_of(ctx, q, f"{op.target}.input_q ({op.name})",
                                                                 learnable), ctx.modules)
    ctx.matcher.forget(op)


def _fake_quant_of(ctx: MatchContext, mod: Observer, where: str, learnable: bool) -> FakeQuantize:
    """The FakeQuantize that calibrated observer ``mod`` (named ``where`` in errors) becomes."""
    qp = _batched_observer_qparams(ctx, mod)  # found there: the observer has data, a finite range
    if qp is not None and not learnable:
        fq = FakeQuantize.from_checked(qp[0], qp[1], mod.qmin, mod.qmax, axis=mod.axis, bits=mod.bits,
                                       symmetric=mod.symmetric)
    else:
        fq = _observer_fake_quant(where, mod, qp, learnable)
    fq.__dict__["qpasses_config"] = getattr(mod, "qpasses_config", None)  # plain attribute, set cheaply
    return fq


def _observer_fake_quant(where: str, mod: Observer, qp, learnable: bool) -> FakeQuantize:
    """The FakeQuantize for observer ``mod`` (named ``where``) with the constructor's checks."""
    if qp is None:
        if not getattr(mod, "has_data", True):
            raise StepError(f"observer {where} has seen no data: run calibration first "
                            f"(PassManager(...).run(gm, data=batches))")
        qp = mod.calculate_qparams()
    scale, zero_point = qp
    try:
        fq = FakeQuantize(scale, zero_point, mod.qmin, mod.qmax, axis=mod.axis, learnable=bool(learnable),
                          bits=mod.bits, symmetric=mod.symmetric)
    except ValueError:
        if bool(torch.isfinite(scale).all()):
            raise
        lo, hi = mod.calculate_range()
        raise StepError(f"observer {where} saw a non-finite range [{float(lo.min())}, "
                        f"{float(hi.max())}]: the float model overflows on the calibration data there") from None
    return fq


def weight_axis(opclass: str, groups: int) -> Optional[int]:
    if opclass.startswith("conv_transpose"):
        return 1 if groups == 1 else None
    return 0


def weight_fake_quant(weight: torch.Tensor, opclass: str, groups: int, bits: int, per_channel: bool,
                      observer: str = "minmax", learnable: bool = False, qparams=None) -> FakeQuantize:
    """A symmetric, narrow-range (e.g. [-127, 127]) FakeQuantize fitted to ``weight``.

    ``qparams``: ``(scale, zero_point)`` of the min-max rule, when already computed and checked
    (float32 / int32 of the right shape, the scale positive and finite), as
    :func:`_weight_qparams` gives them for many weights at once.
    """
    axis = weight_axis(opclass, groups) if per_channel else None
    if observer == "minmax" and not learnable:
        # fast path (the common case, thousands of layers): max |w| per channel, no observer module
        qmin, qmax = qrange(bits, signed=True, narrow=True)
        if qparams is not None:
            return FakeQuantize.from_checked(qparams[0], qparams[1], qmin, qmax, axis=axis, bits=bits, symmetric=True)
        scale, zp = absmax_qparams(weight, axis, qmin, qmax)
        return FakeQuantize(scale, zp, qmin, qmax, axis=axis, bits=bits, symmetric=True)
    obs = new_observer(_observer_config(observer, bits, True, True, axis=axis, narrow=True))
    with torch.no_grad():
        obs(weight.detach().float())
    return FakeQuantize.from_observer(obs, learnable=learnable)


def _weight_qparams(ctx: MatchContext, weight: torch.Tensor, axis: Optional[int], bits: int,
                    per_channel: bool, default_bits: int):
    """Checked min-max qparams of a weighted op's constant ``weight``, or None (not in the
    batch, changed since, or non-finite).

    The stage's first call computes them for the weights of every candidate node of the
    rule (:func:`~qpasses.numerics.absmax_qparams_many`, one pass per shape); later calls
    look them up, checking the weight is the same tensor, unchanged since.
    """
    key = ("quant.weight_qparams", bool(per_channel), int(default_bits))
    batch = ctx.matcher.scratch.get(key)
    if batch is None:
        groups: Dict[tuple, Dict[int, torch.Tensor]] = {}
        for node in ctx.matcher.index(ctx.rule.anchor_classes()):
            if getattr(node, "_erased", False):
                continue
            v = ctx.view(node)
            w = v.tensor("weight") if v.oc is not None else None
            if not isinstance(w, torch.Tensor):
                continue
            try:
                ax = weight_axis(v.opclass, int(v.get("groups", 1) or 1)) if per_channel else None
                b = bits_for(ctx, node, "w_bits", default_bits)
            except (TypeError, ValueError):
                continue
            if ax is not None and not 0 <= ax < w.dim():
                continue
            groups.setdefault((ax, b, w.shape, w.dtype, w.device), {})[id(w)] = w
        batch = {}
        for (ax, b, *_), ws in groups.items():
            qmin, qmax = qrange(b, signed=True, narrow=True)
            qps = absmax_qparams_many(list(ws.values()), ax, qmin, qmax)
            # positive (clamped to eps) and, unless a weight holds inf / NaN, finite: checked at once;
            # a non-finite one is left to the per-weight path (whose constructor refuses it)
            finite = torch.isfinite(torch.stack([s for s, _ in qps]).reshape(len(qps), -1)).all(1).tolist()
            for w, qp, ok in zip(ws.values(), qps, finite):
                if ok:
                    batch[(id(w), ax, b)] = (w, w._version) + qp
        ctx.matcher.scratch[key] = batch
    hit = batch.get((id(weight), axis, bits))
    if hit is not None and hit[0] is weight and hit[1] == weight._version:
        return hit[2], hit[3]
    return None


def functionalize(ctx: MatchContext, op: fx.Node) -> fx.Node:
    """Rewrite a conv / linear module call to its functional form with explicit weight/bias nodes."""
    return _functionalize(ctx, op)


def _functionalize(ctx: MatchContext, op: fx.Node, wrap_weight=None) -> fx.Node:
    """:func:`functionalize`; ``wrap_weight(weight_node) -> node``, if given, makes the node the
    functional op reads as its weight (placed between the weight and the op), so a weight
    quantizer is attached without rewriting the new node's arguments a second time."""
    view = ctx.view(op)
    mod = view.module
    fn = _FUNCTIONAL.get(view.opclass)
    if mod is None or fn is None:
        return op
    if getattr(mod, "padding_mode", "zeros") != "zeros":
        raise Refuse(f"{op.name}: padding_mode={mod.padding_mode!r} is not supported by weight quantization")
    if len(op.args) > 1 or op.kwargs:
        raise Refuse(f"{op.name} is called with extra arguments (output_size?)")
    x = op.args[0]
    g = ctx.graph
    with g.inserting_before(op):
        # the module's own weight and bias: no existence check needed (get_attr would make one)
        w = new_node(g, "get_attr", f"{op.target}.weight")
        b = new_node(g, "get_attr", f"{op.target}.bias") if mod.bias is not None else None
        wa = w if wrap_weight is None else wrap_weight(w)
        if view.opclass == "linear":
            args = (x, wa, b)
        elif view.opclass.startswith("conv_transpose"):
            args = (x, wa, b, mod.stride, mod.padding, mod.output_padding, mod.groups, mod.dilation)
        else:
            args = (x, wa, b, mod.stride, mod.padding, mod.dilation, mod.groups)
        new = new_node(g, "call_function", fn, args)
    copy_meta(op, new)
    meta, new_meta = op.meta, new.meta
    for k in ("qpasses.bits", QUANT_KEY, "qpasses.folded_bn"):
        if k in meta:
            new_meta[k] = meta[k]
    new_meta["qpasses.module"] = str(op.target)
    new_meta["qpasses.module_type"] = type(mod).__name__
    op.replace_all_uses_with(new)
    g.erase_node(op)
    ctx.matcher.forget(op)
    return new


def attach_weight_quantizer(ctx: MatchContext, op: fx.Node, module: nn.Module, prefix: str,
                            info: Dict[str, Any]) -> fx.Node:
    """Make weighted ``op`` read its weight through ``module`` (registered as ``prefix_N``).

    Module calls are first rewritten to their functional form so the weight is an explicit
    input; ``info`` is recorded as ``op.meta["qpasses.quant"]["weight"]``.  Returns the
    (possibly new) op node.
    """
    def wrap(wnode: fx.Node) -> fx.Node:
        target = add_module(ctx, prefix, module)
        wq = new_node(ctx.graph, "call_module", target, (wnode,))  # at the caller's insert point
        copy_meta(wnode, wq)
        return wq

    new = _functionalize(ctx, op, wrap)
    if new is op:  # already functional (or aten): its weight argument is rewired
        view = ctx.view(op)
        wnode = view.get("weight")
        with ctx.graph.inserting_before(op):
            wq = wrap(wnode)
        view.set("weight", wq)
    # a new dict: the old one may be shared with the node this graph was copied from
    quant = dict(new.meta.get(QUANT_KEY) or {})
    quant["weight"] = info
    new.meta[QUANT_KEY] = quant
    return new


@action("quantize_weight", compact=True, args={"bits": {"min": 2, "max": 16}, "observer": {"choices": ("minmax", "moving_average", "percentile", "mse", "entropy", "histogram", "aciq")}})
def quantize_weight(ctx: MatchContext, op: fx.Node, bits: int = 8, per_channel: bool = True,
                    observer: str = "minmax", learnable: bool = False):
    """Make ``op`` read its weight through a per-channel symmetric FakeQuantize."""
    view = ctx.view(op)
    w = view.tensor("weight")
    if w is None:
        raise Refuse(f"the weight of {op.name} is not a constant")
    default_bits = bits
    bits = bits_for(ctx, op, "w_bits", bits)
    groups = int(view.get("groups", 1) or 1)
    qp = None
    if str(observer) == "minmax" and not learnable:
        axis = weight_axis(view.opclass, groups) if per_channel else None
        qp = _weight_qparams(ctx, w, axis, bits, bool(per_channel), default_bits)
    fq = weight_fake_quant(w, view.opclass, groups, bits, bool(per_channel), str(observer), bool(learnable), qp)
    info = {"bits": bits, "axis": fq.axis}
    if op.op == "call_module" and len(op.args) == 1 and not op.kwargs and compact_class(view.module) is not None \
            and not is_shared_module(ctx.gm, op):
        # the compact form: the same call, its module now reading the weight through fq
        # (expanded to the decomposed form before any later stage: see qpasses/compact.py)
        if is_compact(view.module):  # the run's own module (observe made it, or the run's copy): a new child
            set_submodule(ctx.gm, f"{op.target}.weight_fq", fq, ctx.modules)
        else:
            set_submodule(ctx.gm, op.target, compact_module(view.module, fq), ctx.modules)
        ctx.matcher.forget(op)
        quant = dict(op.meta.get(QUANT_KEY) or {})
        quant["weight"] = info
        op.meta[QUANT_KEY] = quant
        ctx.state["compact"] = True
        return
    attach_weight_quantizer(ctx, op, fq, "weight_fq", info)
