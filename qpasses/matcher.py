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
from .context import PROVENANCE_KEY, RewriteContext
from .guards import check_guards
from .opclasses import OP_CLASSES, OpView

__all__ = ["Match", "MatchFailure", "Matcher", "MatchContext", "FxIR"]


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


class FxIR:
    """The fx side of the matcher's IR adapter: an fx graph read through a
    :class:`RewriteContext` (its op-class memo and module lookups).

    An IR adapter tells the one :class:`Matcher` and the one rule driver
    (:mod:`qpasses.driver`) what they need of a graph: op classes, normalised arguments
    (:meth:`view`), the node producing a value, constants, module types, and (for the
    driver) candidates, match contexts, implementations and guards.  The ONNX twin is
    :class:`qpasses.onnx.rewrite.OnnxIR`."""

    kind = "fx"

    def __init__(self, rewrite: RewriteContext, params: Optional[Dict[str, Any]] = None):
        self.rewrite = rewrite
        self.params = params if params is not None else {}

    # ------------------------------------------------------------------ matching
    def classify(self, node: fx.Node) -> Optional[str]:
        return self.rewrite.classify(node)

    def view(self, node: fx.Node) -> OpView:
        return self.rewrite.view(node)

    def is_ref(self, value: Any) -> bool:
        """Values compared by identity when bound twice (nodes)."""
        return isinstance(value, fx.Node)

    def producer(self, value: Any) -> Optional[fx.Node]:
        """The node a pattern element may match for input ``value`` (None: a constant)."""
        return value if isinstance(value, fx.Node) else None

    def bind_input(self, value: Any) -> Any:
        """What ``$x`` binds for input ``value`` (``_MISSING``: not bindable)."""
        return value if isinstance(value, fx.Node) else _MISSING

    def constant(self, value: Any) -> Any:
        """The constant an input holds (``_MISSING`` when it is computed)."""
        return _MISSING if isinstance(value, fx.Node) else value

    def show(self, value: Any) -> str:
        return value.name if isinstance(value, fx.Node) else repr(value)

    def show_input(self, value: Any) -> str:
        """An input that is not a node, as failures name it."""
        return f"constant {value!r}"

    def describe(self, node: fx.Node, cls: Optional[str]) -> str:
        return _describe(node, cls)

    def module_names(self, node: fx.Node, view: OpView):
        """(names of the module class ``node`` calls or was traced in, shown name), or a
        failure reason."""
        if view.module is not None:
            return module_type_names(view.module), type(view.module).__name__
        names = source_module_names(node)
        if names is None:
            return (f"requires a module call (or, in an exported graph, a recorded source module); "
                    f"{node.name} is {node.op}")
        return names, min(names, key=len)

    def also_matched(self, node: fx.Node, cls: Optional[str]) -> Sequence[fx.Node]:
        return ()

    # ------------------------------------------------------------------ driving
    def candidates(self, classes: Optional[Sequence[str]]) -> List[fx.Node]:
        return self.rewrite.index(classes)

    def skip(self, node: fx.Node, rule: Any) -> bool:
        """True for a node erased by an earlier rewrite, or created by this rule."""
        if node.graph is not self.rewrite.graph or getattr(node, "_erased", False):
            return True
        return node.meta.get(PROVENANCE_KEY) == rule.name

    def context(self, match: Optional[Match], rule: Any) -> "MatchContext":
        return MatchContext(self.rewrite, match, rule, self.params)

    def implementation(self, reg: Any):
        return reg.fn

    def guard(self, ctx: "MatchContext", reg: Any, keeps: Sequence[str]) -> Optional[str]:
        return check_guards(ctx, reg.replaces, keeps)

    def rewritten(self, match: Match, keeps: Sequence[str]) -> None:
        pass  # erased nodes are recognised by fx itself

    def has_output(self) -> bool:
        """The graph still ends in its output node (an action that erased it is a rule bug)."""
        for n in reversed(self.rewrite.graph.nodes):
            return n.op == "output"
        return False

    def tagging(self, rule_name: str):
        return self.rewrite.tagging(rule_name)


class Matcher:
    """Backward pattern matching over one graph, read through an IR adapter
    (:class:`FxIR` for fx graphs, :class:`qpasses.onnx.rewrite.OnnxIR` for ONNX graphs).

    ``Matcher(gm)`` / ``Matcher(gm, rewrite_context)`` match on an fx GraphModule."""

    def __init__(self, graph: Any, rewrite: Optional[RewriteContext] = None):
        if isinstance(graph, fx.GraphModule):
            self.gm = graph
            self.rewrite = rewrite if rewrite is not None else RewriteContext(graph)
            self.ir = FxIR(self.rewrite)
        else:
            self.ir = graph
            self.rewrite = getattr(graph, "rewrite", None)
            self.gm = self.rewrite.gm if self.rewrite is not None else None
        self._steps: Dict[int, Tuple[Pattern, str]] = {}

    @property
    def modules(self):
        return self.rewrite.modules

    def classify(self, node: Any) -> Optional[str]:
        return self.ir.classify(node)

    def view(self, node: Any):
        return self.ir.view(node)

    def index(self, classes: Optional[Sequence[str]]) -> List[Any]:
        """Candidate anchors, in graph order: one linear pass."""
        return self.ir.candidates(classes)

    # ------------------------------------------------------------------ matching
    def match(self, pattern: NodePat, node: Any, alternative: int = 0):
        """Match ``pattern`` rooted at ``node``: a :class:`Match` or a :class:`MatchFailure`."""
        bindings: Dict[str, Any] = {}
        nodes: List[Any] = []
        fail = self._node(pattern, node, bindings, nodes)
        if fail is not None:
            return fail
        return Match(node, bindings, nodes, alternative)

    def _bind(self, name: str, value: Any, b: Dict[str, Any], step: str, where: str) -> Optional[MatchFailure]:
        if name in b:
            old = b[name]
            ir = self.ir
            same = old is value if ir.is_ref(old) or ir.is_ref(value) else _eq(old, value)
            if not same:
                return MatchFailure(step, where, f"{name} is already bound to {getattr(old, 'name', old)!r}")
            return None
        b[name] = value
        return None

    def _child(self, pat: Pattern, value: Any, b: Dict[str, Any], nodes: List[Any],
               parent: str) -> Optional[MatchFailure]:
        if isinstance(pat, AnyPat):
            return None
        ir = self.ir
        if isinstance(pat, ValuePat):
            return self._bind(pat.name, value, b, str(pat), parent)
        if isinstance(pat, BindPat):
            v = ir.bind_input(value)
            if v is _MISSING:
                return MatchFailure(str(pat), parent, f"expected a node input but found {ir.show_input(value)}")
            return self._bind(pat.name, v, b, str(pat), parent)
        if isinstance(pat, LiteralPat):
            v = ir.constant(value)
            if v is _MISSING or not _eq(v, pat.value):
                return MatchFailure(str(pat), parent, f"expected {pat.value!r} but found {ir.show(value)}")
            return None
        if isinstance(pat, NodePat):
            p = ir.producer(value)
            if p is None:
                return MatchFailure(str(pat), parent, f"expected a node but found {ir.show_input(value)}")
            return self._node(pat, p, b, nodes)
        return MatchFailure(str(pat), parent, "unsupported pattern element")

    def _step(self, pat: Pattern) -> str:
        """``str(pat)``, the pattern step named in failures, formatted once per pattern."""
        hit = self._steps.get(id(pat))
        if hit is None:
            hit = self._steps[id(pat)] = (pat, str(pat))  # holds pat: its id stays unique
        return hit[1]

    def _node(self, pat: NodePat, node: Any, b: Dict[str, Any], nodes: List[Any]) -> Optional[MatchFailure]:
        step = self._step(pat)
        ir = self.ir
        cls = ir.classify(node)
        if pat.classes is not None and cls not in pat.classes:
            want = "|".join(pat.spelled)
            return MatchFailure(step, node.name, f"{ir.describe(node, cls)} is not {want}")
        if pat.binding:
            f = self._bind(pat.binding, node, b, step, node.name)
            if f:
                return f
        view = ir.view(node)
        for key, want in pat.attrs.items():
            if key == "module":
                found = ir.module_names(node, view)
                if isinstance(found, str):
                    return MatchFailure(step, node.name, f":module {want} {found}")
                names, shown = found
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
                return MatchFailure(step, node.name, f":{key} is {ir.show(actual)}, not {want!r}")
        nodes.append(node)
        nodes.extend(ir.also_matched(node, cls))
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
            n2: List[Any] = list(nodes)
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
