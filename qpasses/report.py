"""``pm.report``: what matched, where, what was rewritten, what failed and why."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

__all__ = ["Report", "RuleStats", "StageRecord", "StepRecord", "Coverage", "set_coverage_function"]

MAX_REASONS = 200


@dataclass
class RuleStats:
    """Per-rule counters.  ``failures``: candidates whose pattern did not match;
    ``refused``: matches that a constraint, a guard or the action declined.

    A node counts once: a ``fixpoint`` stage visits a node that stays refused in every
    pass, and a composition may run a family twice, but ``candidates``, ``matches``,
    ``n_failures`` and ``n_refused`` count distinct nodes (and distinct reasons);
    ``rewrites`` counts every rewrite."""
    rule: str
    family: Optional[str]
    stage: str
    candidates: int = 0
    matches: int = 0
    rewrites: int = 0
    refused: List[Tuple[str, str]] = field(default_factory=list)
    failures: List[Tuple[str, str]] = field(default_factory=list)
    n_refused: int = 0
    n_failures: int = 0
    rewritten: List[str] = field(default_factory=list)
    disabled: bool = False
    _seen: set = field(default_factory=set, repr=False, compare=False)

    def _first(self, key: tuple) -> bool:
        """True the first time ``key`` is seen (always for unnamed nodes, e.g. in ONNX files)."""
        if not key[1]:
            return True
        if key in self._seen:
            return False
        self._seen.add(key)
        return True

    def candidate(self, node: str) -> None:
        if self._first(("c", node)):
            self.candidates += 1

    def match(self, node: str) -> None:
        if self._first(("m", node)):
            self.matches += 1

    def fail(self, node: str, reason: str) -> None:
        if not self._first(("f", node, reason)):
            return
        self.n_failures += 1
        if len(self.failures) < MAX_REASONS:
            self.failures.append((node, reason))

    def refuse(self, node: str, reason: str) -> None:
        if not self._first(("r", node, reason)):
            return
        self.n_refused += 1
        if len(self.refused) < MAX_REASONS:
            self.refused.append((node, reason))

    def to_dict(self) -> Dict[str, Any]:
        return {"rule": self.rule, "family": self.family, "stage": self.stage, "candidates": self.candidates,
                "matches": self.matches, "rewrites": self.rewrites, "refused": self.n_refused,
                "failures": self.n_failures, "disabled": self.disabled,
                "refused_reasons": [list(x) for x in self.refused[:20]],
                "failure_reasons": [list(x) for x in self.failures[:20]]}


@dataclass
class StageRecord:
    family: Optional[str]
    stage: str
    seconds: float
    iterations: int
    rewrites: int
    converged: bool = True


@dataclass
class StepRecord:
    name: str
    seconds: float
    info: Dict[str, Any] = field(default_factory=dict)


@dataclass
class Coverage:
    """Which weighted ops (conv / conv_transpose / linear, and matrix products against a constant
    weight) of a graph are quantized; each one left in float comes with a reason."""
    quantized: List[str] = field(default_factory=list)
    quantized_ops: List[str] = field(default_factory=list)             # their op classes
    missing: List[Tuple[str, str, str]] = field(default_factory=list)   # (node, op class, reason)

    @property
    def total(self) -> int:
        return len(self.quantized) + len(self.missing)

    @property
    def complete(self) -> bool:
        return not self.missing

    def line(self) -> str:
        text = f"quantized {len(self.quantized)}/{self.total} weighted ops"
        if self.missing:
            text += "; in float: " + "; ".join(f"{n} ({c}): {r}" for n, c, r in self.missing[:20])
        return text


#: the function computing a run's :class:`Coverage` (``fn(gm, report)``): registered by
#: :mod:`qpasses.layer_report`, the layer that knows the quantizer and kernel module classes, so the
#: report (and the manager that fills it) need not
_COVERAGE_FN: Optional[Any] = None


def set_coverage_function(fn) -> None:
    """Register ``fn(gm, report) -> Coverage`` (done by :mod:`qpasses.layer_report` on import)."""
    global _COVERAGE_FN
    _COVERAGE_FN = fn


class Report:
    """The record of one ``PassManager.run``."""

    def __init__(self) -> None:
        self.rules: Dict[str, RuleStats] = {}
        self.stages: List[StageRecord] = []
        self.steps: List[StepRecord] = []
        self.verify: List[Dict[str, Any]] = []
        self.layers: List[Dict[str, Any]] = []
        self.warnings: List[str] = []
        #: :class:`Coverage` of the result, once :meth:`coverage_of` has looked at it
        self.coverage: Optional[Coverage] = None
        self.seconds: float = 0.0
        #: seconds outside the stages and steps: ``copy`` (the working copy of the input),
        #: ``codegen`` (``recompile()``: Python code for the graph before a step and at the end)
        #: and ``prune`` (dropping the submodules the rewrites orphaned)
        self.phases: Dict[str, float] = {}

    def rule(self, name: str, family: Optional[str] = None, stage: str = "main") -> RuleStats:
        key = name if family is None else f"{family}.{name}"
        st = self.rules.get(key)
        if st is None:
            st = self.rules[key] = RuleStats(name, family, stage)
        return st

    def __getitem__(self, name: str) -> RuleStats:
        if name in self.rules:
            return self.rules[name]
        hits = [s for k, s in self.rules.items() if s.rule == name]
        if not hits:
            raise KeyError(name)
        return hits[-1]

    def coverage_of(self, gm: Any) -> Coverage:
        """Count the weighted ops of ``gm`` (the run's result) quantized, with a reason for each
        one left in float; kept as :attr:`coverage` and shown as a line of ``str(report)``."""
        self.coverage = _COVERAGE_FN(gm, self) if _COVERAGE_FN is not None else None
        return self.coverage

    @property
    def rewrites(self) -> int:
        return sum(s.rewrites for s in self.rules.values())

    @property
    def timings(self) -> Dict[str, float]:
        """Seconds per stage (``family.stage``, lint included), per data step (``step:name``), and
        for the ``copy``, ``codegen`` and ``prune`` phases."""
        out: Dict[str, float] = dict(self.phases)
        for s in self.stages:
            key = f"{s.family}.{s.stage}" if s.family else s.stage
            out[key] = out.get(key, 0.0) + s.seconds
        for st in self.steps:
            key = f"step:{st.name}"
            out[key] = out.get(key, 0.0) + st.seconds
        return out

    def to_dict(self) -> Dict[str, Any]:
        return {"rules": [s.to_dict() for s in self.rules.values()],
                "stages": [vars(s) for s in self.stages],
                "steps": [{"name": s.name, "seconds": s.seconds, "info": s.info} for s in self.steps],
                "verify": self.verify, "layers": self.layers, "warnings": self.warnings,
                "phases": dict(self.phases), "seconds": self.seconds}

    def table(self) -> str:
        """One row per rule.  ``n/a``: candidates the rule does not apply to (the pattern did not
        match: nothing to do there); ``refused``: matches a constraint, a guard or the action
        declined (a layer the rule was meant for, left as it was).  The reason column gives the
        first refusal (``refused: ...``), else, for a rule that rewrote nothing, the first
        mismatch (``n/a: ...``)."""
        rows = [("rule", "stage", "cand", "match", "rewr", "n/a", "refused", "first reason")]
        for s in self.rules.values():
            if s.disabled:
                reason = "disabled (when: false)"
            elif s.refused:
                reason = "refused: " + s.refused[0][1]
            elif s.failures and not s.rewrites:
                reason = "n/a: " + s.failures[0][1]
            else:
                reason = ""
            name = f"{s.family}.{s.rule}" if s.family else s.rule
            rows.append((name, s.stage, str(s.candidates), str(s.matches), str(s.rewrites), str(s.n_failures),
                         str(s.n_refused), reason[:80]))
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        return "\n".join(lines)

    def __str__(self) -> str:
        parts = [self.table()]
        if self.steps:
            parts.append("steps: " + ", ".join(f"{s.name} {s.seconds:.2f}s" for s in self.steps))
        if self.verify:
            parts.append("verify: " + "; ".join(
                f"{v['after']}: {v['metric']}={v['value']:.4g}" for v in self.verify))
        if self.coverage is not None:
            parts.append("coverage: " + self.coverage.line())
        if self.warnings:
            parts += ["warning: " + w for w in self.warnings]
        return "\n".join(parts)

    __repr__ = __str__
