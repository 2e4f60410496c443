"""Actions and constraints of the ``binarize`` rule family (BNN / XNOR-Net).

Representation after ``binarize`` (both graph levels):

* a binarized weighted op is in functional form and reads its weight through
  ``qpasses.binary_weight(get_attr <latent float weight>, axis, scale)`` (op class
  ``binary_weight``; a plain op call: the quantizer keeps no tensors, so no module); its node meta
  ``qpasses.quant["weight"] = {"bits": 1, "binary": True, "axis": .., "scale": ..}`` (so the
  ``convert`` family leaves it alone);
* its activation input goes through ``qpasses.binary_sign(x)`` (op class ``binary_act``, shared per
  value); a ReLU that ``drop_relu`` removed in front of it is recorded as
  ``meta["qpasses.float_activation"]`` on that node (the layer report's float reference uses it);
* the first and last weighted ops (graph order) keep ``edge_bits`` fake quantization
  (observer on the input, per-channel weight FakeQuantize), annotated ``qpasses.bits``;
* BatchNorm is untouched (a BNN needs it after each binary conv);
* after the optional ``pack`` stage, binary linear / conv2d layers are
  ``PackedBinaryLinear`` / ``PackedBinaryConv2d`` modules on 1-bit packed weights.
"""
from __future__ import annotations

from typing import List, Optional, Set

import torch
import torch.fx as fx

from ...lang.registry import action, constraint
from ...numerics.observers import OBSERVER_KIND, BITS
from ...context import Refuse
from ...matcher import MatchContext
from .lib import (BinaryActivation, BinaryWeight, PackedBinaryConv2d, PackedBinaryLinear)
from ...opclasses import OP_CLASSES, OpClass, register_module_class, register_op_class
from ...qnodes import stateless_call
from .._graphutil import add_module, copy_meta
from ..ptq.actions import QUANT_KEY, attach_weight_quantizer, observe_input, quantize_weight, weight_axis

FLOAT_ACTIVATION_KEY = "qpasses.float_activation"
_SIGN = torch.ops.qpasses.binary_sign.default
_BWEIGHT = torch.ops.qpasses.binary_weight.default
if "binary_act" not in OP_CLASSES:      # the op calls, and (below) the module form
    register_op_class(OpClass("binary_act", ("input",), spellings={_SIGN: ("input",)}))
if "binary_weight" not in OP_CLASSES:
    register_op_class(OpClass("binary_weight", ("input", "axis", "scale"),
                              spellings={_BWEIGHT: ("input", "axis", "scale")}))
register_module_class(BinaryActivation, "binary_act")
register_module_class(BinaryWeight, "binary_weight")
register_module_class(PackedBinaryLinear, "packed_binary")  # PackedBinaryConv2d is a subclass

_WEIGHTED = ("conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d", "conv_transpose3d", "linear")
_EDGE_KEY = "binarize.edges"


def weighted_nodes(ctx: MatchContext) -> List[fx.Node]:
    """Weighted ops (conv*, conv_transpose*, linear) in graph order."""
    return [n for n in ctx.graph.nodes if ctx.classify(n) in _WEIGHTED]


def _edges(ctx: MatchContext) -> Set[fx.Node]:
    """The first and last weighted ops of the graph (computed once per graph, then kept up to date)."""
    hit = ctx.state.get(_EDGE_KEY)
    if hit is not None and hit[0] == id(ctx.graph) and all(n.graph is ctx.graph for n in hit[1]):
        return hit[1]
    ws = weighted_nodes(ctx)
    edges = {ws[0], ws[-1]} if ws else set()
    ctx.state[_EDGE_KEY] = (id(ctx.graph), edges)
    return edges


@constraint("binarize_edge")
def binarize_edge(ctx: MatchContext, node: fx.Node):
    """The node is the first or the last weighted op of the graph (graph order, not names)."""
    ok = node in _edges(ctx)
    return ok, (f"{node.name} is the first or last weighted op" if ok else f"{node.name} is an inner weighted op")


@constraint("binary_weight")
def binary_weight(ctx: MatchContext, node: fx.Node):
    """The weighted op reads a binarized weight (``BinaryWeight``)."""
    w = ctx.view(node).get("weight")
    ok = isinstance(w, fx.Node) and ctx.classify(w) == "binary_weight"
    return ok, ("" if ok else f"{node.name} does not read a BinaryWeight")


@constraint("input_binary", args={"index": {"min": 0}})
def input_binary(ctx: MatchContext, node: fx.Node, index: int = 0):
    """Activation input ``index`` of the op is already binarized."""
    ins = ctx.view(node).inputs()
    ok = index < len(ins) and isinstance(ins[index], fx.Node) and ctx.classify(ins[index]) == "binary_act"
    return ok, (f"input {index} of {node.name} is already binarized" if ok else "")


_PASS_THROUGH = ("max_pool", "flatten", "reshape", "permute", "transpose")


@constraint("only_feeds_binary")
def only_feeds_binary(ctx: MatchContext, node: fx.Node):
    """Every use of the node's value reaches a ``BinaryActivation`` through max-pool / shape ops only
    (so a ReLU before it is dead weight: sign(relu(x)) would be constant +1)."""
    stack, seen = [node], set()
    while stack:
        n = stack.pop()
        for u in n.users:
            if u in seen:
                continue
            seen.add(u)
            cls = ctx.classify(u)
            if cls == "binary_act":
                continue
            if cls in _PASS_THROUGH:
                stack.append(u)
                continue
            return False, f"{node.name} also feeds {u.name} ({cls or u.op})"
    return True, ""


@action("mark_bits", args={"w_bits": {"min": 1, "max": 32}, "a_bits": {"min": 1, "max": 32}})
def mark_bits(ctx: MatchContext, op: fx.Node, w_bits: Optional[int] = None, a_bits: Optional[int] = None):
    """Annotate ``op`` with ``qpasses.bits`` (keeps an existing annotation's other field)."""
    ann = dict(op.meta.get("qpasses.bits") or {})
    if w_bits is not None:
        ann["w_bits"] = int(w_bits)
    if a_bits is not None:
        ann["a_bits"] = int(a_bits)
    op.meta["qpasses.bits"] = ann


@action("quantize_edge", args={"bits": BITS, "observer": OBSERVER_KIND})
def quantize_edge(ctx: MatchContext, op: fx.Node, bits: int = 8, observer: str = "minmax",
                  learnable: bool = False, observe: bool = True):
    """Keep a first/last layer at ``bits``: observer on its input (converted to a fake quant by the
    ``convert`` family after calibration) and a per-channel weight FakeQuantize (LSQ if ``learnable``)."""
    view = ctx.view(op)
    if view.tensor("weight") is None:
        raise Refuse(f"the weight of {op.name} is not a constant")
    edges = _edges(ctx)
    mark_bits(ctx, op, bits, bits)
    if observe:
        ins = view.inputs()
        if ins and isinstance(ins[0], fx.Node) and ctx.classify(ins[0]) not in ("observer", "fake_quant"):
            observe_input(ctx, op, index=0, kind=observer, bits=bits)
    nodes_before = set(ctx.graph.nodes)
    quantize_weight(ctx, op, bits=bits, per_channel=True, learnable=learnable)
    # functionalize replaced the module call: keep the edge set pointing at the new node
    if op not in set(ctx.graph.nodes):
        new = [n for n in ctx.graph.nodes if n not in nodes_before and ctx.classify(n) in _WEIGHTED]
        edges.discard(op)
        edges.update(new)


@action("binarize_weight")
def binarize_weight(ctx: MatchContext, op: fx.Node, scale: bool = True):
    """Make ``op`` read ``BinaryWeight(latent weight)``: ``alpha * sign(w)`` (XNOR) or ``sign(w)``."""
    view = ctx.view(op)
    w = view.tensor("weight")
    if w is None:
        raise Refuse(f"the weight of {op.name} is not a constant")
    groups = int(view.get("groups", 1) or 1)
    axis = weight_axis(view.opclass, groups)
    if axis is None:
        raise Refuse(f"{op.name}: grouped conv_transpose has no single output-channel axis to scale")
    op = attach_weight_quantizer(ctx, op, BinaryWeight(scale=bool(scale), axis=axis), "binary_w",
                                 {"bits": 1, "axis": axis, "binary": True, "scale": bool(scale)})
    op.meta["qpasses.bits"] = {**(op.meta.get("qpasses.bits") or {}), "w_bits": 1}


@action("binarize_input", args={"index": {"min": 0}})
def binarize_input(ctx: MatchContext, op: fx.Node, index: int = 0):
    """Put a ``BinaryActivation`` (sign, hardtanh STE) on activation input ``index`` of ``op``;
    one per value, shared by every binarized consumer."""
    ins = ctx.view(op).inputs()
    if index >= len(ins) or not isinstance(ins[index], fx.Node):
        raise Refuse(f"{op.name} has no node input {index}")
    x = ins[index]
    for u in x.users:
        if u is not op and ctx.classify(u) == "binary_act":
            op.replace_input_with(x, u)
            break
    else:   # stateless: a plain op call, no module
        sign, consts = stateless_call(BinaryActivation())
        b = ctx.insert("call_function", sign, (x, *consts), after=x, like=x, name="binary_act")
        op.replace_input_with(x, b)
    op.meta.setdefault(QUANT_KEY, {})["input"] = {"bits": 1, "binary": True}
    op.meta["qpasses.bits"] = {**(op.meta.get("qpasses.bits") or {}), "a_bits": 1}


@action("drop_relu")
def drop_relu(ctx: MatchContext, relu: fx.Node, value: fx.Node):
    """Remove a ReLU whose value only reaches sign(): sign(maxpool(x)) replaces sign(maxpool(relu(x))).

    The sign modules it fed remember it (``BinaryActivation.float_activation``): a ReLU commutes
    with max-pooling, so ``act(maxpool(x))`` is the float value there either way."""
    kind = "relu6" if ctx.classify(relu) == "relu6" else "relu"
    for u in list(relu.users):
        for b in ([u] if ctx.classify(u) == "binary_act" else list(u.users)):
            if ctx.classify(b) != "binary_act":
                continue
            b.meta[FLOAT_ACTIVATION_KEY] = kind
            mod = ctx.modules.get(b.target) if b.op == "call_module" else None
            if isinstance(mod, BinaryActivation):
                mod.float_activation = kind
    relu.replace_all_uses_with(value)
    ctx.graph.erase_node(relu)


def _binary_weight_of(ctx: MatchContext, wnode) -> Optional[BinaryWeight]:
    """The ``BinaryWeight`` a weight node computes: its module (a module call), or one built from
    the constants of a ``binary_weight`` op call; else None."""
    if not isinstance(wnode, fx.Node):
        return None
    if wnode.op == "call_function" and wnode.target is _BWEIGHT and len(wnode.args) == 3:
        axis, scale = wnode.args[1], wnode.args[2]
        return BinaryWeight(scale=bool(scale), axis=int(axis)) if isinstance(axis, int) else None
    mod = ctx.modules.get(wnode.target) if wnode.op == "call_module" else None
    return mod if isinstance(mod, BinaryWeight) else None


@action("pack_binary_layer")
def pack_binary_layer(ctx: MatchContext, op: fx.Node):
    """Replace a binary linear / conv2d (BinaryWeight weight, ±1 input) by a 1-bit packed module."""
    view = ctx.view(op)
    wnode = view.get("weight")
    bw = _binary_weight_of(ctx, wnode)
    if bw is None or bw.axis != 0:
        raise Refuse(f"{op.name} does not read a BinaryWeight along axis 0")
    src = wnode.args[0]
    if not (isinstance(src, fx.Node) and src.op == "get_attr"):
        raise Refuse(f"the latent weight of {op.name} is not a constant")
    from ...opclasses import get_attr_value
    w = get_attr_value(ctx.gm, src.target).detach().float()
    alpha = bw.alpha(w) if bw.scale else None
    bias = view.tensor("bias")
    if view.get("bias") is not None and bias is None:
        raise Refuse(f"the bias of {op.name} is not a constant")
    if view.opclass == "linear":
        mod = PackedBinaryLinear(w, alpha, bias)
    elif view.opclass == "conv2d":
        if int(view.get("groups", 1) or 1) != 1:
            raise Refuse(f"{op.name}: grouped conv is not packed (binary_linear is a dense GEMM)")
        padding = view.get("padding", 0)
        if isinstance(padding, str):
            raise Refuse(f"{op.name}: string padding {padding!r} is not packed")
        mod = PackedBinaryConv2d(w, alpha, bias, view.get("stride", 1), padding, view.get("dilation", 1))
    else:
        raise Refuse(f"{op.name}: only linear and conv2d are packed, not {view.opclass}")
    if w.numel() // w.shape[0] > 2 ** 24:
        raise Refuse(f"{op.name}: reduction too long for the int32 accumulator")
    x = view.inputs()[0]
    bnode = view.get("bias")
    target = add_module(ctx, "packed_binary", mod)
    with ctx.graph.inserting_before(op):
        new = ctx.graph.call_module(target, (x,))
    copy_meta(op, new)
    new.meta[QUANT_KEY] = {"weight": {"bits": 1, "binary": True, "packed": True}, "input": {"bits": 1}}
    new.meta["qpasses.bits"] = {"w_bits": 1, "a_bits": 1}
    op.replace_all_uses_with(new)
    ctx.graph.erase_node(op)
    for n in (wnode, src, bnode):
        if isinstance(n, fx.Node) and not n.users:
            ctx.graph.erase_node(n)
