"""What a PassManager will run: rule files, recipes, rules and data steps resolved into an
ordered list of units (stages of rules and data steps), with the run's parameters.

This is the loading half of the manager: names and paths are resolved, recipe parameters
collected and checked against the user's options, and every rule bound to them, before
anything runs.
"""
from __future__ import annotations

import copy
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from .errors import Location, OptionError, RuleError, UnknownNameError, nearest
from .lang.registry import DATA_STEPS
from .lang.rules import ParamSpec, Recipe, Rule, RuleFamily, StageSpec, Step, available_names, find_named
from .lang.syntax import substitute

__all__ = ["Unit", "Plan", "truthy"]


def truthy(v: Any) -> bool:
    """A rule's / step's ``when`` value as a bool (``"off"``, ``"false"``, ``"0"``... are false)."""
    if isinstance(v, str):
        return v.lower() not in ("", "0", "false", "no", "off", "none")
    return bool(v)


@dataclass
class Unit:
    """One thing the manager runs: a stage of rules, or a data step."""
    kind: str                      # "stage" | "step"
    family: Optional[str]
    stage: Optional[StageSpec] = None
    rules: Optional[List[Rule]] = None
    step: Optional[Step] = None

    @property
    def label(self) -> str:
        if self.kind == "stage":
            return f"{self.family}.{self.stage.name}" if self.family else self.stage.name
        return f"step:{self.step.name}"


class Plan:
    """The units of ``rules`` (see :class:`~qpasses.PassManager`) bound to ``options``."""

    def __init__(self, rules: Any, options: Dict[str, Any]):
        self.specs: Dict[str, ParamSpec] = {}
        self._raw: List[Tuple[str, Any, Optional[Step]]] = []
        items = list(rules) if isinstance(rules, (list, tuple)) else [rules]
        if not items:
            raise OptionError("PassManager needs at least one recipe, rule family, rule or step")
        for item in items:
            self._load(item, depth=0)
        self.params = self._resolve_params(options)
        self.units = self._bind()

    def _load(self, item: Any, depth: int, loc: Optional[Location] = None) -> None:
        if depth > 16:
            raise RuleError("recipes include each other more than 16 levels deep (a cycle?)", loc)
        if isinstance(item, Rule):
            self._raw.append(("rule", item, None))
            return
        if isinstance(item, RuleFamily):
            self._add_specs(item.params, override=False)
            self._raw.append(("family", item, None))
            return
        if isinstance(item, Recipe):
            self._add_specs(item.params, override=True)
            for st in item.steps:
                if st.kind == "rules":
                    fam = find_named(st.name, st.loc)
                    if not isinstance(fam, RuleFamily):
                        self._load(fam, depth + 1, st.loc)
                    else:
                        self._add_specs(fam.params, override=False)
                        self._raw.append(("family", fam, st))
                elif st.kind == "recipe":
                    self._load(find_named(st.name, st.loc), depth + 1, st.loc)
                else:
                    if st.name not in DATA_STEPS:
                        raise UnknownNameError(f"unknown data step {st.name!r}", st.loc, nearest(st.name, DATA_STEPS))
                    self._raw.append(("step", st, None))
            return
        if isinstance(item, (str, os.PathLike)):
            s = str(item)
            if s.endswith((".yaml", ".yml")) or os.sep in s or Path(s).is_file():
                from .lang.rules import load_file
                self._load(load_file(s), depth + 1, loc)
                return
            if s in DATA_STEPS and available_names().get(s) not in ("recipe", "rules"):
                self._raw.append(("step", Step("step", s, {}, True, Location("<python>")), None))
                return
            self._load(find_named(s, loc), depth + 1, loc)
            return
        raise OptionError(f"cannot use {type(item).__name__} as rules: give a name, a path, a Rule or a list")

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

    def _bind(self) -> List[Unit]:
        units: List[Unit] = []
        for kind, obj, step in self._raw:
            if kind == "rule":
                units.append(Unit("stage", None, StageSpec(obj.stage), [obj.bind(self.params)]))
            elif kind == "family":
                if step is not None and not truthy(substitute(step.when, self.params, f" (step {step.name})")):
                    continue
                bound = [r.bind(self.params) for r in obj.rules]
                for stage in obj.stages:
                    rs = [r for r in bound if r.stage == stage.name]
                    if rs:
                        units.append(Unit("stage", obj.name, stage, rs))
            else:
                st: Step = obj
                args = {k: substitute(v, self.params, f" (step {st.name})") for k, v in st.args.items()}
                if not truthy(substitute(st.when, self.params, f" (step {st.name})")):
                    continue
                units.append(Unit("step", None, step=Step(st.kind, st.name, args, True, st.loc)))
        return units
