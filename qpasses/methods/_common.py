"""Generic constraints (``where:`` / ``unless:``) and structural actions."""
from __future__ import annotations

from typing import Any

import torch.fx as fx

from ..lang.registry import action, constraint
from ..context import Refuse
from ..matcher import MatchContext, module_type_names, source_module_names
from ._graphutil import matches_any


def _node(x: Any, what: str) -> fx.Node:
    if not isinstance(x, fx.Node):
        raise Refuse(f"{what} expects a node, got {x!r}")
    return x


@constraint("eval_mode")
def eval_mode(ctx: MatchContext, node: fx.Node):
    """The op (BatchNorm, Dropout) runs in inference mode: module.eval() or training=False."""
    training = ctx.view(_node(node, "eval_mode")).get("training", False)
    return (not bool(training), f"{node.name} is in training mode" if training else "")


@constraint("single_use")
def single_use(ctx: MatchContext, node: fx.Node):
    """The node's value has exactly one user."""
    n = len(node.users)
    return (n == 1, f"{node.name} has {n} users")


@constraint("has_users", args={"count": {"min": 0}})
def has_users(ctx: MatchContext, node: fx.Node, count: int = 1):
    """The node has at least ``count`` users."""
    return len(node.users) >= count


@constraint("is_module")
def is_module(ctx: MatchContext, node: fx.Node, type_name: str):
    """The node calls a module whose class (or a base class) is named ``type_name``; in a
    ``torch.export`` graph, the op was traced in a module of that class (as ``:module``)."""
    mod = ctx.view(node).module
    if mod is not None:
        return str(type_name) in module_type_names(mod), f"{node.name} is {type(mod).__name__}"
    names = source_module_names(node)
    if names is None:
        return False, f"{node.name} is {node.op}, not a module call"
    return str(type_name) in names, f"{node.name} was traced in {min(names, key=len)}"


@constraint("has_bias")
def has_bias(ctx: MatchContext, node: fx.Node):
    """The weighted op has a bias."""
    return ctx.view(node).get("bias") is not None


@constraint("arg_equals")
def arg_equals(ctx: MatchContext, node: fx.Node, name: str, value: Any):
    """Normalised argument ``name`` of the node equals ``value``."""
    from ..matcher import _eq
    actual = ctx.view(node).get(str(name))
    return (_eq(actual, value), f"{name} is {actual!r}")


@constraint("skipped")
def skipped(ctx: MatchContext, node: fx.Node, patterns: Any = None):
    """The node is named by one of the glob ``patterns`` (fx name, module path or export module path)."""
    if patterns is None:
        return False
    if isinstance(patterns, str):
        patterns = [patterns]
    hit = matches_any(node, patterns)
    return (hit is not None, f"{node.name} matches skip pattern {hit!r}" if hit else "")


@constraint("rank", args={"value": {"min": 0, "max": 16}})
def rank(ctx: MatchContext, node: fx.Node, value: int):
    """The node's output has ``value`` dimensions (from shape propagation)."""
    from ..frontend import node_shape
    shp = node_shape(node)
    return (shp is not None and len(shp) == int(value), f"{node.name} has shape {shp}")


@action("bypass", replaces=True)
def bypass(ctx: MatchContext, node: fx.Node, value: fx.Node):
    """Replace ``node`` by ``value`` (e.g. drop an eval-mode Dropout)."""
    node.replace_all_uses_with(value)
    ctx.graph.erase_node(node)
