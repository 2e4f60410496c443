"""The op-class rule language on ONNX graphs (an onnx-graphsurgeon adapter).

Rule files are parsed once by :mod:`qpasses.lang` and run unchanged on either IR:
this module classifies graphsurgeon nodes into the same op classes as fx nodes
(:func:`onnx_opclass`: ``Conv`` -> ``conv2d``, ``BatchNormalization`` -> ``batch_norm``,
``Gemm`` / ``MatMul`` with a constant weight -> ``linear``, a ``QuantizeLinear`` ->
``DequantizeLinear`` pair -> ``fake_quant``, ...), matches the parsed patterns backwards
along use-def edges exactly like :class:`qpasses.matcher.Matcher`, and calls ONNX
implementations of the constraints and actions, registered by the same names with
:func:`onnx_constraint` / :func:`onnx_action`.

A rule whose action or constraint has no ONNX implementation is reported (``skipped``),
never silently dropped.  ``run_rules(graph, "canonicalize")`` folds BatchNorm into the
preceding Conv / ConvTranspose / Gemm; ``run_rules(graph, "qdq_cleanup")`` merges
back-to-back Q/DQ pairs.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import onnx_graphsurgeon as gs
import torch

from ..errors import Location, OptionError, QPassesError, UnknownNameError, nearest
from ..lang.registry import constraint_result
from ..lang.rules import Rule, RuleFamily, find_named, load_file
from ..lang.syntax import AnyPat, BindPat, BindingRef, Call, LiteralPat, NodePat, ValuePat
from ..matcher import _eq
from ..ops import OP_CLASSES
from ..report import Report

__all__ = ["onnx_opclass", "OnnxView", "OnnxMatcher", "run_rules", "onnx_action", "onnx_constraint",
           "ONNX_ACTIONS", "ONNX_CONSTRAINTS", "OnnxRefuse", "explain"]

ONNX_ACTIONS: Dict[str, Callable] = {}
ONNX_CONSTRAINTS: Dict[str, Callable] = {}


class OnnxRefuse(Exception):
    """Raised by an ONNX action / constraint to decline a match with a reason."""


def onnx_action(name: str):
    """Register ``fn(ctx, *args, **kw)`` as the ONNX implementation of rule action ``name``."""
    def deco(fn):
        ONNX_ACTIONS[name] = fn
        return fn
    return deco


def onnx_constraint(name: str):
    """Register ``fn(ctx, *args, **kw) -> bool | (bool, reason)`` as the ONNX implementation of ``name``."""
    def deco(fn):
        ONNX_CONSTRAINTS[name] = fn
        return fn
    return deco


# ----------------------------------------------------------------------------- classification

def producer(t: Any) -> Optional[gs.Node]:
    """The node producing tensor ``t`` (None for graph inputs and constants)."""
    if isinstance(t, gs.Variable) and t.inputs:
        return t.inputs[0]
    return None


def const_value(t: Any) -> Optional[np.ndarray]:
    """The value of a constant tensor (an initializer), else None."""
    if isinstance(t, gs.Constant):
        return np.asarray(t.values)
    return None


def is_weight(t: Any) -> bool:
    """A constant, or a DequantizeLinear of a constant (a quantized weight)."""
    if isinstance(t, gs.Constant):
        return True
    p = producer(t)
    return p is not None and p.op == "DequantizeLinear" and isinstance(p.inputs[0], gs.Constant)


def qdq_source(node: gs.Node) -> Optional[gs.Node]:
    """For a DequantizeLinear reading a QuantizeLinear: that QuantizeLinear."""
    if node.op != "DequantizeLinear":
        return None
    p = producer(node.inputs[0])
    return p if p is not None and p.op == "QuantizeLinear" else None


def onnx_opclass(node: gs.Node) -> Optional[str]:
    """The qpasses op class of a graphsurgeon node (None when it has none)."""
    op = node.op
    if op == "Conv":
        w = node.inputs[1]
        rank = len(w.shape) if w.shape is not None else 4
        return f"conv{rank - 2}d"
    if op == "ConvTranspose":
        w = node.inputs[1]
        rank = len(w.shape) if w.shape is not None else 4
        return f"conv_transpose{rank - 2}d"
    if op == "Gemm":
        return "linear" if is_weight(node.inputs[1]) else "matmul"
    if op == "MatMul":
        return "linear" if is_weight(node.inputs[1]) else "matmul"
    if op == "Clip":
        lo = const_value(node.inputs[1]) if len(node.inputs) > 1 else None
        hi = const_value(node.inputs[2]) if len(node.inputs) > 2 else None
        if lo is not None and hi is not None and float(lo) == 0.0 and float(hi) == 6.0:
            return "relu6"
        return "hardtanh"
    if op == "DequantizeLinear":
        return "fake_quant" if qdq_source(node) is not None else None
    if op == "Identity" and node.name.startswith("qpasses_observer_"):
        return "observer"  # placed by the ONNX observe_input / observe_output actions
    return _SIMPLE.get(op)


_SIMPLE = {
    "BatchNormalization": "batch_norm", "LayerNormalization": "layer_norm", "Relu": "relu", "Gelu": "gelu",
    "Add": "add", "Mul": "mul", "Concat": "cat", "MaxPool": "max_pool", "AveragePool": "avg_pool",
    "GlobalAveragePool": "adaptive_avg_pool", "Flatten": "flatten", "Reshape": "reshape", "Transpose": "permute",
    "Softmax": "softmax", "Dropout": "dropout",
}


_MISSING = object()


class OnnxView:
    """Normalised arguments of a graphsurgeon node, like :class:`qpasses.ops.OpView`."""

    def __init__(self, node: gs.Node, opclass: Optional[str] = None):
        self.node = node
        self.opclass = opclass or onnx_opclass(node)
        self.module = None

    def inputs(self) -> List[Any]:
        """Activation inputs as tensors (for a fake_quant pair: the QuantizeLinear's input)."""
        n = self.node
        if self.opclass == "fake_quant":
            return [qdq_source(n).inputs[0]]
        if self.opclass in ("add", "mul", "matmul"):
            return list(n.inputs[:2])
        if self.opclass == "cat":
            return list(n.inputs)
        return list(n.inputs[:1])

    def get(self, name: str, default: Any = None) -> Any:
        n, a = self.node, self.node.attrs
        cls = self.opclass or ""
        if name == "input":
            return n.inputs[0] if n.inputs else default
        if name == "weight" and (cls.startswith("conv") or cls == "linear"):
            return n.inputs[1]
        if name == "bias" and (cls.startswith("conv") or cls == "linear"):
            return n.inputs[2] if len(n.inputs) > 2 else None
        if cls == "batch_norm":
            idx = {"weight": 1, "bias": 2, "running_mean": 3, "running_var": 4}
            if name in idx:
                return n.inputs[idx[name]]
            if name == "eps":
                return float(a.get("epsilon", 1e-5))
            if name == "training":
                return bool(a.get("training_mode", 0))
        if name == "training":
            return False
        if name == "groups":
            return int(a.get("group", 1))
        if name in ("stride", "dilation"):
            v = a.get(name + "s")
            return tuple(v) if v is not None else 1
        if name == "padding":
            v = a.get("pads")
            return tuple(v[: len(v) // 2]) if v is not None else 0
        if name in a:
            return a[name]
        return default

    def tensor(self, name: str) -> Optional[torch.Tensor]:
        v = const_value(self.get(name))
        return None if v is None else torch.from_numpy(np.array(v))


# ----------------------------------------------------------------------------- matching

@dataclass
class OnnxMatch:
    root: gs.Node
    bindings: Dict[str, Any]
    nodes: List[gs.Node] = field(default_factory=list)


def _name(x: Any) -> str:
    return getattr(x, "name", None) or repr(x)


class OnnxMatcher:
    """Backward pattern matching over a graphsurgeon graph (same semantics as the fx matcher)."""

    def __init__(self, graph: gs.Graph):
        self.graph = graph

    def classify(self, node: gs.Node) -> Optional[str]:
        return onnx_opclass(node)

    def match(self, pat: NodePat, node: gs.Node):
        b: Dict[str, Any] = {}
        nodes: List[gs.Node] = []
        fail = self._node(pat, node, b, nodes)
        return fail if fail is not None else OnnxMatch(node, b, nodes)

    def _bind(self, name, value, b, step):
        if name in b:
            old = b[name]
            if not (old is value or (not isinstance(old, (gs.Node, gs.Tensor)) and _eq(old, value))):
                return f"{step}: {name} is already bound to {_name(old)}"
            return None
        b[name] = value
        return None

    def _child(self, pat, value, b, nodes, parent):
        if isinstance(pat, AnyPat):
            return None
        if isinstance(pat, ValuePat):
            return self._bind(pat.name, value, b, str(pat))
        if isinstance(pat, BindPat):
            p = producer(value)
            return self._bind(pat.name, p if p is not None else value, b, str(pat))
        if isinstance(pat, LiteralPat):
            v = const_value(value)
            if v is None or not _eq(v.tolist(), pat.value):
                return f"{pat}: input of {parent} is {_name(value)}, not {pat.value!r}"
            return None
        if isinstance(pat, NodePat):
            p = producer(value)
            if p is None:
                return f"{pat}: input {_name(value)} of {parent} is a graph input or constant"
            return self._node(pat, p, b, nodes)
        return f"{pat}: unsupported pattern element"

    def _node(self, pat: NodePat, node: gs.Node, b, nodes):
        step = str(pat)
        cls = self.classify(node)
        if pat.classes is not None and cls not in pat.classes:
            return f"{step}: {node.name} ({cls or node.op}) is not {'|'.join(pat.spelled)}"
        if pat.binding:
            f = self._bind(pat.binding, node, b, step)
            if f:
                return f
        view = OnnxView(node, cls)
        for key, want in pat.attrs.items():
            if key == "module":
                return f"{step}: ONNX nodes are not module calls (:module {want})"
            actual = view.get(key, _MISSING)
            if actual is _MISSING:
                return f"{step}: {cls} has no argument {key!r}"
            if isinstance(want, NodePat):
                f = self._child(want, actual, b, nodes, node.name)
                if f:
                    return f
            elif isinstance(want, BindingRef):
                f = self._bind(want.name, actual, b, step)
                if f:
                    return f
            elif not _eq(actual, want):
                return f"{step}: :{key} of {node.name} is {actual!r}, not {want!r}"
        nodes.append(node)
        if cls == "fake_quant":
            nodes.append(qdq_source(node))
        if not pat.children:
            return None
        inputs = view.inputs()
        if not pat.rest and len(pat.children) != len(inputs):
            return f"{step}: {node.name} has {len(inputs)} input(s), the pattern lists {len(pat.children)}"
        if len(pat.children) > len(inputs):
            return f"{step}: {node.name} has only {len(inputs)} input(s)"
        orders = [list(range(len(pat.children)))]
        oc = OP_CLASSES.get(cls) if cls else None
        if oc is not None and oc.commutative and len(inputs) == 2 and len(pat.children) == 2:
            orders.append([1, 0])
        first = None
        for order in orders:
            b2, n2 = dict(b), list(nodes)
            fail = None
            for ci, ii in enumerate(order):
                fail = self._child(pat.children[ci], inputs[ii], b2, n2, node.name)
                if fail:
                    break
            if fail is None:
                b.clear(); b.update(b2); nodes[:] = n2
                return None
            first = first or fail
        return first


class OnnxContext:
    """What ONNX constraints and actions receive."""

    def __init__(self, graph: gs.Graph, match: OnnxMatch, rule: Rule, state: Dict[str, Any]):
        self.graph = graph
        self.match = match
        self.rule = rule
        self.state = state

    def view(self, node: gs.Node) -> OnnxView:
        return OnnxView(node)

    def resolve(self, v: Any) -> Any:
        if isinstance(v, BindingRef):
            return self.match.bindings[v.name]
        if isinstance(v, list):
            return [self.resolve(x) for x in v]
        return v

    def call(self, fn, call: Call):
        return fn(self, *[self.resolve(a) for a in call.args],
                  **{k: self.resolve(v) for k, v in call.kwargs.items()})


# ----------------------------------------------------------------------------- guards

def _consumers(node: gs.Node) -> List[gs.Node]:
    return [c for o in node.outputs for c in o.outputs]


def _guard(graph: gs.Graph, m: OnnxMatch, keeps: Sequence[str]) -> Optional[str]:
    """Interior nodes have no users outside the match (unless kept)."""
    matched = {id(n) for n in m.nodes}
    kept = {id(m.bindings[k]) for k in keeps if k in m.bindings}
    outs = {id(t) for t in graph.outputs}
    for n in m.nodes:
        if n is m.root or id(n) in kept:
            continue
        if n.op == "QuantizeLinear" and any(c is m.root for c in _consumers(n)):
            continue
        for o in n.outputs:
            if id(o) in outs:
                return f"interior node {n.name} produces a graph output"
        outside = [c for c in _consumers(n) if id(c) not in matched]
        if outside:
            return f"interior node {n.name} is also used outside the match (by {outside[0].name})"
    return None


# ----------------------------------------------------------------------------- running

def _load(rules: Any, options: Optional[Dict[str, Any]] = None) -> List[Tuple[Optional[str], List[Rule], int]]:
    """(family, bound rules, iteration limit) per stage, in order (``once`` stages: limit 1)."""
    options = options or {}
    items = rules if isinstance(rules, (list, tuple)) else [rules]
    objs: List[Any] = []
    for it in items:
        if isinstance(it, str):
            it = load_file(it) if it.endswith((".yaml", ".yml")) else find_named(it)
        if not isinstance(it, (Rule, RuleFamily)):
            raise QPassesError(f"ONNX rules take rule families or rules, not the recipe {getattr(it, 'name', it)!r}"
                               " (use qpasses.onnx.quantize_onnx for recipes)")
        objs.append(it)
    known = {k for o in objs if isinstance(o, RuleFamily) for k in o.params}
    for k in options:
        if k not in known:
            raise OptionError(f"unknown option {k!r}; these rules take: {', '.join(sorted(known)) or 'no options'}",
                              nearest(k, known))
    out: List[Tuple[Optional[str], List[Rule], int]] = []
    for it in objs:
        if isinstance(it, Rule):
            out.append((None, [it.bind(options)], 1))
            continue
        params = {k: v.default for k, v in it.params.items()}
        for k, v in options.items():
            if k in it.params:
                why = it.params[k].check(it.params[k].coerce(v))
                if why:
                    raise OptionError(f"invalid option: {why}")
                params[k] = it.params[k].coerce(v)
        for st in it.stages:
            limit = st.max_iterations if st.mode == "fixpoint" else 1
            out.append((it.name, [r.bind(params) for r in it.rules if r.stage == st.name], limit))
    return out


def _eval(ctx: OnnxContext, call: Call) -> Tuple[bool, str]:
    fn = ONNX_CONSTRAINTS.get(call.name)
    if fn is None:
        raise OnnxRefuse(f"constraint {call.name!r} has no ONNX implementation")
    return constraint_result(ctx.call(fn, call))


def _check(ctx: OnnxContext, rule: Rule) -> Optional[str]:
    return rule.failing_constraint(lambda c: _eval(ctx, c))


def run_rules(graph: gs.Graph, rules: Any, max_iterations: Optional[int] = None, report: Optional[Report] = None,
              **options: Any) -> Report:
    """Apply rule families / rules (names, paths or objects) to a graphsurgeon graph in place.

    Stages run as their rule file says: ``once``, or ``fixpoint`` up to the stage's
    ``max_iterations`` (``max_iterations`` here overrides the limit).  ``options``
    override the families' parameters by name (as ``PassManager(..., **options)``).  Returns a
    :class:`qpasses.report.Report` with per-rule candidates / matches / rewrites / refusals.
    """
    report = report or Report()
    state: Dict[str, Any] = {}
    for family, rs, limit in _load(rules, options):
        for _ in range(max_iterations or limit):
            changed = 0
            for rule in rs:
                changed += _apply(graph, rule, family, report, state)
            if changed:
                graph.cleanup(remove_unused_graph_inputs=False)
            else:
                break
    graph.cleanup(remove_unused_graph_inputs=False).toposort()
    return report


def _apply(graph: gs.Graph, rule: Rule, family: Optional[str], report: Report, state) -> int:
    stats = report.rule(rule.name, family, rule.stage)
    if not rule.when or (isinstance(rule.when, str) and rule.when.lower() in ("false", "0", "no")):
        stats.disabled = True
        return 0
    fn = ONNX_ACTIONS.get(rule.rewrite.name)
    anchors = rule.anchor_classes()
    matcher = OnnxMatcher(graph)
    done = 0
    dead: set = set()
    for node in list(graph.nodes):
        if id(node) in dead:
            continue
        cls = matcher.classify(node)
        if anchors is not None and cls not in anchors:
            continue
        stats.candidate(node.name)
        m, why = None, None
        for pat in rule.match:
            r = matcher.match(pat, node)
            if isinstance(r, OnnxMatch):
                m = r
                break
            why = why or r
        if m is None:
            stats.fail(node.name, str(why))
            continue
        stats.match(node.name)
        if fn is None:
            stats.refuse(node.name, f"action {rule.rewrite.name!r} has no ONNX implementation")
            continue
        ctx = OnnxContext(graph, m, rule, state)
        try:
            why = _check(ctx, rule) or _guard(graph, m, rule.keeps)
            if why:
                stats.refuse(node.name, why)
                continue
            ctx.call(fn, rule.rewrite)
        except OnnxRefuse as e:
            stats.refuse(node.name, str(e))
            continue
        kept = {id(m.bindings[k]) for k in rule.keeps if k in m.bindings}
        dead.update(id(n) for n in m.nodes if id(n) not in kept)
        stats.rewrites += 1
        stats.rewritten.append(node.name)
        done += 1
    return done


def explain(graph: gs.Graph, rule: Union[str, Rule], node_name: str, family: Any = None) -> str:
    """Why ``rule`` does (not) apply to the ONNX node called ``node_name``."""
    rules = [r for _, rs, _ in _load(family or ["canonicalize", "qdq_cleanup"]) for r in rs]
    if isinstance(rule, str):
        hits = [r for r in rules if r.name == rule]
        if not hits:
            raise UnknownNameError(f"no rule named {rule!r}", Location("<explain>"), nearest(rule, [r.name for r in rules]))
        rule = hits[0]
    nodes = [n for n in graph.nodes if n.name == node_name]
    if not nodes:
        raise QPassesError(f"no ONNX node named {node_name!r} (did you mean "
                           f"{nearest(node_name, [n.name for n in graph.nodes])!r}?)")
    node = nodes[0]
    first = None
    for pat in rule.match:
        r = OnnxMatcher(graph).match(pat, node)
        if isinstance(r, OnnxMatch):
            try:
                why = _check(OnnxContext(graph, r, rule, {}), rule) or _guard(graph, r, rule.keeps)
            except OnnxRefuse as e:
                why = str(e)
            if why:
                return f"rule {rule.name!r} does not apply to {node_name}: {why}"
            return f"rule {rule.name!r} matches node {node_name} and would rewrite it"
        first = first or r
    return f"rule {rule.name!r} does not apply to {node_name}: {first}"


# ----------------------------------------------------------------------------- ONNX implementations

def _out(x: Any) -> gs.Tensor:
    return x.outputs[0] if isinstance(x, gs.Node) else x


def replace_uses(graph: gs.Graph, old: gs.Tensor, new: gs.Tensor) -> None:
    """Every consumer of ``old`` reads ``new``; a graph output keeps its name through an Identity."""
    for c in list(old.outputs):
        for i, t in enumerate(c.inputs):
            if t is old:
                c.inputs[i] = new
    for i, t in enumerate(graph.outputs):
        if t is old:
            prod = producer(old)
            if prod is not None:
                prod.outputs = [gs.Variable(old.name + "_pre", dtype=old.dtype, shape=old.shape)
                                if o is old else o for o in prod.outputs]
            graph.nodes.append(gs.Node("Identity", name=old.name + "_keep", inputs=[new], outputs=[old]))


@onnx_constraint("eval_mode")
def _eval_mode(ctx, node):
    training = ctx.view(node).get("training", False)
    return not training, f"{node.name} has training_mode=1" if training else ""


@onnx_constraint("single_use")
def _single_use(ctx, node):
    n = len(_consumers(node))
    return n == 1, f"{node.name} has {n} users"


def _fq_params(dq: gs.Node):
    q = qdq_source(dq)
    vals = []
    for t in list(q.inputs[1:3]) + list(dq.inputs[1:3]):
        v = const_value(t)
        if v is None:
            return None
        vals.append(v)
    if len(vals) < 4 or not (np.array_equal(vals[0], vals[2]) and np.array_equal(vals[1], vals[3])):
        return None
    if vals[1].dtype != vals[3].dtype:
        return None
    return vals[0], vals[1], q.attrs.get("axis", 1), dq.attrs.get("axis", 1), str(vals[1].dtype)


@onnx_constraint("same_qparams")
def _same_qparams(ctx, first, second):
    a, b = _fq_params(first), _fq_params(second)
    ok = (a is not None and b is not None and np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
          and a[4] == b[4] and (a[0].size == 1 or a[2:4] == b[2:4]))
    return ok, "" if ok else f"{first.name} and {second.name} quantize differently"


@onnx_constraint("constant_operand")
def _constant_operand(ctx, node):
    """A MatMul / Gemm against a constant weight already classifies as ``linear`` here: the
    ``matmul`` nodes canonicalize sees multiply two activations."""
    return False, f"{node.name} multiplies two activations"


@onnx_action("as_linear")
def _as_linear(ctx, node):
    """Nothing to rewrite on ONNX graphs (no ``addmm``; ``MatMul`` / ``Gemm`` with a constant
    weight is ``linear`` already)."""
    raise OnnxRefuse(f"{node.name}: ONNX products with a constant weight are linear already")


@onnx_action("bypass")
def _bypass(ctx, node, value):
    """Consumers of ``node`` read ``value`` instead (the node becomes dead and is cleaned up)."""
    replace_uses(ctx.graph, _out(node), _out(value))


@onnx_action("fold_bn")
def _fold_bn(ctx, conv, bn):
    """Fold an inference BatchNormalization into the Conv / ConvTranspose / Gemm producing its input."""
    from ..actions.fold import fold_bn_params
    cv, bv = OnnxView(conv), OnnxView(bn)
    if conv.op == "MatMul" or (conv.op == "Gemm" and (conv.attrs.get("transB", 0) != 1 or conv.attrs.get("transA", 0))):
        raise OnnxRefuse(f"{conv.name}: only Conv, ConvTranspose and Gemm(transB=1) are folded")
    w = cv.tensor("weight")
    if w is None:
        raise OnnxRefuse(f"the weight of {conv.name} is not a float constant")
    b = cv.tensor("bias")
    if cv.get("bias") is not None and b is None:
        raise OnnxRefuse(f"the bias of {conv.name} is not a constant")
    stats = [bv.tensor(k) for k in ("running_mean", "running_var", "weight", "bias")]
    if any(s is None for s in stats):
        raise OnnxRefuse(f"{bn.name} has non-constant parameters")
    mean, var, gamma, beta = stats
    groups = int(cv.get("groups", 1))
    opclass = cv.opclass or "conv2d"
    cout = w.shape[1] * groups if opclass.startswith("conv_transpose") else w.shape[0]
    if cout != mean.numel():
        raise OnnxRefuse(f"{bn.name} normalises {mean.numel()} channels, {conv.name} produces {cout}")
    if len(_consumers(conv)) != 1:
        raise OnnxRefuse(f"{conv.name} has other users")
    w2, b2 = fold_bn_params(w.float(), None if b is None else b.float(), mean.float(), var.float(), gamma.float(),
                            beta.float(), float(bv.get("eps", 1e-5)), opclass, groups)
    conv.inputs[1] = gs.Constant(conv.inputs[1].name + "_folded", w2.numpy().astype(np.float32))
    bconst = gs.Constant(conv.name + "_bias_folded", b2.numpy().astype(np.float32))
    if len(conv.inputs) > 2:
        conv.inputs[2] = bconst
    else:
        conv.inputs.append(bconst)
    replace_uses(ctx.graph, bn.outputs[0], conv.outputs[0])


@onnx_action("fuse_rms_norm")
def _fuse_rms_norm(ctx, *args, **kwargs):
    """HF's written-out RMSNorm is fused on PyTorch graphs only: an ONNX graph keeps its
    Pow / ReduceMean / Add / Sqrt / Div / Mul nodes (no RMSNormalization op before opset 23)."""
    raise OnnxRefuse("RMSNorm is fused on PyTorch graphs only; the ONNX graph keeps the decomposed form")
