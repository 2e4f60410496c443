"""Quantization actions: observers on activation inputs, fake-quantized weights, observer -> fake quant.

Representation (shared by every later rule, the integer back-ends and ONNX export):

* prepare: ``call_module`` :class:`~qpasses.numerics.Observer` nodes between an
  activation and the weighted ops that read it (one observer per value and config,
  shared by every weighted consumer; other consumers keep reading the float value);
* convert: each observer module is replaced at its name by a
  :class:`~qpasses.numerics.FakeQuantize` (per-tensor affine by default) and its node becomes
  that quantizer's op call (:mod:`qpasses.qnodes`:
  ``qpasses.fake_quant_per_tensor(x, get_attr act_q_N.scale, get_attr act_q_N.zero_point, ...)``);
  each weighted op reads its weight through a per-channel symmetric ``FakeQuantize`` in the same
  form: ``F.conv2d(x_fq, fake_quant_per_channel(get_attr weight, get_attr weight_fq_N.scale, ...),
  bias, ...)``.  Every quantizer is one node of the graph, never hidden inside a module.
"""
from __future__ import annotations

from typing import Any, Dict, Optional

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from ...errors import StepError
from ...lang.registry import action, constraint
from ...numerics.observers import OBSERVER_KIND, BITS
from ...context import Refuse
from ...matcher import MatchContext
from ...numerics import FakeQuantize, Observer, absmax_qparams, make_observer, qrange
from ...opclasses import register_module_class
from ...qnodes import as_quantizer_call, has_graph_call, insert_quantizer, quantizer_module, stateless_call
from .._graphutil import add_module

register_module_class(Observer, "observer")
register_module_class(FakeQuantize, "fake_quant")

QUANT_KEY = "qpasses.quant"

_FUNCTIONAL = {
    "conv1d": F.conv1d, "conv2d": F.conv2d, "conv3d": F.conv3d,
    "conv_transpose1d": F.conv_transpose1d, "conv_transpose2d": F.conv_transpose2d,
    "conv_transpose3d": F.conv_transpose3d, "linear": F.linear,
}


def _is_quant_module(ctx: MatchContext, node: Any, kinds=(Observer, FakeQuantize)) -> bool:
    return quantizer_module(ctx.modules, node, kinds) is not None


def bits_for(ctx: MatchContext, node: fx.Node, kind: str, default: int) -> int:
    """Bit-width for ``node``: a per-node annotation (``assign_bits``) wins over the recipe default."""
    ann = node.meta.get("qpasses.bits")
    if isinstance(ann, dict) and ann.get(kind) is not None:
        return int(ann[kind])
    return int(default)


@constraint("input_quantized", args={"index": {"min": 0}})
def input_quantized(ctx: MatchContext, node: fx.Node, index: int = 0):
    """The op's activation input ``index`` already passes through an observer or fake quant."""
    ins = ctx.view(node).inputs()
    if index >= len(ins):
        return False
    return (_is_quant_module(ctx, ins[index]), f"input {index} of {node.name} is already observed/quantized")


@constraint("weight_quantized")
def weight_quantized(ctx: MatchContext, node: fx.Node):
    """The op already reads its weight through a fake quant (or was marked quantized)."""
    if node.meta.get(QUANT_KEY, {}).get("weight"):
        return True, f"{node.name} already has a quantized weight"
    w = ctx.view(node).get("weight")
    return (_is_quant_module(ctx, w, (FakeQuantize,)), f"{node.name} already has a quantized weight")


@constraint("float_input", args={"index": {"min": 0}})
def float_input(ctx: MatchContext, node: fx.Node, index: int = 0):
    """Input ``index`` is a floating-point tensor (integer indices are never quantized)."""
    from ...frontend import node_dtype
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
    obs.qpasses_config = dict(cfg)
    return obs


@action("observe_input", args={"index": {"min": 0}, "bits": BITS, "kind": OBSERVER_KIND})
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
    insert_input_quantizer(ctx, op, x, new_observer(cfg))


def insert_input_quantizer(ctx: MatchContext, op: fx.Node, x: fx.Node, module: nn.Module) -> fx.Node:
    """Register ``module`` as ``act_q_N`` and make ``op`` read ``x`` through it (a new node right
    after ``x``, with ``x``'s meta: the quantizer op call for a ``FakeQuantize``, a module call
    for an observer); returns that node."""
    target = add_module(ctx, "act_q", module)
    if has_graph_call(module):
        q = insert_quantizer(ctx, x, target, after=x)
    else:
        q = ctx.insert("call_module", target, (x,), after=x, like=x)
    ctx.replace_input(op, x, q)
    return q


@action("observe_output", args={"bits": BITS, "kind": OBSERVER_KIND})
def observe_output(ctx: MatchContext, op: fx.Node, kind: str = "minmax", bits: int = 8, symmetric: bool = False,
                   signed: Optional[bool] = None, **extra):
    """Put an observer after ``op``: every user of ``op`` reads the observed value."""
    for u in op.users:
        if _is_quant_module(ctx, u):
            raise Refuse(f"{op.name} is already observed by {u.name}")
    bits = bits_for(ctx, op, "a_bits", bits)
    cfg = _observer_config(kind, bits, symmetric, signed, **extra)
    target = add_module(ctx, "out_q", new_observer(cfg))
    obs = ctx.insert("call_module", target, (op,), after=op, like=op)
    ctx.replace_uses(op, obs, keep=obs)


@action("to_fake_quant")
def to_fake_quant(ctx: MatchContext, obs: fx.Node, learnable: bool = False):
    """Replace a calibrated observer by a FakeQuantize carrying its qparams."""
    mod = ctx.modules.get(obs.target)
    if not isinstance(mod, Observer):
        raise Refuse(f"{obs.name} is not an observer")
    fq = _observer_fake_quant(f"{obs.target} ({obs.name})", mod, bool(learnable))
    fq.qpasses_config = getattr(mod, "qpasses_config", None)
    # the observer's node becomes the fake quant's op call, reading its tensors from the module
    ctx.replace_module(obs.target, fq)
    as_quantizer_call(ctx, obs)


def _observer_fake_quant(where: str, mod: Observer, learnable: bool) -> FakeQuantize:
    """The FakeQuantize for calibrated observer ``mod`` (named ``where`` in errors)."""
    if not getattr(mod, "has_data", True):
        raise StepError(f"observer {where} has seen no data: run calibration first "
                        f"(PassManager(...).run(gm, data=batches))")
    scale, zero_point = mod.calculate_qparams()
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
                      observer: str = "minmax", learnable: bool = False) -> FakeQuantize:
    """A symmetric, narrow-range (e.g. [-127, 127]) FakeQuantize fitted to ``weight``."""
    axis = weight_axis(opclass, groups) if per_channel else None
    if observer == "minmax" and not learnable:
        # max |w| per channel, without an observer module
        qmin, qmax = qrange(bits, signed=True, narrow=True)
        scale, zp = absmax_qparams(weight, axis, qmin, qmax)
        return FakeQuantize(scale, zp, qmin, qmax, axis=axis, bits=bits, symmetric=True)
    obs = new_observer(_observer_config(observer, bits, True, True, axis=axis, narrow=True))
    with torch.no_grad():
        obs(weight.detach().float())
    return FakeQuantize.from_observer(obs, learnable=learnable)


def _functionalize(ctx: MatchContext, op: fx.Node, wrap_weight) -> fx.Node:
    """Rewrite a conv / linear module call to its functional form with explicit weight / bias
    ``get_attr`` nodes; ``wrap_weight(weight_node) -> node`` makes the node the functional op
    reads as its weight.  Returns ``op`` itself when it is not a module call."""
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
    w = ctx.get_attr(f"{op.target}.weight", before=op)
    b = ctx.get_attr(f"{op.target}.bias", before=op) if mod.bias is not None else None
    wa = wrap_weight(w)
    if view.opclass == "linear":
        args = (x, wa, b)
    elif view.opclass.startswith("conv_transpose"):
        args = (x, wa, b, mod.stride, mod.padding, mod.output_padding, mod.groups, mod.dilation)
    else:
        args = (x, wa, b, mod.stride, mod.padding, mod.dilation, mod.groups)
    new = ctx.insert("call_function", fn, args, before=op, like=op)
    for k in ("qpasses.bits", QUANT_KEY, "qpasses.folded_bn"):
        if k in op.meta:
            new.meta[k] = op.meta[k]
    new.meta["qpasses.module"] = str(op.target)
    new.meta["qpasses.module_type"] = type(mod).__name__
    ctx.replace_uses(op, new)
    ctx.erase(op)
    return new


def attach_weight_quantizer(ctx: MatchContext, op: fx.Node, module: nn.Module, prefix: str,
                            info: Dict[str, Any]) -> fx.Node:
    """Make weighted ``op`` read its weight through ``module`` (registered as ``prefix_N``).

    Module calls are first rewritten to their functional form so the weight is an explicit
    input; ``info`` is recorded as ``op.meta["qpasses.quant"]["weight"]``.  Returns the
    (possibly new) op node.
    """
    def wrap(wnode: fx.Node) -> fx.Node:
        call = stateless_call(module)
        if call is not None:   # a quantizer without state: a plain op call, no module
            return ctx.insert("call_function", call[0], (wnode, *call[1]), after=wnode, like=wnode, name=prefix)
        target = add_module(ctx, prefix, module)
        if has_graph_call(module):
            return insert_quantizer(ctx, wnode, target, after=wnode)
        return ctx.insert("call_module", target, (wnode,), after=wnode, like=wnode)

    new = _functionalize(ctx, op, wrap)
    if new is op:  # already functional (or aten): its weight argument is rewired
        view = ctx.view(op)
        view.set("weight", wrap(view.get("weight")))
    # a new dict: the old one may be shared with the node this graph was copied from
    quant = dict(new.meta.get(QUANT_KEY) or {})
    quant["weight"] = info
    new.meta[QUANT_KEY] = quant
    return new


@action("quantize_weight", args={"bits": BITS, "observer": OBSERVER_KIND})
def quantize_weight(ctx: MatchContext, op: fx.Node, bits: int = 8, per_channel: bool = True,
                    observer: str = "minmax", learnable: bool = False):
    """Make ``op`` read its weight through a per-channel symmetric FakeQuantize."""
    view = ctx.view(op)
    w = view.tensor("weight")
    if w is None:
        raise Refuse(f"the weight of {op.name} is not a constant")
    bits = bits_for(ctx, op, "w_bits", bits)
    groups = int(view.get("groups", 1) or 1)
    fq = weight_fake_quant(w, view.opclass, groups, bits, bool(per_channel), str(observer), bool(learnable))
    attach_weight_quantizer(ctx, op, fq, "weight_fq", {"bits": bits, "axis": fq.axis})
