"""Pattern and call syntax inside rule files.

Patterns are S-expressions::

    (batch_norm $bn (conv2d|conv_transpose2d $conv ?x))
    (add $sum (conv2d $c _) ?skip)
    (linear $fc (fake_quant ...) :bias None)
    (conv2d $c ?x :groups 1 :module Conv2d ...)

* ``(op[|op...] ...)`` — a node of one of the op classes (or aliases such as ``conv``,
  ``weighted``); ``*`` matches any op.
* ``$name`` right after the op names the node itself; elsewhere ``$name`` is a node
  input of any op, bound to ``name``.  Binding the same name twice requires the same node.
* ``?name`` binds any input value (node or constant); ``_`` matches anything.
* Children match the op class's *activation inputs* in order (``input`` for conv,
  ``input``/``other`` for add, the list elements for cat); ``...`` allows further inputs.
  Commutative ops (add, mul) are tried in both orders.
* ``:arg value`` constrains a normalised argument (``:groups 1``, ``:stride [2, 2]``),
  ``:module Name`` the module type (matched against class names in the MRO, nothing
  is imported), ``:arg (pattern)`` matches the argument's producer node.

Calls (constraints, actions, data-step arguments) read ``name(arg, key=value, ...)``
with values ``$node``, ``?value``, ``${param}``, numbers, strings, ``true/false/null``,
bare words (strings) and ``[lists]``.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, List, Optional, Tuple

from ..errors import Location, RuleSyntaxError, UnknownNameError, MissingParameterError, nearest

# ----------------------------------------------------------------------------- tokens

_TOKEN_RE = re.compile(r"""
    (?P<ws>\s+)
  | (?P<param>\$\{\s*[A-Za-z_][A-Za-z0-9_]*\s*\})
  | (?P<bind>\$[A-Za-z_][A-Za-z0-9_]*)
  | (?P<value>\?[A-Za-z_][A-Za-z0-9_]*)
  | (?P<kw>:[A-Za-z_][A-Za-z0-9_]*)
  | (?P<ellipsis>\.\.\.)
  | (?P<number>[-+]?(?:\d+\.\d*|\.\d+|\d+)(?:[eE][-+]?\d+)?)
  | (?P<string>"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*')
  | (?P<ident>[A-Za-z_][A-Za-z0-9_.]*)
  | (?P<punct>[()\[\],=|*])
""", re.VERBOSE)


@dataclass
class Tok:
    kind: str
    text: str
    loc: Location


#: the longest pattern / call / value text the parser reads (characters); longer text is refused
MAX_TEXT = 65536
#: how deeply patterns and ``[lists]`` may nest inside one pattern or call
MAX_NESTING = 64


def snippet(text: str, limit: int = 60) -> str:
    """``text`` stripped and shortened for an error message."""
    t = " ".join(str(text).split()) if len(text) <= 4 * limit else " ".join(str(text)[:4 * limit].split())
    return t if len(t) <= limit else t[:limit - 3] + "..."


def tokenize(text: str, base: Location) -> List[Tok]:
    """Split ``text`` into tokens in one pass (linear time; positions tracked incrementally)."""
    return list(iter_tokens(text, base))


def iter_tokens(text: str, base: Location) -> Iterator[Tok]:
    """The tokens of ``text``, produced as the parser asks for them; the last is ``eof``."""
    from ..errors import RuleLimitError
    if len(text) > MAX_TEXT:
        raise RuleLimitError(f"text of {len(text)} characters is longer than the limit of {MAX_TEXT} "
                             f"for one pattern or call", base)
    i = 0
    line = base.line or 1
    line_start = -(base.col or 1) + 1  # offset of column 1 of the current line (first line: shifted)
    n = len(text)
    match = _TOKEN_RE.match
    while i < n:
        m = match(text, i)
        if not m:
            raise RuleSyntaxError(f"unexpected character {text[i]!r} in {snippet(text)!r}",
                                  Location(base.file, line, i - line_start + 1))
        kind = m.lastgroup
        end = m.end()
        if kind != "ws":
            yield Tok(kind, m.group(), Location(base.file, line, i - line_start + 1))
        nl = text.count("\n", i, end)
        if nl:
            line += nl
            line_start = text.rfind("\n", i, end) + 1
        i = end
    yield Tok("eof", "", Location(base.file, line, n - line_start + 1))


_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "0": "\0", "\\": "\\", '"': '"', "'": "'"}
_ESCAPE_RE = re.compile(r"\\(x[0-9a-fA-F]{2}|u[0-9a-fA-F]{4}|U[0-9a-fA-F]{8}|[xuU]|.)", re.S)


def unescape(body: str, loc: Location) -> str:
    """Decode the backslash escapes of a quoted string (``\\n``, ``\\t``, ``\\xHH``, ``\\uHHHH``, ...).

    Unknown escapes such as ``\\d`` keep their backslash (regular expressions read as written);
    a malformed ``\\x`` / ``\\u`` escape is a :class:`RuleSyntaxError` at ``loc``.
    """
    if "\\" not in body:
        return body

    def rep(m: "re.Match") -> str:
        e = m.group(1)
        if e in ("x", "u", "U"):
            raise RuleSyntaxError(f"malformed escape '\\{e}' in string {snippet(body)!r}: "
                                  f"\\x takes 2, \\u 4 and \\U 8 hex digits", loc)
        if e[0] in "xuU" and len(e) > 1:
            code = int(e[1:], 16)
            if code > 0x10FFFF or 0xD800 <= code <= 0xDFFF:
                raise RuleSyntaxError(f"escape '\\{e}' is not a valid character", loc)
            return chr(code)
        return _ESCAPES.get(e, "\\" + e)
    return _ESCAPE_RE.sub(rep, body)


# ----------------------------------------------------------------------------- AST

class Pattern:
    loc: Location


@dataclass
class NodePat(Pattern):
    classes: Optional[Tuple[str, ...]]  # None = any op
    binding: Optional[str]
    children: List[Pattern]
    rest: bool
    attrs: Dict[str, Any]
    loc: Location = field(default_factory=Location)
    spelled: Tuple[str, ...] = ()  # the names as written (for messages)

    def __str__(self) -> str:
        head = "|".join(self.spelled) if self.spelled else "*"
        parts = [head]
        if self.binding:
            parts.append("$" + self.binding)
        parts += [str(c) for c in self.children]
        for k, v in self.attrs.items():
            parts.append(f":{k} {format_value(v)}")
        if self.rest:
            parts.append("...")
        return "(" + " ".join(parts) + ")"


@dataclass
class BindPat(Pattern):
    name: str
    loc: Location = field(default_factory=Location)

    def __str__(self):
        return "$" + self.name


@dataclass
class ValuePat(Pattern):
    name: str
    loc: Location = field(default_factory=Location)

    def __str__(self):
        return "?" + self.name


@dataclass
class AnyPat(Pattern):
    loc: Location = field(default_factory=Location)

    def __str__(self):
        return "_"


@dataclass
class LiteralPat(Pattern):
    value: Any
    loc: Location = field(default_factory=Location)

    def __str__(self):
        return format_value(self.value)


@dataclass(frozen=True)
class BindingRef:
    """``$name`` (node) or ``?name`` (value) inside a call."""
    name: str
    sigil: str = "$"

    def __str__(self):
        return self.sigil + self.name


@dataclass
class ParamRef:
    """``${name}``: a recipe parameter, replaced when a PassManager binds its options."""
    name: str
    loc: Location = field(default_factory=Location)

    def __str__(self):
        return "${" + self.name + "}"


@dataclass
class Call:
    name: str
    args: List[Any]
    kwargs: Dict[str, Any]
    loc: Location = field(default_factory=Location)

    def __str__(self):
        items = [format_value(a) for a in self.args] + [f"{k}={format_value(v)}" for k, v in self.kwargs.items()]
        return f"{self.name}({', '.join(items)})"


def format_value(v: Any) -> str:
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(format_value(x) for x in v) + "]"
    if isinstance(v, str):
        return v if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_.]*", v) and v not in _WORDS else repr(v)
    return str(v)


# ----------------------------------------------------------------------------- parser

_WORDS = {"true": True, "false": False, "True": True, "False": False, "null": None, "None": None,
          "none": None}


class _Parser:
    def __init__(self, text: str, loc: Location):
        self.text = text
        self._it = iter_tokens(text, loc)
        self._toks: List[Tok] = []
        self.i = 0
        self.depth = 0

    def tok(self, j: int) -> Tok:
        """Token ``j`` (read lazily, so an error early in a long text is found early)."""
        toks = self._toks
        while len(toks) <= j:
            nxt = next(self._it, None)
            if nxt is None:
                return toks[-1]  # eof repeats
            toks.append(nxt)
        return toks[j]

    def enter(self, t: Tok) -> None:
        self.depth += 1
        if self.depth > MAX_NESTING:
            from ..errors import RuleLimitError
            raise RuleLimitError(f"patterns and lists nest more than {MAX_NESTING} levels deep", t.loc)

    def peek(self) -> Tok:
        return self.tok(self.i)

    def next(self) -> Tok:
        t = self.tok(self.i)
        self.i += 1
        return t

    def expect(self, text: str) -> Tok:
        t = self.next()
        if t.text != text:
            raise RuleSyntaxError(f"expected {text!r} but found {t.text or 'end of text'!r} in {snippet(self.text)!r}", t.loc)
        return t

    def end(self) -> None:
        t = self.peek()
        if t.kind != "eof":
            raise RuleSyntaxError(f"unexpected {t.text!r} after the end of {snippet(self.text)!r}", t.loc)

    # values ----------------------------------------------------------------
    def value(self) -> Any:
        t = self.next()
        k = t.kind
        if k == "number":
            return float(t.text) if any(c in t.text for c in ".eE") else int(t.text)
        if k == "string":
            return unescape(t.text[1:-1], t.loc)
        if k == "param":
            return ParamRef(t.text[2:-1].strip(), t.loc)
        if k == "bind":
            return BindingRef(t.text[1:], "$")
        if k == "value":
            return BindingRef(t.text[1:], "?")
        if k == "ident":
            return _WORDS.get(t.text, t.text)
        if t.text == "[":
            self.enter(t)
            items = []
            while self.peek().text != "]":
                if self.peek().kind == "eof":
                    raise RuleSyntaxError(f"unclosed '[' in {snippet(self.text)!r}", t.loc)
                items.append(self.value())
                if self.peek().text == ",":
                    self.next()
            self.next()
            self.depth -= 1
            return items
        raise RuleSyntaxError(f"expected a value but found {t.text or 'end of text'!r} in {snippet(self.text)!r}", t.loc)

    # calls -----------------------------------------------------------------
    def call(self) -> Call:
        t = self.next()
        if t.kind != "ident":
            raise RuleSyntaxError(f"expected a name like fold_bn(...) but found {t.text or 'nothing'!r}", t.loc)
        args, kwargs = [], {}
        if self.peek().text == "(":
            self.next()
            while self.peek().text != ")":
                if self.peek().kind == "eof":
                    raise RuleSyntaxError(f"unclosed '(' in call {t.text}", t.loc)
                if self.peek().kind == "ident" and self.tok(self.i + 1).text == "=":
                    key = self.next().text
                    self.next()
                    if key in kwargs:
                        raise RuleSyntaxError(f"argument {key!r} given twice", t.loc)
                    kwargs[key] = self.value()
                else:
                    if kwargs:
                        raise RuleSyntaxError("positional argument after keyword argument", self.peek().loc)
                    args.append(self.value())
                if self.peek().text == ",":
                    self.next()
                elif self.peek().text != ")":
                    raise RuleSyntaxError(f"expected ',' or ')' but found {self.peek().text!r}", self.peek().loc)
            self.next()
        return Call(t.text, args, kwargs, t.loc)

    # patterns --------------------------------------------------------------
    def pattern(self, top: bool = False) -> Pattern:
        t = self.peek()
        if t.text == "(":
            return self.node_pattern()
        self.next()
        if t.kind == "bind":
            return BindPat(t.text[1:], t.loc)
        if t.kind == "value":
            return ValuePat(t.text[1:], t.loc)
        if t.kind == "ident" and t.text == "_":
            return AnyPat(t.loc)
        if top:
            raise RuleSyntaxError(f"a pattern must start with '(' but starts with {t.text!r}", t.loc)
        self.i -= 1
        return LiteralPat(self.value(), t.loc)

    def node_pattern(self) -> NodePat:
        from ..opclasses import resolve_names, all_class_names  # late: ops registry may grow
        open_tok = self.expect("(")
        self.enter(open_tok)
        names: List[str] = []
        spelled: List[str] = []
        while True:
            t = self.next()
            if t.text == "*":
                names = None  # type: ignore[assignment]
                spelled.append("*")
            elif t.kind == "ident":
                try:
                    if names is not None:
                        names.extend(resolve_names(t.text))
                    spelled.append(t.text)
                except KeyError:
                    raise UnknownNameError(f"unknown op class {t.text!r}", t.loc,
                                           nearest(t.text, all_class_names())) from None
            else:
                raise RuleSyntaxError(f"expected an op class name after '(' but found {t.text or 'end of text'!r}", t.loc)
            if self.peek().text == "|":
                self.next()
                continue
            break
        binding = None
        if self.peek().kind == "bind":
            binding = self.next().text[1:]
        children: List[Pattern] = []
        attrs: Dict[str, Any] = {}
        rest = False
        while self.peek().text != ")":
            t = self.peek()
            if t.kind == "eof":
                raise RuleSyntaxError(f"unclosed '(' in pattern {snippet(self.text)!r}", open_tok.loc)
            if t.kind == "ellipsis":
                self.next()
                rest = True
                continue
            if rest:
                raise RuleSyntaxError("nothing may follow '...' except ':arg' constraints", t.loc)
            if t.kind == "kw":
                self.next()
                key = t.text[1:]
                if key in attrs:
                    raise RuleSyntaxError(f"constraint :{key} given twice", t.loc)
                attrs[key] = self.node_pattern() if self.peek().text == "(" else self.value()
                continue
            if attrs:
                raise RuleSyntaxError("inputs must come before ':arg' constraints", t.loc)
            children.append(self.pattern())
        self.expect(")")
        self.depth -= 1
        return NodePat(tuple(dict.fromkeys(names)) if names is not None else None, binding, children, rest,
                       attrs, open_tok.loc, tuple(spelled))


def parse_pattern(text: str, loc: Optional[Location] = None) -> NodePat:
    """Parse one S-expression pattern; raises RuleSyntaxError / UnknownNameError with its location."""
    p = _Parser(str(text), loc or Location())
    pat = p.pattern(top=True)
    p.end()
    if not isinstance(pat, NodePat):
        raise RuleSyntaxError("a rule's pattern must be a node pattern '(op ...)'", pat.loc)
    return pat


def parse_call(text: str, loc: Optional[Location] = None) -> Call:
    """Parse ``name(args...)`` (parentheses optional when there are no arguments)."""
    p = _Parser(str(text), loc or Location())
    c = p.call()
    p.end()
    return c


def parse_value(text: str, loc: Optional[Location] = None) -> Any:
    p = _Parser(str(text), loc or Location())
    v = p.value()
    p.end()
    return v


# ----------------------------------------------------------------------------- params

def substitute(value: Any, params: Dict[str, Any], where: str = "") -> Any:
    """Replace every ``${param}`` inside ``value`` (recursively through lists/calls/patterns)."""
    if isinstance(value, ParamRef):
        if value.name not in params:
            raise MissingParameterError(f"parameter ${{{value.name}}} is not defined{where}", value.loc,
                                        nearest(value.name, params))
        return params[value.name]
    if isinstance(value, list):
        return [substitute(v, params, where) for v in value]
    if isinstance(value, Call):
        return Call(value.name, [substitute(a, params, where) for a in value.args],
                    {k: substitute(v, params, where) for k, v in value.kwargs.items()}, value.loc)
    if isinstance(value, NodePat):
        return NodePat(value.classes, value.binding, [substitute(c, params, where) for c in value.children],
                       value.rest, {k: substitute(v, params, where) for k, v in value.attrs.items()},
                       value.loc, value.spelled)
    if isinstance(value, LiteralPat):
        return LiteralPat(substitute(value.value, params, where), value.loc)
    return value


def find_refs(value: Any, kind: type, into_patterns: bool = True) -> list:
    """All instances of ``kind`` (e.g. :class:`ParamRef`) inside ``value``: lists and action /
    constraint calls, and (``into_patterns``) pattern children, attributes and literals."""
    out: list = []
    stack = [value]
    while stack:
        v = stack.pop()
        if isinstance(v, kind):
            out.append(v)
        elif isinstance(v, list):
            stack.extend(v)
        elif isinstance(v, Call):
            stack.extend(v.args)
            stack.extend(v.kwargs.values())
        elif not into_patterns:
            continue
        elif isinstance(v, NodePat):
            stack.extend(v.children)
            stack.extend(v.attrs.values())
        elif isinstance(v, LiteralPat):
            stack.append(v.value)
    return out


def param_refs(value: Any) -> List[ParamRef]:
    """All ``${param}`` references inside ``value``."""
    return find_refs(value, ParamRef)
