"""Actions and constraints of the ``dynamic`` rule family (dynamic int8 quantization).

Representation after ``dynamic`` (both graph levels):

* a linear op with a constant weight (``nn.Linear`` call, ``F.linear``, ``aten.linear``) reads its
  input through a dynamic quantizer node -- one ``call_function`` of a custom op, no module
  (op class ``dynamic_fq``; :func:`~qpasses.qnodes.dynamic_quantizer_call`): per token
  ``qpasses.fake_quant_per_token.default(x, qmin, qmax, symmetric)``, per tensor
  ``qpasses.fake_quant_dynamic_per_tensor.default(x, qmin, qmax, symmetric)`` -- and its weight
  through a holder-backed per-output-channel symmetric narrow-range ``FakeQuantize`` node
  (``fake_quant_per_channel`` on ``get_attr`` weight, scale and zero point), PT2E's dynamic
  convention: ``linear(dyn_q(x), fq_w(W), b)``.  An ``nn.Linear`` call becomes ``F.linear`` on
  the module's own ``get_attr`` weight / bias, so ``state_dict`` keys are unchanged;
* each input of an activation x activation ``matmul`` / ``bmm`` goes through a dynamic quantizer
  node: per tensor, or with ``per_token`` one range per row of the left operand
  (``fake_quant_per_token``) and per column of the right one
  (``qpasses.fake_quant_dynamic_per_slice.default(b, -2, qmin, qmax, symmetric)``).

No calibration data is needed; the node meta ``qpasses.quant`` records
``{"dynamic": {...}}`` so static ``convert`` rules leave these ops alone.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.fx as fx

from ...lang.registry import action, constraint
from ...context import Refuse
from ...matcher import MatchContext
from .lib import quantize_weight_per_channel
from ...numerics import FakeQuantize
from ...qnodes import dynamic_quantizer_call, is_dynamic_quantizer
from ..ptq.actions import QUANT_KEY


def _rank(node) -> Optional[int]:
    if not isinstance(node, fx.Node):
        return None
    shape = node.meta.get("qpasses.shape")
    if shape is None and "val" in node.meta and hasattr(node.meta["val"], "shape"):
        shape = node.meta["val"].shape
    return None if shape is None else len(shape)


@constraint("constant_weight")
def constant_weight(ctx: MatchContext, node: fx.Node):
    """The op's weight is a constant tensor (module parameter or ``get_attr``), not an activation."""
    w = ctx.view(node).tensor("weight")
    return w is not None, f"the weight of {node.name} is not a constant tensor"


@constraint("dynamic_inputs")
def dynamic_inputs(ctx: MatchContext, node: fx.Node):
    """Both operands of the matmul already pass through a dynamic fake quant."""
    ins = ctx.view(node).inputs()[:2]
    ok = len(ins) == 2 and all(is_dynamic_quantizer(i) is not None for i in ins)
    return ok, (f"both inputs of {node.name} are already dynamically quantized" if ok else "")


@constraint("activation_operands")
def activation_operands(ctx: MatchContext, node: fx.Node):
    """Both operands are computed activations (not constants / parameters)."""
    ins = ctx.view(node).inputs()[:2]
    if len(ins) != 2:
        return False, f"{node.name} does not have two tensor operands"
    for i, a in enumerate(ins):
        if not isinstance(a, fx.Node) or a.op == "get_attr":
            return False, f"operand {i} of {node.name} is a constant (use a linear rule for weights)"
    return True, ""


@action("dynamic_linear", args={"w_bits": {"min": 2, "max": 8}, "a_bits": {"min": 2, "max": 8}, "granularity": {"choices": ("per_tensor", "per_token")}})
def dynamic_linear(ctx: MatchContext, op: fx.Node, w_bits: int = 8, a_bits: int = 8,
                   granularity: str = "per_token", symmetric: bool = False):
    """Make a constant-weight linear read a dynamic quantizer node and a per-channel weight quantizer.

    PT2E's dynamic form: ``linear(dyn_q(x), fake_quant_per_channel(get_attr W, ...), b)``, ``dyn_q``
    one call of ``qpasses::fake_quant_per_token`` (``granularity=per_token``) or
    ``qpasses::fake_quant_dynamic_per_tensor`` (``per_tensor``).  The
    weight quantizer is a holder-backed ``FakeQuantize`` (symmetric, narrow range, axis 0) with the
    scales of :func:`~qpasses.methods.dynamic.lib.quantize_weight_per_channel`; a module call becomes
    ``F.linear`` on the module's own ``get_attr`` weight / bias (``state_dict`` keys unchanged).
    The activation quantizer is shared per (value, configuration)."""
    from ..ptq.actions import attach_weight_quantizer
    view = ctx.view(op)
    w = view.tensor("weight")
    if w is None:
        raise Refuse(f"the weight of {op.name} is not a constant")
    if w.dim() != 2:
        raise Refuse(f"{op.name}: weight of shape {tuple(w.shape)} is not 2-D")
    if view.get("bias") is not None and view.tensor("bias") is None:
        raise Refuse(f"the bias of {op.name} is not a constant")
    x = view.inputs()[0]
    if not isinstance(x, fx.Node):
        raise Refuse(f"{op.name} has no activation input")
    if view.module is not None and (len(op.args) != 1 or op.kwargs):
        raise Refuse(f"{op.name} is called with extra arguments")
    fq = weight_quantizer_per_channel(w, int(w_bits))
    new = attach_weight_quantizer(ctx, op, fq, "weight_fq", {"bits": int(w_bits), "axis": 0})
    _dynamic_fq_on(ctx, new, x, int(a_bits), bool(symmetric), -1 if granularity == "per_token" else None)
    quant = dict(new.meta.get(QUANT_KEY) or {})
    quant["dynamic"] = {"w_bits": int(w_bits), "a_bits": int(a_bits), "granularity": str(granularity),
                        "symmetric": bool(symmetric)}
    new.meta[QUANT_KEY] = quant


def weight_quantizer_per_channel(w, bits: int) -> FakeQuantize:
    """The per-output-channel symmetric narrow-range ``FakeQuantize`` of a 2-D weight, with exactly
    the scales :func:`~qpasses.methods.dynamic.lib.quantize_weight_per_channel` computes."""
    _, scale = quantize_weight_per_channel(w, bits)
    qmax = 2 ** (bits - 1) - 1
    return FakeQuantize(scale, torch.zeros_like(scale), -qmax, qmax, axis=0, bits=bits, symmetric=True)


def _dynamic_fq_on(ctx: MatchContext, op: fx.Node, x: fx.Node, bits: int, symmetric: bool,
                   reduce_dim: Optional[int]) -> None:
    """``op`` reads ``x`` through the dynamic quantizer node of this configuration (one call of its
    custom op, :func:`~qpasses.qnodes.dynamic_quantizer_call`), shared per (value, configuration)."""
    target, consts = dynamic_quantizer_call(int(bits), bool(symmetric), reduce_dim)
    for u in x.users:
        if u is not op and u.op == "call_function" and u.target == target and u.args[0] is x and tuple(u.args[1:]) == consts and not u.kwargs:
            ctx.replace_input(op, x, u)
            return
    q = ctx.insert("call_function", target, (x, *consts), after=x, like=x, name="dyn_q")
    ctx.replace_input(op, x, q)


@action("dynamic_matmul", args={"a_bits": {"min": 2, "max": 8}, "granularity": {"choices": ("per_tensor", "per_token")}})
def dynamic_matmul(ctx: MatchContext, op: fx.Node, a_bits: int = 8, granularity: str = "per_token",
                   symmetric: bool = False):
    """Quantize both operands of an activation x activation matmul on the fly.

    ``per_token``: rows of the left operand and columns of the right one get their own range
    (both operands must be at least 2-D); ``per_tensor``: one range per operand.
    """
    ins = ctx.view(op).inputs()[:2]
    a, b = ins
    if a is b:
        raise Refuse(f"{op.name} multiplies a value by itself; not supported")
    if granularity == "per_token":
        ra, rb = _rank(a), _rank(b)
        if ra is None or rb is None:
            raise Refuse(f"{op.name}: operand ranks unknown (no shape meta), cannot quantize per token")
        if ra < 2 or rb < 2:
            raise Refuse(f"{op.name}: per-token quantization needs 2-D+ operands, got ranks {ra} and {rb}")
        dims = (-1, -2)
    else:
        dims = (None, None)
    _dynamic_fq_on(ctx, op, a, a_bits, symmetric, dims[0])
    _dynamic_fq_on(ctx, op, b, a_bits, symmetric, dims[1])
    op.meta[QUANT_KEY] = {"dynamic": {"a_bits": int(a_bits), "granularity": str(granularity),
                                      "symmetric": bool(symmetric)}}


@constraint("dynamic_input")
def dynamic_input(ctx: MatchContext, node: fx.Node):
    """The op's activation input already passes through a dynamic fake quant."""
    ins = ctx.view(node).inputs()
    ok = bool(ins) and is_dynamic_quantizer(ins[0]) is not None
    return ok, (f"the input of {node.name} is already dynamically quantized" if ok else "")


@action("dynamic_conv", args={"w_bits": {"min": 2, "max": 8}, "a_bits": {"min": 2, "max": 8}})
def dynamic_conv(ctx: MatchContext, op: fx.Node, w_bits: int = 8, a_bits: int = 8, symmetric: bool = False):
    """Convolution: the input is quantized per tensor on the fly (``fake_quant_dynamic_per_tensor``), the weight
    per output channel with qparams fixed here (the ``quantize_weight`` action of ``convert``)."""
    from ..ptq.actions import quantize_weight
    x = ctx.view(op).inputs()[0]
    if not isinstance(x, fx.Node):
        raise Refuse(f"{op.name} has no activation input")
    if ctx.view(op).tensor("weight") is None:
        raise Refuse(f"the weight of {op.name} is not a constant")
    _dynamic_fq_on(ctx, op, x, a_bits, symmetric, None)
    quantize_weight(ctx, op, bits=int(w_bits), per_channel=True)
