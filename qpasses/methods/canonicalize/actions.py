"""Canonicalize actions for weighted ops spelled as matrix products (qpasses/methods/canonicalize/canonicalize.yaml).

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

from ...lang.registry import action, constraint
from ...context import Refuse
from ...matcher import MatchContext
from .._graphutil import add_param, erase_if_unused


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


# ================================================================================ RMSNorm
# HF's RMSNorm (Llama, Qwen2, Mistral, ...) is written out as
#   weight * (x * rsqrt(mean(x ** 2, -1, keepdim=True) + eps))
# and a torch.export graph keeps it as five nodes.  The `fuse_rms_norm` rule of
# qpasses/methods/canonicalize/canonicalize.yaml matches that chain and replaces it by one `rms_norm` node, so rules
# that reason about normalisation layers (smoothing, balancing) see a single producer.
# The op classes the pattern needs are registered here when no other module has them yet.
from ...opclasses import OP_CLASSES, OpClass, register_op_class  # noqa: E402

_aten = torch.ops.aten
for _oc in (
    OpClass("pow", ("input", "exponent"), functions=(torch.pow,), methods=("pow",),
            spellings={_aten.pow.Tensor_Scalar: ("input", "exponent")}),
    OpClass("mean", ("input", "dim", "keepdim", "dtype"), defaults={"keepdim": False, "dtype": None},
            functions=(torch.mean,), methods=("mean",),
            spellings={_aten.mean.dim: ("input", "dim", "keepdim", "dtype")}),
    OpClass("rsqrt", ("input",), functions=(torch.rsqrt,), methods=("rsqrt",),
            spellings={_aten.rsqrt.default: ("input",)}),
):
    if _oc.name not in OP_CLASSES:
        register_op_class(_oc)


def _number(v: Any):
    return v if isinstance(v, (int, float)) and not isinstance(v, bool) else None


@action("fuse_rms_norm", replaces=True)
def fuse_rms_norm(ctx: MatchContext, out: fx.Node, norm: fx.Node, r: fx.Node, x: fx.Node, pw: fx.Node,
                  mean: fx.Node, eps_add: fx.Node, w: fx.Node):
    """``w * (x * rsqrt(mean(x ** 2, -1, keepdim=True) + eps))`` becomes ``rms_norm(x, [C], w, eps)``.

    Refused unless: the squared input is the normalised input, the exponent is 2, the mean is over
    the last dim only with ``keepdim``, ``eps`` is a number and ``w`` a constant ``[C]`` vector
    (``C`` the last dim of ``x``)."""
    if ctx.view(pw).get("input") is not x:
        raise Refuse(f"{pw.name} squares {ctx.view(pw).get('input')}, not the normalised input {x}")
    if _number(ctx.view(pw).get("exponent")) != 2:
        raise Refuse(f"{pw.name}: exponent {ctx.view(pw).get('exponent')!r} is not 2")
    mv = ctx.view(mean)
    dim, keep = mv.get("dim"), mv.get("keepdim")
    shape = x.meta.get("val").shape if hasattr(x.meta.get("val"), "shape") else x.meta.get("qpasses.shape")
    if shape is None:
        raise Refuse(f"{x.name}: the input's shape is not recorded")
    rank = len(shape)
    dims = list(dim) if isinstance(dim, (list, tuple)) else [dim]
    if len(dims) != 1 or not isinstance(dims[0], int) or dims[0] % rank != rank - 1 or not keep:
        raise Refuse(f"{mean.name}: mean over {dim} (keepdim={keep}), not over the last dim with keepdim")
    if mv.get("dtype") is not None:
        raise Refuse(f"{mean.name}: mean with a dtype cast")
    ev = ctx.view(eps_add)
    eps = [v for v in (ev.get("input"), ev.get("other")) if v is not mean]
    if len(eps) != 1 or _number(eps[0]) is None or ev.get("alpha", 1) != 1:
        raise Refuse(f"{eps_add.name}: eps is not a number")
    weight = _constant(ctx, w)
    C = shape[-1]
    if not isinstance(weight, torch.Tensor) or weight.dim() != 1 or not isinstance(C, int) or weight.numel() != C:
        raise Refuse(f"{out.name}: the scale {w} is not a constant [{C}] vector")
    aten_level = isinstance(out.target, torch._ops.OpOverload)
    if aten_level:
        new = ctx.insert("call_function", torch.ops.aten.rms_norm.default, (x, [int(C)], w, float(eps[0])),
                         before=out, like=out)
    else:
        new = ctx.insert("call_function", F.rms_norm, (x, [int(C)], w, float(eps[0])), before=out, like=out)
    new.meta["qpasses.fused_from"] = "rms_norm: " + ", ".join(n.name for n in (pw, mean, eps_add, norm, out))
    ctx.replace_uses(out, new)
    for n in (out, norm, r, eps_add, mean, pw):
        ctx.rewrite.erase_if_unused(n)
