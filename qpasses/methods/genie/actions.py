"""Swing convolutions (GENIE-D): swap strided convolutions for :class:`SwingConv2d` / ``SwingConv1d`` and back."""
from __future__ import annotations

import torch.fx as fx
import torch.nn as nn

from ...lang.registry import action, constraint
from ...context import Refuse
from ...matcher import MatchContext
from .lib import SwingConv1d, SwingConv2d, _Swing, to_swing

__all__ = ["strided", "swing_conv", "unswing_conv"]


@constraint("strided")
def strided(ctx: MatchContext, node: fx.Node):
    """The convolution has a stride > 1 along some dimension."""
    s = ctx.view(node).get("stride", 1)
    vals = list(s) if isinstance(s, (tuple, list)) else [s]
    ok = any(int(v) > 1 for v in vals)
    return ok, f"{node.name} has stride {s}"


@constraint("is_swing")
def is_swing(ctx: MatchContext, node: fx.Node):
    """The node calls a swing convolution."""
    mod = ctx.view(node).module
    return isinstance(mod, _Swing), f"{node.name} calls {type(mod).__name__ if mod is not None else node.op}"


@action("swing_conv", args={"jitter": {"min": 1, "max": 64}})
def swing_conv(ctx: MatchContext, op: fx.Node, jitter: int = 1):
    """Replace the module behind ``op`` (a plain Conv1d/Conv2d) by its swing version, same tensors."""
    mod = ctx.view(op).module
    if mod is None:
        raise Refuse(f"{op.name} is not a module call (functional convolutions cannot swing)")
    if isinstance(mod, _Swing):
        raise Refuse(f"{op.name} already swings")
    if type(mod) not in (nn.Conv1d, nn.Conv2d):
        raise Refuse(f"{op.name} calls {type(mod).__name__}, not a plain Conv1d/Conv2d")
    if ctx.is_shared_module(op):
        raise Refuse(f"{op.target} is called more than once")
    ctx.replace_module(op.target, to_swing(mod, int(jitter)))


@action("unswing_conv")
def unswing_conv(ctx: MatchContext, op: fx.Node):
    """Put the plain convolution (same tensors) back in place of a swing convolution."""
    mod = ctx.view(op).module
    if not isinstance(mod, (SwingConv1d, SwingConv2d)):
        raise Refuse(f"{op.name} is not a swing convolution")
    ctx.replace_module(op.target, mod.to_conv())
