"""The PassManager: applies rule families, rules and data steps to a copy of a graph."""
from __future__ import annotations

import contextlib
import copy
import fnmatch
import gc
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

import torch
import torch.fx as fx

from .errors import (Location, OptionError, QPassesError, RewriteError, RuleError, StepError, UnknownNameError,
                     VerifyError, nearest)
from .frontend import as_inputs, input_arity, make_exported_trainable
from .compact import expand_compact, has_compact
from .fxfast import copy_graph, delete_unused_submodules, graph_shape, lint, module_table, recompile, same_shape
from .guards import check_guards
from .lang.registry import ACTIONS, CONSTRAINTS, DATA_STEPS, constraint_result
from .lang.rules import ParamSpec, Recipe, Rule, RuleFamily, StageSpec, Step, find_named, load_file
from .lang.syntax import substitute
from .matcher import Match, MatchContext, MatchFailure, Matcher
from .modcopy import copy_module_tree, library_class
from .ops import node_paths
from .report import Report, StageRecord, StepRecord

__all__ = ["PassManager", "Refuse", "StepContext", "Explanation", "copy_graph_module", "PROVENANCE_KEY"]

PROVENANCE_KEY = "qpasses.rule"
#: graph-module meta entry caching the call count of each module (actions.graphutil): it
#: holds the graph it counted, so copies and saved files drop it
MODULE_CALLS_KEY = "qpasses.module_calls"
#: GraphModule attributes copy_graph_module replaces after copying the module tree
_GM_REPLACED = frozenset({"_graph", "meta", "_create_node_hooks", "_erase_node_hooks"})


class Refuse(Exception):
    """Raised by an action to decline a match; the reason goes to ``pm.report``."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


@dataclass
class _Unit:
    kind: str                      # "stage" | "step"
    family: Optional[str]
    stage: Optional[StageSpec] = None
    rules: Optional[List[Rule]] = None
    step: Optional[Step] = None


class StepContext:
    """What a data step receives."""

    def __init__(self, gm: fx.GraphModule, data: Any, params: Dict[str, Any], args: Dict[str, Any],
                 report: Report, manager: "PassManager", record: Dict[str, Any]):
        self.gm = gm
        self.data = data
        self.params = params
        self.args = args
        self.report = report
        self.manager = manager
        #: free-form facts the step reports (shown in pm.report.steps)
        self.info = record
        self.progress = manager.progress

    def arg(self, name: str, default: Any = None) -> Any:
        """A step argument (from the recipe's ``with:``), else the recipe parameter of that name."""
        if name in self.args:
            return self.args[name]
        return self.params.get(name, default)


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


def copy_graph_module(gm: fx.GraphModule, recompile: bool = True) -> fx.GraphModule:
    """A copy of ``gm`` that shares nothing mutable with it (graph, modules, parameters).

    With ``recompile=False`` the copy must be ``recompile()``-d before it is called.
    """
    meta = dict(getattr(gm, "meta", {}))
    meta.pop(MODULE_CALLS_KEY, None)  # a cache of gm's own graph
    state = meta.get("qpasses.state")
    if isinstance(state, dict):  # the actions' per-run scratch (name counters, flags): the copy's own
        meta["qpasses.state"] = {k: (dict(v) if isinstance(v, dict) else v) for k, v in state.items()
                                 if k != "compact"}
    # node meta is copied one level deep, as Graph.__deepcopy__ does: values (fake tensors
    # from torch.export among them, which do not deep-copy) are kept by reference
    graph = copy_graph(gm.graph)
    new = copy_module_tree(gm, skip=_GM_REPLACED)
    # the copied object still points at the old graph; give it its own
    new.__dict__["_graph"] = graph
    graph.owning_module = new
    new.__dict__["meta"] = meta
    new.__dict__["_create_node_hooks"] = []
    new.__dict__["_erase_node_hooks"] = []
    make_exported_trainable(new)          # the copy's own train()/eval(), not the original's refusing ones
    if recompile:
        new.recompile()
    return new


def _truthy(v: Any) -> bool:
    if isinstance(v, str):
        return v.lower() not in ("", "0", "false", "no", "off", "none")
    return bool(v)


class PassManager:
    """Apply recipes, rule families, rules and data steps to a GraphModule.

    Args:
        rules: a recipe or rule-family name (``"ptq_int8"``, ``"canonicalize"``), a path to
            a rule file, a :class:`Rule`, a loaded family/recipe, a data-step name, or a
            list of these applied in order.
        verify: check numerics on sample inputs after every stage (``exact`` stages must
            keep outputs within ``verify_tol``; others report SQNR and must stay finite).
        progress: show progress bars in data steps.
        **options: recipe parameters by name (``w_bits=4``, ``observer="percentile"``).
            Unknown names and out-of-range values raise :class:`OptionError` here,
            before anything is rewritten.
    """

    def __init__(self, rules: Any, *, verify: bool = False, verify_tol: float = 1e-4, progress: bool = False,
                 **options: Any):
        self.verify = verify
        self.verify_tol = verify_tol
        self.progress = progress
        self.specs: Dict[str, ParamSpec] = {}
        self._units_raw: List[Tuple[str, Any, Optional[str]]] = []
        self._load(rules)
        self.params = self._resolve_params(options)
        self.units = self._bind_units()
        self.report = Report()
        self._last_input: Optional[fx.GraphModule] = None

    # ------------------------------------------------------------------ loading
    def _load(self, rules: Any) -> None:
        items = list(rules) if isinstance(rules, (list, tuple)) else [rules]
        if not items:
            raise OptionError("PassManager needs at least one recipe, rule family, rule or step")
        for item in items:
            self._load_one(item, depth=0)

    def _load_one(self, item: Any, depth: int, loc: Optional[Location] = None) -> None:
        if depth > 16:
            raise RuleError("recipes include each other more than 16 levels deep (a cycle?)", loc)
        if isinstance(item, Rule):
            self._units_raw.append(("rule", item, None))
            return
        if isinstance(item, RuleFamily):
            self._add_specs(item.params, override=False)
            self._units_raw.append(("family", item, None))
            return
        if isinstance(item, Recipe):
            self._add_specs(item.params, override=True)
            for st in item.steps:
                if st.kind == "rules":
                    fam = self._resolve(st.name, st.loc)
                    if not isinstance(fam, RuleFamily):
                        self._load_one(fam, depth + 1, st.loc)
                    else:
                        self._add_specs(fam.params, override=False)
                        self._units_raw.append(("family", fam, st))
                elif st.kind == "recipe":
                    self._load_one(self._resolve(st.name, st.loc), depth + 1, st.loc)
                else:
                    if st.name not in DATA_STEPS:
                        raise UnknownNameError(f"unknown data step {st.name!r}", st.loc, nearest(st.name, DATA_STEPS))
                    self._units_raw.append(("step", st, None))
            return
        if isinstance(item, (str, os.PathLike)):
            s = str(item)
            if s.endswith((".yaml", ".yml")) or os.sep in s or Path(s).is_file():
                self._load_one(load_file(s), depth + 1, loc)
                return
            if s in DATA_STEPS and not _is_named_file(s):
                self._units_raw.append(("step", Step("step", s, {}, True, Location("<python>")), None))
                return
            self._load_one(self._resolve(s, loc), depth + 1, loc)
            return
        raise OptionError(f"cannot use {type(item).__name__} as rules: give a name, a path, a Rule or a list")

    @staticmethod
    def _resolve(name: str, loc: Optional[Location]):
        return find_named(name, loc)

    def _add_specs(self, specs: Dict[str, ParamSpec], override: bool) -> None:
        for k, v in specs.items():
            if override or k not in self.specs:
                self.specs[k] = v

    def _resolve_params(self, options: Dict[str, Any]) -> Dict[str, Any]:
        params = {k: copy.deepcopy(v.default) for k, v in self.specs.items()}
        for k, v in options.items():
            spec = self.specs.get(k)
            if spec is None:
                known = sorted(self.specs)
                raise OptionError(f"unknown option {k!r}; this recipe takes: {', '.join(known) or 'no options'}",
                                  nearest(k, known))
            why = spec.check(spec.coerce(v))
            if why:
                raise OptionError(f"invalid option: {why}")
            params[k] = spec.coerce(v)
        for k, spec in self.specs.items():
            if params.get(k) is not None:
                why = spec.check(params[k])
                if why:
                    raise OptionError(f"invalid option: {why}")
        return params

    def _bind_units(self) -> List[_Unit]:
        units: List[_Unit] = []
        for kind, obj, step in self._units_raw:
            if kind == "rule":
                units.append(_Unit("stage", None, StageSpec(obj.stage), [obj.bind(self.params)]))
            elif kind == "family":
                if step is not None and not _truthy(substitute(step.when, self.params, f" (step {step.name})")):
                    continue
                bound = [r.bind(self.params) for r in obj.rules]
                for stage in obj.stages:
                    rs = [r for r in bound if r.stage == stage.name]
                    if rs:
                        units.append(_Unit("stage", obj.name, stage, rs))
            else:
                st: Step = obj
                args = {k: substitute(v, self.params, f" (step {st.name})") for k, v in st.args.items()}
                when = substitute(st.when, self.params, f" (step {st.name})")
                if not _truthy(when):
                    continue
                units.append(_Unit("step", None, step=Step(st.kind, st.name, args, True, st.loc)))
        return units

    @property
    def rules(self) -> List[Rule]:
        """Every bound rule, in application order."""
        return [r for u in self.units if u.rules for r in u.rules]

    # ------------------------------------------------------------------ running
    def run(self, gm: fx.GraphModule, data: Any = None, example_inputs: Any = None) -> fx.GraphModule:
        """Apply everything to a copy of ``gm`` and return it; ``gm`` itself is never modified.

        Args:
            gm: a GraphModule (from :func:`qpasses.trace`).
            data: calibration / training data: an iterable of batches (a tensor or a tuple
                of positional inputs; a ``DataLoader``'s ``(inputs, labels)`` gives the model
                its leading items), for the data steps that need it.
            example_inputs: inputs for ``verify=True`` (defaults to the example inputs
                recorded by ``trace``, else the first batch of ``data``).
        """
        if not isinstance(gm, fx.GraphModule):
            raise OptionError(f"run() expects a torch.fx.GraphModule (use qpasses.trace), got {type(gm).__name__}")
        t0 = time.perf_counter()
        self.report = Report()
        self._last_input = gm
        # rewriting (copy, stages, lint, code generation) allocates many small cyclic objects;
        # full GC passes over a large graph would make it superlinear in the graph's size, so
        # the cyclic GC is paused there (not in data steps or verify, which run the model)
        with self._phase("copy"):
            work = copy_graph_module(gm, recompile=False)
            # the module table the stages match against: built once here and handed from stage
            # to stage while only qpasses' own actions (which keep it current) have run
            modules: Optional[Dict[str, torch.nn.Module]] = module_table(work)
        self._check_skip(gm)
        sample = None
        reference = None
        before = None  # the outputs before the current unit: what an "exact" stage must keep
        if self.verify:
            sample = self._sample(gm, data, example_inputs)
            reference = before = self._forward(gm, sample)
        # compact quantized modules (qpasses/compact.py), e.g. from an earlier run that ended in
        # convert or from this run's observe / convert: expanded before the first unit that does
        # not read that form
        compact = has_compact(work, modules)
        # units that changed the graph since its code was last generated: the copy's code is
        # generated lazily, and lint + code generation run once before anything can run or read
        # the graph (a data step, verify, the return), not after every stage
        changed: List[str] = ["copy"]
        for unit in self.units:
            label = (f"{unit.family}.{unit.stage.name}" if unit.family else unit.stage.name) \
                if unit.kind == "stage" else f"step:{unit.step.name}"
            compact = _state(work).pop("compact", False) or compact
            if compact and not _reads_compact(unit):
                with self._phase("expand"):
                    if expand_compact(work):
                        changed.append(f"expand before {label}")
                compact = False
                modules = None
            if unit.kind == "stage":
                t = time.perf_counter()
                with _no_gc():
                    shape = graph_shape(work.graph)
                    iters, rewrites, converged, modules = self._run_stage(work, unit, modules)
                    if rewrites and not same_shape(shape, graph_shape(work.graph)):
                        changed.append(label)  # (a stage that only swapped modules keeps the code)
                self.report.stages.append(StageRecord(
                    unit.family, unit.stage.name, time.perf_counter() - t, iters, rewrites, converged))
                if self.verify:
                    self._refresh(work, changed)
                    before = self._check(work, sample, reference, before, label, unit.stage.verify)
            else:
                self._refresh(work, changed)
                stepped = self._run_step(work, unit.step, data)
                if not (stepped is work and modules is not None and _keeps_modules(unit.step.name, modules)):
                    modules = None  # a data step may change anything
                work = stepped
                if self.verify:
                    before = self._check(work, sample, reference, before, label, "sqnr")
        _state(work).pop("compact", None)  # (a later run sees the compact modules themselves)
        self._prune(work)
        self._refresh(work, changed)
        self.report.seconds = time.perf_counter() - t0
        return work

    def _check_skip(self, gm: fx.GraphModule) -> None:
        """Warn (in the report) about ``skip`` patterns that name no node of the graph: a typo
        there would otherwise quantize the layer the user meant to keep in float."""
        skip = self.params.get("skip")
        if not skip or not isinstance(skip, (list, tuple)):
            return
        names = {name for n in gm.graph.nodes for name in node_paths(n)}
        for p in skip:
            if not any(fnmatch.fnmatchcase(name, str(p)) for name in names):
                self.report.warnings.append(f"skip pattern {str(p)!r} matches no node name or module path "
                                            f"of the graph (nothing is skipped by it)")

    @contextlib.contextmanager
    def _phase(self, name: str):
        """Run the body without the cyclic GC and add its seconds to ``report.phases[name]``."""
        t = time.perf_counter()
        try:
            with _no_gc():
                yield
        finally:
            phases = self.report.phases
            phases[name] = phases.get(name, 0.0) + time.perf_counter() - t

    def _prune(self, gm: fx.GraphModule) -> None:
        """Drop the submodules no node uses any more (a folded BatchNorm, a replaced observer,
        a module swapped for another): they would still be in ``parameters()`` and the
        ``state_dict``."""
        with self._phase("prune"):
            delete_unused_submodules(gm)

    def _refresh(self, gm: fx.GraphModule, changed: List[str]) -> None:
        """Lint the graph and generate its code if ``changed`` names units that changed it
        (then empties the list)."""
        if not changed:
            return
        if changed != ["copy"]:  # (the copy of a linted graph needs no second check)
            with self._phase("lint"):
                try:
                    lint(gm.graph)
                except Exception as e:  # noqa: BLE001 - a malformed graph is a rewrite bug: say where
                    raise RewriteError(f"the graph is malformed after {', '.join(changed)}: "
                                       f"{type(e).__name__}: {e}") from e
        changed.clear()
        with self._phase("codegen"):
            recompile(gm)

    def _run_stage(self, gm: fx.GraphModule, unit: _Unit, modules: Optional[Dict[str, torch.nn.Module]] = None
                   ) -> Tuple[int, int, bool, Optional[Dict[str, torch.nn.Module]]]:
        """Run one stage: (iterations, rewrites, converged, the module table for the next stage
        or None when an action or constraint from outside qpasses ran and may have changed the
        module tree without the table)."""
        stage = unit.stage
        matcher = Matcher(gm, modules)
        own = all(_is_own(reg) for reg in _registrations(unit) if reg is not None)
        state = _state(gm)
        total = 0
        limit = stage.max_iterations if stage.mode == "fixpoint" else 1
        for it in range(1, limit + 1):
            changed = 0
            for rule in unit.rules:
                changed += self._apply_rule(gm, matcher, rule, unit.family, stage.name, state)
            total += changed
            if changed == 0:
                return it, total, True, matcher.modules if own else None
        converged = stage.mode == "once"
        if not converged:
            self.report.warnings.append(
                f"stage {stage.name!r} did not reach a fixpoint in {limit} iterations; stopped there")
        return limit, total, converged, matcher.modules if own else None

    def _apply_rule(self, gm: fx.GraphModule, matcher: Matcher, rule: Rule, family: Optional[str], stage: str,
                    state: Dict[str, Any]) -> int:
        stats = self.report.rule(rule.name, family, stage)
        if not _truthy(rule.when):
            stats.disabled = True
            return 0
        action = ACTIONS[rule.rewrite.name]
        keeps = tuple(rule.keeps) + action.keeps
        rewrites = 0
        # nodes created while this rule runs (by its actions) are tagged with its name; the
        # hook stays registered for the whole loop rather than once per rewrite
        with _tag_new_nodes(gm, rule.name, matcher):
            for node in matcher.index(rule.anchor_classes()):
                if getattr(node, "_erased", False):
                    continue
                if node.meta.get(PROVENANCE_KEY) == rule.name:
                    continue  # created by this rule: never re-matched by it
                stats.candidate(node.name)
                m, failure = self._match(matcher, rule, node)
                if m is None:
                    stats.fail(node.name, str(failure))
                    continue
                stats.match(node.name)
                ctx = MatchContext(gm, matcher, m, rule, self.params, state)
                why = self._constraints(ctx, rule)
                if why is None:
                    why = check_guards(ctx, action.replaces, keeps)
                if why is not None:
                    stats.refuse(node.name, why)
                    continue
                try:
                    ctx.call(action.fn, rule.rewrite)
                except Refuse as r:
                    stats.refuse(node.name, r.reason)
                    continue
                except QPassesError:
                    raise
                except Exception as e:  # noqa: BLE001
                    where = f" ({rule.loc})" if rule.loc and rule.loc.file else ""
                    raise RewriteError(f"rule {rule.name!r}{where} failed on node {node.name}: "
                                       f"{type(e).__name__}: {e}") from e
                rewrites += 1
                stats.rewrites += 1
                stats.rewritten.append(node.name)
        return rewrites

    @staticmethod
    def _match(matcher: Matcher, rule: Rule, node: fx.Node) -> Tuple[Optional[Match], Optional[MatchFailure]]:
        first = None
        for i, pat in enumerate(rule.match):
            r = matcher.match(pat, node, i)
            if isinstance(r, Match):
                return r, None
            first = first or r
        return None, first

    @staticmethod
    def _constraints(ctx: MatchContext, rule: Rule) -> Optional[str]:
        return rule.failing_constraint(lambda c: _eval_constraint(ctx, c))

    def _run_step(self, gm: fx.GraphModule, step: Step, data: Any) -> fx.GraphModule:
        reg = DATA_STEPS[step.name]
        record: Dict[str, Any] = {}
        ctx = StepContext(gm, data, self.params, step.args, self.report, self, record)
        t = time.perf_counter()
        try:
            out = reg.fn(ctx)
        except QPassesError:
            raise
        except Exception as e:  # noqa: BLE001
            raise StepError(f"data step {step.name!r} failed: {type(e).__name__}: {e}") from e
        self.report.steps.append(StepRecord(step.name, time.perf_counter() - t, record))
        if out is not None:
            if not isinstance(out, fx.GraphModule):
                raise StepError(f"data step {step.name!r} returned {type(out).__name__}, not a GraphModule")
            gm = out
        return gm

    # ------------------------------------------------------------------ verify
    @staticmethod
    def _sample(gm: fx.GraphModule, data: Any, example_inputs: Any):
        if example_inputs is not None:
            return as_inputs(example_inputs)
        ex = getattr(gm, "meta", {}).get("qpasses.example_inputs")
        if ex is not None:
            return as_inputs(ex)
        if data is not None:
            for batch in data:
                return as_inputs(batch, input_arity(gm))
        raise OptionError("verify=True needs sample inputs: pass example_inputs= or data=, or trace with qpasses.trace")

    @staticmethod
    def _forward(gm: fx.GraphModule, sample) -> List[torch.Tensor]:
        with torch.no_grad():
            out = gm(*sample)
        flat, _ = torch.utils._pytree.tree_flatten(out)
        return [o.detach().float() for o in flat if isinstance(o, torch.Tensor)]

    def _check(self, gm: fx.GraphModule, sample, reference, before, label: str, mode: str):
        """Check the outputs after a unit and return them.

        ``exact``: against ``before`` (the outputs before this unit: a stage that must keep the
        numerics is judged on what *it* changed, also after stages that quantized); ``sqnr``:
        the signal-to-noise ratio against the original ``reference``; ``none``: no check."""
        got = self._forward(gm, sample)
        if mode == "none":
            return got
        if len(got) != len(reference):
            raise VerifyError(f"after {label}: the graph returns {len(got)} tensors, the original {len(reference)}")
        worst_err, worst_sqnr = 0.0, math.inf
        for r, p, g in zip(reference, before, got):
            if r.shape != g.shape:
                raise VerifyError(f"after {label}: output shape {tuple(g.shape)} != original {tuple(r.shape)}")
            if not torch.isfinite(g).all():
                raise VerifyError(f"after {label}: outputs contain NaN/inf")
            err = (p - g).abs().max().item() if p.numel() else 0.0
            scale = max(p.abs().max().item() if p.numel() else 0.0, 1.0)
            worst_err = max(worst_err, err / scale)
            noise = (r - g).pow(2).sum().item()
            sig = r.pow(2).sum().item()
            worst_sqnr = min(worst_sqnr, math.inf if noise == 0 else 10 * math.log10(max(sig, 1e-30) / noise))
        if mode == "exact":
            self.report.verify.append({"after": label, "metric": "max_rel_err", "value": worst_err})
            if worst_err > self.verify_tol:
                raise VerifyError(f"after {label}: outputs changed by {worst_err:.3g} (relative to the outputs "
                                  f"before it), more than verify_tol={self.verify_tol}")
        else:
            self.report.verify.append({"after": label, "metric": "sqnr_db", "value": worst_sqnr})
        return got

    # ------------------------------------------------------------------ explain
    def explain(self, rule: Union[str, Rule], node: Union[str, fx.Node], gm: Optional[fx.GraphModule] = None
                ) -> Explanation:
        """Why ``rule`` does (not) rewrite ``node``: the pattern step, constraint or guard that fails.

        ``gm`` defaults to the graph the node belongs to, else the last graph given to ``run``.
        """
        if isinstance(rule, str):
            hits = [r for r in self.rules if r.name == rule]
            if not hits:
                raise UnknownNameError(f"no rule named {rule!r} in this PassManager", Location("<explain>"),
                                       nearest(rule, [r.name for r in self.rules]))
            r = hits[0]
        else:
            r = rule.bind(self.params)
        if isinstance(node, fx.Node):
            gm = gm or node.graph.owning_module
        gm = gm or self._last_input
        if gm is None:
            raise OptionError("explain needs a graph: pass gm= or call run() first")
        if isinstance(node, str):
            found = [n for n in gm.graph.nodes if n.name == node]
            if not found:
                from .errors import MatchError
                raise MatchError(f"no node named {node!r} in the graph "
                                 f"(did you mean {nearest(node, [n.name for n in gm.graph.nodes])!r}?)")
            node = found[0]
        matcher = Matcher(gm)
        if not _truthy(r.when):
            return Explanation(r.name, node.name, False, "when", "the rule is disabled by its 'when' parameter")
        anchors = r.anchor_classes()
        cls = matcher.classify(node)
        if anchors is not None and cls not in anchors:
            return Explanation(r.name, node.name, False, str(r.match[0]),
                               f"{node.name} is {cls or node.op}, not a candidate anchor ({'|'.join(anchors)})")
        if node.meta.get(PROVENANCE_KEY) == r.name:
            return Explanation(r.name, node.name, False, "provenance", "the node was created by this rule")
        m, failure = self._match(matcher, r, node)
        if m is None:
            return Explanation(r.name, node.name, False, f"pattern step {failure.step}",
                               f"on node {failure.node}: {failure.reason}")
        ctx = MatchContext(gm, matcher, m, r, self.params, {})
        why = self._constraints(ctx, r)
        if why:
            return Explanation(r.name, node.name, False, "constraint", why)
        action = ACTIONS[r.rewrite.name]
        why = check_guards(ctx, action.replaces, tuple(r.keeps) + action.keeps)
        if why:
            return Explanation(r.name, node.name, False, "soundness guard", why)
        return Explanation(r.name, node.name, True, "", "")


def _eval_constraint(ctx: MatchContext, call) -> Tuple[bool, str]:
    reg = CONSTRAINTS[call.name]
    try:
        res = ctx.call(reg.fn, call)
    except QPassesError:
        raise
    except Exception as e:  # noqa: BLE001 - a constraint that crashes is a rule error, with its location
        from .errors import MatchError
        raise MatchError(f"constraint {call} of rule {ctx.rule.name!r} failed: {type(e).__name__}: {e}"
                         f" (at {getattr(call, 'loc', '?')})") from e
    return constraint_result(res)


def _keeps_modules(step: str, modules: Dict[str, torch.nn.Module]) -> bool:
    """Whether the module table ``modules`` is still exact after data step ``step``: a step of
    qpasses' own declared to only run the model, on a model whose modules are all torch.nn /
    qpasses classes (whose forward passes change no module tree)."""
    reg = DATA_STEPS.get(step)
    return bool(reg is not None and reg.keeps_modules and _is_own(reg) and all(map(_runs_plainly, modules.values())))


def _reads_compact(unit: _Unit) -> bool:
    """Whether ``unit`` runs on the compact form of quantized modules: a data step of qpasses'
    own that only runs the model (``calibrate``), or a stage whose actions and constraints
    were all registered with ``compact=True`` (``convert``)."""
    if unit.kind != "stage":
        reg = DATA_STEPS.get(unit.step.name)
        return bool(reg is not None and reg.keeps_modules and _is_own(reg))
    return all(reg is not None and reg.compact for reg in _registrations(unit))


def _registrations(unit: _Unit) -> list:
    """The registrations (None for an unknown name) of a stage's actions and constraints."""
    return [reg for r in unit.rules
            for reg in [ACTIONS.get(r.rewrite.name)] + [CONSTRAINTS.get(c.name) for c in r.where + r.unless]]


def _is_own(reg) -> bool:
    """Whether a registered constraint / action / data step is qpasses' own."""
    return reg.fn.__module__.startswith("qpasses.")


_PLAIN_RUN: Dict[type, bool] = {}


def _runs_plainly(mod: torch.nn.Module) -> bool:
    """A torch.nn / qpasses module or a GraphModule (generated code): running it adds,
    removes or replaces no submodule."""
    t = type(mod)
    hit = _PLAIN_RUN.get(t)
    if hit is None:
        hit = _PLAIN_RUN[t] = issubclass(t, fx.GraphModule) or library_class(t)
    return hit


def _is_named_file(name: str) -> bool:
    from .lang.rules import available_names
    return available_names().get(name) in ("recipe", "rules")


def _state(gm: fx.GraphModule) -> Dict[str, Any]:
    """The per-run scratch state actions share (``gm.meta["qpasses.state"]``)."""
    return gm.meta.setdefault("qpasses.state", {}) if hasattr(gm, "meta") else {}


@contextlib.contextmanager
def _no_gc():
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


@contextlib.contextmanager
def _tag_new_nodes(gm: fx.GraphModule, rule_name: str, matcher: Matcher):
    def hook(node: fx.Node) -> None:
        node.meta[PROVENANCE_KEY] = rule_name
        matcher.note_created(node)

    gm._register_create_node_hook(hook)
    try:
        yield
    finally:
        gm._unregister_create_node_hook(hook)
