"""Quantizer nodes: the one graph form of a quantizer, and how code finds the module behind one.

A quantizer in a graph is one node.  For :class:`~qpasses.numerics.FakeQuantize` (fixed or LSQ,
per tensor or per channel) it is a ``call_function`` of its ``torch.library`` custom op, whose
scale and zero point are ``get_attr`` nodes reading the *holder* module's tensors::

    act_q_0_scale = get_attr act_q_0.scale
    act_q_0_zero_point = get_attr act_q_0.zero_point
    act_q_0 = qpasses.fake_quant_per_tensor.default(x, act_q_0_scale, act_q_0_zero_point, 0, 255)

The holder (``act_q_0``, a ``FakeQuantize``) is never called by the graph: it keeps the tensors
(so ``state_dict`` keys stay ``act_q_0.scale`` / ``act_q_0.zero_point``, and an LSQ scale is a
parameter an optimiser sees) and the plain attributes the back-ends read (``qmin``, ``qmax``,
``axis``, ``bits``, ``symmetric``, ``learnable``).  ``torch.export`` keeps the op one node.

Other quantizer kinds join this form by giving their module a ``graph_call()`` method returning
``(op, tensor attribute names, constants)`` (as :func:`graph_call` does for ``FakeQuantize``) and
their op a place in :data:`QUANTIZER_OPS`:

* the group-wise int4 weight quantizer (``Int4GroupFakeQuantize``):
  ``qpasses.fake_quant_per_group(w, get_attr q.scales, get_attr q.zeros | q.zero_point, group_size, 0, 15)``;
* the static fp8 quantizer (``Fp8FakeQuantize``): ``qpasses.fp8_fake_quant_per_tensor(x, get_attr
  q.scale)`` or ``qpasses.fp8_fake_quant_per_channel(w, get_attr q.scale, axis)``;
* ACIQ's per-channel-bits weight quantizer (``ChannelBitsFakeQuant``):
  ``qpasses.fake_quant_channel_bits(w, get_attr q.scale, q.qmax, q.gain, q.offset, axis)``.

A quantizer that keeps no tensors is a plain ``call_function`` of its op, with no holder: dynamic
fp8 (``qpasses.fp8_fake_quant_per_token(x)``, :func:`fp8_dynamic_granularity`) and the binary
quantizers (``qpasses.binary_sign(x)``, ``qpasses.binary_weight(w, axis, scale)``); such modules
give that call by ``stateless_call()`` (:func:`stateless_call`).

Observers exist only between ``observe`` and ``convert``, so they stay ``call_module`` nodes; so do
the quantizer modules of the other methods that are not yet in this form.
:func:`quantizer_module` reads both forms, which is what every consumer uses.

A *dynamic* activation quantizer (``dynamic_int8``) has no holder and no qparams to keep: it is one
``call_function`` node of a dynamic op (:data:`DYNAMIC_QUANTIZER_OPS`, op class ``dynamic_fq``),
``qpasses.fake_quant_per_token.default(x, 0, 255, False)`` and the like, whose bits, symmetry and
granularity :func:`is_dynamic_quantizer` reads back from its constants.
"""
from __future__ import annotations

import contextlib
from typing import Any, Iterable, NamedTuple, Optional, Tuple

import torch
import torch.fx as fx
import torch.nn as nn

from .numerics import FakeQuantize, Observer, qops  # noqa: F401  (qops registers the ops)
from .numerics.fp8 import FP8_DYNAMIC_OPS
from .opclasses import OpClass, holder_of, register_holder_op, register_op_class

__all__ = ["QUANTIZER_OPS", "holder_target", "quantizer_module", "is_quantizer_call", "graph_call", "as_quantizer_call", "as_module_call", "drop_dead", "bypassed",
           "insert_quantizer", "QUANTIZER_TYPES", "has_graph_call", "fp8_dynamic_granularity",
           "stateless_call", "DYNAMIC_QUANTIZER_OPS", "DynamicQuantizer", "is_dynamic_quantizer",
           "dynamic_quantizer_call"]

_Q = torch.ops.qpasses

#: the custom ops a holder-backed quantizer node calls: ``op(x, scale, zero_point, *constants)``
QUANTIZER_OPS = frozenset({
    _Q.fake_quant_per_tensor.default, _Q.fake_quant_per_channel.default,
    _Q.fake_quant_lsq_per_tensor.default, _Q.fake_quant_lsq_per_channel.default,
    _Q.fake_quant_per_group.default,
    _Q.fp8_fake_quant_per_tensor.default, _Q.fp8_fake_quant_per_channel.default,
    _Q.fake_quant_channel_bits.default,
})

#: module types whose instances are quantizers or observers (for :func:`quantizer_module`'s default)
QUANTIZER_TYPES: Tuple[type, ...] = (Observer, FakeQuantize)


for _op in QUANTIZER_OPS:
    register_holder_op(_op, 1)


def fp8_dynamic_granularity(node: Any) -> Optional[str]:
    """``"per_token"`` / ``"per_tensor"`` for a ``call_function`` node of a dynamic fp8 quantizer op
    (:data:`qpasses.numerics.fp8.FP8_DYNAMIC_OPS`: no holder, the scale measured at every call),
    else ``None``."""
    if not (isinstance(node, fx.Node) and node.op == "call_function"):
        return None
    try:
        per_token = FP8_DYNAMIC_OPS.get(node.target)
    except TypeError:   # unhashable target
        return None
    return None if per_token is None else ("per_token" if per_token else "per_tensor")


#: dynamic activation quantizers (qparams measured on the input at every call; no holder, no
#: ``get_attr``): ``op(x, [reduce_dim,] quant_min, quant_max, symmetric)``, op class ``dynamic_fq``
DYNAMIC_QUANTIZER_OPS = frozenset({
    _Q.fake_quant_per_token.default, _Q.fake_quant_dynamic_per_tensor.default,
    _Q.fake_quant_dynamic_per_slice.default,
})
_DYN_ARGS = ("input", "quant_min", "quant_max", "symmetric")
# spelled explicitly: the ops' schemas name their tensor ``x``, the op class reads it as ``input``
register_op_class(OpClass("dynamic_fq", _DYN_ARGS,
                          spellings={_Q.fake_quant_per_token.default: _DYN_ARGS,
                                     _Q.fake_quant_dynamic_per_tensor.default: _DYN_ARGS,
                                     _Q.fake_quant_dynamic_per_slice.default:
                                     ("input", "reduce_dim", "quant_min", "quant_max", "symmetric")}))


class DynamicQuantizer(NamedTuple):
    """What a dynamic quantizer node computes (:func:`is_dynamic_quantizer`)."""
    bits: int                     # bits of the code range (``(qmax - qmin).bit_length()``)
    symmetric: bool
    granularity: str              # "per_token" | "per_tensor" | "per_slice"
    reduce_dim: Optional[int]     # -1 per token, None per tensor, else the dim reduced
    qmin: int
    qmax: int


def is_dynamic_quantizer(node: Any) -> Optional[DynamicQuantizer]:
    """The :class:`DynamicQuantizer` a ``call_function`` node of a dynamic quantizer op
    (:data:`DYNAMIC_QUANTIZER_OPS`) computes, else ``None`` (also for a node whose constants are
    not plain Python values)."""
    if not (isinstance(node, fx.Node) and node.op == "call_function" and node.target in DYNAMIC_QUANTIZER_OPS):
        return None
    args = list(node.args)
    if node.kwargs:
        return None
    if node.target is _Q.fake_quant_dynamic_per_slice.default:
        if len(args) != 5:
            return None
        rd = args.pop(1)
        if not isinstance(rd, int):
            return None
        gran = "per_token" if rd == -1 else "per_slice"
    elif node.target is _Q.fake_quant_per_token.default:
        rd, gran = -1, "per_token"
    else:
        rd, gran = None, "per_tensor"
    if len(args) != 4:
        return None
    _, qmin, qmax, sym = args
    if not (isinstance(qmin, int) and isinstance(qmax, int) and isinstance(sym, bool)):
        return None
    return DynamicQuantizer(int(qmax - qmin).bit_length(), sym, gran, rd, qmin, qmax)


def dynamic_quantizer_call(bits: int, symmetric: bool, reduce_dim: Optional[int]) -> Tuple[Any, Tuple[Any, ...]]:
    """``(op, constants)``: the node ``op(x, *constants)`` quantizes ``x`` dynamically to ``bits``
    (symmetric: signed narrow ``[-(2^(b-1)-1), 2^(b-1)-1]``; else unsigned ``[0, 2^b - 1]``), one
    range per token (``reduce_dim=-1``), per tensor (``None``) or per slice reduced over ``reduce_dim``."""
    if symmetric:
        qmin, qmax = -(2 ** (bits - 1) - 1), 2 ** (bits - 1) - 1
    else:
        qmin, qmax = 0, 2 ** bits - 1
    if reduce_dim is None:
        return _Q.fake_quant_dynamic_per_tensor.default, (qmin, qmax, bool(symmetric))
    if reduce_dim == -1:
        return _Q.fake_quant_per_token.default, (qmin, qmax, bool(symmetric))
    return _Q.fake_quant_dynamic_per_slice.default, (int(reduce_dim), qmin, qmax, bool(symmetric))


def is_quantizer_call(node: Any) -> bool:
    """``node`` is a ``call_function`` of a holder-backed quantizer op (:data:`QUANTIZER_OPS`)."""
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target in QUANTIZER_OPS


def holder_target(node: Any) -> Optional[str]:
    """The module path behind a quantizer node: a ``call_module`` node's target, or, for a
    quantizer op call, the module whose ``scale`` its ``get_attr`` reads.  ``None`` otherwise."""
    return holder_of(node) if isinstance(node, fx.Node) else None


def _lookup(modules: Any, target: str) -> Optional[nn.Module]:
    if isinstance(modules, nn.Module):
        try:
            return modules.get_submodule(target)
        except AttributeError:
            return None
    return modules.get(target)


def quantizer_module(modules: Any, node: Any, kinds: Optional[Tuple[type, ...]] = QUANTIZER_TYPES) -> Any:
    """The quantizer (or observer) module behind ``node``, in either graph form, else ``None``.

    ``modules``: a graph module, ``dict(gm.named_modules())`` or a rewrite context's
    ``modules``.  ``kinds`` restricts the module types accepted (``None``: any module)."""
    t = holder_target(node)
    if t is None:
        return None
    mod = _lookup(modules, t)
    if mod is None or (kinds is not None and not isinstance(mod, kinds)):
        return None
    return mod


def has_graph_call(mod: Any) -> bool:
    """``mod`` is a quantizer module with an op form (a ``FakeQuantize``, or a module with a
    ``graph_call()`` method)."""
    return isinstance(mod, FakeQuantize) or callable(getattr(mod, "graph_call", None))


def stateless_call(mod: Any) -> Optional[Tuple[Any, Tuple[Any, ...]]]:
    """``(op, constants)`` for a quantizer module that keeps no tensors (its ``stateless_call()``:
    dynamic fp8, the binary quantizers): its graph node is the plain call ``op(x, *constants)``, with
    no module behind it.  ``None`` for anything else."""
    call = getattr(mod, "stateless_call", None)
    return call() if callable(call) else None


def graph_call(fq: nn.Module) -> Tuple[Any, Tuple[str, ...], Tuple[Any, ...]]:
    """``(op, tensor attribute names, constants)``: ``fq``'s forward is
    ``op(x, *(getattr(fq, a) for a in names), *constants)``.  ``fq`` is a ``FakeQuantize`` or a
    holder module with its own ``graph_call()`` (e.g. ``Int4GroupFakeQuantize``)."""
    if not isinstance(fq, FakeQuantize):
        call = getattr(fq, "graph_call", None)
        if not callable(call):
            raise TypeError(f"{type(fq).__name__} has no quantizer op form (no graph_call())")
        return call()
    if fq.axis is None:
        op = _Q.fake_quant_lsq_per_tensor if fq.learnable else _Q.fake_quant_per_tensor
        return op.default, ("scale", "zero_point"), (int(fq.qmin), int(fq.qmax))
    op = _Q.fake_quant_lsq_per_channel if fq.learnable else _Q.fake_quant_per_channel
    return op.default, ("scale", "zero_point"), (int(fq.axis), int(fq.qmin), int(fq.qmax))


def _attr_nodes(ctx: Any, target: str, names, before: fx.Node):
    out = []
    mod = ctx.modules.get(target)
    for a in names:
        n = ctx.get_attr(f"{target}.{a}", before=before)
        t = getattr(mod, a)
        n.meta["qpasses.shape"] = tuple(t.shape)
        n.meta["qpasses.dtype"] = t.dtype
        out.append(n)
    return out


def as_quantizer_call(ctx: Any, node: fx.Node) -> fx.Node:
    """Turn ``node`` -- a ``call_module`` of a quantizer with an op form (:func:`has_graph_call`),
    or a quantizer op call whose holder changed kind (e.g. LSQ frozen to fixed) -- into the op call
    of the module it names, in place (same name, place and users).  Returns ``node``."""
    target = holder_target(node)
    fq = ctx.modules.get(target) if target is not None else None
    if not has_graph_call(fq) or node.op not in ("call_module", "call_function"):
        raise TypeError(f"{node.name} does not call a quantizer with an op form "
                        f"({type(fq).__name__ if fq is not None else 'no module'})")
    x = node.args[0]
    old = [a for a in node.args[1:] if isinstance(a, fx.Node)] if node.op == "call_function" else []
    op, names, consts = graph_call(fq)
    attrs = _attr_nodes(ctx, target, names, before=node)
    ctx.rewrite_call(node, "call_function", op, (x, *attrs, *consts))
    for a in old:
        ctx.erase_if_unused(a)
    return node


def as_module_call(ctx: Any, node: fx.Node) -> fx.Node:
    """Turn a quantizer op call into a ``call_module`` of its holder, in place: for data steps
    that swap a quantizer for a stateful stand-in module at the same path (GENIE-M, LSQ's
    first-batch initialisation).  :func:`as_quantizer_call` turns it back.  Returns ``node``."""
    target = holder_target(node)
    if target is None:
        raise TypeError(f"{node.name} is not a quantizer node")
    if node.op == "call_module":
        return node
    old = [a for a in node.args[1:] if isinstance(a, fx.Node)]
    ctx.rewrite_call(node, "call_module", target, (node.args[0],))
    for a in old:
        ctx.erase_if_unused(a)
    return node


def _passthrough(x, *args):
    """What a bypassed quantizer node calls: its input, unchanged."""
    return x


@contextlib.contextmanager
def bypassed(gm: fx.GraphModule, nodes: Iterable[fx.Node]):
    """Within the block each quantizer op node of ``nodes`` returns its input (e.g. to run the
    float graph, or to capture a layer's float input); ``gm``'s code is regenerated on the way in
    and out.  Dynamic quantizer nodes (:data:`DYNAMIC_QUANTIZER_OPS`, dynamic fp8) are bypassed
    too.  Other nodes are left alone."""
    saved = [(n, n.target) for n in nodes
             if is_quantizer_call(n) or fp8_dynamic_granularity(n) is not None or is_dynamic_quantizer(n) is not None]
    for n, _ in saved:
        n.target = _passthrough
    if saved:
        gm.recompile()
    try:
        yield
    finally:
        for n, t in saved:
            n.target = t
        if saved:
            gm.recompile()


def drop_dead(ctx: Any, nodes) -> None:
    """Erase each of ``nodes`` that is unused and is a ``get_attr``, a module call or a quantizer
    op call (whose ``get_attr`` inputs then go too, when nothing else reads them), or a dynamic
    quantizer node.  A node listed twice, or listed and also reached as an input, is erased once."""
    gone = set()
    todo = list(nodes)
    while todo:
        n = todo.pop(0)
        if not isinstance(n, fx.Node) or n in gone or n.graph is not ctx.graph or n.users:
            continue
        if n.op in ("get_attr", "call_module"):
            ctx.erase(n)
            gone.add(n)
        elif is_quantizer_call(n) or fp8_dynamic_granularity(n) is not None or is_dynamic_quantizer(n) is not None:
            todo.extend(a for a in n.all_input_nodes if a.op == "get_attr")
            ctx.erase(n)
            gone.add(n)


def insert_quantizer(ctx: Any, x: fx.Node, target: str, *, before: Optional[fx.Node] = None,
                     after: Optional[fx.Node] = None) -> fx.Node:
    """Insert the node form of the quantizer held at ``target`` (a ``FakeQuantize``, or another
    module with an op form, already registered there) reading ``x``; returns the op node (it
    carries ``x``'s shape records).

    ``ctx`` is a :class:`~qpasses.context.RewriteContext`.  Placed after ``after`` (else before
    ``before``); the ``get_attr`` nodes go right before the op node."""
    fq = ctx.modules.get(target)
    if not has_graph_call(fq):
        raise TypeError(f"{target} holds {type(fq).__name__}, not a quantizer with an op form")
    op, names, consts = graph_call(fq)
    attrs = _attr_nodes(ctx, target, names, before=after.next if after is not None else before)
    return ctx.insert("call_function", op, (x, *attrs, *consts), after=attrs[-1], like=x, name=target.replace(".", "_"))
