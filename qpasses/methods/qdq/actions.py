"""Constraints of the ``qdq_cleanup`` rule family on fx graphs (its ONNX twin is in qpasses.onnx.rewrite)."""
from __future__ import annotations

import torch
import torch.fx as fx

from ...lang.registry import constraint
from ...matcher import MatchContext
from ...numerics import FakeQuantize


def fq_params(mod):
    """(scale, zero_point, qmin, qmax, axis) of a FakeQuantize, or None."""
    if not isinstance(mod, FakeQuantize) or not mod.enabled:
        return None
    return (mod.scale.detach().float().reshape(-1), mod.zero_point.detach().reshape(-1).to(torch.int64),
            int(mod.qmin), int(mod.qmax), mod.axis)


def same_params(a, b) -> bool:
    if a is None or b is None:
        return False
    return (a[2:] == b[2:] and a[0].shape == b[0].shape and a[1].shape == b[1].shape
            and bool(torch.equal(a[0], b[0])) and bool(torch.equal(a[1], b[1])))


@constraint("same_qparams")
def same_qparams(ctx: MatchContext, first: fx.Node, second: fx.Node):
    """Two fake quantizations have identical scale, zero point, integer range and axis."""
    pa = fq_params(ctx.view(first).module)
    pb = fq_params(ctx.view(second).module)
    ok = same_params(pa, pb)
    return ok, "" if ok else f"{first.name} and {second.name} quantize differently"
