"""Small graph-editing helpers shared by actions, over the rewrite context's verbs."""
from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn

from ..context import copy_meta
from ..matcher import MatchContext
from ..opclasses import matches_any, node_paths  # noqa: F401  (re-exported)

__all__ = ["add_module", "add_param", "node_paths", "erase_if_unused", "copy_meta", "is_shared_module", "retarget",
           "matches_any"]


def add_module(ctx: MatchContext, prefix: str, module: nn.Module) -> str:
    """Register ``module`` on the graph module under a fresh top-level name; returns the target."""
    return ctx.rewrite.add_module(prefix, module)


def add_param(ctx: MatchContext, prefix: str, value: torch.Tensor, before: fx.Node,
              requires_grad: bool = True) -> fx.Node:
    """Register ``value`` as a new parameter and return a ``get_attr`` node placed before ``before``."""
    return ctx.rewrite.add_param(prefix, value, before, requires_grad)


def erase_if_unused(ctx: MatchContext, node: Any) -> None:
    """Erase ``node`` if nothing reads it (an op or attribute read; never an input or the output)."""
    ctx.rewrite.erase_if_unused(node)


def is_shared_module(ctx: MatchContext, node: fx.Node) -> bool:
    """True when the module called by ``node`` is called by another node too."""
    return ctx.rewrite.is_shared_module(node)


def retarget(ctx: MatchContext, node: fx.Node, new_target: str) -> None:
    """Point a call_module node at another module."""
    ctx.rewrite.retarget(node, new_target)
