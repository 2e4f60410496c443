"""The rule language: patterns (S-expressions), calls, rule files and recipes."""
from .syntax import (Pattern, NodePat, BindPat, ValuePat, AnyPat, LiteralPat, Call, BindingRef,
                     ParamRef, parse_pattern, parse_call, parse_value)
from .rules import (Rule, RuleFamily, Recipe, Step, ParamSpec, load_file, find_named, available_names,
                    recipe_params, shared_params)
from .registry import constraint, action, data_step, CONSTRAINTS, ACTIONS, DATA_STEPS

__all__ = [
    "Pattern", "NodePat", "BindPat", "ValuePat", "AnyPat", "LiteralPat", "Call", "BindingRef",
    "ParamRef", "parse_pattern", "parse_call", "parse_value", "Rule", "RuleFamily", "Recipe", "Step",
    "ParamSpec", "load_file", "find_named", "available_names", "recipe_params", "shared_params", "constraint", "action", "data_step",
    "CONSTRAINTS", "ACTIONS", "DATA_STEPS",
]
