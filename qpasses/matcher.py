"""The matcher: index nodes by op class, visit candidate anchors, match backwards.

Matching walks *up* the use-def edges from an anchor node (the pattern's root).  The
walk is recursive only over the pattern, whose depth is fixed by the rule file, never
over the graph: a 100k-node graph costs one linear indexing pass plus constant work
per candidate anchor.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.fx as fx

from .lang.syntax import AnyPat, BindPat, Call, BindingRef, LiteralPat, NodePat, Pattern, ValuePat
from .context import RewriteContext
from .ops import OP_CLASSES, OpView

__all__ = ["Match", "MatchFailure", "Matcher", "MatchContext"]


@dataclass
class Match:
    """A successful match: the root node, the named bindings and every matched node."""
    root: fx.Node
    bindings: Dict[str, Any]
    nodes: List[fx.Node]
    alternative: int = 0

    def __getitem__(self, name: str) -> Any:
        return self.bindings[name]


@dataclass
class MatchFailure:
    """Why a pattern did not match: the pattern step, the node it was tried on, the reason."""
    step: str
    node: str
    reason: str

    def __str__(self) -> str:
        return f"at {self.step} on node {self.node}: {self.reason}"


_MISSING = object()


def _describe(node: fx.Node, cls: Optional[str]) -> str:
    if cls:
        return f"{node.name} ({cls})"
    t = node.target
    tname = getattr(t, "__name__", None) or str(t)
    return f"{node.name} ({node.op} {tname})"


def _eq(actual: Any, wanted: Any) -> bool:
    """Argument equality that treats 2 and (2, 2) alike and lists like tuples."""
    if isinstance(wanted, list):
        wanted = tuple(wanted)
    if isinstance(actual, list):
        actual = tuple(actual)
    if isinstance(actual, tuple) and not isinstance(wanted, tuple):
        return len(actual) > 0 and all(_eq(a, wanted) for a in actual)
    if isinstance(wanted, tuple) and not isinstance(actual, tuple):
        return all(_eq(actual, w) for w in wanted)
    if isinstance(actual, tuple):
        return len(actual) == len(wanted) and all(_eq(a, w) for a, w in zip(actual, wanted))
    if isinstance(actual, torch.Tensor) or isinstance(wanted, torch.Tensor):
        return False
    if isinstance(actual, str) or isinstance(wanted, str):
        return str(actual) == str(wanted)
    try:
        return actual == wanted
    except Exception:  # noqa: BLE001
        return False


def class_names(cls: type) -> set:
    """Short and qualified names of ``cls`` and of its base classes."""
    return {n for c in cls.__mro__ for n in (c.__name__, f"{c.__module__}.{c.__qualname__}")}


def module_type_names(mod: Any) -> set:
    return class_names(type(mod))


def source_module_names(node: fx.Node) -> Optional[set]:
    """For a node of a ``torch.export`` graph: the names of the module class it was traced in
    (the innermost ``nn_module_stack`` entry: ``"Conv2d"`` and ``"torch.nn.modules.conv.Conv2d"``),
    or None.  The class is recorded by name only, so base classes are not known here (nothing is
    imported); a recorded class object gives its whole MRO."""
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return None
    entry = list(stack.values())[-1]
    t = entry[1] if isinstance(entry, (tuple, list)) and len(entry) > 1 else None
    if isinstance(t, type):
        return class_names(t)
    if isinstance(t, str) and t:
        return {t, t.rsplit(".", 1)[-1]}
    return None


class Matcher:
    """Pattern matching over one GraphModule, reading it through a :class:`RewriteContext`
    (its op-class memo and module lookups; made here when none is given)."""

    def __init__(self, gm: fx.GraphModule, rewrite: Optional[RewriteContext] = None):
        self.gm = gm
        self.rewrite = rewrite if rewrite is not None else RewriteContext(gm)
        self._steps: Dict[int, Tuple[Pattern, str]] = {}

    @property
    def modules(self):
        return self.rewrite.modules

    def classify(self, node: fx.Node) -> Optional[str]:
        return self.rewrite.classify(node)

    def view(self, node: fx.Node) -> OpView:
        return self.rewrite.view(node)

    def index(self, classes: Optional[Sequence[str]]) -> List[fx.Node]:
        """Candidate anchors, in graph order: one linear pass."""
        return self.rewrite.index(classes)

    # ------------------------------------------------------------------ matching
    def match(self, pattern: NodePat, node: fx.Node, alternative: int = 0):
        """Match ``pattern`` rooted at ``node``: a :class:`Match` or a :class:`MatchFailure`."""
        bindings: Dict[str, Any] = {}
        nodes: List[fx.Node] = []
        fail = self._node(pattern, node, bindings, nodes)
        if fail is not None:
            return fail
        return Match(node, bindings, nodes, alternative)

    def _bind(self, name: str, value: Any, b: Dict[str, Any], step: str, where: str) -> Optional[MatchFailure]:
        if name in b:
            old = b[name]
            same = old is value if isinstance(old, fx.Node) or isinstance(value, fx.Node) else _eq(old, value)
            if not same:
                return MatchFailure(step, where, f"{name} is already bound to {getattr(old, 'name', old)!r}")
            return None
        b[name] = value
        return None

    def _child(self, pat: Pattern, value: Any, b: Dict[str, Any], nodes: List[fx.Node],
               parent: str) -> Optional[MatchFailure]:
        if isinstance(pat, AnyPat):
            return None
        if isinstance(pat, ValuePat):
            return self._bind(pat.name, value, b, str(pat), parent)
        if isinstance(pat, BindPat):
            if not isinstance(value, fx.Node):
                return MatchFailure(str(pat), parent, f"expected a node input but found constant {value!r}")
            return self._bind(pat.name, value, b, str(pat), parent)
        if isinstance(pat, LiteralPat):
            if isinstance(value, fx.Node) or not _eq(value, pat.value):
                shown = value.name if isinstance(value, fx.Node) else repr(value)
                return MatchFailure(str(pat), parent, f"expected {pat.value!r} but found {shown}")
            return None
        if isinstance(pat, NodePat):
            if not isinstance(value, fx.Node):
                return MatchFailure(str(pat), parent, f"expected a node but found constant {value!r}")
            return self._node(pat, value, b, nodes)
        return MatchFailure(str(pat), parent, "unsupported pattern element")

    def _step(self, pat: Pattern) -> str:
        """``str(pat)``, the pattern step named in failures, formatted once per pattern."""
        hit = self._steps.get(id(pat))
        if hit is None:
            hit = self._steps[id(pat)] = (pat, str(pat))  # holds pat: its id stays unique
        return hit[1]

    def _node(self, pat: NodePat, node: fx.Node, b: Dict[str, Any], nodes: List[fx.Node]) -> Optional[MatchFailure]:
        step = self._step(pat)
        cls = self.classify(node)
        if pat.classes is not None and cls not in pat.classes:
            want = "|".join(pat.spelled)
            return MatchFailure(step, node.name, f"{_describe(node, cls)} is not {want}")
        if pat.binding:
            f = self._bind(pat.binding, node, b, step, node.name)
            if f:
                return f
        view = self.view(node)
        for key, want in pat.attrs.items():
            if key == "module":
                if view.module is not None:
                    names, shown = module_type_names(view.module), type(view.module).__name__
                else:
                    names = source_module_names(node)
                    if names is None:
                        return MatchFailure(step, node.name, f":module {want} requires a module call (or, in an "
                                                             f"exported graph, a recorded source module); "
                                                             f"{node.name} is {node.op}")
                    shown = min(names, key=len)
                options = want if isinstance(want, list) else [want]
                if not any(str(o) in names for o in options):
                    return MatchFailure(step, node.name, f"module type is {shown}, not {want}")
                continue
            actual = view.get(key, _MISSING)
            if actual is _MISSING:
                return MatchFailure(step, node.name, f"{cls or node.op} has no argument {key!r}")
            if isinstance(want, NodePat):
                f = self._child(want, actual, b, nodes, node.name)
                if f:
                    return f
                continue
            if isinstance(want, BindingRef):
                f = self._bind(want.name, actual, b, step, node.name)
                if f:
                    return f
                continue
            if not _eq(actual, want):
                shown = actual.name if isinstance(actual, fx.Node) else repr(actual)
                return MatchFailure(step, node.name, f":{key} is {shown}, not {want!r}")
        nodes.append(node)
        children = pat.children
        if not children:
            return None
        inputs = view.inputs()
        if not pat.rest and len(children) != len(inputs):
            return MatchFailure(step, node.name,
                                f"{node.name} has {len(inputs)} input(s), the pattern lists {len(children)} "
                                f"(add '...' to allow more)")
        if len(children) > len(inputs):
            return MatchFailure(step, node.name, f"{node.name} has only {len(inputs)} input(s)")
        oc = OP_CLASSES.get(cls) if cls else None
        if not (oc is not None and oc.commutative and len(children) == 2 and len(inputs) == 2):
            # one order only: match in place (on failure the caller drops b and nodes, or
            # its own copies of them, anyway)
            for ci, child in enumerate(children):
                fail = self._child(child, inputs[ci], b, nodes, node.name)
                if fail:
                    return fail
            return None
        orders = [[0, 1], [1, 0]]
        first: Optional[MatchFailure] = None
        for order in orders:
            b2 = dict(b)
            n2: List[fx.Node] = list(nodes)
            fail = None
            for ci, ii in enumerate(order):
                fail = self._child(children[ci], inputs[ii], b2, n2, node.name)
                if fail:
                    break
            if fail is None:
                b.clear()
                b.update(b2)
                nodes[:] = n2
                return None
            first = first or fail
        return first


class MatchContext:
    """What constraints and actions see: the match, the rule and its params, and the
    :class:`RewriteContext` whose verbs change the graph (``ctx.rewrite``; its common
    verbs are also methods of this object)."""

    def __init__(self, rewrite: RewriteContext, match: Optional[Match], rule: Any, params: Dict[str, Any]):
        self.rewrite = rewrite
        self.gm = rewrite.gm
        self.graph = rewrite.gm.graph
        self.match = match
        self.rule = rule
        self.params = params

    @property
    def state(self) -> Dict[str, Any]:
        """The run's scratch space shared by all actions (e.g. observer sharing tables)."""
        return self.rewrite.state

    @property
    def modules(self):
        return self.rewrite.modules

    def view(self, node: fx.Node) -> OpView:
        return self.rewrite.view(node)

    def classify(self, node: fx.Node) -> Optional[str]:
        return self.rewrite.classify(node)

    def __getattr__(self, name: str):
        # the rewrite context's verbs (add_module, replace_module, insert, erase, ...)
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self.__dict__["rewrite"], name)

    def resolve(self, value: Any) -> Any:
        """Turn ``$x`` / ``?x`` references (and lists of them) into bound values."""
        if isinstance(value, BindingRef):
            return self.match.bindings[value.name]
        if isinstance(value, list):
            return [self.resolve(v) for v in value]
        return value

    def call(self, fn, call: Call):
        args = [self.resolve(a) for a in call.args]
        kwargs = {k: self.resolve(v) for k, v in call.kwargs.items()} if call.kwargs else {}
        return fn(self, *args, **kwargs)
