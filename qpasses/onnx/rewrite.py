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

import contextlib
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import onnx_graphsurgeon as gs
import torch

from ..context import Refuse
from ..errors import Location, OptionError, QPassesError, UnknownNameError, nearest
from ..explain import apply_rule, explain_rule
from ..lang.registry import ACTIONS, CONSTRAINTS
from ..lang.rules import Rule, RuleFamily, find_named, load_file
from ..lang.syntax import Call, BindingRef
from ..matcher import Match, Matcher
from ..report import Report

__all__ = ["onnx_opclass", "OnnxView", "OnnxIR", "OnnxContext", "run_rules", "onnx_action", "onnx_constraint",
           "OnnxRefuse", "explain"]

#: what ONNX actions / constraints raise to decline a match: the one refusal of both IRs
OnnxRefuse = Refuse


def _implement(table, kind: str, name: str):
    def deco(fn):
        reg = table.get(name)
        if reg is None:
            raise ValueError(f"ONNX implementation of unknown {kind} {name!r}: register it for fx graphs first")
        reg.onnx = fn
        return fn
    return deco


def onnx_action(name: str):
    """Register ``fn(ctx, *args, **kw)`` as the ONNX implementation of rule action ``name`` (the
    same registry entry as its fx implementation: one name, one argument list, two IRs)."""
    return _implement(ACTIONS, "action", name)


def onnx_constraint(name: str):
    """Register ``fn(ctx, *args, **kw) -> bool | (bool, reason)`` as the ONNX implementation of
    constraint ``name``."""
    return _implement(CONSTRAINTS, "constraint", name)


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
    """Normalised arguments of a graphsurgeon node, like :class:`qpasses.opclasses.OpView`."""

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


# ----------------------------------------------------------------------------- the IR adapter

def _name(x: Any) -> str:
    return getattr(x, "name", None) or repr(x)


_MISSING = object()


class OnnxContext:
    """What ONNX constraints and actions receive: the graph, the match, the rule, the run's
    scratch state and the parameters."""

    def __init__(self, graph: gs.Graph, match: Optional[Match], rule: Rule, state: Dict[str, Any],
                 params: Optional[Dict[str, Any]] = None):
        self.graph = graph
        self.match = match
        self.rule = rule
        self.state = state
        self.params = params or {}

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


class OnnxIR:
    """The ONNX side of the matcher's IR adapter (see :class:`qpasses.matcher.FxIR`): an
    onnx-graphsurgeon graph.  Inputs are tensors; a pattern element matches a tensor's
    producer; a ``QuantizeLinear`` -> ``DequantizeLinear`` pair is one ``fake_quant`` node."""

    kind = "onnx"

    def __init__(self, graph: gs.Graph, state: Optional[Dict[str, Any]] = None,
                 params: Optional[Dict[str, Any]] = None):
        self.graph = graph
        self.state = state if state is not None else {}
        self.params = params or {}
        self.dead: set = set()

    # matching
    def classify(self, node: gs.Node) -> Optional[str]:
        return onnx_opclass(node)

    def view(self, node: gs.Node) -> "OnnxView":
        return OnnxView(node)

    def is_ref(self, value: Any) -> bool:
        return isinstance(value, (gs.Node, gs.Tensor))

    def producer(self, value: Any) -> Optional[gs.Node]:
        return producer(value)

    def bind_input(self, value: Any) -> Any:
        p = producer(value)
        return p if p is not None else value

    def constant(self, value: Any) -> Any:
        v = const_value(value)
        return _MISSING if v is None else v.tolist()

    def show(self, value: Any) -> str:
        return _name(value) if isinstance(value, (gs.Node, gs.Tensor)) else repr(value)

    def show_input(self, value: Any) -> str:
        kind = "constant" if isinstance(value, gs.Constant) else "graph input"
        return f"{kind} {_name(value)}"

    def describe(self, node: gs.Node, cls: Optional[str]) -> str:
        return f"{node.name} ({cls or node.op})"

    def module_names(self, node: gs.Node, view: Any):
        return "requires a module call; ONNX nodes are not module calls"

    def also_matched(self, node: gs.Node, cls: Optional[str]) -> Sequence[gs.Node]:
        return (qdq_source(node),) if cls == "fake_quant" else ()

    # driving
    def candidates(self, classes: Optional[Sequence[str]]) -> List[gs.Node]:
        return [n for n in list(self.graph.nodes) if classes is None or onnx_opclass(n) in classes]

    def skip(self, node: gs.Node, rule: Any) -> bool:
        return id(node) in self.dead  # replaced by an earlier rewrite (removed at clean-up)

    def context(self, match: Optional[Match], rule: Any) -> OnnxContext:
        return OnnxContext(self.graph, match, rule, self.state, self.params)

    def implementation(self, reg: Any):
        return reg.onnx

    def guard(self, ctx: OnnxContext, reg: Any, keeps: Sequence[str]) -> Optional[str]:
        return _guard(self.graph, ctx.match, keeps)

    def rewritten(self, match: Match, keeps: Sequence[str]) -> None:
        kept = {id(match.bindings[k]) for k in keeps if k in match.bindings}
        self.dead.update(id(n) for n in match.nodes if id(n) not in kept)

    def has_output(self) -> bool:
        return bool(self.graph.outputs)

    def tagging(self, rule_name: str):
        return contextlib.nullcontext()


# ----------------------------------------------------------------------------- guards

def _consumers(node: gs.Node) -> List[gs.Node]:
    return [c for o in node.outputs for c in o.outputs]


def _guard(graph: gs.Graph, m: Match, keeps: Sequence[str]) -> Optional[str]:
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


def run_rules(graph: gs.Graph, rules: Any, max_iterations: Optional[int] = None, report: Optional[Report] = None,
              **options: Any) -> Report:
    """Apply rule families / rules (names, paths or objects) to a graphsurgeon graph in place.

    Stages run as their rule file says: ``once``, or ``fixpoint`` up to the stage's
    ``max_iterations`` (``max_iterations`` here overrides the limit).  ``options``
    override the families' parameters by name (as ``PassManager(..., **options)``).  Returns a
    :class:`qpasses.report.Report` with per-rule candidates / matches / rewrites / refusals: the
    same matcher and driver as on fx graphs (:func:`qpasses.explain.apply_rule`).
    """
    report = report or Report()
    state: Dict[str, Any] = {}
    for family, rs, limit in _load(rules, options):
        for _ in range(max_iterations or limit):
            changed = sum(_apply(graph, rule, family, report, state) for rule in rs)
            if changed:
                graph.cleanup(remove_unused_graph_inputs=False)
            else:
                break
    graph.cleanup(remove_unused_graph_inputs=False).toposort()
    return report


def _apply(graph: gs.Graph, rule: Rule, family: Optional[str], report: Report, state: Dict[str, Any],
           params: Optional[Dict[str, Any]] = None) -> int:
    ir = OnnxIR(graph, state, params)
    return apply_rule(ir, Matcher(ir), rule, report.rule(rule.name, family, rule.stage))


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
    return str(explain_rule(OnnxIR(graph), rule, nodes[0]))


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
    from ..methods.canonicalize.fold import fold_bn_params
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
