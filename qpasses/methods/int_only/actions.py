"""Actions of the ``integerize`` family: lower a calibrated fake-quant graph to integer arithmetic.

Stages (``qpasses/methods/int_only/integerize.yaml``):

1. ``qdq``: every activation ``FakeQuantize`` becomes ``dequantize_int(quantize_per_tensor_int(x))``
   (``Q`` / ``DQ``) -- numerically the same graph;
2. ``propagate``: ``DQ`` sinks below ops that commute with it exactly (ReLU = clamp at the zero
   point, max-pool, flatten / reshape / permute), and ``Q`` hoists above them (quantization is
   monotone, so ``Q(relu6(x)) == clamp(Q(x), Q(0), Q(6))`` exactly);
3. ``fuse``: the patterns ``Q(op(DQ(a), ...))`` become one integer op: int8 conv / linear with an
   int32 bias and a fixed-point requantization, residual add, concatenation, average pooling;
   ``Q(DQ(a))`` becomes a requantization (or nothing when the parameters agree);
4. ``fold``: a clamp after a requantizing op narrows that op's output range (ReLU / ReLU6 folded
   into the clamp).

Every integer value carries ``node.meta["qpasses.int"] = {"scale", "zp", "qmin", "qmax"}``.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional

import torch
import torch.fx as fx

from ...errors import StepError
from ...lang.registry import action, constraint, data_step
from ...context import Refuse
from ...matcher import MatchContext
from ... import kernels as _kernels  # noqa: F401  registers the int8 kernel ops
from . import lib as io
from ...numerics import FakeQuantize
from ...numerics.fixed_point import quantize_multiplier_tensor
from ...opclasses import OpClass, register_op_class
from .._graphutil import add_param, copy_meta, erase_if_unused

INT_KEY = "qpasses.int"
Q = io.INT_OPS["quantize_int"]
DQ = io.INT_OPS["dequantize_int"]
CONV = torch.ops.qpasses.int8_conv2d_requant.default
LINEAR = torch.ops.qpasses.int8_linear_requant.default


def _register(name: str, target, params, inputs=("input",), list_input: bool = False) -> None:
    register_op_class(OpClass(name, tuple(params), inputs=tuple(inputs), list_input=list_input,
                              spellings={target: tuple(params)}))


_register("quantize_int", Q, ("input", "scale", "zero_point", "qmin", "qmax"))
_register("dequantize_int", DQ, ("input", "scale", "zero_point"))
_register("int_requant", io.INT_OPS["int_requant"], ("input", "in_zp", "M0", "shift", "out_zp", "qmin", "qmax",
                                                     "left_shift"))
_register("int_clamp", io.INT_OPS["int_clamp"], ("input", "qmin", "qmax"))
_register("int_add", io.INT_OPS["int_add"], ("input", "a_zp", "a_M0", "a_shift", "other", "b_zp", "b_M0", "b_shift",
                                             "out_M0", "out_shift", "out_zp", "qmin", "qmax", "left_shift"),
          inputs=("input", "other"))
_register("int_cat", io.INT_OPS["int_cat"], ("tensors", "zps", "M0s", "shifts", "dim", "out_zp", "qmin", "qmax",
                                             "left_shift"),
          inputs=("tensors",), list_input=True)
_register("int_avg_pool", io.INT_OPS["int_avg_pool"], ("input", "kernel", "stride", "in_zp", "M0", "shift", "out_zp",
                                                       "qmin", "qmax", "left_shift"))
_register("int_conv2d", CONV, ("input", "x_zp", "w_q", "bias_int32", "M0", "shift", "out_zp", "qmin", "qmax",
                               "stride", "padding", "dilation", "groups"))
_register("int_linear", LINEAR, ("input", "x_zp", "w_q", "bias_int32", "M0", "shift", "out_zp", "qmin", "qmax"))
_register("int_conv2d_sr", io.INT_OPS["int_conv_sr"], ("input", "x_zp", "w_q", "bias_int32", "M0", "shift", "out_zp",
                                                       "qmin", "qmax", "stride", "padding", "dilation", "groups"))
_register("int_linear_sr", io.INT_OPS["int_linear_sr"], ("input", "x_zp", "w_q", "bias_int32", "M0", "shift",
                                                         "out_zp", "qmin", "qmax"))

#: ops whose output requantization has ``qmin``/``qmax`` arguments (positions from the schema)
_CLAMPABLE = {
    io.INT_OPS["int_requant"]: (5, 6), io.INT_OPS["int_add"]: (11, 12), io.INT_OPS["int_cat"]: (6, 7),
    io.INT_OPS["int_avg_pool"]: (7, 8), CONV: (7, 8), LINEAR: (7, 8), Q: (3, 4),
    io.INT_OPS["int_conv_sr"]: (7, 8), io.INT_OPS["int_linear_sr"]: (7, 8),
}


def _new(ctx: MatchContext, before: fx.Node, target, args, like: Optional[fx.Node] = None,
         qp: Optional[Dict[str, Any]] = None) -> fx.Node:
    with ctx.graph.inserting_before(before):
        n = ctx.graph.call_function(target, tuple(args))
    if like is not None:
        copy_meta(like, n)
    if qp is not None:
        n.meta[INT_KEY] = dict(qp)
        n.meta["qpasses.dtype"] = torch.int8
        n.meta["qpasses.int_dtype"] = torch.int8
    return n


def _qp_of_q(q: fx.Node) -> Dict[str, Any]:
    _, scale, zp, qmin, qmax = q.args
    return {"scale": float(scale), "zp": int(zp), "qmin": int(qmin), "qmax": int(qmax)}


def _int_qp(node: fx.Node, scale: float, zp: int) -> Dict[str, Any]:
    qp = node.meta.get(INT_KEY)
    if qp is not None:
        return qp
    return {"scale": float(scale), "zp": int(zp), "qmin": -128, "qmax": 127}


def _replace(ctx: MatchContext, old: fx.Node, new: fx.Node) -> None:
    old.replace_all_uses_with(new)
    ctx.graph.erase_node(old)


def _drop(ctx: MatchContext, *nodes) -> None:
    for n in nodes:
        if isinstance(n, fx.Node) and not n.users and n.graph is ctx.graph:
            erase_if_unused(ctx, n)


# ================================================================================= prepare
@constraint("feeds_activation")
def feeds_activation(ctx: MatchContext, node: fx.Node):
    """The node's only user is a ReLU / ReLU6 / hardtanh (which will be fused into its clamp)."""
    users = list(node.users)
    ok = len(users) == 1 and ctx.classify(users[0]) in ("relu", "relu6", "hardtanh")
    return ok, f"{node.name} feeds only {users[0].name}" if ok else ""


# ================================================================================= stage 1: Q/DQ
@constraint("activation_fake_quant")
def activation_fake_quant(ctx: MatchContext, fq: fx.Node):
    """A per-tensor FakeQuantize on an activation (not on a weight constant)."""
    mod = ctx.view(fq).module
    if not isinstance(mod, FakeQuantize):
        return False, f"{fq.name} is not a FakeQuantize"
    x = fq.args[0] if fq.args else None
    if isinstance(x, fx.Node) and x.op == "get_attr":
        return False, f"{fq.name} quantizes a constant (weight)"
    if mod.axis is not None:
        return False, f"{fq.name} is per-channel (axis={mod.axis}); integer activations are per-tensor"
    if not mod.enabled:
        return False, f"{fq.name} is disabled"
    return True, ""


@action("fq_to_qdq", replaces=True)
def fq_to_qdq(ctx: MatchContext, fq: fx.Node):
    """``fq(x)`` -> ``dequantize_int(quantize_per_tensor_int(x))`` with the FakeQuantize's qparams
    (uint8 ranges re-based into int8)."""
    mod: FakeQuantize = ctx.view(fq).module
    try:
        scale, zp, qmin, qmax, offset = io.int8_params(float(mod.scale.detach()), int(mod.zero_point),
                                                        mod.qmin, mod.qmax)
    except ValueError as e:
        raise Refuse(f"{fq.name}: {e}") from None
    qp = {"scale": scale, "zp": zp, "qmin": qmin, "qmax": qmax, "offset": offset}
    q = _new(ctx, fq, Q, (fq.args[0], scale, zp, qmin, qmax), like=fq, qp=qp)
    dq = _new(ctx, fq, DQ, (q, scale, zp), like=fq)
    dq.meta["qpasses.dtype"] = torch.float32
    _replace(ctx, fq, dq)


# ================================================================================= stage 2: propagate
_LAYOUT = ("flatten", "reshape", "permute", "transpose", "max_pool")


def _bound_code(ctx: MatchContext, op: fx.Node, scale: float, zp: int, qmin: int, qmax: int, exact: bool):
    """Integer clamp bounds ``(lo, hi)`` for a ReLU-like op on values quantized with (scale, zp).

    ``exact``: the real bounds must lie on the grid (when sinking DQ below the op); otherwise
    they are quantized (when hoisting Q above it, which is exact for any bound)."""
    cls = ctx.classify(op)
    if cls == "relu":
        lo_r, hi_r = 0.0, None
    elif cls == "relu6":
        lo_r, hi_r = 0.0, 6.0
    elif cls == "hardtanh":
        v = ctx.view(op)
        lo_r, hi_r = float(v.get("min_val", -1.0)), float(v.get("max_val", 1.0))
    else:
        return None

    def code(r):
        if r is None:
            return qmax
        c = r / scale
        if exact and abs(c - round(c)) > 1e-6 * max(1.0, abs(c)):
            raise Refuse(f"{op.name}: bound {r} is not on the quantization grid (scale {scale:g})")
        return int(min(max(round(c) + zp, qmin), qmax))
    return code(lo_r), code(hi_r)


def _copy_op(ctx: MatchContext, op: fx.Node, old_in: fx.Node, new_in: fx.Node, before: fx.Node) -> fx.Node:
    with ctx.graph.inserting_before(before):
        if ctx.classify(op) == "max_pool":
            # the int8 convolutions return channels-last tensors, and torch's CPU max_pool2d on a
            # channels-last int8 tensor fails once C*H*W exceeds 127 (its index type is the
            # element type); a contiguous copy keeps the same codes
            new_in = ctx.graph.call_function(torch.ops.aten.clone.default, (new_in,),
                                             {"memory_format": torch.contiguous_format})
            new_in.meta["qpasses.int_dtype"] = torch.int8
        n = ctx.graph.node_copy(op, lambda a: new_in if a is old_in else a)
    return n


@action("sink_dequantize", replaces=True, keeps=("dq",))
def sink_dequantize(ctx: MatchContext, op: fx.Node, dq: fx.Node):
    """``op(DQ(q))`` -> ``DQ(op_int(q))`` for ops that commute with dequantization."""
    q, scale, zp = dq.args
    qp = _int_qp(q, scale, zp)
    cls = ctx.classify(op)
    if cls in _LAYOUT:
        if ctx.view(op).input is not dq:
            raise Refuse(f"{op.name} reads the dequantized value in a non-data argument")
        new = _copy_op(ctx, op, dq, q, op)
        new.meta["qpasses.int_dtype"] = torch.int8
        new.meta[INT_KEY] = dict(qp)
    else:
        lo, hi = _bound_code(ctx, op, qp["scale"], qp["zp"], qp["qmin"], qp["qmax"], exact=True)
        nqp = dict(qp, qmin=max(lo, qp["qmin"]), qmax=min(hi, qp["qmax"]))
        new = _new(ctx, op, io.INT_OPS["int_clamp"], (q, nqp["qmin"], nqp["qmax"]), like=op, qp=nqp)
    out = _new(ctx, op, DQ, (new, scale, zp), like=op)
    _replace(ctx, op, out)
    _drop(ctx, dq)


@action("hoist_quantize", replaces=True)
def hoist_quantize(ctx: MatchContext, q: fx.Node):
    """``Q(op(x))`` -> ``op_int(Q(x))`` for layout ops, max-pool and ReLU-like ops (single-use
    chains, repeated upwards as far as it goes)."""
    moved = 0
    while True:
        op = q.args[0]
        if not isinstance(op, fx.Node) or len(op.users) != 1 or op.op == "placeholder":
            break
        cls = ctx.classify(op)
        if cls not in _LAYOUT + ("relu", "relu6", "hardtanh"):
            break
        v = ctx.view(op)
        x = v.input
        if not isinstance(x, fx.Node) or (cls in _LAYOUT and x is not op.args[0]):
            break
        qp = _qp_of_q(q)
        new_q = _new(ctx, op, Q, (x,) + tuple(q.args[1:]), like=x, qp=dict(q.meta.get(INT_KEY, qp)))
        if cls in _LAYOUT:
            new = _copy_op(ctx, op, x, new_q, q)
            new.meta["qpasses.int_dtype"] = torch.int8
            new.meta[INT_KEY] = dict(new_q.meta[INT_KEY])
        else:
            lo, hi = _bound_code(ctx, op, qp["scale"], qp["zp"], qp["qmin"], qp["qmax"], exact=False)
            nqp = dict(new_q.meta[INT_KEY], qmin=lo, qmax=hi)
            new = _new(ctx, q, io.INT_OPS["int_clamp"], (new_q, lo, hi), like=q, qp=nqp)
        _replace(ctx, q, new)
        ctx.graph.erase_node(op)
        q = new_q
        moved += 1
    if moved == 0:
        raise Refuse(f"nothing to hoist {q.name} above")


# ================================================================================= stage 3: fuse
def _weight_codes(ctx: MatchContext, op: fx.Node):
    v = ctx.view(op)
    wn = v.get("weight")
    mod = ctx.module(wn) if isinstance(wn, fx.Node) else None
    if not isinstance(mod, FakeQuantize):
        raise Refuse(f"{op.name} does not read a fake-quantized weight (run convert first)")
    src = wn.args[0]
    if not (isinstance(src, fx.Node) and src.op == "get_attr"):
        raise Refuse(f"the weight of {op.name} is not a constant")
    from ...opclasses import get_attr_value
    w = get_attr_value(ctx.gm, src.target).detach().float()
    if mod.qmin < -128 or mod.qmax > 127:
        raise Refuse(f"{op.name}: {mod.bits}-bit weights do not fit int8")
    if mod.zero_point.abs().max() != 0:
        raise Refuse(f"{op.name}: asymmetric weights (non-zero weight zero point) are not supported")
    codes = mod.int_repr(w).to(torch.int8)
    n_out = w.shape[0]
    sw = mod.scale.detach().float().reshape(-1)
    if sw.numel() == 1:
        sw = sw.expand(n_out).clone()
    if mod.axis not in (None, 0) or sw.numel() != n_out:
        raise Refuse(f"{op.name}: weight scales must be per tensor or per output channel (axis 0)")
    b = v.get("bias")
    bias = None
    if isinstance(b, fx.Node):
        if b.op != "get_attr":
            raise Refuse(f"the bias of {op.name} is not a constant")
        bias = get_attr_value(ctx.gm, b.target).detach().float()
    elif b is not None:
        raise Refuse(f"{op.name}: unsupported bias {b!r}")
    return v, wn, codes, sw, bias


def _requant_params(ctx: MatchContext, before: fx.Node, s_x: float, sw: torch.Tensor, bias, s_y: float):
    acc_scale = s_x * sw.double()
    M = acc_scale / s_y
    try:
        M0, shift = quantize_multiplier_tensor(M)
    except ValueError as e:
        raise Refuse(str(e)) from None
    b_node = None
    if bias is not None:
        bq = torch.round(bias.double() / acc_scale)
        if bool((bq.abs() > 2 ** 31 - 1).any()):
            raise Refuse("the int32 bias overflows")
        b_node = add_param(ctx, "int_bias", bq.to(torch.int32), before)
    return (add_param(ctx, "int_M0", M0.to(torch.int32), before), add_param(ctx, "int_shift",
            shift.to(torch.int32), before), b_node)


def _pair(v, n=2) -> List[int]:
    if isinstance(v, (list, tuple)):
        v = [int(a) for a in v]
        return v * n if len(v) == 1 else v
    return [int(v)] * n


@action("fuse_weighted", replaces=True, keeps=("dq",), args={"rounding": {"choices": ("gemmlowp", "single")}})
def fuse_weighted(ctx: MatchContext, q: fx.Node, op: fx.Node, dq: fx.Node, rounding: str = "gemmlowp"):
    """``Q(conv2d|linear(DQ(x), fq(W), b))`` -> ``int8_conv2d_requant`` / ``int8_linear_requant``:
    int8 weights, int32 bias in scale ``s_x s_w``, per-channel multiplier ``M = s_x s_w / s_y``.
    ``rounding="single"`` uses ``int_conv2d_requant_sr`` / ``int_linear_requant_sr`` instead."""
    if rounding not in ("gemmlowp", "single"):
        raise Refuse(f"unknown rounding {rounding!r}")
    from ...kernels import pack_int8_conv_weight, pack_int8_weight
    from ...kernels.library import MAX_K_INT8_ZP
    cls = ctx.classify(op)
    x, s_x, z_x = dq.args
    v, wn, codes, sw, bias = _weight_codes(ctx, op)
    oq = _qp_of_q(q)
    M0n, shn, bn = _requant_params(ctx, op, float(s_x), sw, bias, oq["scale"])
    if cls == "linear":
        if codes.shape[1] > MAX_K_INT8_ZP:
            raise Refuse(f"{op.name}: K={codes.shape[1]} could overflow the int32 accumulator")
        wq = add_param(ctx, "int_weight", pack_int8_weight(codes), op)
        args = (x, int(z_x), wq, bn, M0n, shn, oq["zp"], oq["qmin"], oq["qmax"])
        target = LINEAR if rounding == "gemmlowp" else io.INT_OPS["int_linear_sr"]
    else:
        if codes.dim() != 4:
            raise Refuse(f"{op.name}: only 2-d convolutions have an integer kernel")
        pad = v.get("padding", 0)
        if isinstance(pad, str):
            raise Refuse(f"{op.name}: padding={pad!r} (string padding) is not supported")
        if codes[0].numel() > MAX_K_INT8_ZP:
            raise Refuse(f"{op.name}: receptive field could overflow the int32 accumulator")
        wq = add_param(ctx, "int_weight", pack_int8_conv_weight(codes), op)
        args = (x, int(z_x), wq, bn, M0n, shn, oq["zp"], oq["qmin"], oq["qmax"], _pair(v.get("stride", 1)),
                _pair(pad), _pair(v.get("dilation", 1)), int(v.get("groups", 1) or 1))
        target = CONV if rounding == "gemmlowp" else io.INT_OPS["int_conv_sr"]
    leftovers = [wn, wn.args[0], v.get("bias"), dq]
    new = _new(ctx, q, target, args, like=q, qp=q.meta.get(INT_KEY, oq))
    new.meta["qpasses.source"] = op.name
    _replace(ctx, q, new)
    ctx.graph.erase_node(op)
    _drop(ctx, *leftovers)


@action("fuse_add", replaces=True, keeps=("a", "b"))
def fuse_add(ctx: MatchContext, q: fx.Node, op: fx.Node, a: fx.Node, b: fx.Node):
    """``Q(DQ(a) + DQ(b))`` -> ``int_add_requant`` (TFLite ADD: 20-bit left shift, three multipliers)."""
    alpha = ctx.view(op).get("alpha", 1)
    if alpha not in (1, 1.0, None):
        raise Refuse(f"{op.name}: add with alpha={alpha}")
    xa, sa, za = a.args
    xb, sb, zb = b.args
    oq = _qp_of_q(q)
    L = io.ADD_LEFT_SHIFT
    twice = 2.0 * max(float(sa), float(sb))
    ma, sha = io.multiplier(float(sa) / twice)
    mb, shb = io.multiplier(float(sb) / twice)
    mo, sho = io.multiplier(twice / ((1 << L) * oq["scale"]))
    args = (xa, int(za), ma, sha, xb, int(zb), mb, shb, mo, sho, oq["zp"], oq["qmin"], oq["qmax"], L)
    new = _new(ctx, q, io.INT_OPS["int_add"], args, like=q, qp=q.meta.get(INT_KEY, oq))
    _replace(ctx, q, new)
    ctx.graph.erase_node(op)
    _drop(ctx, a, b)


@action("fuse_cat", replaces=True)
def fuse_cat(ctx: MatchContext, q: fx.Node, op: fx.Node):
    """``Q(cat([DQ(x_i)], dim))`` -> ``int_cat_requant`` (each input rescaled to the output scale)."""
    v = ctx.view(op)
    ins = v.inputs()
    if not ins or not all(isinstance(i, fx.Node) and ctx.classify(i) == "dequantize_int" for i in ins):
        raise Refuse(f"not every input of {op.name} is dequantized from integers")
    oq = _qp_of_q(q)
    xs, zps, m0s, shs = [], [], [], []
    for d in ins:
        x, s, z = d.args
        xs.append(x)
        zps.append(int(z))
        if abs(float(s) - oq["scale"]) <= 1e-12 * oq["scale"]:
            m0s.append(0)
            shs.append(-1)     # same scale: only the zero point changes
        else:
            m0, sh = io.multiplier(float(s) / (oq["scale"] * 2 ** io.REQUANT_LEFT_SHIFT))
            m0s.append(m0)
            shs.append(sh)
    dim = int(v.get("dim", 0))
    new = _new(ctx, q, io.INT_OPS["int_cat"], (xs, zps, m0s, shs, dim, oq["zp"], oq["qmin"], oq["qmax"],
                                               io.REQUANT_LEFT_SHIFT),
               like=q, qp=q.meta.get(INT_KEY, oq))
    _replace(ctx, q, new)
    ctx.graph.erase_node(op)
    _drop(ctx, *ins)


@action("fuse_avg_pool", replaces=True, keeps=("dq",))
def fuse_avg_pool(ctx: MatchContext, q: fx.Node, op: fx.Node, dq: fx.Node):
    """``Q(avg_pool(DQ(x)))`` -> ``int_avg_pool2d_requant`` (no padding; adaptive pooling when the
    output size divides the input size)."""
    from ...frontend import node_shape
    v = ctx.view(op)
    cls = ctx.classify(op)
    shp = node_shape(dq)
    if shp is None or len(shp) != 4:
        raise Refuse(f"{op.name}: needs a known 4-d input shape, got {shp}")
    h, w = int(shp[2]), int(shp[3])
    if cls == "adaptive_avg_pool":
        osz = v.get("output_size")
        oh, ow = _pair(osz) if not isinstance(osz, (list, tuple)) or None not in osz else (None, None)
        if oh is None or h % oh or w % ow:
            raise Refuse(f"{op.name}: output size {osz} does not divide the input {h}x{w}")
        k = [h // oh, w // ow]
        st = list(k)
    else:
        k = _pair(v.get("kernel_size"))
        stv = v.get("stride", None)
        st = k if stv in (None, [], ()) else _pair(stv)
        if any(_pair(v.get("padding", 0))) or v.get("ceil_mode", False):
            raise Refuse(f"{op.name}: padding / ceil_mode are not supported by the integer average pool")
        if v.get("divisor_override", None) is not None:
            raise Refuse(f"{op.name}: divisor_override is not supported")
    x, s, z = dq.args
    oq = _qp_of_q(q)
    L = io.pool_left_shift(k[0] * k[1])
    m0, sh = io.multiplier(float(s) / (oq["scale"] * k[0] * k[1] * 2 ** L))
    new = _new(ctx, q, io.INT_OPS["int_avg_pool"], (x, k, st, int(z), m0, sh, oq["zp"], oq["qmin"], oq["qmax"], L),
               like=q, qp=q.meta.get(INT_KEY, oq))
    _replace(ctx, q, new)
    ctx.graph.erase_node(op)
    _drop(ctx, dq)


@action("fuse_requant", replaces=True, keeps=("dq",))
def fuse_requant(ctx: MatchContext, q: fx.Node, dq: fx.Node):
    """``Q(DQ(x))`` -> ``x`` when the parameters agree, else ``int_requant(x)`` (``M = s_in / s_out``)."""
    x, s, z = dq.args
    oq = _qp_of_q(q)
    iq = x.meta.get(INT_KEY, {}) if isinstance(x, fx.Node) else {}
    same = abs(float(s) - oq["scale"]) <= 1e-12 * oq["scale"] and int(z) == oq["zp"]
    if same and iq.get("qmin", -128) >= oq["qmin"] and iq.get("qmax", 127) <= oq["qmax"]:
        _replace(ctx, q, x)
    else:
        if same:
            new = _new(ctx, q, io.INT_OPS["int_clamp"], (x, oq["qmin"], oq["qmax"]), like=q,
                       qp=q.meta.get(INT_KEY, oq))
        else:
            L = io.REQUANT_LEFT_SHIFT
            m0, sh = io.multiplier(float(s) / (oq["scale"] * 2 ** L))
            new = _new(ctx, q, io.INT_OPS["int_requant"], (x, int(z), m0, sh, oq["zp"], oq["qmin"], oq["qmax"], L),
                       like=q, qp=q.meta.get(INT_KEY, oq))
        _replace(ctx, q, new)
    _drop(ctx, dq)


# ================================================================================= stage 4: fold
@constraint("clampable")
def clampable(ctx: MatchContext, node: fx.Node):
    """The node is an integer op with an output clamp range (``qmin``/``qmax`` arguments)."""
    return node.target in _CLAMPABLE, f"{node.name} has no output clamp"


@action("fold_clamp", replaces=True)
def fold_clamp(ctx: MatchContext, c: fx.Node, p: fx.Node):
    """``int_clamp(op(...), lo, hi)`` -> ``op`` with its clamp range narrowed to ``[lo, hi]``."""
    i_lo, i_hi = _CLAMPABLE[p.target]
    args = list(p.args)
    lo, hi = int(c.args[1]), int(c.args[2])
    args[i_lo] = max(int(args[i_lo]), lo)
    args[i_hi] = min(int(args[i_hi]), hi)
    if args[i_lo] > args[i_hi]:
        raise Refuse(f"empty clamp range after folding {c.name} into {p.name}")
    p.args = tuple(args)
    if INT_KEY in p.meta:
        p.meta[INT_KEY] = dict(p.meta[INT_KEY], qmin=args[i_lo], qmax=args[i_hi])
    _replace(ctx, c, p)


# ================================================================================= check step
@data_step("check_integer", args={"strict": {"type": bool, "default": False}})
def check_integer(ctx):
    """Count integer ops and float compute left between the input quantizers and the output
    dequantizers; with ``strict`` raise when any float compute op remains."""
    rep = io.integer_ops_report(ctx.gm)
    n_q = sum(1 for n in ctx.gm.graph.nodes if n.target is Q)
    n_dq = sum(1 for n in ctx.gm.graph.nodes if n.target is DQ)
    floats = [f for f in rep["float_ops"]]
    ctx.info.update({"integer_ops": rep["integer_ops"], "integer_layout_ops": rep["other"],
                     "quantize": n_q, "dequantize": n_dq, "float_ops": len(floats)})
    if floats:
        ctx.info["float_op_names"] = floats[:10]
        if ctx.arg("strict", False):
            raise StepError(f"integerize left {len(floats)} float op(s) in the graph: {', '.join(floats[:5])}; "
                            f"see pm.report for the refusals (or pass strict=False for a mixed graph)")
    return None


# ================================================================================= int32 bias grid
@action("round_bias_to_int32_grid")
def round_bias_to_int32_grid(ctx: MatchContext, op: fx.Node):
    """Replace the float bias of a fake-quantized conv2d / linear by its value on the int32 grid
    ``round(b / (s_x s_w)) * s_x s_w`` that the integer kernel will use, so the fake-quant graph
    models the integer graph's bias exactly (the rounding is up to ``0.5 * M`` output steps, which
    matters at low bit-widths where ``M = s_x s_w / s_y`` approaches 1)."""
    from ...opclasses import get_attr_value
    if op.meta.get("qpasses.int_bias"):
        raise Refuse(f"{op.name}: bias already on the int32 grid")
    v = ctx.view(op)
    xin = v.input
    xmod = ctx.module(xin) if isinstance(xin, fx.Node) else None
    if not isinstance(xmod, FakeQuantize) or xmod.axis is not None:
        raise Refuse(f"the input of {op.name} is not per-tensor fake-quantized")
    wn = v.get("weight")
    wmod = ctx.module(wn) if isinstance(wn, fx.Node) else None
    if not isinstance(wmod, FakeQuantize):
        raise Refuse(f"{op.name} does not read a fake-quantized weight")
    b = v.get("bias")
    if not (isinstance(b, fx.Node) and b.op == "get_attr"):
        raise Refuse(f"{op.name} has no constant bias")
    bias = get_attr_value(ctx.gm, b.target).detach()
    n_out = bias.numel()
    sw = wmod.scale.detach().double().reshape(-1)
    if sw.numel() == 1:
        sw = sw.expand(n_out)
    if sw.numel() != n_out:
        raise Refuse(f"{op.name}: weight scales do not match the output channels")
    acc = float(xmod.scale.detach()) * sw
    new_b = (torch.round(bias.double() / acc) * acc).to(bias.dtype)
    nb = add_param(ctx, "int_grid_bias", new_b, op, requires_grad=False)
    v.set("bias", nb)
    op.meta["qpasses.int_bias"] = True
    _drop(ctx, b)
