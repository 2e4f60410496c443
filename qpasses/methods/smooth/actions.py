"""Actions of the ``smooth`` family (qpasses/methods/smooth/smooth.yaml): fold per-channel balancing scales.

A balancing data step (``smooth_scales`` for SmoothQuant, ``awq_scales`` for AWQ, in
``qpasses/methods/smooth/steps.py``) finds the layer groups from the graph's structure
(:mod:`qpasses.methods.smooth.balance`), chooses one positive scale ``s_j`` per producer channel and
records the plan on the nodes.  The rules here carry it out, exactly in float:

* ``balance_fold`` -- a producer that absorbs ``1/s`` (a LayerNorm / RMSNorm's weight and bias,
  a linear's weight rows and bias) and its consumers' weight columns that take ``s`` (through the
  channel map, e.g. repeated for grouped-query attention);
* ``balance_scale_node`` -- a group whose producer cannot absorb the scale (a post-LN LayerNorm
  that also feeds the residual, a GELU) gets an explicit ``mul(x, 1/s)`` node in front of its
  consumers (only when the step was run with ``scale_nodes=true``).

Weights are replaced by new parameters (``get_attr``), or, for module calls, on the module (a
module called from elsewhere too is copied first), so a weight shared with another op (GPT-2's
tied ``lm_head``) keeps its value for that op.  Everything is computed and checked before the
graph changes: a refused group leaves it as it was.
"""
from __future__ import annotations

import copy
from typing import Dict, List, Tuple

import torch
import torch.fx as fx
import torch.nn as nn

from ...context import Refuse
from ...lang.registry import action, constraint
from ...matcher import MatchContext
from ...opclasses import get_attr_value

PLAN_KEY = "qpasses.balance"            # on a producer: {"group": Group, "scale": Tensor}
REFUSED_KEY = "qpasses.balance_refused"  # on a producer: the reason it is no group
NODE_KEY = "qpasses.balance_node"       # on a consumer of a scale-node group: shared plan dict

__all__ = ["PLAN_KEY", "REFUSED_KEY", "NODE_KEY", "balance_fold", "balance_scale_node"]


def _read(ctx: MatchContext, node: fx.Node, name: str):
    """(tensor or None, how to write it) of argument ``name`` of ``node``."""
    if node.op == "call_module":
        mod = ctx.rewrite.module(node)
        t = getattr(mod, name, None)
        return (t if isinstance(t, torch.Tensor) else None), ("module", name)
    v = ctx.view(node).get(name)
    if v is None:
        return None, ("arg", name)
    if isinstance(v, fx.Node) and v.op == "get_attr":
        t = get_attr_value(ctx.gm, str(v.target))
        if isinstance(t, torch.Tensor):
            return t, ("arg", name)
    raise Refuse(f"the {name} of {node.name} is not a constant")


def _apply_writes(ctx: MatchContext, writes: List[Tuple[fx.Node, str, torch.Tensor]]) -> None:
    """Write new values for (node, argument) pairs; modules called elsewhere are copied first."""
    copied: Dict[fx.Node, nn.Module] = {}
    for node, name, value in writes:
        if node.op == "call_module":
            mod = copied.get(node)
            if mod is None:
                mod = ctx.rewrite.module(node)
                if ctx.rewrite.is_shared_module(node):
                    mod = copy.deepcopy(mod)
                    target = ctx.rewrite.add_module(str(node.target).replace(".", "_") + "_balanced", mod)
                    ctx.rewrite.retarget(node, target)
                copied[node] = mod
            old = getattr(mod, name)
            setattr(mod, name, nn.Parameter(value.to(old.dtype), requires_grad=old.requires_grad))
        else:
            view = ctx.view(node)
            old_node = view.get(name)
            old = get_attr_value(ctx.gm, str(old_node.target))
            new = ctx.rewrite.add_param("balanced_" + name, value.to(old.dtype), before=node,
                                        requires_grad=bool(getattr(old, "requires_grad", False)))
            view.set(name, new)
            ctx.rewrite.erase_if_unused(old_node)


def _consumer_writes(ctx: MatchContext, group, scale: torch.Tensor) -> List[Tuple[fx.Node, str, torch.Tensor]]:
    writes = []
    for c in group.consumers:
        w, _ = _read(ctx, c.node, "weight")
        if w is None or w.dim() != 2 or w.shape[1] != c.channels.numel():
            raise Refuse(f"{c.node.name}'s weight does not have {c.channels.numel()} input columns")
        s = scale[c.channels].to(w.dtype)
        writes.append((c.node, "weight", w.detach() * s[None, :]))
    return writes


@constraint("balance_planned")
def balance_planned(ctx: MatchContext, node: fx.Node):
    """A balancing step looked at ``node`` as a producer (it holds a plan or a refusal)."""
    ok = PLAN_KEY in node.meta or REFUSED_KEY in node.meta
    return ok, "" if ok else f"no balancing step analysed {node.name} (run smooth_scales / awq_scales first)"


@action("balance_fold")
def balance_fold(ctx: MatchContext, producer: fx.Node):
    """Fold the planned scale of ``producer``'s group: the producer's channels take ``1/s``, its
    consumers' input columns ``s``."""
    plan = node_plan = producer.meta.get(PLAN_KEY)
    if node_plan is None:
        raise Refuse(producer.meta.get(REFUSED_KEY, f"{producer.name} heads no group"))
    group, scale = plan["group"], plan["scale"].detach().double()
    if not bool((scale > 0).all()) or not bool(torch.isfinite(scale).all()):
        raise Refuse(f"the scales planned for {producer.name} are not all positive and finite")
    inv = 1.0 / scale
    writes = []
    if group.kind == "norm":
        w, _ = _read(ctx, producer, "weight")
        if w is None or w.numel() != scale.numel():
            raise Refuse(f"{producer.name} has no [{scale.numel()}] weight to absorb the scale")
        writes.append((producer, "weight", w.detach() * inv.to(w.dtype)))
        cls = ctx.rewrite.classify(producer)
        if cls == "layer_norm":
            b, _ = _read(ctx, producer, "bias")
            if b is not None:
                writes.append((producer, "bias", b.detach() * inv.to(b.dtype)))
    elif group.kind == "linear":
        w, _ = _read(ctx, producer, "weight")
        if w is None or w.dim() != 2 or w.shape[0] != scale.numel():
            raise Refuse(f"{producer.name}'s weight does not have {scale.numel()} output rows")
        writes.append((producer, "weight", w.detach() * inv.to(w.dtype)[:, None]))
        b, _ = _read(ctx, producer, "bias")
        if b is not None:
            writes.append((producer, "bias", b.detach() * inv.to(b.dtype)))
    else:
        raise Refuse(f"{producer.name}: a {group.kind} group is folded by balance_scale_node")
    writes += _consumer_writes(ctx, group, scale)
    _apply_writes(ctx, writes)
    producer.meta.pop(PLAN_KEY, None)
    producer.meta["qpasses.balanced"] = group.describe()


@action("balance_scale_node")
def balance_scale_node(ctx: MatchContext, op: fx.Node):
    """Put ``mul(x, 1/s)`` in front of the consumers of a scale-node group (once per group; each
    consumer reads it and takes ``s`` in its weight columns)."""
    plan = op.meta.get(NODE_KEY)
    if plan is None:
        raise Refuse(f"{op.name} is in no scale-node group")
    if plan.get("mul") is not None:
        op.meta.pop(NODE_KEY, None)
        if ctx.view(op).get("input") is plan["mul"]:
            return   # folded with its group by an earlier consumer
        raise Refuse(f"{op.name}'s input changed after its group was balanced")
    group, scale = plan["group"], plan["scale"].detach().double()
    if not bool((scale > 0).all()) or not bool(torch.isfinite(scale).all()):
        raise Refuse(f"the scales planned for {group.producer.name} are not all positive and finite")
    x = group.producer
    for c in group.consumers:
        if ctx.view(c.node).get("input") is not x:
            raise Refuse(f"{c.node.name} no longer reads {x.name}")
    writes = _consumer_writes(ctx, group, scale)
    first = group.consumers[0].node   # consumers are listed in graph order
    dtype = writes[0][2].dtype
    inv = ctx.rewrite.add_param("balance_inv_scale", (1.0 / scale).to(dtype), before=first, requires_grad=False)
    aten_level = isinstance(first.target, torch._ops.OpOverload)
    target = torch.ops.aten.mul.Tensor if aten_level else torch.mul
    mul = ctx.rewrite.insert("call_function", target, (x, inv), before=first, like=x)
    mul.meta["qpasses.scale_node"] = group.describe()
    for c in group.consumers:
        ctx.rewrite.replace_input(c.node, x, mul)
    _apply_writes(ctx, writes)
    plan["mul"] = mul
    op.meta.pop(NODE_KEY, None)



@constraint("scale_node_planned")
def scale_node_planned(ctx: MatchContext, op: fx.Node):
    """``op`` is a consumer of a scale-node group planned by a balancing step."""
    ok = NODE_KEY in op.meta
    return ok, "" if ok else f"{op.name} is in no scale-node group (an exact group, or scale_nodes=false)"
