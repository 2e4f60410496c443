"""Rule files and recipes: YAML (safe loader) with file:line:col on every error.

A *rule family* file::

    version: 1
    family: canonicalize
    params: {eps_check: {default: true, type: bool}}
    stages: [{name: canonicalize, mode: fixpoint, max_iterations: 8, verify: exact}]
    rules:
      - name: fold_bn_into_conv
        stage: canonicalize
        match: (batch_norm $bn (conv|conv_transpose|linear $conv ?x))
        where: [eval_mode($bn)]
        rewrite: fold_bn($conv, $bn)

A *recipe* file::

    version: 1
    recipe: ptq_int8
    params: {w_bits: {default: 8, type: int, min: 2, max: 16}}
    steps:
      - rules: canonicalize
      - rules: observe
      - step: calibrate
      - rules: convert

The Python API builds the same objects: ``Rule(name=..., match="(...)", rewrite="...")``.
"""
from __future__ import annotations


import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import yaml

from ..errors import (ArgumentError, Location, RuleError, RuleLimitError, RuleSchemaError, RuleSyntaxError,
                      UnknownNameError, nearest)
from .registry import ACTIONS, CONSTRAINTS, DATA_STEPS, Registered, check_arguments
from .syntax import (MAX_NESTING, MAX_TEXT, BindPat, BindingRef, Call, NodePat, ParamRef, Pattern,
                     ValuePat, find_refs, param_refs, parse_call, parse_pattern, parse_value, substitute)

# ----------------------------------------------------------------------------- located YAML


class LStr(str):
    loc: Location


class LDict(dict):
    loc: Location
    key_locs: Dict[str, Location]
    val_locs: Dict[str, Location]


class LList(list):
    loc: Location
    item_locs: List[Location]


def _mark(file: Optional[str], node: yaml.Node, quoted_shift: bool = True) -> Location:
    col = node.start_mark.column + 1
    style = getattr(node, "style", None)
    if quoted_shift and style in ("'", '"'):
        col += 1
    if style in ("|", ">"):
        return Location(file, node.start_mark.line + 2, node.start_mark.column + 1)
    return Location(file, node.start_mark.line + 1, col)


# ----------------------------------------------------------------------------- limits

#: the limits a rule file is read under; anything beyond them is a located RuleLimitError
LIMITS = {
    "file_bytes": 256 * 1024,       # size of one rule / recipe file
    "yaml_depth": 32,               # nesting of YAML mappings and lists (after alias expansion)
    "yaml_nodes": 20000,            # YAML values in one file, aliases counted at every use
    # read-only copies of qpasses.lang.syntax.MAX_TEXT / MAX_NESTING, which the parser uses:
    "pattern_chars": MAX_TEXT,      # one pattern, call or ${...} value text
    "pattern_depth": MAX_NESTING,   # nesting of (patterns) and [lists] inside one text
}

_STD = "tag:yaml.org,2002:"
_SCALAR_TAGS = {_STD + "str", _STD + "int", _STD + "float", _STD + "bool", _STD + "null"}

try:  # libyaml when present (fast); the pure-Python parser otherwise: same events either way
    _EventLoader = yaml.CSafeLoader  # type: ignore[attr-defined]
except AttributeError:  # pragma: no cover - depends on the PyYAML build
    _EventLoader = yaml.SafeLoader


def _event_loc(file: Optional[str], ev: Any) -> Location:
    m = getattr(ev, "start_mark", None)
    return Location(file, m.line + 1, m.column + 1) if m is not None else Location(file, 1, 1)


def _compose(loader: Any, file: Optional[str]) -> Optional[yaml.Node]:
    """Build the YAML node tree from parser events without recursion.

    Nesting is limited to ``LIMITS['yaml_depth']``; an alias may only refer to an anchor whose
    node is complete (so a node cannot contain itself); one document per file.
    """
    max_depth = LIMITS["yaml_depth"]
    max_nodes = LIMITS["yaml_nodes"]
    anchors: Dict[str, yaml.Node] = {}
    sizes: Dict[int, Tuple[int, int]] = {}  # id(anchored node) -> (values once expanded, depth)
    stack: List[list] = []   # [node, anchor, pending mapping key, values inside, depth inside]
    root: Optional[yaml.Node] = None
    docs = 0

    def add(node: yaml.Node, size: int, depth: int, ev: Any) -> None:
        nonlocal root
        # budgets: an alias counts as the whole value it stands for, so a "billion laughs"
        # file is refused as soon as its expanded size passes the budget (no expansion happens)
        if len(stack) + depth > max_depth:
            raise RuleLimitError(f"YAML nests more than {max_depth} levels deep (after expanding aliases)",
                                 _event_loc(file, ev))
        if not stack:
            root = node
            return
        frame = stack[-1]
        frame[3] += size
        frame[4] = max(frame[4], depth)
        if frame[3] > max_nodes:
            raise RuleLimitError(f"the file expands to more than {max_nodes} YAML values "
                                 f"(aliases are counted at every use)", _event_loc(file, ev))
        parent = frame[0]
        if isinstance(parent, yaml.SequenceNode):
            parent.value.append(node)
        elif frame[2] is None:
            frame[2] = node
        else:
            parent.value.append((frame[2], node))
            frame[2] = None

    while True:
        ev = loader.get_event()
        if isinstance(ev, yaml.StreamEndEvent):
            break
        if isinstance(ev, yaml.DocumentStartEvent):
            docs += 1
            if docs > 1:
                raise RuleSchemaError("a rule file holds one YAML document (found a second '---')", _event_loc(file, ev))
            continue
        if isinstance(ev, (yaml.StreamStartEvent, yaml.DocumentEndEvent)):
            continue
        if isinstance(ev, yaml.AliasEvent):
            node = anchors.get(ev.anchor)
            if node is None:
                raise RuleSchemaError(f"alias *{ev.anchor} refers to no complete anchor &{ev.anchor} before it "
                                      f"(an anchor cannot be used inside its own value)", _event_loc(file, ev))
            add(node, *sizes[id(node)], ev)
            continue
        if isinstance(ev, yaml.ScalarEvent):
            tag = ev.tag
            if tag is None or tag == "!":
                tag = loader.resolve(yaml.ScalarNode, ev.value, ev.implicit)
                if tag == _STD + "timestamp":
                    tag = _STD + "str"  # a plain 2024-01-01 reads as text, not as a date
            node = yaml.ScalarNode(tag, ev.value, ev.start_mark, ev.end_mark, style=ev.style)
            if ev.anchor is not None:
                anchors[ev.anchor] = node
                sizes[id(node)] = (1, 0)
            add(node, 1, 0, ev)
            continue
        if isinstance(ev, (yaml.SequenceStartEvent, yaml.MappingStartEvent)):
            seq = isinstance(ev, yaml.SequenceStartEvent)
            kind = yaml.SequenceNode if seq else yaml.MappingNode
            tag = ev.tag
            if tag is None or tag == "!":
                tag = loader.resolve(kind, None, ev.implicit)
            if len(stack) >= max_depth:
                raise RuleLimitError(f"YAML nests more than {max_depth} levels deep", _event_loc(file, ev))
            stack.append([kind(tag, [], ev.start_mark, None, flow_style=ev.flow_style), ev.anchor, None, 0, 0])
            continue
        if isinstance(ev, (yaml.SequenceEndEvent, yaml.MappingEndEvent)):
            node, anchor, _, size, depth = stack.pop()
            node.end_mark = ev.end_mark
            if anchor is not None:
                anchors[anchor] = node
                sizes[id(node)] = (size + 1, depth + 1)
            add(node, size + 1, depth + 1, ev)
            continue
    return root


def _scalar(node: yaml.ScalarNode, file: Optional[str], loader: Any) -> Any:
    tag = node.tag
    if tag not in _SCALAR_TAGS:
        raise RuleSchemaError(f"YAML tag {_tag_text(tag)} is not allowed in rule files (only plain values: "
                              f"strings, numbers, true/false, null, lists and mappings)", _mark(file, node))
    try:
        value = {"str": loader.construct_yaml_str, "int": loader.construct_yaml_int,
                 "float": loader.construct_yaml_float, "bool": loader.construct_yaml_bool,
                 "null": loader.construct_yaml_null}[tag[len(_STD):]](node)
    except (ValueError, KeyError, IndexError, TypeError, OverflowError, yaml.YAMLError):
        raise RuleSchemaError(f"{_tag_text(tag)} {node.value!r} is not a valid {tag[len(_STD):]}",
                              _mark(file, node)) from None
    if isinstance(value, str):
        s = LStr(value)
        s.loc = _mark(file, node)
        return s
    return value


def _tag_text(tag: str) -> str:
    return "!!" + tag[len(_STD):] if tag.startswith(_STD) else tag if tag.startswith("!") else f"!<{tag}>"


def _construct(node: yaml.Node, file: Optional[str], loader: Any) -> Any:
    """Located Python values (LStr / LDict / LList) from a node tree.

    Aliases are expanded here; :func:`_compose` has already bounded their expanded size and
    depth (``LIMITS``), so this recursion stays shallow and small.
    """

    def build(n: yaml.Node) -> Any:
        if isinstance(n, yaml.MappingNode):
            if n.tag != _STD + "map":
                raise RuleSchemaError(f"YAML tag {_tag_text(n.tag)} is not allowed on a mapping in rule files",
                                      _mark(file, n))
            out = LDict()
            out.loc = _mark(file, n)
            out.key_locs, out.val_locs = {}, {}
            for k, v in n.value:
                if isinstance(k, yaml.ScalarNode) and k.tag == _STD + "merge":
                    raise RuleSchemaError("merge keys '<<' are not supported in rule files; write the keys out",
                                          _mark(file, k))
                if not isinstance(k, yaml.ScalarNode):
                    raise RuleSchemaError("mapping keys must be plain names", _mark(file, k))
                key = build(k)
                if key in out:
                    raise RuleSyntaxError(f"key {key!r} appears twice", _mark(file, k))
                out[key] = build(v)
                out.key_locs[key] = _mark(file, k)
                out.val_locs[key] = _mark(file, v)
            return out
        if isinstance(n, yaml.SequenceNode):
            if n.tag != _STD + "seq":
                raise RuleSchemaError(f"YAML tag {_tag_text(n.tag)} is not allowed on a list in rule files",
                                      _mark(file, n))
            out = LList(build(v) for v in n.value)
            out.loc = _mark(file, n)
            out.item_locs = [_mark(file, v) for v in n.value]
            return out
        return _scalar(n, file, loader)

    return build(node)


def load_yaml(text: str, file: Optional[str] = None) -> Any:
    """Parse YAML under the rule-file policy, keeping locations (LStr / LDict / LList).

    Safe: plain values only (strings, numbers, booleans, null, lists, mappings); any other tag,
    on a scalar, a list or a mapping, is a located :class:`RuleSchemaError`.  Nesting, size and
    alias expansion are bounded by :data:`LIMITS`.
    """
    if len(text) > LIMITS["file_bytes"]:
        raise RuleLimitError(f"the file is {len(text)} characters long; the limit is {LIMITS['file_bytes']}",
                             Location(file, 1, 1))
    loader = None
    try:
        loader = _EventLoader(text)
        root = _compose(loader, file)
        if root is None:
            return None
        return _construct(root, file, loader)
    except yaml.MarkedYAMLError as e:
        m = e.problem_mark or e.context_mark
        loc = Location(file, m.line + 1, m.column + 1) if m else Location(file, 1, 1)
        if "nesting depth" in str(e.problem or ""):  # libyaml's own limit (1000) met first
            raise RuleLimitError(f"YAML nests more than {LIMITS['yaml_depth']} levels deep", loc) from None
        raise RuleSyntaxError(f"YAML: {e.problem or e.context}", loc) from None
    except yaml.reader.ReaderError as e:
        line, col = _line_col(text, e.position)
        raise RuleSyntaxError(f"YAML: {e.reason} (character {e.character!r})", Location(file, line, col)) from None
    except yaml.YAMLError as e:
        raise RuleSyntaxError(f"YAML: {e}", Location(file, 1, 1)) from None
    except UnicodeError as e:  # a lone surrogate in text handed over as a Python str
        line, col = _line_col(text, getattr(e, "start", 0))
        raise RuleSyntaxError(f"the text is not valid Unicode: {e.reason}", Location(file, line, col)) from None
    finally:
        if loader is not None:
            loader.dispose()


def _line_col(text: str, offset: int) -> Tuple[int, int]:
    offset = max(0, min(int(offset or 0), len(text)))
    line = text.count("\n", 0, offset) + 1
    return line, offset - (text.rfind("\n", 0, offset) + 1) + 1


def decode_text(data: bytes, file: Optional[str] = None) -> str:
    """The UTF-8 text of a rule file (a BOM is dropped); a located RuleSyntaxError otherwise."""
    if len(data) > LIMITS["file_bytes"]:
        raise RuleLimitError(f"the file is {len(data)} bytes long; the limit is {LIMITS['file_bytes']}",
                             Location(file, 1, 1))
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        start = e.start
        good = data[:start].decode("utf-8", errors="replace")
        line, col = _line_col(good, len(good))
        raise RuleSyntaxError(f"the file is not UTF-8 text: byte 0x{data[start]:02x} cannot be decoded",
                              Location(file, line, col)) from None


def _loc(obj: Any, default: Location) -> Location:
    return getattr(obj, "loc", None) or default


def _vloc(d: Any, key: str, default: Location) -> Location:
    locs = getattr(d, "val_locs", None)
    return locs.get(key, default) if locs else default


def _check_keys(d: Dict, allowed: Sequence[str], what: str, loc: Location) -> None:
    for k in d:
        if k not in allowed:
            kl = getattr(d, "key_locs", {}).get(k, loc)
            raise RuleSyntaxError(f"unknown key {k!r} in {what}", kl, nearest(k, allowed))


# ----------------------------------------------------------------------------- schema
#
# The declared form of rule-family and recipe files.  Every value is checked against it
# before anything is parsed further, so a wrong type anywhere is a located RuleSchemaError.


def _what(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return f"the boolean {'true' if v else 'false'}"
    if isinstance(v, int):
        return f"the integer {v}"
    if isinstance(v, float):
        return f"the number {v}"
    if isinstance(v, str):
        return f"the string {v[:40] + '...' if len(v) > 40 else v!r}"
    if isinstance(v, list):
        return "a list"
    if isinstance(v, dict):
        return "a mapping"
    return type(v).__name__


class _S:
    """One schema node: ``check(value, loc, where)`` raises a located RuleSchemaError."""
    text = "a value"

    def ok(self, v: Any) -> bool:
        return True

    def check(self, v: Any, loc: Location, where: str) -> None:
        if not self.ok(v):
            raise RuleSchemaError(f"{where} must be {self.text}, got {_what(v)}", _loc(v, loc))


class _Str(_S):
    text = "a string"

    def ok(self, v):
        return isinstance(v, str)


class _Int(_S):
    text = "an integer"

    def ok(self, v):
        return isinstance(v, int) and not isinstance(v, bool)


class _Num(_S):
    text = "a number"

    def ok(self, v):
        return isinstance(v, (int, float)) and not isinstance(v, bool)


class _Bool(_S):
    text = "true or false"

    def ok(self, v):
        return isinstance(v, bool)


class _Null(_S):
    text = "null"

    def ok(self, v):
        return v is None


class _Data(_S):
    """Plain data: scalars, lists, mappings with string keys."""
    text = "plain data"

    def check(self, v, loc, where):
        if isinstance(v, dict):
            for k, x in v.items():
                if not isinstance(k, str):
                    raise RuleSchemaError(f"keys in {where} must be strings, got {_what(k)}",
                                          getattr(v, "key_locs", {}).get(k, _loc(v, loc)))
                self.check(x, _vloc(v, k, loc), f"{where}.{k}")
        elif isinstance(v, list):
            locs = getattr(v, "item_locs", None)
            for i, x in enumerate(v):
                self.check(x, locs[i] if locs else loc, f"{where}[{i}]")


class _Scalar(_S):
    text = "a string, number, true/false or null"

    def ok(self, v):
        return not isinstance(v, (list, dict))


class _List(_S):
    def __init__(self, item: _S, nonempty: bool = False):
        self.item, self.nonempty = item, nonempty
        self.text = f"a {'non-empty ' if nonempty else ''}list"

    def check(self, v, loc, where):
        if not isinstance(v, list) or (self.nonempty and not v):
            raise RuleSchemaError(f"{where} must be {self.text}, got {_what(v) if v != [] else 'an empty list'}",
                                  _loc(v, loc))
        locs = getattr(v, "item_locs", None)
        for i, x in enumerate(v):
            self.item.check(x, locs[i] if locs else loc, f"{where}[{i}]")


class _OneOf(_S):
    def __init__(self, *alts: _S, text: str = ""):
        self.alts = alts
        self.text = text or " or ".join(a.text for a in alts)

    def check(self, v, loc, where):
        for a in self.alts:
            if _applies(a, v):
                return a.check(v, loc, where)
        raise RuleSchemaError(f"{where} must be {self.text}, got {_what(v)}", _loc(v, loc))


def _applies(a: _S, v: Any) -> bool:
    """Whether alternative ``a`` of a _OneOf is the one meant for ``v`` (by its shape)."""
    if isinstance(a, (_Record, _MapOf)):
        return isinstance(v, dict)
    if isinstance(a, _List):
        return isinstance(v, list)
    if isinstance(a, (_Data, _OneOf)):
        return True
    return a.ok(v)


class _Record(_S):
    """A mapping with known keys (unknown keys are an error naming the nearest one)."""

    def __init__(self, what: str, fields: Dict[str, _S], required: Sequence[str] = ()):
        self.what, self.fields, self.required = what, fields, tuple(required)
        self.text = f"a mapping ({what})"

    def check(self, v, loc, where):
        if not isinstance(v, dict):
            raise RuleSchemaError(f"{where} must be {self.text}, got {_what(v)}", _loc(v, loc))
        dloc = _loc(v, loc)
        for k, x in v.items():
            kloc = getattr(v, "key_locs", {}).get(k, dloc)
            if not isinstance(k, str):
                raise RuleSchemaError(f"keys of {self.what} must be names, got {_what(k)}", kloc)
            if k not in self.fields:
                raise RuleSyntaxError(f"unknown key {k!r} in {self.what}", kloc, nearest(k, self.fields))
            self.fields[k].check(x, _vloc(v, k, dloc), f"{where}.{k}" if where else k)
        for k in self.required:
            if k not in v:
                raise RuleSchemaError(f"{self.what} is missing {k!r}", dloc)


class _MapOf(_S):
    """A mapping from names to values of one schema."""

    def __init__(self, value: _S, what: str):
        self.value, self.what = value, what
        self.text = f"a mapping of {what}"

    def check(self, v, loc, where):
        if not isinstance(v, dict):
            raise RuleSchemaError(f"{where} must be {self.text}, got {_what(v)}", _loc(v, loc))
        dloc = _loc(v, loc)
        for k, x in v.items():
            if not isinstance(k, str):
                raise RuleSchemaError(f"names in {where} must be strings, got {_what(k)}",
                                      getattr(v, "key_locs", {}).get(k, dloc))
            self.value.check(x, _vloc(v, k, dloc), f"{where}.{k}")


_STRS = _OneOf(_Str(), _List(_Str()), _Null(), text="a string or a list of strings")
_PARAM = _OneOf(
    _Record("parameter", {"default": _Data(), "type": _Str(), "min": _OneOf(_Num(), _Null()),
                          "max": _OneOf(_Num(), _Null()), "choices": _OneOf(_List(_Scalar()), _Null()),
                          "doc": _Str()}),
    _Scalar(), _List(_Data()), text="a default value or a mapping {default, type, min, max, choices, doc}")
_STAGE = _OneOf(_Str(), _Record("stage", {"name": _Str(), "mode": _Str(), "max_iterations": _Int(),
                                          "verify": _Str()}, required=("name",)),
                text="a stage name or a mapping {name, mode, max_iterations, verify}")
_RULE = _Record("rule", {"name": _Str(), "stage": _Str(), "match": _OneOf(_Str(), _List(_Str(), nonempty=True),
                                                                          text="a pattern or a list of patterns"),
                         "where": _STRS, "unless": _STRS, "rewrite": _Str(),
                         "when": _OneOf(_Bool(), _Str(), text="true, false or a ${parameter}"),
                         "doc": _OneOf(_Str(), _Null()), "keeps": _STRS})
_STEP = _Record("step", {"rules": _Str(), "step": _Str(), "recipe": _Str(),
                         "with": _OneOf(_MapOf(_Data(), "argument: value"), _Null(), text="a mapping of argument: value"),
                         "when": _OneOf(_Bool(), _Str(), text="true, false or a ${parameter}")})
_COMMON = {"version": _S(), "params": _OneOf(_MapOf(_PARAM, "name: default"), _Null(),
                                            text="a mapping of name: default or name: {default: ...}"),
           "doc": _OneOf(_Str(), _Null()),
           # the page that documents the file, relative to the docs folder; by default a family's is
           # rules/<family>.md and a recipe's recipes/<recipe>.md (tests/test_layout.py checks them)
           "docs": _Str()}
#: the declared schema of a rule-family file
FAMILY_SCHEMA = _Record("rule file", dict(_COMMON, family=_Str(), stages=_OneOf(_List(_STAGE), _Null(), text="a list"),
                                          rules=_List(_RULE, nonempty=True)))
#: the declared schema of a recipe file
RECIPE_SCHEMA = _Record("recipe", dict(_COMMON, recipe=_Str(), steps=_List(_STEP, nonempty=True)))


# ----------------------------------------------------------------------------- params


_TYPES = {"int": int, "float": (int, float), "bool": bool, "str": str, "list": list, "any": object}


#: the fields of a parameter declaration
PARAM_FIELDS = ("default", "type", "min", "max", "choices", "doc")
#: the value that declares a parameter by inheritance alone (``params: {skip: inherit}``)
INHERIT = "inherit"


@dataclass
class ParamSpec:
    """A recipe / rule-family parameter: default, type and allowed values.

    ``given`` names the fields the file wrote itself: a declaration *refines* the one it
    inherits (from the families and recipes a recipe runs, else from the shared declarations),
    replacing only those fields.  ``inherit`` marks ``name: inherit`` (nothing changed).
    """
    name: str
    default: Any = None
    type: str = "any"
    min: Optional[float] = None
    max: Optional[float] = None
    choices: Optional[List[Any]] = None
    doc: str = ""
    loc: Location = field(default_factory=Location)
    given: Tuple[str, ...] = PARAM_FIELDS
    inherit: bool = False

    def refine(self, base: "ParamSpec") -> "ParamSpec":
        """This declaration over the inherited ``base``: the fields written here replace base's."""
        out = ParamSpec(self.name, base.default, base.type, base.min, base.max,
                        list(base.choices) if base.choices is not None else None, base.doc, self.loc)
        for f in self.given:
            setattr(out, f, getattr(self, f))
        if "default" in self.given and "type" not in self.given and base.type == "float" and \
                isinstance(out.default, int) and not isinstance(out.default, bool):
            out.default = float(out.default)
        if out.min is not None and out.max is not None and out.min > out.max:
            raise RuleSchemaError(f"parameter {self.name!r} has min {out.min} above max {out.max} "
                                  f"(one of them inherited)", self.loc)
        if out.default is not None:
            why = out.check(out.default)
            if why:
                raise RuleSyntaxError(f"default of {why}" + ("" if "default" in self.given else
                                                            " (the inherited default does not fit this declaration)"),
                                      self.loc)
        return out

    def summary(self) -> Dict[str, Any]:
        """The declaration's meaning (without doc and location), for comparisons and listings."""
        return {"default": self.default, "type": self.type, "min": self.min, "max": self.max, "choices": self.choices}

    def check(self, value: Any) -> Optional[str]:
        """A reason why ``value`` is not allowed, or None."""
        t = _TYPES.get(self.type, object)
        if self.type == "int" and isinstance(value, bool):
            return f"{self.name} must be an integer, got {value!r}"
        if self.type == "list" and isinstance(value, (tuple, str)):
            value = list(value) if isinstance(value, tuple) else [value]
        if value is None:
            # None only where the parameter's own default is None (an optional setting)
            return None if self.default is None else f"{self.name} must be of type {self.type}, got None"
        if not isinstance(value, t):
            return f"{self.name} must be of type {self.type}, got {value!r}"
        if self.choices is not None and value not in self.choices:
            return f"{self.name} must be one of {self.choices}, got {value!r}"
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if self.min is not None and value < self.min:
                return f"{self.name} must be >= {self.min}, got {value!r}"
            if self.max is not None and value > self.max:
                return f"{self.name} must be <= {self.max}, got {value!r}"
        return None

    def coerce(self, value: Any) -> Any:
        if self.type == "list" and isinstance(value, (tuple, str)):
            return list(value) if isinstance(value, tuple) else [value]
        if self.type == "float" and isinstance(value, int) and not isinstance(value, bool):
            return float(value)
        return value


def _parse_params(raw: Any, file: Optional[str], loc: Location) -> Dict[str, ParamSpec]:
    out: Dict[str, ParamSpec] = {}
    if raw is None:
        return out
    if not isinstance(raw, dict):
        raise RuleSyntaxError("'params' must be a mapping of name: default or name: {default: ...}", _loc(raw, loc))
    for name, spec in raw.items():
        ploc = getattr(raw, "key_locs", {}).get(name, loc)
        if isinstance(spec, dict):
            _check_keys(spec, PARAM_FIELDS, f"parameter {name!r}", ploc)
            ps = ParamSpec(str(name), spec.get("default"), str(spec.get("type", "any")), spec.get("min"),
                           spec.get("max"), list(spec["choices"]) if spec.get("choices") is not None else None,
                           str(spec.get("doc", "")), ploc, given=tuple(f for f in PARAM_FIELDS if f in spec))
            if ps.type not in _TYPES:
                raise RuleSyntaxError(f"unknown parameter type {ps.type!r}", ploc, nearest(ps.type, _TYPES))
            if ps.min is not None and ps.max is not None and ps.min > ps.max:
                raise RuleSchemaError(f"parameter {name!r} has min {ps.min} above max {ps.max}", ploc)
        elif isinstance(spec, str) and spec == INHERIT:
            ps = ParamSpec(str(name), loc=ploc, given=(), inherit=True)
        else:
            default = spec
            typ = ("bool" if isinstance(default, bool) else "int" if isinstance(default, int) else
                   "float" if isinstance(default, float) else "str" if isinstance(default, str) else
                   "list" if isinstance(default, list) else "any")
            ps = ParamSpec(str(name), _plain(default), typ, loc=ploc, given=("default",))
        ps.default = _plain(ps.default)
        if ps.default is not None and "type" in ps.given:
            why = ps.check(ps.default)
            if why:
                raise RuleSyntaxError(f"default of {why}", ploc)
        out[str(name)] = ps
    return out


def _complete(ps: ParamSpec) -> ParamSpec:
    """A declaration that inherits nothing: its own fields (a bare default, ``a_bits: 6``, has
    the type of its value; a mapping without ``type`` is of type ``any``)."""
    out = ParamSpec(ps.name, ps.default, ps.type, ps.min, ps.max, ps.choices, ps.doc, ps.loc)
    if out.default is not None:
        why = out.check(out.default)
        if why:
            raise RuleSyntaxError(f"default of {why}", ps.loc)
    return out


def _type_conflict(own: ParamSpec, base: ParamSpec) -> bool:
    return "type" in own.given and "any" not in (own.type, base.type) and own.type != base.type


def resolve_params(own: Dict[str, ParamSpec], inherited: Dict[str, Tuple[ParamSpec, Optional[str], Location]],
                   what: str) -> Dict[str, ParamSpec]:
    """The effective parameters of a family or recipe ``what``: ``inherited`` (name -> (spec,
    where it comes from, the location to blame: a recipe's step line)) refined by ``own``; a
    declaration without a type of its own (``inherit``, ``{max: 8}``, a bare default) of a name
    nothing it runs declares refines the shared declaration (:func:`shared_params`); a full
    declaration of such a name stands alone, and ``name: inherit`` must be inherited.

    A declared type that differs from the inherited one is a located :class:`RuleSchemaError`
    at the step that runs the declaring family (or at the declaration, for shared ones).
    """
    shared = shared_params()
    out: Dict[str, ParamSpec] = {}
    for name, ps in own.items():
        src = inherited.get(name)
        # a shared declaration is taken by 'inherit' or by a partial declaration (no type of its
        # own); a full declaration (with a type) of a name nothing it runs declares stands alone
        if src is None and name in shared and "type" not in ps.given:
            src = (shared[name], "the shared declarations (" + str(shared[name].loc.file or "params.yaml") + ")",
                   ps.loc)
        if src is None:
            if ps.inherit:
                raise UnknownNameError(f"parameter {name!r} of {what} is declared '{INHERIT}', but nothing it runs "
                                       f"declares it and the shared declarations do not either", ps.loc,
                                       nearest(name, list(inherited) + list(shared)))
            out[name] = _complete(ps)
            continue
        base, origin, blame = src
        if _type_conflict(ps, base):
            raise RuleSchemaError(f"parameter {name!r} of {what} is declared as {ps.type} (line {ps.loc.line}), "
                                  f"but {origin} declares it as {base.type}", blame)
        out[name] = ps.refine(base)
    for name, (base, _, _) in inherited.items():
        out.setdefault(name, base)
    return out


def _plain(v: Any) -> Any:
    if isinstance(v, LStr):
        return str(v)
    if isinstance(v, list):
        return [_plain(x) for x in v]
    if isinstance(v, dict):
        return {str(k): _plain(x) for k, x in v.items()}
    return v


# ----------------------------------------------------------------------------- rules


def _as_call(v: Any, what: str, loc: Location) -> Call:
    if isinstance(v, Call):
        return v
    if not isinstance(v, str):
        raise RuleSyntaxError(f"{what} must be a call like name(args), got {v!r}", _loc(v, loc))
    return parse_call(v, _loc(v, loc))


def _as_calls(v: Any, what: str, loc: Location) -> List[Call]:
    if v is None:
        return []
    if isinstance(v, (str, Call)):
        v = [v]
    if not isinstance(v, list):
        raise RuleSyntaxError(f"{what} must be a list of calls", _loc(v, loc))
    locs = getattr(v, "item_locs", None)
    return [_as_call(x, what, locs[i] if locs else _loc(x, loc)) for i, x in enumerate(v)]


def _bindings(p: Pattern, out: Dict[str, str]) -> None:
    stack = [p]
    while stack:
        q = stack.pop()
        if isinstance(q, NodePat):
            if q.binding:
                out[q.binding] = "$"
            stack.extend(q.children)
            stack.extend(a for a in q.attrs.values() if isinstance(a, NodePat))
        elif isinstance(q, BindPat):
            out[q.name] = "$"
        elif isinstance(q, ValuePat):
            out[q.name] = "?"


def _refs(v: Any, out: List[BindingRef]) -> None:
    out.extend(find_refs(v, BindingRef, into_patterns=False))


RULE_KEYS = ("name", "stage", "match", "where", "unless", "rewrite", "when", "doc", "keeps")


def _unknown_params(v: Any) -> Tuple[bool, Any, str]:
    """Load time: a ``${param}`` value is not known yet (checked when the rule is bound)."""
    return (not isinstance(v, ParamRef) and not param_refs(v)), v, ""


def _check_call(reg: Registered, call: Call, what: str, rule: str, resolve=_unknown_params) -> None:
    """The call's arguments fit the registration's declared arguments (raises ArgumentError at the call)."""
    why = check_arguments(reg, call.args, call.kwargs, resolve)
    if why:
        raise ArgumentError(f"{what} {call.name}() in rule {rule!r}: {why}", call.loc)


def _named_args(reg: Registered, call: Call) -> Dict[str, Any]:
    """argument name -> value of a call that passed :func:`_check_call`."""
    out = dict(zip([a.name for a in reg.args.values() if not a.keyword_only], call.args))
    out.update(call.kwargs)
    return out


def _rule_calls(rule: "Rule") -> List[Tuple[str, Registered, Call]]:
    out = [("action", ACTIONS[rule.rewrite.name], rule.rewrite)]
    out += [("constraint", CONSTRAINTS[c.name], c) for c in rule.where + rule.unless]
    return out


def _check_param_args(rule: "Rule", params: Dict[str, "ParamSpec"]) -> None:
    """Load time: an argument given as ``${p}``, where ``p`` is declared in the same file, must
    accept ``p``'s default and each of its choices."""
    for what, reg, call in _rule_calls(rule):
        for name, v in _named_args(reg, call).items():
            spec = reg.args.get(name)
            if not isinstance(v, ParamRef) or spec is None or v.name not in params:
                continue
            ps = params[v.name]
            cands = ([("the default", ps.default)] if ps.default is not None else []) + \
                [("the choice", c) for c in (ps.choices or [])]
            for label, c in cands:
                why = spec.check(c)
                if why:
                    raise ArgumentError(f"{what} {call.name}() in rule {rule.name!r}: {why} ({label} of "
                                        f"${{{v.name}}}, declared at line {ps.loc.line})", call.loc)


class Rule:
    """One rewrite rule: a pattern, constraints and an action.

    Built from a rule file or directly::

        Rule(name="fold", match="(batch_norm $bn (conv2d $c ?x))", where=["eval_mode($bn)"],
             rewrite="fold_bn($c, $bn)")
    """

    def __init__(self, name: str, match: Union[str, NodePat, Sequence[Union[str, NodePat]]],
                 rewrite: Union[str, Call, None] = None, where: Sequence[Union[str, Call]] = (),
                 unless: Sequence[Union[str, Call]] = (), stage: str = "main", when: Any = True,
                 doc: str = "", keeps: Sequence[str] = (), loc: Optional[Location] = None,
                 family: Optional[str] = None):
        self.loc = loc or _loc(name, Location("<python>"))
        self.name = str(name)
        if not self.name or not self.name.replace("_", "a").replace("-", "a").replace(".", "a").isalnum():
            raise RuleSyntaxError(f"rule name {self.name!r} must be a plain identifier", self.loc)
        for what, v in (("where", where), ("unless", unless), ("keeps", keeps)):
            if not (isinstance(v, (str, Call, list, tuple)) or v is None):
                raise RuleSchemaError(f"rule {self.name!r}: {what} must be a call or a list of calls, got {_what(v)}",
                                      self.loc)
        if not isinstance(match, (str, NodePat, list, tuple)):
            raise RuleSchemaError(f"rule {self.name!r}: match must be a pattern or a list of patterns, got "
                                  f"{_what(match)}", self.loc)
        where, unless, keeps = where or [], unless or [], keeps or []
        alts = match if isinstance(match, (list, tuple)) else [match]
        if not alts:
            raise RuleSyntaxError(f"rule {self.name!r} has an empty 'match'", self.loc)
        locs = getattr(match, "item_locs", None)
        self.match: List[NodePat] = [
            m if isinstance(m, NodePat) else parse_pattern(str(m), _loc(m, locs[i] if locs else self.loc))
            for i, m in enumerate(alts)]
        if rewrite is None:
            raise RuleSyntaxError(f"rule {self.name!r} has no 'rewrite' action", self.loc)
        self.rewrite: Call = _as_call(rewrite, "rewrite", self.loc)
        self.where: List[Call] = _as_calls(where if isinstance(where, (str, Call)) else list(where), "where", self.loc)
        self.unless: List[Call] = _as_calls(unless if isinstance(unless, (str, Call)) else list(unless), "unless",
                                            self.loc)
        self.stage = str(stage)
        self.when = when if not isinstance(when, str) else parse_value(when, _loc(when, self.loc))
        self.doc = str(doc)
        self.keeps = [str(k).lstrip("$") for k in ([keeps] if isinstance(keeps, str) else keeps)]
        self.family = family
        #: after :meth:`bind`: the parameter values the rule was bound with, by name
        self.param_values: Dict[str, Any] = {}
        self._validate()

    def _validate(self) -> None:
        if self.rewrite.name not in ACTIONS:
            raise UnknownNameError(f"unknown action {self.rewrite.name!r} in rule {self.name!r}",
                                   self.rewrite.loc, nearest(self.rewrite.name, ACTIONS))
        for c in self.where + self.unless:
            if c.name not in CONSTRAINTS:
                raise UnknownNameError(f"unknown constraint {c.name!r} in rule {self.name!r}", c.loc,
                                       nearest(c.name, CONSTRAINTS))
            _check_call(CONSTRAINTS[c.name], c, "constraint", self.name)
        _check_call(ACTIONS[self.rewrite.name], self.rewrite, "action", self.name)
        # every alternative must bind every name that the constraints / action use
        for alt in self.match:
            bound: Dict[str, str] = {}
            _bindings(alt, bound)
            refs: List[BindingRef] = []
            for c in [self.rewrite] + self.where + self.unless:
                _refs(c, refs)
            for r in refs:
                if r.name not in bound:
                    raise RuleSyntaxError(f"{r} is used in rule {self.name!r} but its pattern {alt} does not bind it",
                                          self.rewrite.loc, nearest(r.name, bound))
            for k in self.keeps:
                if k not in bound:
                    raise RuleSyntaxError(f"keeps: ${k} is not bound by the pattern {alt}", self.loc,
                                          nearest(k, bound))

    def failing_constraint(self, evaluate) -> Optional[str]:
        """Why the ``where`` / ``unless`` constraints reject a match, or None.

        ``evaluate(call) -> (ok, reason)`` runs one constraint call on the IR at hand (fx
        graphs in the PassManager, ONNX graphs in :mod:`qpasses.onnx.rewrite`).
        """
        for c in self.where:
            ok, why = evaluate(c)
            if not ok:
                return f"where {c} is false" + (f": {why}" if why else "")
        for c in self.unless:
            ok, why = evaluate(c)
            if ok:
                return f"unless {c} holds" + (f": {why}" if why else "")
        return None

    def params(self) -> List[ParamRef]:
        refs: List[ParamRef] = []
        for p in self.match:
            refs += param_refs(p)
        for c in [self.rewrite] + self.where + self.unless:
            refs += param_refs(c)
        refs += param_refs(self.when)
        return refs

    def bind(self, params: Dict[str, Any]) -> "Rule":
        """A copy with every ``${param}`` replaced (raises MissingParameterError with its location)."""
        where = f" (rule {self.name!r})"
        r = object.__new__(Rule)
        r.__dict__.update(self.__dict__)
        r.match = [substitute(p, params, where) for p in self.match]
        r.rewrite = substitute(self.rewrite, params, where)
        r.where = [substitute(c, params, where) for c in self.where]
        r.unless = [substitute(c, params, where) for c in self.unless]
        r.when = substitute(self.when, params, where)
        # binding a bound rule (no references left) keeps the values it was bound with
        r.param_values = {p.name: params[p.name] for p in self.params()} or dict(self.param_values)

        def resolve(v: Any) -> Tuple[bool, Any, str]:
            refs = param_refs(v)
            if not refs:
                return True, v, ""
            names = ", ".join("${" + p.name + "}" for p in refs)
            return True, substitute(v, params, where), f" (from {names})"
        for what, reg, call in _rule_calls(self):
            _check_call(reg, call, what, self.name, resolve)
        return r

    def anchor_classes(self) -> Optional[Tuple[str, ...]]:
        """Op classes of the pattern roots (None: any node)."""
        out: List[str] = []
        for p in self.match:
            if p.classes is None:
                return None
            out.extend(p.classes)
        return tuple(dict.fromkeys(out))

    def __repr__(self) -> str:
        return f"Rule({self.name!r}, match={' | '.join(map(str, self.match))}, rewrite={self.rewrite})"


@dataclass
class StageSpec:
    name: str
    mode: str = "once"            # once | fixpoint
    max_iterations: int = 10
    verify: str = "sqnr"          # exact | sqnr | none
    loc: Location = field(default_factory=Location)


@dataclass
class RuleFamily:
    """The rules of one file, grouped into stages."""
    name: str
    rules: List[Rule]
    stages: List[StageSpec]
    params: Dict[str, ParamSpec]
    path: Optional[str] = None
    doc: str = ""


@dataclass
class Step:
    """One entry of a recipe: ``rules: family``, ``step: data_step`` or ``recipe: other``."""
    kind: str
    name: str
    args: Dict[str, Any]
    when: Any = True
    loc: Location = field(default_factory=Location)
    #: argument name -> (location of the key, location of the value) in the recipe file
    arg_locs: Dict[str, Tuple[Location, Location]] = field(default_factory=dict, compare=False, repr=False)

    def key_loc(self, name: str) -> Location:
        return self.arg_locs.get(name, (self.loc, self.loc))[0]

    def value_loc(self, name: str) -> Location:
        return self.arg_locs.get(name, (self.loc, self.loc))[1]

    def __post_init__(self) -> None:
        # a data step that declares its arguments checks them whenever a Step is built: from a
        # recipe file (literal values) and when a PassManager binds parameters (every value)
        reg = DATA_STEPS.get(self.name) if self.kind == "step" else None
        if reg is not None and reg.declared:
            why = check_arguments(reg, [], self.args, _unknown_params)
            if why:
                raise ArgumentError(f"data step {self.name}: {why}", self.loc)


@dataclass
class Recipe:
    name: str
    steps: List[Step]
    params: Dict[str, ParamSpec]
    path: Optional[str] = None
    doc: str = ""


def _parse_rule(raw: Any, file: Optional[str], family: str, default_stage: str, loc: Location) -> Rule:
    if not isinstance(raw, dict):
        raise RuleSyntaxError("each rule must be a mapping with name/match/rewrite", _loc(raw, loc))
    rloc = _loc(raw, loc)
    _check_keys(raw, RULE_KEYS, "rule", rloc)
    for key in ("name", "match", "rewrite"):
        if key not in raw:
            raise RuleSyntaxError(f"rule is missing {key!r}", rloc)
    name = raw["name"]
    match = raw["match"]
    if isinstance(match, str) and not isinstance(match, LStr):
        match = LStr(match)
        match.loc = _vloc(raw, "match", rloc)
    if isinstance(raw["rewrite"], str) and not hasattr(raw["rewrite"], "loc"):
        pass
    keeps = raw.get("keeps") or []
    if isinstance(keeps, str):
        keeps = [keeps]
    return Rule(name=name, match=match, rewrite=raw["rewrite"], where=raw.get("where") or [],
                unless=raw.get("unless") or [], stage=raw.get("stage", default_stage),
                when=raw.get("when", True), doc=raw.get("doc", ""), keeps=keeps, loc=rloc, family=family)


def _parse_stages(raw: Any, file: Optional[str], loc: Location) -> List[StageSpec]:
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise RuleSyntaxError("'stages' must be a list", _loc(raw, loc))
    out: List[StageSpec] = []
    seen: Dict[str, StageSpec] = {}
    for s in raw:
        if isinstance(s, str):
            out.append(StageSpec(str(s), loc=_loc(s, loc)))
            _unique_stage(out[-1], seen)
            continue
        if not isinstance(s, dict) or "name" not in s:
            raise RuleSyntaxError("a stage is a name or {name, mode, max_iterations, verify}", _loc(s, loc))
        sl = _loc(s, loc)
        _check_keys(s, ("name", "mode", "max_iterations", "verify"), "stage", sl)
        mode = str(s.get("mode", "once"))
        if mode not in ("once", "fixpoint"):
            raise RuleSyntaxError(f"stage mode must be 'once' or 'fixpoint', got {mode!r}", _vloc(s, "mode", sl),
                                  nearest(mode, ("once", "fixpoint")))
        verify = str(s.get("verify", "sqnr"))
        if verify not in ("exact", "sqnr", "none"):
            raise RuleSyntaxError(f"stage verify must be exact, sqnr or none, got {verify!r}", _vloc(s, "verify", sl))
        mi = s.get("max_iterations", 10)
        if type(mi) is not int or mi < 1 or mi > 1000:
            raise RuleSchemaError(f"max_iterations must be an integer in [1, 1000], got {_what(mi)}",
                                  _vloc(s, "max_iterations", sl))
        out.append(StageSpec(str(s["name"]), mode, mi, verify, sl))
        _unique_stage(out[-1], seen)
    return out


def _unique_stage(st: StageSpec, seen: Dict[str, StageSpec]) -> None:
    if st.name in seen:
        raise RuleSchemaError(f"stage {st.name!r} is declared twice (first at line {seen[st.name].loc.line})", st.loc)
    seen[st.name] = st


def _parse_steps(raw: Any, file: Optional[str], loc: Location,
                 params: Optional[Dict[str, "ParamSpec"]] = None) -> List[Step]:
    if not isinstance(raw, list) or not raw:
        raise RuleSyntaxError("a recipe needs a non-empty 'steps' list", _loc(raw, loc))
    steps = []
    locs = getattr(raw, "item_locs", [loc] * len(raw))
    for i, s in enumerate(raw):
        sl = locs[i]
        if isinstance(s, str):
            raise RuleSyntaxError(f"a step is a mapping such as {{rules: {s}}} or {{step: {s}}}", sl)
        if not isinstance(s, dict):
            raise RuleSyntaxError("each step must be a mapping", sl)
        _check_keys(s, ("rules", "step", "recipe", "with", "when"), "step", sl)
        kinds = [k for k in ("rules", "step", "recipe") if k in s]
        if len(kinds) != 1:
            raise RuleSyntaxError("a step names exactly one of 'rules', 'step' or 'recipe'", sl)
        kind = kinds[0]
        name = s[kind]
        nloc = _vloc(s, kind, sl)
        args = s.get("with") or {}
        if not isinstance(args, dict):
            raise RuleSyntaxError("'with' must be a mapping of argument: value", _vloc(s, "with", sl))
        parsed = {}
        reg = DATA_STEPS.get(str(name)) if kind == "step" else None
        for k, v in args.items():
            vl = _vloc(args, k, sl)
            parsed[str(k)] = parse_value(v, vl) if isinstance(v, str) and ("${" in v) else _plain(v)
            if reg is not None and reg.declared:
                why = check_arguments(reg, [], {str(k): parsed[str(k)]}, _unknown_params)
                if why:
                    bad_key = str(k) not in reg.args
                    raise ArgumentError(f"data step {name}: {why}",
                                        getattr(args, "key_locs", {}).get(k, vl) if bad_key else vl)
        when = s.get("when", True)
        if isinstance(when, str):
            when = parse_value(when, _vloc(s, "when", sl))
        locs_ = {str(k): (getattr(args, "key_locs", {}).get(k, sl), _vloc(args, k, sl)) for k in args}
        steps.append(Step(kind, str(name), parsed, when, nloc, locs_))
    return steps


def _check_step_param_args(step: Step, params: Dict[str, "ParamSpec"]) -> None:
    """A data step's ``with: {arg: ${p}}``: the argument must accept ``p``'s default and each of its choices."""
    reg = DATA_STEPS.get(step.name) if step.kind == "step" else None
    if reg is None or not reg.declared:
        return
    for k, v in step.args.items():
        spec = reg.args.get(k)
        if spec is None or not isinstance(v, ParamRef) or v.name not in params:
            continue
        ps = params[v.name]
        for label, c in ([("the default", ps.default)] if ps.default is not None else []) + \
                [("the choice", c) for c in (ps.choices or [])]:
            why = spec.check(c)
            if why:
                raise ArgumentError(f"data step {step.name}: {why} ({label} of ${{{v.name}}}, declared at "
                                    f"{_where(ps.loc, step.loc)})", step.value_loc(k))


def _where(decl: Location, here: Location) -> str:
    return f"line {decl.line}" if decl.file == here.file else str(decl)


def parse_text(text: str, file: Optional[str] = None) -> Union[RuleFamily, Recipe]:
    """Parse the text of a rule-family or recipe file."""
    data = load_yaml(text, file)
    top = Location(file, 1, 1)
    if not isinstance(data, dict):
        raise RuleSyntaxError("a rule file must be a YAML mapping with 'version' and 'rules' or 'steps'", top)
    dloc = _loc(data, top)
    version = data.get("version")
    if type(version) is not int or version != 1:  # not 1.0, not true
        raise RuleSchemaError(f"unsupported or missing 'version' {version!r}; this qpasses reads version: 1",
                              _vloc(data, "version", dloc))
    recipe = "steps" in data or "recipe" in data
    (RECIPE_SCHEMA if recipe else FAMILY_SCHEMA).check(data, dloc, "")
    params = _parse_params(data.get("params"), file, _vloc(data, "params", dloc))
    if not recipe:  # a family inherits from the shared declarations only (a recipe: see recipe_params)
        params = resolve_params(params, {}, f"rule family {str(data.get('family') or Path(file or 'rules').stem)!r}")
    if recipe:
        _check_keys(data, ("version", "recipe", "params", "steps", "doc", "docs"), "recipe", dloc)
        name = str(data.get("recipe") or Path(file or "recipe").stem)
        steps = _parse_steps(data.get("steps"), file, _vloc(data, "steps", dloc), params)
        for st in steps:  # what the file itself declares (inherited declarations: recipe_params)
            _check_step_param_args(st, params)
        return Recipe(name, steps, params, file, str(data.get("doc") or ""))
    _check_keys(data, ("version", "family", "params", "stages", "rules", "doc", "docs"), "rule file", dloc)
    name = str(data.get("family") or Path(file or "rules").stem)
    stages = _parse_stages(data.get("stages"), file, _vloc(data, "stages", dloc))
    raw_rules = data.get("rules")
    if not isinstance(raw_rules, list) or not raw_rules:
        raise RuleSyntaxError("a rule file needs a non-empty 'rules' list", _vloc(data, "rules", dloc))
    default_stage = stages[0].name if stages else name
    locs = getattr(raw_rules, "item_locs", [dloc] * len(raw_rules))
    rules = [_parse_rule(r, file, name, default_stage, locs[i]) for i, r in enumerate(raw_rules)]
    seen = {}
    for r in rules:
        if r.name in seen:
            raise RuleSyntaxError(f"rule name {r.name!r} is used twice", r.loc)
        seen[r.name] = r
    declared = {s.name for s in stages}
    for r in rules:
        if r.stage not in declared:
            stages.append(StageSpec(r.stage, loc=r.loc))
            declared.add(r.stage)
    # every ${param} a rule uses must be declared by this file or left to a recipe:
    # checked when a PassManager binds parameters (MissingParameterError with location).
    for r in rules:
        _check_param_args(r, params)
    return RuleFamily(name, rules, stages, params, file, str(data.get("doc") or ""))


def load_file(path: Union[str, os.PathLike]) -> Union[RuleFamily, Recipe]:
    """Load a rule-family or recipe file."""
    p = Path(path)
    try:
        size = p.stat().st_size
        if size > LIMITS["file_bytes"]:
            raise RuleLimitError(f"the file is {size} bytes long; the limit is {LIMITS['file_bytes']}",
                                 Location(str(p), 1, 1))
        data = p.read_bytes()
    except OSError as e:
        raise RuleError(f"cannot read rule file: {e.strerror}", Location(str(p))) from None
    return parse_text(decode_text(data, str(p)), str(p))


# ----------------------------------------------------------------------------- shipped files


#: the shipped methods: one package per method, ``qpasses/methods/<method>/``, holding its rule
#: family files (``<family>.yaml``) and recipe files (``recipes/<recipe>.yaml``)
METHODS_DIR = Path(__file__).resolve().parents[1] / "methods"
#: the shipped shared parameter declarations
SHIPPED_SHARED_PARAMS = METHODS_DIR / "params.yaml"


def user_rules_dirs() -> List[Path]:
    """The rule folders named by $QPASSES_RULES_PATH (``os.pathsep``-separated), in that order."""
    env = os.environ.get("QPASSES_RULES_PATH")
    return [Path(p) for p in env.split(os.pathsep) if p] if env else []


def method_dirs() -> List[Path]:
    """The shipped method packages (``qpasses/methods/<method>/``), by name."""
    if not METHODS_DIR.is_dir():
        return []
    return sorted(p for p in METHODS_DIR.iterdir()
                  if p.is_dir() and not p.name.startswith("_") and (p / "__init__.py").is_file())


def rules_dirs() -> List[Path]:
    """Where named rule families and recipes are looked up: the folders of $QPASSES_RULES_PATH
    first (a name there wins), then the shipped method packages."""
    return user_rules_dirs() + method_dirs()


_CACHE: Dict[Tuple[str, float], Union[RuleFamily, Recipe]] = {}


def _load_cached(p: Path) -> Union[RuleFamily, Recipe]:
    key = (str(p), p.stat().st_mtime)
    if key not in _CACHE:
        _CACHE[key] = load_file(p)
    return _CACHE[key]


def _named_files() -> Dict[str, Path]:
    out: Dict[str, Path] = {}
    for d in rules_dirs():
        for sub in (d / "recipes", d):
            if sub.is_dir():
                for f in sorted(sub.glob("*.yaml")):
                    out.setdefault(f.stem, f)
    return out


# ----------------------------------------------------------------------------- shared declarations

#: where the shared parameter declarations live inside each $QPASSES_RULES_PATH folder (the
#: shipped ones: :data:`SHIPPED_SHARED_PARAMS`)
SHARED_PARAMS = Path("shared") / "params.yaml"
SHARED_SCHEMA = _Record("shared declarations", dict(_COMMON, shared=_Str()), required=("params",))
_SHARED_CACHE: Dict[Tuple[Tuple[str, float], ...], Dict[str, ParamSpec]] = {}


def parse_shared_text(text: str, file: Optional[str] = None) -> Dict[str, ParamSpec]:
    """Parse a shared-declarations file (``version: 1``, ``shared: params``, ``params: {...}``)."""
    data = load_yaml(text, file)
    top = Location(file, 1, 1)
    if not isinstance(data, dict):
        raise RuleSyntaxError("a shared-declarations file is a YAML mapping with 'version' and 'params'", top)
    dloc = _loc(data, top)
    if type(data.get("version")) is not int or data.get("version") != 1:
        raise RuleSchemaError(f"unsupported or missing 'version' {data.get('version')!r}; this qpasses reads "
                              f"version: 1", _vloc(data, "version", dloc))
    SHARED_SCHEMA.check(data, dloc, "")
    params = _parse_params(data.get("params"), file, _vloc(data, "params", dloc))
    for ps in params.values():
        if ps.inherit:
            raise RuleSchemaError(f"shared parameter {ps.name!r} cannot be '{INHERIT}': this is where "
                                  f"declarations are inherited from", ps.loc)
    return {k: _complete(v) for k, v in params.items()}


def shared_params() -> Dict[str, ParamSpec]:
    """The shared parameter declarations: ``shared/params.yaml`` of each $QPASSES_RULES_PATH
    folder, then the shipped ``qpasses/methods/params.yaml`` (a name declared in a user folder
    wins over the shipped declaration)."""
    files = [d / SHARED_PARAMS for d in user_rules_dirs()] + [SHIPPED_SHARED_PARAMS]
    files = [f for f in files if f.is_file()]
    key = tuple((str(f), f.stat().st_mtime) for f in files)
    if key not in _SHARED_CACHE:
        out: Dict[str, ParamSpec] = {}
        for f in files:
            data = f.read_bytes()
            for k, v in parse_shared_text(decode_text(data, str(f)), str(f)).items():
                out.setdefault(k, v)
        _SHARED_CACHE.clear()
        _SHARED_CACHE[key] = out
    return _SHARED_CACHE[key]


# ----------------------------------------------------------------------------- a recipe's parameters

#: how deep recipes may include each other
MAX_RECIPE_DEPTH = 16


def step_target(step: Step) -> Union[RuleFamily, "Recipe", None]:
    """The family or recipe a ``rules:`` / ``recipe:`` step runs (None for a data step)."""
    if step.kind == "step":
        return None
    return find_named(step.name, step.loc)


def recipe_params(recipe: "Recipe", _stack: Tuple[str, ...] = ()) -> Dict[str, ParamSpec]:
    """The effective parameters of ``recipe``: its own declarations refining what the families and
    recipes it runs declare (the first step that declares a name gives the inherited
    declaration), plus what it declares alone.

    Also checks, with file:line:col, what would otherwise be ignored or fail late: a ``with:``
    key on a ``rules:`` / ``recipe:`` step that the family or recipe does not declare, a literal
    ``with:`` value its declaration refuses, a declared type that conflicts with the family's
    (at the family step's line), and recipes that include each other.
    """
    key = str(recipe.path or recipe.name)
    if key in _stack or len(_stack) >= MAX_RECIPE_DEPTH:
        raise RuleError(f"recipe {recipe.name!r} includes itself (through {' -> '.join(_stack + (key,))})"
                        if key in _stack else f"recipes include each other more than {MAX_RECIPE_DEPTH} levels deep",
                        Location(recipe.path, 1, 1))
    inherited: Dict[str, Tuple[ParamSpec, Optional[str], Location]] = {}
    for st in recipe.steps:
        target = step_target(st)
        if target is None:
            continue
        if isinstance(target, RuleFamily):
            specs, origin = target.params, f"rule family {target.name!r} (run at line {st.loc.line})"
        else:
            specs, origin = recipe_params(target, _stack + (key,)),                 f"recipe {target.name!r} (run at line {st.loc.line})"
        check_step_binds(st, specs, target)
        for k, v in specs.items():
            inherited.setdefault(k, (v, origin, st.loc))
    out = resolve_params(recipe.params, inherited, f"recipe {recipe.name!r}")
    for st in recipe.steps:
        _check_step_param_args(st, out)
    return out


def check_step_binds(step: Step, specs: Dict[str, ParamSpec], target: Any) -> None:
    """``with:`` on a ``rules:`` / ``recipe:`` step binds parameters of what the step runs: each
    key must be one of them, and a literal value must fit its declaration."""
    what = f"{'recipe' if isinstance(target, Recipe) else 'rule family'} {step.name!r}"
    for k, v in step.args.items():
        if k not in specs:
            raise UnknownNameError(f"with: {what} has no parameter {k!r}; it takes: "
                                   f"{', '.join(sorted(specs)) or 'no parameters'}", step.key_loc(k),
                                   nearest(k, specs))
        if param_refs(v):
            continue
        spec = specs[k]
        why = spec.check(spec.coerce(v))
        if why:
            raise ArgumentError(f"with: {what}: {why}", step.value_loc(k))


def available_names() -> Dict[str, str]:
    """name -> 'recipe' | 'rules' | 'step' for everything addressable by name."""
    out: Dict[str, str] = {}
    for name, p in _named_files().items():
        out[name] = "recipe" if p.parent.name == "recipes" else "rules"
    for name in DATA_STEPS:
        out.setdefault(name, "step")
    return out


def find_named(name: str, loc: Optional[Location] = None) -> Union[RuleFamily, Recipe]:
    """Load the shipped (or $QPASSES_RULES_PATH) rule family or recipe called ``name``."""
    files = _named_files()
    if name not in files:
        raise UnknownNameError(f"no recipe or rule family named {name!r}", loc or Location("<rules argument>"),
                               nearest(name, list(files) + list(DATA_STEPS)))
    return _load_cached(files[name])
