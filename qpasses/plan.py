"""What a PassManager will run: rule files, recipes, rules and data steps resolved into an
ordered list of units (stages of rules and data steps), with the run's parameters.

This is the loading half of the manager: names and paths are resolved, recipe parameters
collected and checked against the user's options, and every rule bound to them, before
anything runs.
"""
from __future__ import annotations

import copy
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, FrozenSet, List, Optional, Tuple

from .errors import ArgumentError, Location, OptionError, RuleError, UnknownNameError, nearest
from .lang.registry import DATA_STEPS
from .lang.rules import (MAX_RECIPE_DEPTH, ParamSpec, Recipe, Rule, RuleFamily, StageSpec, Step, available_names,
                         find_named, recipe_params, step_target)
from .lang.syntax import substitute

__all__ = ["Unit", "Plan", "Binding", "truthy"]


def truthy(v: Any) -> bool:
    """A rule's / step's ``when`` value as a bool (``"off"``, ``"false"``, ``"0"``... are false)."""
    if isinstance(v, str):
        return v.lower() not in ("", "0", "false", "no", "off", "none")
    return bool(v)


@dataclass(frozen=True)
class Binding:
    """A parameter value bound by the ``with:`` of a recipe's ``rules:`` / ``recipe:`` step."""
    value: Any
    #: where: ``with: of recipe step 'ptq_int8' (r.yaml:7:11)``
    origin: str


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
    #: the names among ``params`` that a ``with:`` around the unit rebound, and where
    bound: Dict[str, Binding] = field(default_factory=dict)
    #: the parameters the unit reads: the ``${name}`` references of a stage's rules; None for a
    #: data step (its code may read any parameter)
    reads: Optional[FrozenSet[str]] = None

    def binding(self, name: str) -> Tuple[Any, str]:
        """(value, origin) of parameter ``name`` for this unit: origin is the ``with:`` that
        rebound it, or ``""`` for the run's own value (an option or a declared default)."""
        b = self.bound.get(name)
        return (b.value, b.origin) if b is not None else ((self.params or {}).get(name), "")

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

    def _scope_params(self, i: int, memo: Dict[int, Tuple[Dict[str, Any], bool, Dict[str, Binding]]]):
        """(parameter values, active, names rebound by with: -> :class:`Binding`) of scope ``i``."""
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
                params[k] = val
                bound[k] = Binding(val, f"with: of {sc.what} step {st.name!r} ({st.value_loc(k)})")
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
                rule = obj.bind(params)
                units.append(Unit("stage", None, StageSpec(obj.stage), [rule], params=params,
                                  bound=bound, reads=_reads([rule])))
            elif kind == "family":
                bound_rules = [r.bind(params) for r in obj.rules]
                for stage in obj.stages:
                    rs = [r for r in bound_rules if r.stage == stage.name]
                    if rs:
                        units.append(Unit("stage", obj.name, stage, rs, params=params, bound=bound,
                                          reads=_reads(rs)))
            else:
                st: Step = obj
                where = f" (step {st.name})"
                if not truthy(substitute(st.when, params, where)):
                    continue
                args = {k: substitute(v, params, where) for k, v in st.args.items()}
                # a data step reads an argument it is not given from the run's parameters
                # (StepContext.arg): the values a with: around it rebound travel as arguments
                reg = DATA_STEPS.get(st.name)
                for k, b in bound.items():
                    if k not in args and (reg is None or not reg.declared or k in reg.args):
                        args[k] = b.value
                units.append(Unit("step", None, step=Step(st.kind, st.name, args, True, st.loc, st.arg_locs),
                                  params=params, bound=bound))
        return units

    def uses(self, name: str) -> List[Tuple[Any, str, List[Unit]]]:
        """The values of parameter ``name`` that the run uses: ``(value, origin, units)`` per
        distinct binding, over the units that read it (origin: see :meth:`Unit.binding`), in
        plan order.  ``explain`` and the unmatched-``skip`` warning read parameters here, so
        they see what the run binds, ``with:`` of nested recipe steps included."""
        out: List[Tuple[Any, str, List[Unit]]] = []
        for u in self.units:
            if u.reads is not None and name not in u.reads:
                continue
            value, origin = u.binding(name)
            for entry in out:
                if entry[1] == origin and entry[0] == value:
                    entry[2].append(u)
                    break
            else:
                out.append((value, origin, [u]))
        return out


def _reads(rules: List[Rule]) -> FrozenSet[str]:
    """The parameters bound ``rules`` read (those :meth:`Rule.bind` substituted)."""
    return frozenset(k for r in rules for k in r.param_values)
