"""Actions of the ``lower`` family (``qpasses/methods/lower/lower_triton.yaml``) and of ``weight_int4``.

``lower_to_kernel`` replaces a fake-quantized weighted op by the integer kernel op that computes
the same thing:

* ``act FakeQuantize -> linear / conv2d <- weight FakeQuantize(constant)`` (``ptq_int8``, any
  weight bits <= 8) becomes ``quantize_int8(x) -> torch.ops.qpasses.int8_linear / int8_conv2d``
  with the int8 weight codes pre-packed at lowering time and stored as buffers, the activation
  zero point handled exactly inside the kernel, float (fp32) output;
* ``linear <- Int4GroupFakeQuantize(constant)`` with a float input (``w4a16``) becomes
  ``torch.ops.qpasses.int4_weight_only_linear`` on packed nibbles.

``lower_fp8_linear`` replaces a ``w8a8_fp8`` linear (weight through a per-channel
``Fp8FakeQuantize``) by ``torch.ops.qpasses.fp8_linear`` behind a shared ``quantize_fp8`` node
(static per-tensor input quantizer) or by ``dynamic_fp8_linear`` (dynamic per-token input), the
weight stored once as a float8_e4m3fn buffer.

``lower_dynamic_linear`` replaces ``linear(dyn_q(x), fq_w(W), b)`` (``dynamic_int8``) by
``torch.ops.qpasses.dynamic_int8_linear``: the same per-call activation quantization, then the
int8 GEMM with one zero point per row.

Everything else keeps its fake-quant (float) form and is refused with the reason
("no kernel for ..."), so ``pm.report`` lists it.

The family targets CUDA (constraint ``lower_device``): on the CPU the kernel ops run integer
reference code that is slower than the float layer it replaces, so a layer whose weight lives on
the CPU is refused with a reason pointing to :func:`qpasses.compile` (int8 through Inductor's x86
passes), unless the rule's ``device`` parameter is ``cpu`` (an explicit opt-in: reference
kernels, or Triton under ``TRITON_INTERPRET=1``).
"""
from __future__ import annotations

from typing import Any, Optional

import torch
import torch.fx as fx

from ...kernels import lowering as L
from ...kernels import packing
from ...lang.registry import action, constraint
from ...context import Refuse
from ...matcher import MatchContext
from ..dynamic.lib import dynamic_range
from ...numerics import FakeQuantize
from ...opclasses import get_attr_value
from .._graphutil import add_param, copy_meta, matches_any
from ...qnodes import drop_dead, fp8_dynamic_granularity, is_dynamic_quantizer
from ..ptq.actions import QUANT_KEY

LOWERED_KEY = "qpasses.lowered"


def _module(ctx: MatchContext, node: Any):
    """The module a node calls, or the holder module of a quantizer op node (else None)."""
    return ctx.module(node) if isinstance(node, fx.Node) else None


def _weight_quantizer(ctx: MatchContext, op: fx.Node):
    """``(weight node, its quantizer module, the constant get_attr node, the constant)`` or Nones."""
    wnode = ctx.view(op).get("weight")
    mod = _module(ctx, wnode)
    if mod is None or not isinstance(mod, (FakeQuantize, L.Int4GroupFakeQuantize)):
        return wnode, None, None, None
    src = wnode.args[0] if wnode.args else None
    if not (isinstance(src, fx.Node) and src.op == "get_attr"):
        return wnode, mod, None, None
    return wnode, mod, src, get_attr_value(ctx.gm, src.target)


def _weight_device(ctx: MatchContext, op: fx.Node) -> Optional[torch.device]:
    """The device of the layer's constant weight (its quantizer's input, the module's own weight or
    buffer), or None when it has none."""
    mod = _module(ctx, op)
    if mod is not None:
        for t in list(mod.parameters()) + list(mod.buffers()):
            return t.device
        return None
    _, _, _, w = _weight_quantizer(ctx, op)
    if w is None:
        w = _fp8_weight(ctx, op)[3]
    if w is None:
        w = ctx.view(op).tensor("weight")
    return w.device if isinstance(w, torch.Tensor) else None


CPU_REFUSAL = ("lower targets CUDA; on the CPU its integer reference kernels are slower than float: use "
               "qpasses.compile(qgm) for int8 on x86 CPUs (Inductor), or device='cpu' to lower anyway")


@constraint("lower_device", args={"device": {"choices": ("cuda", "cpu")}})
def lower_device(ctx: MatchContext, op: fx.Node, device: str = "cuda"):
    """The layer's weight is on a CUDA device, or ``device`` is ``cpu`` (explicit opt-in)."""
    if str(device) == "cpu":
        return True, ""
    dev = _weight_device(ctx, op)
    if dev is not None and dev.type == "cuda":
        return True, ""
    return False, f"{op.name}: weight on {dev.type if dev is not None else 'an unknown device'}: {CPU_REFUSAL}"


@constraint("weight_fake_quantized")
def weight_fake_quantized(ctx: MatchContext, op: fx.Node):
    """The weight of ``op`` is read through a FakeQuantize / Int4GroupFakeQuantize module."""
    wnode, mod, _, _ = _weight_quantizer(ctx, op)
    if mod is None:
        other = _module(ctx, wnode)
        if other is None:
            return False, f"the weight of {op.name} is not fake-quantized (float layer: nothing to lower)"
        return False, (f"the weight of {op.name} is read through {type(other).__name__}, which has no kernel "
                       f"(weights behind FakeQuantize or Int4GroupFakeQuantize are lowered)")
    return True, ""


def _const_bias(ctx: MatchContext, op: fx.Node) -> Optional[torch.Tensor]:
    view = ctx.view(op)
    if view.get("bias") is None:
        return None
    b = view.tensor("bias")
    if b is None:
        raise Refuse(f"no kernel for {op.name}: its bias is not a constant")
    return b.detach().to(torch.float32).reshape(-1)


def _pair(v, name: str, op: fx.Node):
    if isinstance(v, str):
        raise Refuse(f"no kernel for {op.name}: string {name}={v!r}")
    if isinstance(v, int):
        return [v, v]
    v = list(v)
    return v * 2 if len(v) == 1 else v


def _finish(ctx: MatchContext, op: fx.Node, new: fx.Node, info: dict, dead) -> None:
    copy_meta(op, new)
    for k in (QUANT_KEY, "qpasses.bits", "qpasses.module", "qpasses.module_type"):
        if k in op.meta:
            new.meta[k] = op.meta[k]
    new.meta[LOWERED_KEY] = info
    op.replace_all_uses_with(new)
    ctx.graph.erase_node(op)
    drop_dead(ctx, dead)


def _quantized_input(ctx: MatchContext, op: fx.Node, x_fq: fx.Node, qp) -> fx.Node:
    """One ``quantize_int8`` node per (value, qparams), shared by all the ops it feeds."""
    src = x_fq.args[0]
    args = (src, *qp)
    target = torch.ops.qpasses.quantize_int8.default
    for u in (src.users if isinstance(src, fx.Node) else ()):
        if (u.op == "call_function" and u.target is target and tuple(u.args) == args
                and u.meta.get("qpasses.lowered_from") == x_fq.name):
            return u                                   # placed right after x_fq, so before every user of it
    with ctx.graph.inserting_after(x_fq):
        node = ctx.graph.call_function(target, args)
    if "qpasses.shape" in x_fq.meta:
        node.meta["qpasses.shape"] = x_fq.meta["qpasses.shape"]
    node.meta["qpasses.dtype"] = torch.int8
    node.meta["qpasses.lowered_from"] = x_fq.name
    return node


def _lower_int8(ctx: MatchContext, op: fx.Node, wfq, wsrc, w, out_dtype: torch.dtype) -> None:
    view = ctx.view(op)
    ins = view.inputs()
    x_fq = ins[0] if ins else None
    afq = _module(ctx, x_fq)
    if not isinstance(afq, FakeQuantize):
        raise Refuse(f"no kernel for {op.name}: int8 weights with a float (not fake-quantized) input")
    qp = L.act_int8_params(afq)
    if qp is None:
        raise Refuse(f"no kernel for {op.name}: its input quantizer ({afq.extra_repr()}) is not per-tensor "
                     f"with at most 256 levels")
    wc = L.int8_weight_codes(wfq, w)
    if wc is None:
        raise Refuse(f"no kernel for {op.name}: weight quantizer ({wfq.extra_repr()}) is not symmetric int8 "
                     f"per output channel")
    codes, w_scale = wc
    bias = _const_bias(ctx, op)
    out_zp = qp[1] - qp[4]                                   # activation zero point in the int8 domain
    if view.opclass == "linear":
        K = codes.shape[1]
        from ...kernels.library import MAX_K_INT8_ZP
        if K > MAX_K_INT8_ZP:
            raise Refuse(f"no kernel for {op.name}: K={K} could overflow the int32 accumulator")
        xq, wp, xs, ws, bn = _int8_operands(ctx, op, x_fq, qp, packing.pack_int8_weight(codes), w_scale, bias)
        with ctx.graph.inserting_before(op):
            new = ctx.graph.call_function(torch.ops.qpasses.int8_linear.default,
                                          (xq, xs, wp, ws, bn, "none", out_dtype, out_zp))
        kernel = "int8_linear"
    elif view.opclass == "conv2d":
        stride = _pair(view.get("stride", 1), "stride", op)
        padding = _pair(view.get("padding", 0), "padding", op)
        dilation = _pair(view.get("dilation", 1), "dilation", op)
        groups = int(view.get("groups", 1) or 1)
        shape = x_fq.meta.get("qpasses.shape")
        if shape is not None and len(shape) != 4:
            raise Refuse(f"no kernel for {op.name}: conv2d on a {len(shape)}-d input (needs NCHW)")
        xq, wp, xs, ws, bn = _int8_operands(ctx, op, x_fq, qp, packing.pack_int8_conv_weight(codes), w_scale,
                                            bias)
        with ctx.graph.inserting_before(op):
            new = ctx.graph.call_function(torch.ops.qpasses.int8_conv2d.default,
                                          (xq, xs, wp, ws, bn, stride, padding, dilation, groups, "none",
                                           out_dtype, out_zp))
        kernel = "int8_conv2d"
    else:
        raise Refuse(f"no kernel for {view.opclass} ({op.name}): int8 kernels exist for linear and conv2d only")
    bias_node = view.get("bias")
    _finish(ctx, op, new, {"kernel": kernel, "w_bits": int(wfq.bits), "a_zero_point": out_zp}, [])
    drop_dead(ctx, [x_fq, ctx.state.get("lower.wnode"), wsrc, bias_node])


def _int8_operands(ctx: MatchContext, op: fx.Node, x_fq: fx.Node, qp, packed_w: torch.Tensor,
                   w_scale: torch.Tensor, bias: Optional[torch.Tensor]):
    """The int8 kernels' operands: the quantized input node and get_attr nodes for the packed
    weight, the activation scale, the weight scales and the bias (None without one)."""
    xq = _quantized_input(ctx, op, x_fq, qp)
    wp = add_param(ctx, "lowered_w", packed_w, op)
    xs = add_param(ctx, "lowered_xs", torch.tensor([qp[0]], dtype=torch.float32), op, requires_grad=False)
    ws = add_param(ctx, "lowered_ws", w_scale, op, requires_grad=False)
    bn = add_param(ctx, "lowered_b", bias, op, requires_grad=False) if bias is not None else None
    return xq, wp, xs, ws, bn


def _lower_int4(ctx: MatchContext, op: fx.Node, wq: L.Int4GroupFakeQuantize, wsrc, w) -> None:
    view = ctx.view(op)
    if view.opclass != "linear":
        raise Refuse(f"no kernel for {view.opclass} ({op.name}) with int4 group-wise weights (linear only)")
    ins = view.inputs()
    x = ins[0] if ins else None
    if isinstance(_module(ctx, x), FakeQuantize):
        raise Refuse(f"no kernel for {op.name}: int4 weights with a quantized input (W4A16 wants float "
                     f"activations)")
    bias = _const_bias(ctx, op)
    w_packed, scales, zeros = wq.packed(w)
    wp = add_param(ctx, "lowered_w4", w_packed, op)
    sn = add_param(ctx, "lowered_s4", scales, op, requires_grad=False)
    zn = add_param(ctx, "lowered_z4", zeros, op, requires_grad=False) if zeros is not None else None
    bn = add_param(ctx, "lowered_b", bias, op, requires_grad=False) if bias is not None else None
    bias_node = view.get("bias")
    with ctx.graph.inserting_before(op):
        new = ctx.graph.call_function(torch.ops.qpasses.int4_weight_only_linear.default,
                                      (x, wp, sn, zn, wq.group_size, bn))
    _finish(ctx, op, new, {"kernel": "int4_weight_only_linear", "w_bits": 4, "group_size": wq.group_size}, [])
    drop_dead(ctx, [ctx.state.get("lower.wnode"), wsrc, bias_node])


_OUT_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
               "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def _out_dtype(out_dtype: str) -> torch.dtype:
    if str(out_dtype) not in _OUT_DTYPES:
        from ...errors import OptionError
        raise OptionError(f"lower: out_dtype must be one of {sorted(_OUT_DTYPES)}, got {out_dtype!r}")
    return _OUT_DTYPES[str(out_dtype)]


@action("lower_to_kernel", args={"out_dtype": {"choices": ("float32", "fp32", "float16", "fp16", "bfloat16", "bf16")}})
def lower_to_kernel(ctx: MatchContext, op: fx.Node, out_dtype: str = "float32", skip=()):
    """Replace a fake-quantized linear / conv2d by its integer kernel op (see module doc)."""
    if matches_any(op, skip):
        raise Refuse(f"{op.name} is in skip: left in fake-quant form")
    od = _out_dtype(out_dtype)
    wnode, mod, wsrc, w = _weight_quantizer(ctx, op)
    if mod is None:
        raise Refuse(f"{op.name}: float weight, nothing to lower")
    if w is None or not isinstance(w, torch.Tensor):
        raise Refuse(f"no kernel for {op.name}: its weight is not a constant")
    ctx.state["lower.wnode"] = wnode
    try:
        if isinstance(mod, L.Int4GroupFakeQuantize):
            _lower_int4(ctx, op, mod, wsrc, w)
        else:
            if int(mod.bits) > 8:
                raise Refuse(f"no kernel for {op.name}: {mod.bits}-bit weights (int8 kernels take <= 8 bits)")
            _lower_int8(ctx, op, mod, wsrc, w, od)
    finally:
        ctx.state.pop("lower.wnode", None)


# ================================================================================ w4a16 weights
@constraint("int4_weight_free")
def int4_weight_free(ctx: MatchContext, op: fx.Node):
    """``op`` reads a plain constant weight (not already quantized) of a linear layer."""
    view = ctx.view(op)
    w = view.get("weight")
    if _module(ctx, w) is not None:
        return False, f"the weight of {op.name} is already quantized"
    if view.tensor("weight") is None:
        return False, f"the weight of {op.name} is not a constant"
    return True, ""


@action("quantize_weight_int4", args={"group_size": {"min": 32, "max": 8192, "multiple_of": 32}})
def quantize_weight_int4(ctx: MatchContext, op: fx.Node, group_size: int = 128, symmetric: bool = True, skip=()):
    """Read the weight of a linear op through an :class:`Int4GroupFakeQuantize` (w4a16)."""
    if matches_any(op, skip):
        raise Refuse(f"{op.name} is in skip: left in float")
    if int(group_size) not in (32, 64, 128, 256) and (int(group_size) <= 0 or int(group_size) % 32):
        from ...errors import OptionError
        raise OptionError(f"w4a16: group_size must be a positive multiple of 32 (32/64/128), got {group_size}")
    from ..ptq.actions import attach_weight_quantizer
    view = ctx.view(op)
    w = view.tensor("weight")
    if w is None or w.dim() != 2:
        raise Refuse(f"{op.name}: weight is not a constant [N, K] matrix")
    fq = L.Int4GroupFakeQuantize.fit(w, int(group_size), bool(symmetric))
    attach_weight_quantizer(ctx, op, fq, "weight_fq4", {"bits": 4, "axis": 0, "group_size": int(group_size),
                                                       "symmetric": bool(symmetric)})


# ================================================================================ dynamic_int8
@action("lower_dynamic_linear", args={"out_dtype": {"choices": ("float32", "fp32", "float16", "fp16", "bfloat16", "bf16")}})
def lower_dynamic_linear(ctx: MatchContext, op: fx.Node, out_dtype: str = "float32", skip=()):
    """``linear(dyn_q(x), fq_w(W), b)`` (dynamic_int8) -> ``qpasses::dynamic_int8_linear``.

    The input quantizer must be a per-token (``fake_quant_per_token``) or per-tensor
    (``fake_quant_dynamic_per_tensor``) dynamic quantizer node of at most 8 bits, the weight quantizer symmetric per output channel with at most 8 bits and
    a constant weight.  The output keeps the input's dtype (as the fake-quant graph's does) unless
    ``out_dtype`` is ``float16`` / ``bfloat16``.
    """
    if matches_any(op, skip):
        raise Refuse(f"{op.name} is in skip: left in fake-quant form")
    od = _out_dtype(out_dtype)
    view = ctx.view(op)
    if view.opclass != "linear":
        raise Refuse(f"no kernel for {view.opclass} ({op.name}): dynamic_int8_linear is a linear kernel")
    ins = view.inputs()
    x_fq = ins[0] if ins else None
    dq = is_dynamic_quantizer(x_fq)
    if dq is None:
        raise Refuse(f"the input of {op.name} is not dynamically quantized")
    if dq.granularity not in ("per_token", "per_tensor") or dq.bits > 8 or \
            (dq.qmin, dq.qmax) != dynamic_range(dq.bits, dq.symmetric):
        raise Refuse(f"no kernel for {op.name}: its input quantizer ({dq.granularity}, range [{dq.qmin}, {dq.qmax}], "
                     f"symmetric={dq.symmetric}) is not a per-token or per-tensor dynamic quantizer of at most 8 bits")
    wnode, wfq, wsrc, w = _weight_quantizer(ctx, op)
    if not isinstance(wfq, FakeQuantize) or not isinstance(w, torch.Tensor):
        raise Refuse(f"no kernel for {op.name}: its weight is not a constant read through a FakeQuantize")
    if int(wfq.bits) > 8:
        raise Refuse(f"no kernel for {op.name}: {wfq.bits}-bit weights (int8 kernels take <= 8 bits)")
    wc = L.int8_weight_codes(wfq, w)
    if wc is None:
        raise Refuse(f"no kernel for {op.name}: weight quantizer ({wfq.extra_repr()}) is not symmetric int8 "
                     f"per output channel")
    codes, w_scale = wc
    if w_scale.numel() == 1:                                 # a per-tensor weight scale: one per channel
        w_scale = w_scale.expand(codes.shape[0]).clone()
    from ...kernels.library import MAX_K_INT8_ZP
    if codes.shape[1] > MAX_K_INT8_ZP:
        raise Refuse(f"no kernel for {op.name}: K={codes.shape[1]} could overflow the int32 accumulator")
    bias = _const_bias(ctx, op)
    wp = add_param(ctx, "lowered_w", packing.pack_int8_weight(codes), op)
    ws = add_param(ctx, "lowered_ws", w_scale, op, requires_grad=False)
    bn = add_param(ctx, "lowered_b", bias, op, requires_grad=False) if bias is not None else None
    per_token = dq.granularity == "per_token"
    bias_node = view.get("bias")
    with ctx.graph.inserting_before(op):
        new = ctx.graph.call_function(torch.ops.qpasses.dynamic_int8_linear.default,
                                      (x_fq.args[0], wp, ws, bn, int(dq.bits), bool(dq.symmetric), per_token,
                                       None if od is torch.float32 else od))
    _finish(ctx, op, new, {"kernel": "dynamic_int8_linear", "w_bits": int(wfq.bits), "a_bits": int(dq.bits),
                           "granularity": "per_token" if per_token else "per_tensor"}, [])
    drop_dead(ctx, [x_fq, wnode, bias_node])   # the weight get_attr goes with its quantizer


# ================================================================================ w8a8_fp8
def _fp8_weight(ctx: MatchContext, op: fx.Node):
    """``(weight node, its Fp8FakeQuantize, the constant get_attr node, the constant)`` or Nones."""
    from ...numerics.fp8 import Fp8FakeQuantize
    wnode = ctx.view(op).get("weight")
    mod = _module(ctx, wnode)
    if not isinstance(mod, Fp8FakeQuantize):
        return wnode, None, None, None
    src = wnode.args[0] if wnode.args else None
    if not (isinstance(src, fx.Node) and src.op == "get_attr"):
        return wnode, mod, None, None
    return wnode, mod, src, get_attr_value(ctx.gm, src.target)


def _add_buffer(ctx: MatchContext, prefix: str, value: torch.Tensor, before: fx.Node,
                after: Optional[fx.Node] = None) -> fx.Node:
    """Register ``value`` (a copy) as a buffer under a fresh name; a ``get_attr`` node reading it,
    placed before ``before`` (or after ``after``).  Buffers, not parameters: a float8 weight and
    its scales are constants of the deployed graph."""
    rw = ctx.rewrite
    name = rw.fresh_name(prefix)
    ctx.gm.register_buffer(name, value.detach().clone())
    n = rw.get_attr(name, before=None if after is not None else before, after=after)
    n.meta["qpasses.shape"] = tuple(value.shape)
    n.meta["qpasses.dtype"] = value.dtype
    return n


def _quantized_fp8_input(ctx: MatchContext, x_fq: fx.Node, scale: torch.Tensor):
    """``(quantize_fp8 node, its scale get_attr node)``: one pair per static fp8 activation
    quantizer, shared by every linear it feeds."""
    src = x_fq.args[0]
    target = torch.ops.qpasses.quantize_fp8.default
    for u in (src.users if isinstance(src, fx.Node) else ()):
        if (u.op == "call_function" and u.target is target
                and u.meta.get("qpasses.lowered_from") == x_fq.name):
            return u, u.args[1]                       # placed right after x_fq, so before every user of it
    sn = _add_buffer(ctx, "lowered_xs8", scale, x_fq, after=x_fq)
    with ctx.graph.inserting_after(sn):
        node = ctx.graph.call_function(target, (src, sn))
    if "qpasses.shape" in x_fq.meta:
        node.meta["qpasses.shape"] = x_fq.meta["qpasses.shape"]
    node.meta["qpasses.dtype"] = torch.float8_e4m3fn
    node.meta["qpasses.lowered_from"] = x_fq.name
    return node, sn


@action("lower_fp8_linear", args={"out_dtype": {"choices": ("float32", "fp32", "float16", "fp16", "bfloat16", "bf16")}})
def lower_fp8_linear(ctx: MatchContext, op: fx.Node, out_dtype: str = "float32", skip=()):
    """Replace a ``w8a8_fp8`` linear by ``fp8_linear`` (static per-tensor fp8 input: a shared
    ``quantize_fp8`` node in front) or ``dynamic_fp8_linear`` (dynamic per-token fp8 input), the
    weight stored as a float8_e4m3fn buffer with its fp32 scales (see module doc)."""
    from ...numerics.fp8 import Fp8DynamicQuantize, Fp8FakeQuantize
    if matches_any(op, skip):
        raise Refuse(f"{op.name} is in skip: left in fake-quant form")
    od = _out_dtype(out_dtype)
    view = ctx.view(op)
    if view.opclass != "linear":
        raise Refuse(f"no kernel for {view.opclass} ({op.name}) with fp8 weights: fp8_linear / "
                     f"dynamic_fp8_linear take linear layers only")
    wnode, wq, wsrc, w = _fp8_weight(ctx, op)
    if wq is None:
        raise Refuse(f"the weight of {op.name} is not read through an Fp8FakeQuantize")
    if not isinstance(w, torch.Tensor):
        raise Refuse(f"no kernel for {op.name}: its weight is not a constant")
    wc, why = L.fp8_weight_codes(wq, w)
    if wc is None:
        raise Refuse(f"no kernel for {op.name}: {why}")
    codes, w_scale = wc
    ins = view.inputs()
    x_fq = ins[0] if ins else None
    amod = _module(ctx, x_fq)
    shape = x_fq.meta.get("qpasses.shape") if isinstance(x_fq, fx.Node) else None
    if shape is not None and (len(shape) < 1 or shape[-1] != codes.shape[1]):
        raise Refuse(f"no kernel for {op.name}: input shape {tuple(shape)} does not end in K={codes.shape[1]}")
    xdt = x_fq.meta.get("qpasses.dtype") if isinstance(x_fq, fx.Node) else None
    if isinstance(xdt, torch.dtype) and xdt not in (torch.float32, torch.float16, torch.bfloat16):
        raise Refuse(f"no kernel for {op.name}: {xdt} input (the fp8 kernels take float32 / float16 / bfloat16)")
    if isinstance(amod, Fp8FakeQuantize):
        xs, why = L.fp8_act_scale(amod)
        if xs is None:
            raise Refuse(f"no kernel for {op.name}: {why}")
        activations = "static"
    elif isinstance(amod, Fp8DynamicQuantize) or fp8_dynamic_granularity(x_fq) is not None:
        if amod is not None and not amod.enabled:
            raise Refuse(f"no kernel for {op.name}: its input fp8 quantizer is disabled")
        per_token = amod.per_token if amod is not None else fp8_dynamic_granularity(x_fq) == "per_token"
        if not per_token:
            raise Refuse(f"no kernel for {op.name}: dynamic per-tensor fp8 input (dynamic_fp8_linear "
                         f"quantizes per token)")
        activations = "dynamic"
    else:
        from ...qnodes import quantizer_module
        other = quantizer_module(ctx.modules, x_fq)
        if other is None and getattr(amod, "bits", None) is not None:
            other = amod                                 # another method's quantizer module (call_module)
        what = "a float (not fp8-quantized) input" if other is None else f"a {type(other).__name__} input"
        raise Refuse(f"no kernel for {op.name}: fp8 weights with {what} (no weight-only fp8 kernel)")
    bias = _const_bias(ctx, op)
    bias_node = view.get("bias")
    wn = _add_buffer(ctx, "lowered_w8", codes, op)
    wsn = _add_buffer(ctx, "lowered_ws8", w_scale, op)
    bn = _add_buffer(ctx, "lowered_b", bias, op) if bias is not None else None
    if activations == "static":
        xq, xsn = _quantized_fp8_input(ctx, x_fq, xs)
        with ctx.graph.inserting_before(op):
            new = ctx.graph.call_function(torch.ops.qpasses.fp8_linear.default, (xq, xsn, wn, wsn, bn, od))
        kernel = "fp8_linear"
    else:
        with ctx.graph.inserting_before(op):
            new = ctx.graph.call_function(torch.ops.qpasses.dynamic_fp8_linear.default,
                                          (x_fq.args[0], wn, wsn, bn, None if od is torch.float32 else od))
        kernel = "dynamic_fp8_linear"
    _finish(ctx, op, new, {"kernel": kernel, "w_bits": 8, "a_bits": 8, "format": "float8_e4m3fn",
                           "activations": activations,
                           "w_granularity": "per_tensor" if wq.axis is None else "per_channel"}, [])
    drop_dead(ctx, [x_fq, wnode, wsrc, bias_node])
