"""The rule driver, shared by fx and ONNX graphs: apply a bound rule to every candidate
(:func:`apply_rule`), or say why it does or does not rewrite one node (:func:`explain_rule`;
:func:`explain_in_plan` binds the rule as a plan's run does), and warn about ``skip`` patterns
that name nothing (:func:`skip_warnings`).

Both read the graph through an IR adapter (:class:`qpasses.matcher.FxIR`,
:class:`qpasses.onnx.rewrite.OnnxIR`), so ``when``, ``where`` / ``unless``, the soundness
guards, refusals (:class:`qpasses.context.Refuse`) and the report mean the same on both IRs.
"""
from __future__ import annotations

import fnmatch
from typing import Any, List, Optional, Tuple

import torch.fx as fx

from .context import Refuse, RewriteContext
from .errors import Location, MatchError, QPassesError, RewriteError, UnknownNameError, nearest
from .lang.registry import ACTIONS, CONSTRAINTS, constraint_result
from .lang.rules import Rule
from .matcher import FxIR, Match, MatchFailure, Matcher
from .opclasses import node_paths
from .plan import Plan, Unit, truthy

__all__ = ["Explanation", "explain_in_plan", "explain_rule", "apply_rule", "first_match",
           "failing_constraint", "skip_warnings"]


class Explanation:
    """Answer of :meth:`PassManager.explain`.

    ``bindings`` says where the rule's parameters came from when a ``with:`` of a recipe step
    rebound them (``"skip=['conv1'] from with: of recipe step 'ptq_int8' (r.yaml:7:11)"``).  A
    rule that runs more than once in a plan with different parameters (a family run by two
    nested recipes) is explained once per binding: this object is the first, ``others`` the rest.
    """

    def __init__(self, rule: str, node: str, matched: bool, step: str, reason: str, bindings: str = ""):
        self.rule, self.node, self.matched, self.step, self.reason = rule, node, matched, step, reason
        self.bindings = bindings
        self.others: List["Explanation"] = []

    def __bool__(self) -> bool:
        return self.matched

    def _line(self) -> str:
        with_ = f" [{self.bindings}]" if self.bindings else ""
        if self.matched:
            return f"rule {self.rule!r} matches node {self.node} and would rewrite it{with_}"
        return f"rule {self.rule!r} does not apply to node {self.node}: {self.step}: {self.reason}{with_}"

    def __str__(self) -> str:
        return "\n".join([self._line()] + ["also " + o._line() for o in self.others])

    __repr__ = __str__


def first_match(matcher: Matcher, rule: Rule, node: Any) -> Tuple[Optional[Match], Optional[MatchFailure]]:
    """The first of the rule's alternative patterns that matches at ``node``, else the first failure."""
    first = None
    for i, pat in enumerate(rule.match):
        r = matcher.match(pat, node, i)
        if isinstance(r, Match):
            return r, None
        first = first or r
    return None, first


def _eval_constraint(ir: Any, ctx: Any, call) -> Tuple[bool, str]:
    fn = ir.implementation(CONSTRAINTS[call.name])
    if fn is None:
        raise Refuse(f"constraint {call.name!r} has no {ir.kind} implementation")
    try:
        res = ctx.call(fn, call)
    except (QPassesError, Refuse):
        raise
    except Exception as e:  # noqa: BLE001 - a constraint that crashes is a rule error, with its location
        raise MatchError(f"constraint {call} of rule {ctx.rule.name!r} failed: {type(e).__name__}: {e}"
                         f" (at {getattr(call, 'loc', '?')})") from e
    return constraint_result(res)


def failing_constraint(ctx: Any, rule: Rule, ir: Any = None) -> Optional[str]:
    """The reason of the rule's first failing ``where`` / ``unless`` constraint, else None."""
    ir = ir if ir is not None else FxIR(ctx.rewrite)
    return rule.failing_constraint(lambda c: _eval_constraint(ir, ctx, c))


def apply_rule(ir: Any, matcher: Matcher, rule: Rule, stats: Any) -> int:
    """Apply bound ``rule`` at every candidate anchor of ``ir``'s graph; count in ``stats``
    (a :class:`qpasses.report.RuleStats`) and return the number of rewrites."""
    if not truthy(rule.when):
        stats.disabled = True
        return 0
    reg = ACTIONS[rule.rewrite.name]
    fn = ir.implementation(reg)
    keeps = tuple(rule.keeps) + tuple(reg.keeps)
    rewrites = 0
    with ir.tagging(rule.name):  # nodes created while the rule runs carry its name
        for node in ir.candidates(rule.anchor_classes()):
            if ir.skip(node, rule):
                continue
            stats.candidate(node.name)
            m, failure = first_match(matcher, rule, node)
            if m is None:
                stats.fail(node.name, str(failure))
                continue
            stats.match(node.name)
            if fn is None:
                stats.refuse(node.name, f"action {rule.rewrite.name!r} has no {ir.kind} implementation")
                continue
            ctx = ir.context(m, rule)
            try:
                why = failing_constraint(ctx, rule, ir) or ir.guard(ctx, reg, keeps)
                if why is not None:
                    stats.refuse(node.name, why)
                    continue
                had_output = ir.has_output()
                ctx.call(fn, rule.rewrite)
                if had_output and not ir.has_output():
                    raise RewriteError(f"rule {rule.name!r} ({rule.loc}) refused on node {node.name}: its "
                                       f"rewrite would erase the graph's output; the run stops and the input "
                                       f"graph is unchanged")
            except Refuse as r:
                stats.refuse(node.name, r.reason)
                continue
            except QPassesError:
                raise
            except Exception as e:  # noqa: BLE001
                where = f" ({rule.loc})" if rule.loc and rule.loc.file else ""
                raise RewriteError(f"rule {rule.name!r}{where} failed on node {node.name}: "
                                   f"{type(e).__name__}: {e}") from e
            ir.rewritten(m, keeps)
            rewrites += 1
            stats.rewrites += 1
            stats.rewritten.append(node.name)
    return rewrites


def explain_rule(ir: Any, rule: Rule, node: Any) -> Explanation:
    """Why bound rule ``rule`` does (not) rewrite ``node`` of ``ir``'s graph."""
    if not truthy(rule.when):
        return Explanation(rule.name, node.name, False, "when", "the rule is disabled by its 'when' parameter")
    anchors = rule.anchor_classes()
    cls = ir.classify(node)
    if anchors is not None and cls not in anchors:
        return Explanation(rule.name, node.name, False, str(rule.match[0]),
                           f"{node.name} is {cls or node.op}, not a candidate anchor ({'|'.join(anchors)})")
    if ir.skip(node, rule):
        return Explanation(rule.name, node.name, False, "provenance", "the node was created by this rule")
    m, failure = first_match(Matcher(ir), rule, node)
    if m is None:
        return Explanation(rule.name, node.name, False, f"pattern step {failure.step}",
                           f"on node {failure.node}: {failure.reason}")
    ctx = ir.context(m, rule)
    try:
        why = failing_constraint(ctx, rule, ir)
    except Refuse as r:
        why = r.reason
    if why:
        return Explanation(rule.name, node.name, False, "constraint", why)
    reg = ACTIONS[rule.rewrite.name]
    if ir.implementation(reg) is None:
        return Explanation(rule.name, node.name, False, "action",
                           f"action {rule.rewrite.name!r} has no {ir.kind} implementation")
    why = ir.guard(ctx, reg, tuple(rule.keeps) + tuple(reg.keeps))
    if why:
        return Explanation(rule.name, node.name, False, "soundness guard", why)
    return Explanation(rule.name, node.name, True, "", "")


def _bindings(unit: Optional[Unit], rule: Rule) -> str:
    """The parameters of bound ``rule`` that a ``with:`` around ``unit`` rebound, with where."""
    if unit is None:
        return ""
    parts = []
    for name in rule.param_values:
        value, origin = unit.binding(name)
        if origin:
            parts.append(f"{name}={value!r} from {origin}")
    return "; ".join(parts)


def explain_in_plan(plan: Plan, rule: Any, node: fx.Node, gm: fx.GraphModule) -> Explanation:
    """Why ``rule`` (a name, or a :class:`Rule`) does (not) rewrite ``node`` of ``gm`` when
    ``plan`` runs: the rule as the run binds it, in each unit that runs it (the parameters of
    that unit, ``with:`` of the recipe steps around it included).  A rule the plan does not
    run is bound to the plan's parameters."""
    occurrences: List[Tuple[Optional[Unit], Rule]] = []
    if isinstance(rule, str):
        occurrences = [(u, r) for u in plan.units if u.rules for r in u.rules if r.name == rule]
        if not occurrences:
            names = [r.name for u in plan.units if u.rules for r in u.rules]
            raise UnknownNameError(f"no rule named {rule!r} in this PassManager", Location("<explain>"),
                                   nearest(rule, names))
    else:
        occurrences = [(u, rule.bind(u.params)) for u in plan.units if u.rules
                       if any(r.name == rule.name and str(r.loc) == str(rule.loc) for r in u.rules)]
        occurrences = occurrences or [(None, rule.bind(plan.params))]
    out: List[Explanation] = []
    seen = []
    for unit, r in occurrences:
        key = (r.name, str(r.loc), r.param_values)
        if key in seen:        # the same rule bound to the same values: the same answer
            continue
        seen.append(key)
        params = unit.params if unit is not None else plan.params
        e = explain_rule(FxIR(RewriteContext(gm), params), r, node)
        e.bindings = _bindings(unit, r)
        out.append(e)
    first = out[0]
    first.others = out[1:]
    return first


def skip_warnings(plan: Plan, gm: fx.GraphModule) -> List[str]:
    """Warnings for ``skip`` patterns that name no node of ``gm`` (a typo there would quantize
    the layer the user meant to keep in float), over the ``skip`` values the run binds
    (:meth:`Plan.uses`: the options, and ``with:`` of nested recipe steps); and for a ``skip``
    value the run never uses because ``with:`` rebinds it wherever it is read."""
    uses = plan.uses("skip")
    names = None
    out: List[str] = []
    done = set()
    for value, origin, _units in uses:
        if not value or not isinstance(value, (list, tuple)):
            continue
        if names is None:
            names = {name for n in gm.graph.nodes for name in node_paths(n)}
        for p in value:
            if (str(p), origin) in done or any(fnmatch.fnmatchcase(name, str(p)) for name in names):
                continue
            done.add((str(p), origin))
            src = f" ({origin})" if origin else ""
            out.append(f"skip pattern {str(p)!r}{src} matches no node name or module path of the graph "
                       f"(nothing is skipped by it)")
    outer = plan.params.get("skip")
    if outer and uses and all(origin for _, origin, _ in uses):
        out.append(f"skip={outer!r} (the run's value) skips nothing: "
                   f"{'; '.join(sorted({o for _, o, _ in uses}))} rebinds skip wherever it is read")
    return out
