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

from .errors import ArgumentError, Location, OptionError, RuleError, UnknownNameError, nearest
from .lang.registry import DATA_STEPS
from .lang.rules import (MAX_RECIPE_DEPTH, ParamSpec, Recipe, Rule, RuleFamily, StageSpec, Step, available_names,
                         find_named, recipe_params, step_target)
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
    #: the parameter values this unit was bound with (the run's, rebound by ``with:`` of the
    #: recipe / rule steps around it)
    params: Optional[Dict[str, Any]] = None

    @property
    def label(self) -> str:
        if self.kind == "stage":
            return f"{self.family}.{self.stage.name}" if self.family else self.stage.name
        return f"step:{self.step.name}"


@dataclass
class _Scope:
    """A ``rules:`` / ``recipe:`` step of a recipe: its ``when`` and the parameters its ``with:``
    binds for what it runs (checked against ``specs``, what that family / recipe declares)."""
    parent: Optional[int]
    step: Optional[Step] = None
    specs: Optional[Dict[str, ParamSpec]] = None
    what: str = "recipe"


class Plan:
    """The units of ``rules`` (see :class:`~qpasses.PassManager`) bound to ``options``.

    Parameters are one namespace: a recipe's effective parameters (:func:`recipe_params`: its
    own declarations over those of everything it runs) give the defaults, the options override
    them.  ``with:`` on a ``rules:`` / ``recipe:`` step rebinds names for that step only, and its
    ``when`` switches the whole family / nested recipe off.
    """

    def __init__(self, rules: Any, options: Dict[str, Any]):
        self.specs: Dict[str, ParamSpec] = {}
        self._raw: List[Tuple[str, Any, int]] = []
        self._scopes: List[_Scope] = [_Scope(None)]
        items = list(rules) if isinstance(rules, (list, tuple)) else [rules]
        if not items:
            raise OptionError("PassManager needs at least one recipe, rule family, rule or step")
        for item in items:
            self._load(item, depth=0)
        self.params = self._resolve_params(options)
        self.units = self._bind()

    def _load(self, item: Any, depth: int, loc: Optional[Location] = None) -> None:
        if depth > MAX_RECIPE_DEPTH:
            raise RuleError("recipes include each other more than 16 levels deep (a cycle?)", loc)
        if isinstance(item, Rule):
            self._raw.append(("rule", item, 0))
            return
        if isinstance(item, RuleFamily):
            self._add_specs(item.params, override=False)
            self._raw.append(("family", item, 0))
            return
        if isinstance(item, Recipe):
            self._add_specs(recipe_params(item), override=True)
            self._expand(item, 0, depth)
            return
        if isinstance(item, (str, os.PathLike)):
            s = str(item)
            if s.endswith((".yaml", ".yml")) or os.sep in s or Path(s).is_file():
                from .lang.rules import load_file
                self._load(load_file(s), depth + 1, loc)
                return
            if s in DATA_STEPS and available_names().get(s) not in ("recipe", "rules"):
                self._raw.append(("step", Step("step", s, {}, True, Location("<python>")), 0))
                return
            self._load(find_named(s, loc), depth + 1, loc)
            return
        raise OptionError(f"cannot use {type(item).__name__} as rules: give a name, a path, a Rule or a list")

    def _expand(self, recipe: Recipe, scope: int, depth: int) -> None:
        """The steps of ``recipe`` (already checked by :func:`recipe_params`), in scope ``scope``."""
        if depth > MAX_RECIPE_DEPTH:
            raise RuleError("recipes include each other more than 16 levels deep (a cycle?)",
                            Location(recipe.path, 1, 1))
        for st in recipe.steps:
            if st.kind == "step":
                if st.name not in DATA_STEPS:
                    raise UnknownNameError(f"unknown data step {st.name!r}", st.loc, nearest(st.name, DATA_STEPS))
                self._raw.append(("step", st, scope))
                continue
            target = step_target(st)
            specs = target.params if isinstance(target, RuleFamily) else recipe_params(target)
            self._scopes.append(_Scope(scope, st, specs, "rule family" if isinstance(target, RuleFamily) else "recipe"))
            inner = len(self._scopes) - 1
            if isinstance(target, RuleFamily):
                self._raw.append(("family", target, inner))
            else:
                self._expand(target, inner, depth + 1)

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

    def needs_data(self) -> bool:
        """Whether a data step of the plan reads the run's data (with these parameters)."""
        before: set = set()
        for u in self.units:
            if u.kind != "step":
                continue
            reg = DATA_STEPS.get(u.step.name)
            need = True if reg is None else reg.needs_data
            if callable(need):
                params = u.params if u.params is not None else self.params
                args = u.step.args
                need = need(lambda n, d=None: args[n] if n in args else params.get(n, d), frozenset(before))
            if need:
                return True
            before.add(u.step.name)
        return False

    def _scope_params(self, i: int, memo: Dict[int, Tuple[Dict[str, Any], bool, Dict[str, Any]]]):
        """(parameter values, active, names rebound by with: -> value) of scope ``i``."""
        if i in memo:
            return memo[i]
        sc = self._scopes[i]
        if sc.parent is None:
            memo[i] = (self.params, True, {})
            return memo[i]
        outer, active, bound = self._scope_params(sc.parent, memo)
        st = sc.step
        where = f" (step {st.name})"
        active = active and truthy(substitute(st.when, outer, where))
        params, bound = outer, dict(bound)
        if active and st.args:
            params = dict(outer)
            for k, v in st.args.items():
                spec = sc.specs[k]
                val = spec.coerce(copy.deepcopy(substitute(v, outer, where)))
                why = spec.check(val)
                if why:
                    raise ArgumentError(f"with: {sc.what} {st.name!r}: {why}", st.value_loc(k))
                params[k] = bound[k] = val
        memo[i] = (params, active, bound)
        return memo[i]

    def _bind(self) -> List[Unit]:
        units: List[Unit] = []
        memo: Dict[int, Any] = {}
        for kind, obj, scope in self._raw:
            params, active, bound = self._scope_params(scope, memo)
            if not active:
                continue
            if kind == "rule":
                units.append(Unit("stage", None, StageSpec(obj.stage), [obj.bind(params)], params=params))
            elif kind == "family":
                bound_rules = [r.bind(params) for r in obj.rules]
                for stage in obj.stages:
                    rs = [r for r in bound_rules if r.stage == stage.name]
                    if rs:
                        units.append(Unit("stage", obj.name, stage, rs, params=params))
            else:
                st: Step = obj
                where = f" (step {st.name})"
                if not truthy(substitute(st.when, params, where)):
                    continue
                args = {k: substitute(v, params, where) for k, v in st.args.items()}
                # a data step reads an argument it is not given from the run's parameters
                # (StepContext.arg): the values a with: around it rebound travel as arguments
                reg = DATA_STEPS.get(st.name)
                for k, v in bound.items():
                    if k not in args and (reg is None or not reg.declared or k in reg.args):
                        args[k] = v
                units.append(Unit("step", None, step=Step(st.kind, st.name, args, True, st.loc, st.arg_locs),
                                  params=params))
        return units
