"""The PassManager: runs a plan of rule stages and data steps on a copy of a graph.

It knows nothing about quantization: loading is :mod:`qpasses.plan`, the graph is read and
changed through :mod:`qpasses.context`, numerics are checked by :mod:`qpasses.verify` and
``explain`` lives in :mod:`qpasses.explain`.
"""
from __future__ import annotations

import contextlib
import gc
import time
from typing import Any, Dict, List, Optional, Union

import torch.fx as fx

from .context import PROVENANCE_KEY, Refuse, RewriteContext, copy_graph_module, delete_unused_submodules
from .errors import MatchError, OptionError, QPassesError, RewriteError, StepError, nearest
from .explain import Explanation, apply_rule, explain_in_plan, skip_warnings
from .lang.registry import DATA_STEPS
from .lang.rules import Rule, Step
from .matcher import FxIR, Matcher
from .plan import Plan, Unit
from .report import Report, StageRecord, StepRecord
from .verify import Verifier

__all__ = ["PassManager", "Refuse", "StepContext", "Explanation", "copy_graph_module", "PROVENANCE_KEY"]


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
        #: whether the step shows progress bars (``PassManager(quiet=True)`` turns them off)
        self.progress = manager.progress
        #: ``PassManager(strict_calibration=True)``: a constant (empty-range) activation is an error
        self.strict_calibration = manager.strict_calibration

    def arg(self, name: str, default: Any = None) -> Any:
        """A step argument (from the recipe's ``with:``), else the recipe parameter of that name."""
        if name in self.args:
            return self.args[name]
        return self.params.get(name, default)


class PassManager:
    """Apply recipes, rule families, rules and data steps to a GraphModule.

    Args:
        rules: a recipe or rule-family name (``"ptq_int8"``, ``"canonicalize"``), a path to
            a rule file, a :class:`Rule`, a loaded family/recipe, a data-step name, or a
            list of these applied in order.
        verify: check numerics on sample inputs after every stage (``exact`` stages must
            keep outputs within ``verify_tol``; others report SQNR and must stay finite).
        progress: show progress bars in data steps (the default); ``quiet=True`` turns them off.
        strict_calibration: make an activation that was constant on all the calibration data
            (an empty quantization range, otherwise a warning) an error.
        **options: recipe parameters by name (``w_bits=4``, ``observer="percentile"``).
            Unknown names and out-of-range values raise :class:`OptionError` here,
            before anything is rewritten.
    """

    def __init__(self, rules: Any, *, verify: bool = False, verify_tol: float = 1e-4, progress: bool = True,
                 quiet: bool = False, strict_calibration: bool = False, **options: Any):
        self.verify = verify
        self.strict_calibration = bool(strict_calibration)
        self.verify_tol = verify_tol
        self.progress = bool(progress) and not quiet
        plan = Plan(rules, options)
        self.plan = plan
        self.specs = plan.specs
        self.params = plan.params
        self.units: List[Unit] = plan.units
        self.report = Report()
        self._last_input: Optional[fx.GraphModule] = None

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
        with self._phase("copy"):
            work = copy_graph_module(gm)
        self._check_skip(gm)
        verifier = Verifier(gm, data, example_inputs, self.verify_tol, self.report.verify) if self.verify else None
        state: Dict[str, Any] = {}   # the run's scratch space, shared by its stages' actions
        changed: List[str] = []      # units that changed the graph since its code was generated
        for unit in self.units:
            if unit.kind == "stage":
                t = time.perf_counter()
                with _no_gc():
                    iters, rewrites, converged = self._run_stage(work, unit, state)
                if rewrites:  # named with the rules that rewrote, for a lint / codegen failure
                    names = [r.name for r in unit.rules
                             if self.report.rule(r.name, unit.family, unit.stage.name).rewrites]
                    changed.append(f"{unit.label} (rules {', '.join(names)})" if names else unit.label)
                self.report.stages.append(StageRecord(
                    unit.family, unit.stage.name, time.perf_counter() - t, iters, rewrites, converged))
                if verifier is not None:
                    self._refresh(work, changed)
                    verifier.check(work, unit.label, unit.stage.verify)
            else:
                self._refresh(work, changed)
                work = self._run_step(work, unit.step, data, unit.params)
                if verifier is not None:
                    verifier.check(work, unit.label, "sqnr")
        with self._phase("prune"):
            # attribute reads nothing uses any more (an erased op's inputs), then the submodules
            # no node uses (a folded BatchNorm, a replaced observer), which would still be in
            # parameters() and the state_dict
            dead = [n for n in work.graph.find_nodes(op="get_attr", sort=False) if not n.users]
            for n in dead:
                work.graph.erase_node(n)
            if dead and not changed:
                changed.append("prune")
            delete_unused_submodules(work)
        self._refresh(work, changed)
        self.report.coverage_of(work)   # "quantized 9/9 weighted ops", each one left in float with its reason
        self.report.seconds = time.perf_counter() - t0
        return work

    def _check_skip(self, gm: fx.GraphModule) -> None:
        """Warn (in the report) about ``skip`` patterns that name no node of the graph, over the
        values the run binds (:func:`qpasses.explain.skip_warnings`)."""
        self.report.warnings.extend(skip_warnings(self.plan, gm))

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

    def _refresh(self, gm: fx.GraphModule, changed: List[str]) -> None:
        """Lint the graph and generate its code if ``changed`` names units that changed it
        (then empties the list): once before anything runs or returns the graph."""
        if not changed:
            return
        with self._phase("lint"):
            try:
                gm.graph.lint()
            except Exception as e:  # noqa: BLE001 - a malformed graph is a rewrite bug: say where
                raise RewriteError(f"the graph is malformed after {', '.join(changed)}: "
                                   f"{type(e).__name__}: {e}") from e
        with self._phase("codegen"):
            try:
                gm.recompile()
            except Exception as e:  # noqa: BLE001
                raise RewriteError(f"no code can be generated for the graph after {', '.join(changed)}: "
                                   f"{type(e).__name__}: {e}") from e
        changed.clear()

    def _run_stage(self, gm: fx.GraphModule, unit: Unit, state: Dict[str, Any]):
        """Run one stage: (iterations, rewrites, converged)."""
        stage = unit.stage
        total = 0
        limit = stage.max_iterations if stage.mode == "fixpoint" else 1
        with RewriteContext(gm, state) as rc:
            matcher = Matcher(FxIR(rc, unit.params if unit.params is not None else self.params))
            for it in range(1, limit + 1):
                changed = 0
                for rule in unit.rules:
                    changed += self._apply_rule(rc, matcher, rule, unit.family, stage.name)
                total += changed
                if changed == 0:
                    return it, total, True
        converged = stage.mode == "once"
        if not converged:
            self.report.warnings.append(
                f"stage {stage.name!r} did not reach a fixpoint in {limit} iterations; stopped there")
        return limit, total, converged

    def _apply_rule(self, rc: RewriteContext, matcher: Matcher, rule: Rule, family: Optional[str],
                    stage: str) -> int:
        return apply_rule(matcher.ir, matcher, rule, self.report.rule(rule.name, family, stage))

    def _run_step(self, gm: fx.GraphModule, step: Step, data: Any, params: Optional[Dict[str, Any]] = None
                  ) -> fx.GraphModule:
        reg = DATA_STEPS[step.name]
        record: Dict[str, Any] = {}
        ctx = StepContext(gm, data, self.params if params is None else params, step.args, self.report, self, record)
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

    # ------------------------------------------------------------------ explain
    def explain(self, rule: Union[str, Rule], node: Union[str, fx.Node], gm: Optional[fx.GraphModule] = None
                ) -> Explanation:
        """Why ``rule`` does (not) rewrite ``node``: the pattern step, constraint or guard that fails.

        The rule is bound as the run binds it (``with:`` of the recipe steps around it included);
        a rule the run applies with different parameters in several places is explained for each
        (:class:`Explanation` ``.others``).

        ``gm`` defaults to the graph the node belongs to, else the last graph given to ``run``.
        """
        if isinstance(node, fx.Node):
            gm = gm or node.graph.owning_module
        gm = gm or self._last_input
        if gm is None:
            raise OptionError("explain needs a graph: pass gm= or call run() first")
        if isinstance(node, str):
            found = [n for n in gm.graph.nodes if n.name == node]
            if not found:
                raise MatchError(f"no node named {node!r} in the graph "
                                 f"(did you mean {nearest(node, [n.name for n in gm.graph.nodes])!r}?)")
            node = found[0]
        return explain_in_plan(self.plan, rule, node, gm)


@contextlib.contextmanager
def _no_gc():
    """Pause the cyclic GC: rewriting allocates many small cyclic objects, and full passes
    over a large graph would make a run superlinear in the graph's size."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()
