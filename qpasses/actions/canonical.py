"""Canonicalize actions for weighted ops spelled as matrix products (rules/canonicalize.yaml).

GPT-2's ``Conv1D`` is ``addmm(bias, x, W)`` with ``W`` of shape ``[in, out]``, and some models
write ``x @ W`` against a constant 2-D weight.  Both are a ``linear``; every weighted-op rule
(observe, convert, dynamic, weight_int4, lower, ONNX export) expects ``linear``'s ``[out, in]``
weight, whose per-channel axis is dim 0.  So the op is rewritten once, here, into
``linear(x, W.T, bias)``: the new weight is a parameter holding ``W.T`` (the out dim of the
``[in, out]`` weight, its dim 1, becomes dim 0), and the numerics are those of the original
op.  The original parameter is left to the module that owns it (shared with the input graph).
"""
from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F

from ..lang.registry import action, constraint
from ..context import Refuse
from ..matcher import MatchContext
from .graphutil import add_param, erase_if_unused


def _constant(ctx: MatchContext, value: Any) -> Any:
    if isinstance(value, fx.Node) and value.op == "get_attr":
        obj = ctx.gm
        for part in str(value.target).split("."):
            obj = getattr(obj, part)
        return obj
    return None


@action("as_linear", replaces=True)
def as_linear(ctx: MatchContext, op: fx.Node):
    """``addmm(b, x, W)`` / ``mm(x, W)`` / ``matmul(x, W)`` with a constant ``[in, out]`` weight
    ``W`` (and a constant ``[out]`` bias, ``beta = alpha = 1``) becomes ``linear(x, W.T, b)``."""
    view = ctx.view(op)
    cls = view.opclass
    if cls == "addmm":
        x, wnode, bnode = view.get("input"), view.get("weight"), view.get("bias")
        if view.get("beta", 1) != 1 or view.get("alpha", 1) != 1:
            raise Refuse(f"{op.name}: addmm with beta / alpha other than 1 is not a linear")
    elif cls == "matmul":
        ins = [view.get(n) for n in view._names()[:2]]
        x, wnode, bnode = ins[0], ins[1], None
    else:
        raise Refuse(f"{op.name} is {cls}, not addmm / matmul")
    w = _constant(ctx, wnode)
    if not isinstance(w, torch.Tensor):
        raise Refuse(f"the weight of {op.name} is not a constant (an activation product, left to matmul rules)")
    if w.dim() != 2 or not w.is_floating_point():
        raise Refuse(f"the weight of {op.name} has shape {tuple(w.shape)}: a linear needs a 2-D float [in, out] weight")
    b = None
    if bnode is not None:
        b = _constant(ctx, bnode)
        if not isinstance(b, torch.Tensor) or b.dim() != 1 or b.numel() != w.shape[1]:
            raise Refuse(f"the bias of {op.name} is not a constant [{w.shape[1]}] vector")
    if not isinstance(x, fx.Node):
        raise Refuse(f"the input of {op.name} is not a graph value")
    aten_level = isinstance(op.target, torch._ops.OpOverload)
    linear = torch.ops.aten.linear.default if aten_level else F.linear
    wt = add_param(ctx, "linear_weight", w.detach().t().contiguous(), op, requires_grad=w.requires_grad)
    new = ctx.insert("call_function", linear, (x, wt, bnode), before=op, like=op)
    for k in ("qpasses.module", "qpasses.module_type"):
        if k in op.meta:
            new.meta[k] = op.meta[k]
    new.meta["qpasses.transposed_from"] = f"{cls} {wnode.target}"
    ctx.replace_uses(op, new)
    ctx.erase(op)
    erase_if_unused(ctx, wnode)


@constraint("constant_operand")
def constant_operand(ctx: MatchContext, op: fx.Node):
    """The second operand of a matmul is a constant tensor (``get_attr``): a weight."""
    view = ctx.view(op)
    names = view._names()
    other = view.get(names[1]) if len(names) > 1 else None
    ok = isinstance(_constant(ctx, other), torch.Tensor)
    return ok, "" if ok else f"the second operand of {op.name} is an activation"
