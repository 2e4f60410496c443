"""First / last weighted layer bit-widths (GENIE, like most low-bit PTQ work, keeps them at 8 bits)."""
from __future__ import annotations

import torch.fx as fx

from ...lang.registry import action, constraint
from ...matcher import MatchContext

__all__ = ["edge_weighted", "set_bits"]


@constraint("edge_weighted", args={"which": {"choices": ("both", "first", "last")}})
def edge_weighted(ctx: MatchContext, node: fx.Node, which: str = "both"):
    """``node`` is the first (``which="first"``), last (``"last"``) or either (``"both"``) weighted op in graph order."""
    from ...opclasses import resolve_names
    key = (id(ctx.graph), len(ctx.graph.nodes))
    cached = ctx.state.get("edge_weighted")
    if cached is None or cached[0] != key:
        ws = [n for n in ctx.index(resolve_names("weighted")) if not getattr(n, "_erased", False)]
        cached = (key, ws)
        ctx.state["edge_weighted"] = cached
    ws = cached[1]
    if not ws:
        return False, "no weighted ops"
    hit = (which in ("first", "both") and node is ws[0]) or (which in ("last", "both") and node is ws[-1])
    wanted = {"first": "the first", "last": "the last"}.get(which, "the first or the last")
    return hit, f"{node.name} is not {wanted} weighted op"


@action("set_bits", args={"w_bits": {"min": 1, "max": 16}, "a_bits": {"min": 1, "max": 16}})
def set_bits(ctx: MatchContext, op: fx.Node, w_bits: int = 8, a_bits: int = 8):
    """Annotate ``op`` with ``qpasses.bits = {w_bits, a_bits}`` (honoured by observe / convert)."""
    op.meta["qpasses.bits"] = {"w_bits": int(w_bits), "a_bits": int(a_bits)}
