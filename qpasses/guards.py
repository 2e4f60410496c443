"""Soundness guards, checked before every rewrite.

* interior nodes of a replaced match have no users outside the match (unless the rule
  ``keeps`` them).  This also rules out cycles: an external input of the match that
  depended on an interior node would make that interior node used outside the match,
  so a match that passes is convex and replacing it keeps the graph acyclic (fx lint
  re-checks topological order after every stage);
* no matched node is an in-place op, and no external input of a replaced match is
  mutated in place elsewhere (moving reads across a mutation would change results);
* no matched BatchNorm / Dropout is in training mode (stateful);
* shared weights: actions that change parameters clone them when they are shared
  (e.g. ``fold_bn`` in ``qpasses/methods/canonicalize/fold.py``
  copies a shared module first), so guards need not refuse those.
"""
from __future__ import annotations

from typing import Optional

import torch.fx as fx

from .opclasses import is_inplace

# ``ctx`` below is a qpasses.matcher.MatchContext (not imported: the matcher calls the guards)

__all__ = ["check_guards", "is_training_stateful"]


def is_training_stateful(ctx, node: fx.Node) -> bool:
    cls = ctx.classify(node)
    if cls not in ("batch_norm", "dropout"):
        return False
    return bool(ctx.view(node).get("training", False))


def check_guards(ctx, replaces: bool, keeps=()) -> Optional[str]:
    """The reason the rewrite would be unsound, or None."""
    m = ctx.match
    matched = set(m.nodes)
    for n in m.nodes:
        if is_inplace(n, ctx.modules):
            return f"{n.name} is an in-place op; rewriting across it is unsafe"
        if is_training_stateful(ctx, n):
            return f"{n.name} ({ctx.classify(n)}) is in training mode (stateful); put the model in eval()"
    if not replaces:
        return None
    kept = {m.bindings[k] for k in keeps if k in m.bindings}
    for n in m.nodes:
        if n is m.root or n in kept:
            continue
        outside = [u for u in n.users if u not in matched]
        if outside:
            names = ", ".join(u.name for u in outside[:3])
            return f"interior node {n.name} is also used outside the match (by {names})"
    for n in m.nodes:
        for inp in n.all_input_nodes:
            if inp in matched:
                continue
            for u in ctx.rewrite.mutators(inp):
                if u not in matched:
                    return f"input {inp.name} of the match is mutated in place by {u.name}"
    return None
