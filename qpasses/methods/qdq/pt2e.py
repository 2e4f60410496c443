"""Actions and constraints of the ``qdq`` rule family (``qpasses/methods/qdq/qdq.yaml``): quantizers frozen into
PT2E's folded Q/DQ convention.

(Not to be confused with :mod:`qpasses.methods.qdq.actions`, the constraint of the ``qdq_cleanup`` family.)

A converted graph (after ``ptq_int8``, ``int_only`` with ``integerize=false``, ``qat_convert``,
``w4a16`` or ``dynamic_int8``) holds its quantizers as ``call_module`` nodes: ``act_q_N`` reading
an activation, ``weight_fq_N(get_attr weight)`` reading a constant weight.  This family replaces
each of them by ``call_function`` nodes that torch.export, torch.onnx and Inductor's x86 int8
passes (with freezing) understand, the form ``torchao.quantization.pt2e.convert_pt2e(fold_quantize=True)``
produces:

* **weights** -- the integer codes are computed here, once, from the quantizer's own output on
  the constant, and stored as an ``int8`` (``uint8`` for an unsigned range) buffer read by
  ``get_attr``; ``quantized_decomposed.dequantize_per_channel`` (per-channel scales along the
  quantizer's axis, 0 for conv / linear) or ``dequantize_per_tensor`` turns them back into the
  weight.  A dequantization has no range (``(q - zp) * s``), so narrow (``[-127, 127]``) and
  4-bit weight codes are exact in an int8 container; the action checks that the
  dequantized weight equals the fake-quantized one bit for bit before it rewrites anything;
* **activations** (per tensor, fixed qparams) -- ``quantize_per_tensor -> dequantize_per_tensor``
  in ``uint8``: a range inside ``[0, 255]`` as it is, a signed one inside ``[-128, 127]`` shifted by
  128 (zero point + 128: ``clamp(round(x/s), -128, 127) + 128 = clamp(round(x/s) + 128, 0, 255)``
  on integers, so the codes and the dequantized values are the same).  One ``quantize`` node per
  quantizer and one ``dequantize`` per reader (PT2E's convention, which Inductor's patterns need:
  they consume a dequantize with a single user);
* **what quantized_decomposed cannot express exactly** stays a ``torch.ops.qpasses.*`` custom op
  (:mod:`qpasses.numerics.qops`) as a ``call_function`` node with frozen (``get_attr``) qparams:
  a range narrower than the uint8 container (``[-127, 127]``, 4-bit activations), LSQ (its forward
  divides by the scale and clamps before rounding), per-channel activations, group-wise int4
  weights (``fake_quant_per_group``) and dynamic activations other than per-tensor affine 8-bit
  (their graph form is already a custom op call: ``fake_quant_per_token``,
  ``fake_quant_dynamic_per_slice``, a symmetric ``fake_quant_dynamic_per_tensor``);
* **dynamic per-tensor affine 8-bit activations** (``dynamic_int8`` with
  ``granularity=per_tensor``) -- PT2E's dynamic form: ``choose_qparams.tensor`` ->
  ``quantize_per_tensor.tensor`` -> one ``dequantize_per_tensor.tensor`` per reader, in uint8
  (what ``convert_pt2e`` writes for ``X86InductorQuantizer``'s dynamic config, and what Inductor's
  x86 int8 linear patterns take).  A per-tensor custom quantizer whose codes fit 8 bits is followed by
  a full-range ``uint8`` Q/DQ pair with the same scale and zero point: its output lies on that
  grid already (``|q - z| <= 255``, so ``round(((q - z) s) / s)`` is ``q - z`` exactly), the pair
  is the identity, and the engines see an int8 tensor.  Each such choice is a refusal of
  the rule that would have used quantized_decomposed, with its reason, in ``pm.report``.
"""
from __future__ import annotations

import operator
from typing import Any, Optional, Tuple

import torch
import torch.ao.quantization.fx._decomposed  # noqa: F401  registers torch.ops.quantized_decomposed
import torch.fx as fx

from ...context import Refuse
from ...kernels.lowering import Int4GroupFakeQuantize
from ...lang.registry import action, constraint
from ...matcher import MatchContext
from ...numerics import FakeQuantize
from ...qnodes import DYNAMIC_QUANTIZER_OPS, drop_dead, is_dynamic_quantizer
from ...opclasses import get_attr_value, register_module_class
from .._graphutil import copy_meta

register_module_class(Int4GroupFakeQuantize, "group_fq")

QD = torch.ops.quantized_decomposed
QP = torch.ops.qpasses
QDQ_KEY = "qpasses.qdq"

_F32_EPS = torch.finfo(torch.float32).eps

#: quantized_decomposed ops that read activations / weights in the frozen form
Q_TENSOR = QD.quantize_per_tensor.default
DQ_TENSOR = QD.dequantize_per_tensor.default
DQ_CHANNEL = QD.dequantize_per_channel.default
#: PT2E's dynamic per-tensor activation form (qparams as tensors, measured on every call)
CHOOSE_QPARAMS = QD.choose_qparams.tensor
Q_TENSOR_T = QD.quantize_per_tensor.tensor
DQ_TENSOR_T = QD.dequantize_per_tensor.tensor
#: qpasses custom quantizer ops the frozen form may keep
CUSTOM_OPS = (QP.fake_quant_per_tensor.default, QP.fake_quant_per_channel.default, QP.fake_quant_per_group.default,
              QP.fake_quant_lsq_per_tensor.default, QP.fake_quant_lsq_per_channel.default,
              *sorted(DYNAMIC_QUANTIZER_OPS, key=str))


# ------------------------------------------------------------------------------------------ helpers
def _module(ctx: MatchContext, node: Any):
    """The module a node calls, or the holder module of a quantizer op node (else None)."""
    return ctx.module(node) if isinstance(node, fx.Node) else None


def _constant(ctx: MatchContext, node: Any) -> Optional[torch.Tensor]:
    """The tensor a ``get_attr`` node reads, else None."""
    if isinstance(node, fx.Node) and node.op == "get_attr":
        v = get_attr_value(ctx.gm, node.target)
        return v if isinstance(v, torch.Tensor) else None
    return None


def _container(qmin: int, qmax: int) -> Optional[Tuple[torch.dtype, int]]:
    """``(dtype, shift)`` of an 8-bit container for activation codes in ``[qmin, qmax]``: uint8,
    signed ranges shifted by +128 (x86 Inductor's int8 patterns take uint8 activations)."""
    if 0 <= qmin and qmax <= 255:
        return torch.uint8, 0
    if -128 <= qmin and qmax <= 127:
        return torch.uint8, 128
    return None


def _weight_dtype(qmin: int, qmax: int) -> Optional[torch.dtype]:
    if -128 <= qmin and qmax <= 127:
        return torch.int8
    if 0 <= qmin and qmax <= 255:
        return torch.uint8
    return None


def _effective_scale(mod: FakeQuantize) -> torch.Tensor:
    """The scale the module's forward multiplies by (LSQ: ``max(|scale|, eps)``)."""
    s = mod.scale.detach().to(torch.float32)
    return torch.clamp(s.abs(), min=_F32_EPS) if mod.learnable else s


def _tag(node: fx.Node, form: str, **info) -> None:
    node.meta[QDQ_KEY] = dict(form=form, **info)


def _replace(ctx: MatchContext, old: fx.Node, new: fx.Node) -> None:
    copy_meta(old, new)
    old.replace_all_uses_with(new)
    ctx.graph.erase_node(old)


def _qdq_per_user(ctx: MatchContext, value: fx.Node, users, scale: float, zp: int, qmin: int, qmax: int,
                  dtype: torch.dtype, like: fx.Node, source: str) -> None:
    """``quantize_per_tensor(value)`` once, and one ``dequantize_per_tensor`` per reader in
    ``users`` (each reader is re-pointed from ``like`` to its own dequantization)."""
    with ctx.graph.inserting_after(value):
        q = ctx.graph.call_function(Q_TENSOR, (value, scale, zp, qmin, qmax, dtype))
    copy_meta(like, q)
    q.meta["qpasses.dtype"] = dtype
    _tag(q, "quantize_per_tensor", source=source)
    anchor = q
    for u in list(users):
        with ctx.graph.inserting_after(anchor):
            dq = ctx.graph.call_function(DQ_TENSOR, (q, scale, zp, qmin, qmax, dtype))
        copy_meta(like, dq)
        _tag(dq, "dequantize_per_tensor", source=source)
        u.replace_input_with(like, dq)
        anchor = dq


# ------------------------------------------------------------------------------------- constraints
def weight_reason(ctx: MatchContext, q: fx.Node) -> str:
    """Why the constant-weight quantizer ``q`` cannot be an integer constant read by a
    quantized_decomposed dequantization ('' when it can)."""
    mod = _module(ctx, q)
    if not isinstance(mod, FakeQuantize):
        return f"{q.name} is not a FakeQuantize"
    if not mod.enabled:
        return f"{q.name} is disabled (identity)"
    w = _constant(ctx, q.args[0] if q.args else None)
    if w is None or not w.is_floating_point():
        return f"{q.name} does not read a constant float tensor"
    if _weight_dtype(mod.qmin, mod.qmax) is None:
        return f"{q.name}: codes [{mod.qmin}, {mod.qmax}] do not fit an 8-bit container"
    if mod.axis is not None and not 0 <= (mod.axis % max(w.dim(), 1)) < w.dim():
        return f"{q.name}: axis {mod.axis} out of range for a {w.dim()}-d weight"
    return ""


def activation_reason(ctx: MatchContext, q: fx.Node) -> str:
    """Why the activation quantizer ``q`` cannot be ``quantize_per_tensor -> dequantize_per_tensor``
    in uint8 with the same numbers ('' when it can)."""
    mod = _module(ctx, q)
    if not isinstance(mod, FakeQuantize):
        return f"{q.name} is not a FakeQuantize"
    if not mod.enabled:
        return f"{q.name} is disabled (identity)"
    if mod.learnable:
        return (f"{q.name} is LSQ (x / s clamped before rounding): kept as qpasses::fake_quant_lsq_"
                f"{'per_tensor' if mod.axis is None else 'per_channel'}")
    if mod.axis is not None:
        return f"{q.name} is per channel (axis {mod.axis}) on an activation: kept as qpasses::fake_quant_per_channel"
    c = _container(mod.qmin, mod.qmax)
    if c is None:
        return f"{q.name}: range [{mod.qmin}, {mod.qmax}] wider than 8 bits: kept as qpasses::fake_quant_per_tensor"
    lo, hi = mod.qmin + c[1], mod.qmax + c[1]
    if (lo, hi) != (0, 255):
        return (f"{q.name}: range [{mod.qmin}, {mod.qmax}] ({mod.bits}-bit) is narrower than uint8 [0, 255] "
                f"after the shift: kept as qpasses::fake_quant_per_tensor, then a uint8 Q/DQ pair")
    return ""


@constraint("qdq_weight")
def qdq_weight(ctx: MatchContext, q: fx.Node):
    """The quantizer reads a constant weight and its codes fit an 8-bit (int8 / uint8) constant."""
    why = weight_reason(ctx, q)
    return not why, why


@constraint("qdq_activation")
def qdq_activation(ctx: MatchContext, q: fx.Node):
    """The activation quantizer is per tensor, fixed and full-range 8-bit (uint8, or int8 shifted)."""
    why = activation_reason(ctx, q)
    return not why, why


# ------------------------------------------------------------------------------------------ actions
def _codes(mod: FakeQuantize, w: torch.Tensor, dtype: torch.dtype):
    """``(codes, scale, zero_point, fake-quantized weight)`` of a constant weight, from the
    quantizer's own output: ``q = round(y / s) + z`` (exact: ``y = (q - z) s`` with ``|q - z| <= 255``)."""
    with torch.no_grad():
        y = mod(w.detach())
        s = _effective_scale(mod)
        z = mod.zero_point.detach().to(torch.int64)
        if mod.axis is None:
            sb, zb = s.reshape(()), z.reshape(())
        else:
            shape = [1] * w.dim()
            shape[mod.axis % w.dim()] = -1
            sb, zb = s.reshape(shape), z.reshape(shape)
        q = torch.round(y.to(torch.float32) / sb) + zb
        if bool(((q < mod.qmin) | (q > mod.qmax)).any()):
            raise Refuse(f"codes of the weight outside [{mod.qmin}, {mod.qmax}]")
    return q.to(dtype), s, z, y


@action("freeze_weight")
def freeze_weight(ctx: MatchContext, q: fx.Node):
    """A weight quantizer on a constant: int8 / uint8 codes (a buffer) read by
    ``dequantize_per_channel`` (``dequantize_per_tensor`` for one scale); bit-exact or refused."""
    why = weight_reason(ctx, q)
    if why:
        raise Refuse(why)
    mod = _module(ctx, q)
    src = q.args[0]
    w = _constant(ctx, src)
    dtype = _weight_dtype(mod.qmin, mod.qmax)
    codes, s, z, y = _codes(mod, w, dtype)
    lo, hi = int(torch.iinfo(dtype).min), int(torch.iinfo(dtype).max)
    with torch.no_grad():
        if mod.axis is None:
            scale, zp = float(s.reshape(())), int(z.reshape(()))
            back = DQ_TENSOR(codes, scale, zp, lo, hi, dtype)
        else:
            axis = mod.axis % w.dim()
            back = DQ_CHANNEL(codes, s.reshape(-1), z.reshape(-1), axis, lo, hi, dtype)
        if not torch.equal(back.to(y.dtype), y):
            diff = (back.to(y.dtype) - y).abs().max().item()
            raise Refuse(f"{q.name}: the dequantized codes differ from the fake-quantized weight by {diff:.3g}")
    cn = ctx.rewrite.add_param(f"{_base(src)}_int8" if dtype is torch.int8 else f"{_base(src)}_uint8", codes, q)
    if mod.axis is None:
        args = (cn, scale, zp, lo, hi, dtype)
        target = DQ_TENSOR
    else:
        sn = ctx.rewrite.add_param(f"{_base(src)}_scale", s.reshape(-1), q, requires_grad=False)
        zn = ctx.rewrite.add_param(f"{_base(src)}_zero_point", z.reshape(-1), q)
        args = (cn, sn, zn, axis, lo, hi, dtype)
        target = DQ_CHANNEL
    with ctx.graph.inserting_before(q):
        dq = ctx.graph.call_function(target, args)
    _tag(dq, "int_weight", dtype=str(dtype).replace("torch.", ""), qmin=int(mod.qmin), qmax=int(mod.qmax),
         axis=None if mod.axis is None else int(axis))
    _replace(ctx, q, dq)
    drop_dead(ctx, (src,))


def _base(node: fx.Node) -> str:
    return str(node.target).replace(".", "_")


def _qparam_nodes(ctx: MatchContext, q: fx.Node, mod, scale: torch.Tensor):
    sn = ctx.rewrite.add_param(f"{q.name}_scale", scale, q, requires_grad=False)
    zn = ctx.rewrite.add_param(f"{q.name}_zero_point", mod.zero_point.detach().to(torch.int32), q)
    return sn, zn


@action("keep_custom_quantizer")
def keep_custom_quantizer(ctx: MatchContext, q: fx.Node):
    """A FakeQuantize that quantized_decomposed cannot express exactly becomes the qpasses custom
    op its forward calls, with frozen qparams (``get_attr``); a per-tensor one whose codes fit
    8 bits is followed by a uint8 Q/DQ pair (the identity on its output)."""
    mod = _module(ctx, q)
    if not isinstance(mod, FakeQuantize):
        raise Refuse(f"{q.name} is not a FakeQuantize")
    x = q.args[0]
    if not mod.enabled:
        _replace_with_value(ctx, q, x)
        return
    s = mod.scale.detach().to(torch.float32).clone()
    if mod.axis is None:
        op = QP.fake_quant_lsq_per_tensor.default if mod.learnable else QP.fake_quant_per_tensor.default
        sn, zn = _qparam_nodes(ctx, q, mod, s)
        args = (x, sn, zn, int(mod.qmin), int(mod.qmax))
    else:
        op = QP.fake_quant_lsq_per_channel.default if mod.learnable else QP.fake_quant_per_channel.default
        sn, zn = _qparam_nodes(ctx, q, mod, s)
        args = (x, sn, zn, int(mod.axis), int(mod.qmin), int(mod.qmax))
    with ctx.graph.inserting_before(q):
        fq = ctx.graph.call_function(op, args)
    users = list(q.users)
    _tag(fq, "custom_op", op=str(op), reason=activation_reason(ctx, q) if _constant(ctx, x) is None
         else weight_reason(ctx, q))
    _replace(ctx, q, fq)
    c = _container(mod.qmin, mod.qmax)
    if mod.axis is None and c is not None and _constant(ctx, x) is None:
        es = float(_effective_scale(mod).reshape(()))
        zp = int(mod.zero_point.reshape(())) + c[1]
        _qdq_per_user(ctx, fq, users, es, zp, 0, 255, c[0], fq, q.name)


def _replace_with_value(ctx: MatchContext, q: fx.Node, x: Any) -> None:
    q.replace_all_uses_with(x)
    ctx.graph.erase_node(q)


@action("to_qdq")
def to_qdq(ctx: MatchContext, q: fx.Node):
    """A per-tensor 8-bit activation FakeQuantize becomes ``quantize_per_tensor`` (uint8) and one
    ``dequantize_per_tensor`` per reader."""
    why = activation_reason(ctx, q)
    if why:
        raise Refuse(why)
    mod = _module(ctx, q)
    dtype, shift = _container(mod.qmin, mod.qmax)
    x = q.args[0]
    scale = float(mod.scale.detach().to(torch.float32).reshape(()))
    zp = int(mod.zero_point.reshape(())) + shift
    users = list(q.users)
    if not users:
        raise Refuse(f"{q.name} has no readers")
    _qdq_per_user(ctx, x, users, scale, zp, mod.qmin + shift, mod.qmax + shift, dtype, q, q.name)
    ctx.graph.erase_node(q)


@action("freeze_group_weight")
def freeze_group_weight(ctx: MatchContext, q: fx.Node):
    """A group-wise int4 weight quantizer (``w4a16``) becomes ``qpasses::fake_quant_per_group`` on
    a constant, with frozen scales and zero points.  The op computes the grid value ``(q - z) s``
    the int4 kernel dequantizes; the module's straight-through forward is that value within a few
    ulps (checked; refused otherwise)."""
    mod = _module(ctx, q)
    src = q.args[0] if q.args else None
    w = _constant(ctx, src)
    if not isinstance(mod, Int4GroupFakeQuantize) or w is None or w.dim() != 2:
        raise Refuse(f"{q.name} does not read a constant [N, K] weight through Int4GroupFakeQuantize")
    s = mod.scales.detach().to(torch.float32)
    z = (torch.full_like(s, 8.0) if mod.zeros is None else mod.zeros.detach().to(torch.float32))
    zi = torch.round(z).to(torch.int32)
    if not torch.equal(zi.to(torch.float32), z):
        raise Refuse(f"{q.name}: zero points are not integers")
    with torch.no_grad():
        y = mod(w.detach())
        direct = QP.fake_quant_per_group.default(w.detach(), s, zi, mod.group_size, 0, 15)
        if not torch.equal(direct, y):   # integer zero points: the same op on the same qparams
            raise Refuse(f"{q.name}: qpasses::fake_quant_per_group with int32 zero points does not reproduce "
                         f"the weight")
    const = src
    old_qparams = [a for a in q.args[1:] if isinstance(a, fx.Node) and a.op == "get_attr"]   # the holder's
    sn = ctx.rewrite.add_param(f"{q.name}_scale", s, q, requires_grad=False)
    zn = ctx.rewrite.add_param(f"{q.name}_zero_point", zi, q)
    with ctx.graph.inserting_before(q):
        fq = ctx.graph.call_function(QP.fake_quant_per_group.default, (const, sn, zn, mod.group_size, 0, 15))
    _tag(fq, "custom_op", op="qpasses.fake_quant_per_group",
         reason="group-wise int4 weights: quantized_decomposed has no exact group-wise form for int4 codes",
         exact=True)
    _replace(ctx, q, fq)
    drop_dead(ctx, (src, *old_qparams))


def dynamic_reason(q: fx.Node) -> str:
    """Why the dynamic quantizer node ``q`` cannot be PT2E's dynamic per-tensor form
    (``choose_qparams.tensor`` -> ``quantize_per_tensor.tensor`` -> ``dequantize_per_tensor.tensor``
    in uint8), '' when it can."""
    info = is_dynamic_quantizer(q)
    if info is None:
        return f"{q.name} is not a dynamic quantizer node"
    if info.granularity != "per_tensor":
        return (f"{q.name}: dynamic {info.granularity} activation qparams have no quantized_decomposed form "
                f"(PT2E's dynamic activations are per tensor): kept as {q.target}")
    if info.symmetric or (info.qmin, info.qmax) != (0, 255):
        return (f"{q.name}: dynamic per-tensor range [{info.qmin}, {info.qmax}] (symmetric={info.symmetric}) is "
                f"not PT2E's affine uint8 [0, 255]: kept as {q.target}")
    return ""


@action("freeze_dynamic_fq")
def freeze_dynamic_fq(ctx: MatchContext, q: fx.Node):
    """A per-tensor affine 8-bit dynamic quantizer (``dynamic_int8`` with
    ``granularity=per_tensor``) becomes PT2E's dynamic form, which Inductor's x86 int8 linear
    patterns consume: ``choose_qparams.tensor(x, 0, 255, eps, uint8)`` once, then
    ``quantize_per_tensor.tensor`` and one ``dequantize_per_tensor.tensor`` per reader (all in uint8).
    ``eps`` is float32's, so the scale and zero point are the op's own, bit for bit; the codes are
    ``round(x * (1 / s))`` (quantized_decomposed's arithmetic) where the op computes
    ``round(x / s)``, which can differ by one code where ``x / s`` lies within a rounding error of a
    tie.  Any other dynamic quantizer is already a custom op with no qparams to freeze: it stays,
    and the refusal says why."""
    why = dynamic_reason(q)
    if why:
        raise Refuse(why)
    x = q.args[0]
    users = list(q.users)
    if not users:
        raise Refuse(f"{q.name} has no readers")
    with ctx.graph.inserting_before(q):
        cq = ctx.graph.call_function(CHOOSE_QPARAMS, (x, 0, 255, _F32_EPS, torch.uint8))
        s = ctx.graph.call_function(operator.getitem, (cq, 0))
        z = ctx.graph.call_function(operator.getitem, (cq, 1))
        qn = ctx.graph.call_function(Q_TENSOR_T, (x, s, z, 0, 255, torch.uint8))
    copy_meta(q, qn)
    qn.meta["qpasses.dtype"] = torch.uint8
    _tag(cq, "choose_qparams", source=q.name)
    _tag(qn, "quantize_per_tensor", source=q.name, dynamic=True)
    anchor = qn
    for u in users:
        with ctx.graph.inserting_after(anchor):
            dq = ctx.graph.call_function(DQ_TENSOR_T, (qn, s, z, 0, 255, torch.uint8))
        copy_meta(q, dq)
        _tag(dq, "dequantize_per_tensor", source=q.name, dynamic=True)
        u.replace_input_with(q, dq)
        anchor = dq
    ctx.graph.erase_node(q)


@action("no_qdq_form")
def no_qdq_form(ctx: MatchContext, q: fx.Node):
    """Always declines: the quantizer module has no frozen form (the report says which)."""
    mod = _module(ctx, q)
    kind = type(mod).__name__ if mod is not None else q.op
    raise Refuse(f"no frozen Q/DQ form for {kind} ({q.name}): left as a module")
