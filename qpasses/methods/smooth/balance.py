"""Layer groups for activation / weight balancing (SmoothQuant, AWQ), found from the graph.

A *group* is a producer whose output channels can absorb a per-channel scale exactly, plus the
linear ops it feeds (the *consumers*): dividing the producer's channel ``j`` by ``s_j`` and
multiplying the consumers' input column ``j`` by ``s_j`` leaves the model's function unchanged
(up to float rounding).  SmoothQuant (Xiao et al., 2023) and AWQ (Lin et al., 2024) both choose
``s``; which layers may share it is a question about the graph, which peers answer with
per-architecture tables of module-name regexes.  Here it is answered from structure alone:

* **producers**: a ``layer_norm`` / ``rms_norm`` with an affine weight (its weight and bias take
  ``1/s``), or a ``linear`` with a constant weight (its weight rows and bias take ``1/s``);
* from a producer, every use is followed forward, channel by channel.  Each value on the way
  carries a *label tensor*: for every element, the producer channel it comes from.  Labels go
  through shape ops by running the very op on the labels (``view``, ``transpose``, ``permute``,
  ``expand`` (``repeat_kv`` of grouped-query attention), ``split`` / ``getitem`` (GPT-2's fused
  ``c_attn``), ``slice``, ...), with the sizes the graph computed on a real batch;
* ops that commute with a positive per-channel scale pass the labels on: ``relu``, a ``mul``
  by a value that does not depend on the producer (the gate of a gated MLP, rotary tables), a
  ``mul`` / ``div`` by a number, and attention's value path (``scaled_dot_product_attention``'s
  ``value``, ``matmul(probs, v)``), whose output channel ``d`` of a head is a mix of the same
  channel ``d`` of that head's values over the sequence;
* a ``linear`` reading a labelled value as its input is a consumer; its labels give the map
  from its input columns to producer channels (``o_proj``'s columns to ``v_proj``'s rows,
  repeated for grouped-query attention);
* any other use (a residual ``add``, ``gelu`` / ``silu``, ``layer_norm``, the query / key of
  attention, a graph output) *blocks* the channels that reach it.

The group keeps the producer channels that reach consumers; it is exact when none of them is
also blocked (GPT-2's ``c_attn``: only the value slice reaches ``c_proj``; its query and key
slices reach attention scores and keep scale 1).  Otherwise the group is refused with the
reason (a post-LN BERT's LayerNorm also feeds the residual; a GELU sits between two linears).
With ``scale_nodes=True`` the linears left out of every exact group get an explicit
``mul(x, 1/s)`` node in front of them instead (as AutoAWQ's ``ScaledActivation`` does for GELU):
exact too, at the cost of one float multiply.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

import torch
import torch.fx as fx
import torch.nn as nn

from ...opclasses import OpView, classify, get_attr_value

__all__ = ["Group", "Refusal", "find_groups", "run_recording", "group_label"]

# ops that move / copy elements without computing on them: run on the labels as they are
_SHAPE_OPS = {
    "view", "reshape", "_unsafe_view", "transpose", "t", "permute", "unsqueeze", "squeeze", "expand",
    "slice", "select", "clone", "contiguous", "alias", "detach", "split", "split_with_sizes", "chunk",
    "unbind", "flatten", "unflatten", "narrow", "movedim", "view_as", "expand_as",
}
# ops that keep values (casts, inference-mode dropout): labels pass unchanged
_IDENTITY_OPS = {"to", "_to_copy", "type", "float", "lift_fresh_copy"}


def _op_name(node: fx.Node) -> str:
    t = node.target
    if node.op == "call_method":
        return str(t)
    if isinstance(t, torch._ops.OpOverload):
        return t._schema.name.split("::")[-1]
    return getattr(t, "__name__", str(t))


@dataclass
class Consumer:
    node: fx.Node
    #: producer channel of each input column of the consumer (LongTensor [K])
    channels: torch.Tensor


@dataclass
class Group:
    """A producer, the linear consumers that read its (scaled) channels, and how."""

    producer: fx.Node
    kind: str                        # "norm" | "linear" | "scale_node"
    size: int                        # producer channels
    consumers: List[Consumer]
    #: producer channels that reach the consumers (the others keep scale 1)
    scaled: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))

    def describe(self) -> str:
        part = "" if self.scaled.numel() == self.size else f" [channels {_ranges(self.scaled)} of {self.size}]"
        via = " (scale node)" if self.kind == "scale_node" else ""
        return f"{self.producer.name}{part}{via} -> {', '.join(c.node.name for c in self.consumers)}"


@dataclass
class Refusal:
    producer: fx.Node
    reason: str


def _ranges(idx: torch.Tensor) -> str:
    v = idx.tolist()
    out, start = [], None
    for i, x in enumerate(v):
        if start is None:
            start = x
        if i + 1 == len(v) or v[i + 1] != x + 1:
            out.append(f"{start}" if start == x else f"{start}-{x}")
            start = None
    return ",".join(out)


# ------------------------------------------------------------------------------ running the graph
class _Recorder(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule, keep_all: bool, watch: Optional[Dict[fx.Node, Any]] = None):
        super().__init__(gm, garbage_collect_values=not keep_all)
        self.keep_all = keep_all
        self.values: Dict[fx.Node, Any] = {}
        self.watch = watch or {}

    def run_node(self, n: fx.Node) -> Any:
        out = super().run_node(n)
        if self.keep_all:
            self.values[n] = out
        cb = self.watch.get(n)
        if cb is not None:
            cb(n, out, self)
        return out


@torch.no_grad()
def run_recording(gm: fx.GraphModule, inputs: Sequence[Any], keep_all: bool = False,
                  watch: Optional[Dict[fx.Node, Any]] = None) -> Dict[fx.Node, Any]:
    """Run ``gm`` on ``inputs`` node by node; every node's value when ``keep_all``; ``watch`` maps a
    node to ``callback(node, value, interpreter)`` (``interpreter.env`` holds the live values)."""
    r = _Recorder(gm, keep_all, watch)
    r.run(*inputs)
    return r.values


# ------------------------------------------------------------------------------ following channels
def _derived_from(src: fx.Node, other: Any, order: Dict[fx.Node, int]) -> bool:
    """Whether ``other`` depends on ``src`` (searching only nodes after ``src`` in graph order)."""
    if not isinstance(other, fx.Node):
        return False
    lo = order[src]
    seen, stack = set(), [other]
    while stack:
        n = stack.pop()
        if n is src:
            return True
        if n in seen or order.get(n, -1) <= lo:
            continue
        seen.add(n)
        stack.extend(n.all_input_nodes)
    return False


def _sub(v: Any, src: fx.Node, lab: Any, env: Dict[fx.Node, Any]) -> Any:
    return fx.node.map_arg(v, lambda n: lab if n is src else env[n])


def _labels_of(lab: Any) -> torch.Tensor:
    if isinstance(lab, (tuple, list)):
        parts = [_labels_of(x) for x in lab if isinstance(x, (torch.Tensor, tuple, list))]
        return torch.unique(torch.cat(parts)) if parts else torch.zeros(0, dtype=torch.long)
    return torch.unique(lab.reshape(-1)).long()


class _Walk:
    def __init__(self, gm: fx.GraphModule, producer: fx.Node, size: int, env: Dict[fx.Node, Any],
                 modules: Dict[str, nn.Module], order: Dict[fx.Node, int]):
        self.gm, self.producer, self.size, self.env, self.modules, self.order = gm, producer, size, env, modules, order
        self.consumers: List[Consumer] = []
        self.blocked: List[Tuple[str, torch.Tensor]] = []   # (reason, producer channels blocked)
        self.reached_linear = False

    def block(self, why: str, lab: Any) -> None:
        self.blocked.append((why, _labels_of(lab)))

    def run(self) -> None:
        out = self.env[self.producer]
        lab0 = torch.arange(self.size, dtype=torch.float64).expand(out.shape).contiguous()
        stack = [(self.producer, lab0)]
        done = set()
        while stack:
            node, lab = stack.pop()
            for user in list(node.users):
                if (user, node) in done:
                    continue
                done.add((user, node))
                nxt = self.step(user, node, lab)
                if nxt is not None:
                    stack.append((user, nxt))

    def step(self, u: fx.Node, src: fx.Node, lab: Any) -> Any:
        env = self.env
        if u.op == "output":
            self.block(f"{src.name} is a graph output", lab)
            return None
        cls = classify(u, self.modules)
        name = _op_name(u)
        if cls == "linear":
            self.reached_linear = True
            view = OpView(u, self.gm, "linear", self.modules)
            if view.get("input") is not src or view.get("weight") is src or view.get("bias") is src:
                self.block(f"{src.name} is a weight or bias of {u.name}", lab)
                return None
            if not isinstance(lab, torch.Tensor):
                self.block(f"{u.name} reads a tuple", lab)
                return None
            K = lab.shape[-1]
            rows = lab.reshape(-1, K)
            if rows.shape[0] == 0 or not bool((rows == rows[:1]).all()):
                self.block(f"the channels of {u.name}'s input vary along other dims", lab)
                return None
            self.consumers.append(Consumer(u, rows[0].long().clone()))
            return None
        if cls == "relu":
            return lab
        if cls == "dropout":
            training = OpView(u, self.gm, "dropout", self.modules).get("training", False)
            if u.op == "call_module":
                training = self.modules[u.target].training
            if training:
                self.block(f"{u.name} is a dropout in training mode", lab)
                return None
            return lab
        if cls in ("mul",) or name in ("div", "truediv"):
            args = list(u.args)
            others = [a for a in args if a is not src]
            if len(others) != len(args) - 1:
                self.block(f"{u.name} multiplies {src.name} by itself", lab)
                return None
            other = others[0] if others else None
            if name in ("div", "truediv") and (args[0] is not src or isinstance(other, fx.Node)):
                self.block(f"{u.name} divides by a computed value", lab)
                return None
            if isinstance(other, fx.Node):
                if _derived_from(self.producer, other, self.order):
                    self.block(f"{u.name} multiplies two values computed from {self.producer.name}", lab)
                    return None
                shape = env[u].shape
                try:
                    return torch.broadcast_to(lab, shape).contiguous()
                except RuntimeError:
                    self.block(f"{u.name} broadcasts {src.name}'s channels", lab)
                    return None
            if isinstance(other, (int, float)) and not isinstance(other, bool) and other != 0:
                return lab
            self.block(f"{u.name} multiplies by {other!r}", lab)
            return None
        if cls in ("scaled_dot_product_attention", "matmul", "bmm"):
            view = OpView(u, self.gm, cls, self.modules)
            ins = view.inputs()
            value = ins[2] if cls == "scaled_dot_product_attention" else ins[1]
            if value is not src:
                self.block(f"{src.name} reaches {u.name} as {'a query or key' if cls.startswith('scaled') else 'its left operand'}", lab)
                return None
            # the attention weights may depend on the producer (GPT-2's c_attn makes q, k and v):
            # the query / key paths are followed too and block the channels they carry, so a
            # scaled channel never reaches them
            if lab.dim() < 2 or not bool((lab == lab[..., :1, :]).all()):
                self.block(f"the channels of {src.name} vary along the sequence", lab)
                return None
            out = env[u]
            try:
                return torch.broadcast_to(lab[..., :1, :], out.shape).contiguous()
            except RuntimeError:
                self.block(f"{u.name}: unexpected value shape", lab)
                return None
        if name in _IDENTITY_OPS:
            return lab
        if cls in ("reshape", "permute", "transpose", "flatten") or name in _SHAPE_OPS or cls == "getitem":
            try:
                if u.op == "call_function":
                    return u.target(*_sub(u.args, src, lab, env), **_sub(u.kwargs, src, lab, env))
                if u.op == "call_method":
                    if u.args[0] is not src or any(a is src for a in u.args[1:]):
                        raise TypeError("channel source is not self")
                    args = _sub(u.args, src, lab, env)
                    return getattr(args[0], u.target)(*args[1:], **_sub(u.kwargs, src, lab, env))
                if u.op == "call_module":
                    return self.modules[u.target](lab)
            except Exception as e:  # noqa: BLE001 - an op the labels cannot go through blocks them
                self.block(f"{u.name} ({name}) cannot be followed: {type(e).__name__}", lab)
                return None
        what = cls or name
        self.block(f"{src.name} reaches {u.name} ({what})", lab)
        return None


# ------------------------------------------------------------------------------ finding groups
def _constant(gm: fx.GraphModule, v: Any) -> Optional[torch.Tensor]:
    if isinstance(v, torch.Tensor):
        return v
    if isinstance(v, fx.Node) and v.op == "get_attr":
        t = get_attr_value(gm, str(v.target))
        return t if isinstance(t, torch.Tensor) else None
    return None


def _producer_size(gm: fx.GraphModule, node: fx.Node, cls: str, modules) -> Tuple[Optional[int], str]:
    view = OpView(node, gm, cls, modules)
    w = _constant(gm, view.get("weight"))
    if cls in ("layer_norm", "rms_norm"):
        if w is None:
            return None, f"{node.name} has no constant affine weight to absorb a scale"
        if w.dim() != 1:
            return None, f"{node.name} normalises over more than the last dim"
        b = view.get("bias") if cls == "layer_norm" else None
        if b is not None and _constant(gm, b) is None:
            return None, f"{node.name}'s bias is not a constant"
        return int(w.numel()), ""
    if w is None or w.dim() != 2:
        return None, f"{node.name}'s weight is not a constant matrix"
    b = view.get("bias")
    if b is not None and _constant(gm, b) is None:
        return None, f"{node.name}'s bias is not a constant"
    return int(w.shape[0]), ""


def group_label(g: Group) -> str:
    return g.describe()


def find_groups(gm: fx.GraphModule, inputs: Sequence[Any], scale_nodes: bool = False,
                values: Optional[Dict[fx.Node, Any]] = None) -> Tuple[List[Group], List[Refusal]]:
    """Every exact group of ``gm`` (and, with ``scale_nodes``, a scale-node group for each set of
    linears sharing an input that no exact group covers), and every refused producer with its
    reason.  ``inputs``: one batch the graph runs on to learn its concrete sizes."""
    modules = dict(gm.named_modules())
    env = values if values is not None else run_recording(gm, inputs, keep_all=True)
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    groups: List[Group] = []
    refused: List[Refusal] = []
    covered = set()
    for node in gm.graph.nodes:
        cls = classify(node, modules)
        if cls not in ("layer_norm", "rms_norm", "linear"):
            continue
        if not isinstance(env.get(node), torch.Tensor) or not env[node].is_floating_point():
            continue
        size, why = _producer_size(gm, node, cls, modules)
        if size is None:
            refused.append(Refusal(node, why))
            continue
        if env[node].shape[-1] != size:
            refused.append(Refusal(node, f"{node.name}'s output does not have its {size} channels last"))
            continue
        w = _Walk(gm, node, size, env, modules, order)
        w.run()
        if not w.consumers:
            first = w.blocked[0][0] if w.blocked else "its output is not used"
            refused.append(Refusal(node, f"no linear reads {node.name}'s channels ({first})"))
            continue
        scaled = torch.unique(torch.cat([c.channels for c in w.consumers]))
        clash = [why for why, chans in w.blocked if bool(torch.isin(chans, scaled).any())]
        if clash:
            names = ", ".join(c.node.name for c in w.consumers)
            refused.append(Refusal(node, f"{node.name} -> {names} is not exact: {clash[0]}"))
            continue
        kind = "linear" if cls == "linear" else "norm"
        groups.append(Group(node, kind, size, w.consumers, scaled))
        covered.update(c.node for c in w.consumers)
    if scale_nodes:
        by_input: Dict[fx.Node, List[fx.Node]] = {}
        for node in gm.graph.nodes:
            if node in covered or classify(node, modules) != "linear":
                continue
            x = OpView(node, gm, "linear", modules).get("input")
            if not isinstance(x, fx.Node) or not isinstance(env.get(x), torch.Tensor) or not env[x].is_floating_point():
                continue
            if _constant(gm, OpView(node, gm, "linear", modules).get("weight")) is None:
                continue
            by_input.setdefault(x, []).append(node)
        for x, linears in by_input.items():
            K = int(env[x].shape[-1])
            idx = torch.arange(K)
            groups.append(Group(x, "scale_node", K, [Consumer(n, idx.clone()) for n in linears], idx.clone()))
    return groups, refused


def consumers_of(groups: Iterable[Group]) -> Dict[fx.Node, Group]:
    return {c.node: g for g in groups for c in g.consumers}
