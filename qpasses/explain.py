"""``explain``: why a rule does or does not rewrite a node (pattern step, constraint, guard)."""
from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

import torch.fx as fx

from .context import PROVENANCE_KEY, RewriteContext
from .errors import MatchError, QPassesError
from .guards import check_guards
from .lang.registry import ACTIONS, CONSTRAINTS, constraint_result
from .lang.rules import Rule
from .matcher import Match, MatchContext, MatchFailure, Matcher
from .plan import truthy

__all__ = ["Explanation", "explain", "first_match", "failing_constraint"]


class Explanation:
    """Answer of :meth:`PassManager.explain`."""

    def __init__(self, rule: str, node: str, matched: bool, step: str, reason: str):
        self.rule, self.node, self.matched, self.step, self.reason = rule, node, matched, step, reason

    def __bool__(self) -> bool:
        return self.matched

    def __str__(self) -> str:
        if self.matched:
            return f"rule {self.rule!r} matches node {self.node} and would rewrite it"
        return f"rule {self.rule!r} does not apply to node {self.node}: {self.step}: {self.reason}"

    __repr__ = __str__


def first_match(matcher: Matcher, rule: Rule, node: fx.Node) -> Tuple[Optional[Match], Optional[MatchFailure]]:
    """The first of the rule's alternative patterns that matches at ``node``, else the first failure."""
    first = None
    for i, pat in enumerate(rule.match):
        r = matcher.match(pat, node, i)
        if isinstance(r, Match):
            return r, None
        first = first or r
    return None, first


def _eval_constraint(ctx: MatchContext, call) -> Tuple[bool, str]:
    reg = CONSTRAINTS[call.name]
    try:
        res = ctx.call(reg.fn, call)
    except QPassesError:
        raise
    except Exception as e:  # noqa: BLE001 - a constraint that crashes is a rule error, with its location
        raise MatchError(f"constraint {call} of rule {ctx.rule.name!r} failed: {type(e).__name__}: {e}"
                         f" (at {getattr(call, 'loc', '?')})") from e
    return constraint_result(res)


def failing_constraint(ctx: MatchContext, rule: Rule) -> Optional[str]:
    """The reason of the rule's first failing ``where`` / ``unless`` constraint, else None."""
    return rule.failing_constraint(lambda c: _eval_constraint(ctx, c))


def explain(rule: Rule, node: fx.Node, gm: fx.GraphModule, params: Dict[str, Any]) -> Explanation:
    """Why bound rule ``rule`` does (not) rewrite ``node`` of ``gm``."""
    rc = RewriteContext(gm)
    matcher = Matcher(gm, rc)
    if not truthy(rule.when):
        return Explanation(rule.name, node.name, False, "when", "the rule is disabled by its 'when' parameter")
    anchors = rule.anchor_classes()
    cls = matcher.classify(node)
    if anchors is not None and cls not in anchors:
        return Explanation(rule.name, node.name, False, str(rule.match[0]),
                           f"{node.name} is {cls or node.op}, not a candidate anchor ({'|'.join(anchors)})")
    if node.meta.get(PROVENANCE_KEY) == rule.name:
        return Explanation(rule.name, node.name, False, "provenance", "the node was created by this rule")
    m, failure = first_match(matcher, rule, node)
    if m is None:
        return Explanation(rule.name, node.name, False, f"pattern step {failure.step}",
                           f"on node {failure.node}: {failure.reason}")
    ctx = MatchContext(rc, m, rule, params)
    why = failing_constraint(ctx, rule)
    if why:
        return Explanation(rule.name, node.name, False, "constraint", why)
    action = ACTIONS[rule.rewrite.name]
    why = check_guards(ctx, action.replaces, tuple(rule.keeps) + action.keeps)
    if why:
        return Explanation(rule.name, node.name, False, "soundness guard", why)
    return Explanation(rule.name, node.name, True, "", "")
