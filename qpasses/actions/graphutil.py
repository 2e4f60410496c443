"""Small graph-editing helpers shared by actions: new modules, parameters and attributes."""
from __future__ import annotations

from typing import Any, Dict

import torch
import torch.fx as fx
import torch.nn as nn
from torch.nn.modules import module as _nn_module

from ..fxfast import note_module
from ..manager import MODULE_CALLS_KEY
from ..matcher import MatchContext
from ..ops import matches_any, module_attr, node_paths  # noqa: F401  (re-exported)

__all__ = ["add_module", "add_param", "node_paths", "erase_if_unused", "copy_meta", "is_shared_module", "retarget",
           "matches_any"]


_FREE = object()


def _unique(gm: nn.Module, prefix: str, state: Dict[str, Any]) -> str:
    counters = state.setdefault("name_counters", {})
    i = counters.get(prefix, 0)
    while True:
        name = f"{prefix}_{i}"
        i += 1
        if module_attr(gm, name, _FREE) is _FREE:  # hasattr, without __getattr__ raising for a free name
            counters[prefix] = i
            return name


def add_module(ctx: MatchContext, prefix: str, module: nn.Module) -> str:
    """Register ``module`` on the graph module under a fresh top-level name; returns the target."""
    gm = ctx.gm
    name = _unique(gm, prefix, ctx.state)
    if (isinstance(module, nn.Module) and "." not in name and type(gm).add_module is nn.Module.add_module
            and not getattr(_nn_module, "_global_module_registration_hooks", True)):
        gm._modules[name] = module  # what add_module does for a valid, unused name (_unique checked it)
    else:
        gm.add_module(name, module)
    note_module(ctx.matcher.modules, name, module)
    return name


def add_param(ctx: MatchContext, prefix: str, value: torch.Tensor, before: fx.Node,
              requires_grad: bool = True) -> fx.Node:
    """Register ``value`` as a new parameter and return a ``get_attr`` node placed before ``before``."""
    name = _unique(ctx.gm, prefix, ctx.state)
    if value.is_floating_point():
        ctx.gm.register_parameter(name, nn.Parameter(value.detach().clone(), requires_grad=requires_grad))
    else:
        ctx.gm.register_buffer(name, value.detach().clone())
    with ctx.graph.inserting_before(before):
        n = ctx.graph.get_attr(name)
    n.meta["qpasses.shape"] = tuple(value.shape)
    n.meta["qpasses.dtype"] = value.dtype
    return n


def copy_meta(src: fx.Node, dst: fx.Node) -> None:
    for k in ("qpasses.shape", "qpasses.dtype", "tensor_meta", "val", "nn_module_stack", "stack_trace"):
        if k in src.meta and k not in dst.meta:
            dst.meta[k] = src.meta[k]


def erase_if_unused(graph: fx.Graph, node: Any) -> None:
    if isinstance(node, fx.Node) and not node.users and node.op in ("get_attr", "call_module", "call_function",
                                                                     "call_method"):
        graph.erase_node(node)


def is_shared_module(gm: fx.GraphModule, node: fx.Node) -> bool:
    """True when the module called by ``node`` is called by another node too.

    The call counts are computed once per graph and cached in ``gm.meta`` (kept up to date by
    :func:`retarget`), so the check is O(1) amortised.
    """
    counts = _call_counts(gm)
    return counts.get(node.target, 0) > 1


def _call_counts(gm: fx.GraphModule) -> Dict[str, int]:
    meta = gm.meta if hasattr(gm, "meta") else {}
    key = MODULE_CALLS_KEY
    cached = meta.get(key)
    if cached is None or cached[0] is not gm.graph:
        counts: Dict[str, int] = {}
        for n in gm.graph.nodes:
            if n.op == "call_module":
                counts[n.target] = counts.get(n.target, 0) + 1
        cached = (gm.graph, counts)
        meta[key] = cached
    return cached[1]


def retarget(gm: fx.GraphModule, node: fx.Node, new_target: str) -> None:
    """Point a call_module node at another module, keeping the cached call counts right."""
    counts = _call_counts(gm)
    counts[node.target] = counts.get(node.target, 1) - 1
    counts[new_target] = counts.get(new_target, 0) + 1
    node.target = new_target


