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

Observers exist only between ``observe`` and ``convert``, so they stay ``call_module`` nodes; so do
the quantizer modules of the other methods (fp8, dynamic, group-wise, binary) that are not yet in
this form.  :func:`quantizer_module` reads both forms, which is what every consumer uses.
"""
from __future__ import annotations

from typing import Any, Optional, Tuple

import torch
import torch.fx as fx
import torch.nn as nn

from .numerics import FakeQuantize, Observer, qops  # noqa: F401  (qops registers the ops)

__all__ = ["QUANTIZER_OPS", "holder_target", "quantizer_module", "is_quantizer_call", "graph_call",
           "insert_quantizer", "QUANTIZER_TYPES"]

_Q = torch.ops.qpasses

#: the custom ops a holder-backed quantizer node calls: ``op(x, scale, zero_point, *constants)``
QUANTIZER_OPS = frozenset({
    _Q.fake_quant_per_tensor.default, _Q.fake_quant_per_channel.default,
    _Q.fake_quant_lsq_per_tensor.default, _Q.fake_quant_lsq_per_channel.default,
})

#: module types whose instances are quantizers or observers (for :func:`quantizer_module`'s default)
QUANTIZER_TYPES: Tuple[type, ...] = (Observer, FakeQuantize)


def is_quantizer_call(node: Any) -> bool:
    """``node`` is a ``call_function`` of a holder-backed quantizer op (:data:`QUANTIZER_OPS`)."""
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target in QUANTIZER_OPS


def holder_target(node: Any) -> Optional[str]:
    """The module path behind a quantizer node: a ``call_module`` node's target, or, for a
    quantizer op call, the module whose ``scale`` its ``get_attr`` reads.  ``None`` otherwise."""
    if not isinstance(node, fx.Node):
        return None
    if node.op == "call_module":
        return node.target
    if node.op == "call_function" and node.target in QUANTIZER_OPS and len(node.args) > 1:
        s = node.args[1]
        if isinstance(s, fx.Node) and s.op == "get_attr" and isinstance(s.target, str) and "." in s.target:
            return s.target.rsplit(".", 1)[0]
    return None


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


def graph_call(fq: FakeQuantize) -> Tuple[Any, Tuple[str, ...], Tuple[Any, ...]]:
    """``(op, tensor attribute names, constants)``: ``fq``'s forward is
    ``op(x, *(getattr(fq, a) for a in names), *constants)``."""
    if fq.axis is None:
        op = _Q.fake_quant_lsq_per_tensor if fq.learnable else _Q.fake_quant_per_tensor
        return op.default, ("scale", "zero_point"), (int(fq.qmin), int(fq.qmax))
    op = _Q.fake_quant_lsq_per_channel if fq.learnable else _Q.fake_quant_per_channel
    return op.default, ("scale", "zero_point"), (int(fq.axis), int(fq.qmin), int(fq.qmax))


def insert_quantizer(ctx: Any, x: fx.Node, target: str, *, before: Optional[fx.Node] = None,
                     after: Optional[fx.Node] = None) -> fx.Node:
    """Insert the node form of the quantizer held at ``target`` (a ``FakeQuantize`` already
    registered there) reading ``x``; returns the op node (it carries ``x``'s shape records).

    ``ctx`` is a :class:`~qpasses.context.RewriteContext`.  Placed after ``after`` (else before
    ``before``); the ``get_attr`` nodes go right before the op node."""
    fq = ctx.modules.get(target)
    if not isinstance(fq, FakeQuantize):
        raise TypeError(f"{target} holds {type(fq).__name__}, not a FakeQuantize")
    op, names, consts = graph_call(fq)
    if after is not None:
        first = ctx.get_attr(f"{target}.{names[0]}", after=after)
    else:
        first = ctx.get_attr(f"{target}.{names[0]}", before=before)
    attrs = [first]
    for a in names[1:]:
        attrs.append(ctx.get_attr(f"{target}.{a}", after=attrs[-1]))
    for n, a in zip(attrs, names):
        t = getattr(fq, a)
        n.meta["qpasses.shape"] = tuple(t.shape)
        n.meta["qpasses.dtype"] = t.dtype
    return ctx.insert("call_function", op, (x, *attrs, *consts), after=attrs[-1], like=x, name=target.replace(".", "_"))
