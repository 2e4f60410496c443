"""Integer-only inference (Jacob et al., CVPR 2018): integer custom ops and parameter helpers.

The ``integerize`` rule family (``qpasses/methods/int_only/integerize.yaml``, actions in
:mod:`qpasses.methods.int_only.actions`) lowers a calibrated fake-quant graph to these ops plus the
int8 GEMM / conv kernels of :mod:`qpasses.kernels` (``int8_conv2d_requant``,
``int8_linear_requant``).

Representation of an integer activation: an **int8** tensor ``q`` with a per-tensor scale ``s``
and zero point ``z`` (real value ``(q - z) * s``).  Affine *uint8* quantization (``[0, 255]``,
zero point ``z_u8``, what the default asymmetric observers produce) is stored in int8 with the
exact bijection ``q_i8 = q_u8 - 128``, ``z_i8 = z_u8 - 128``: ``q - z`` -- the only thing the
arithmetic ever uses -- is unchanged, so results are bit-identical to a uint8 implementation
(TFLite's uint8 -> int8 conversion does the same).  The zero point of the input enters the
int32 accumulation by subtracting it before the GEMM (``sum (q_x - z_x) * q_w``, with conv
padding equal to ``z_x``); see ``docs/recipes/int_only.md`` for the row-sum alternative.

Ops (``torch.ops.qpasses.<name>``), each with a CPU reference implementation in integer
arithmetic and a fake (meta) implementation:

``quantize_per_tensor_int``  float -> int8 codes (graph input boundary)
``dequantize_int``           int8 codes -> float32 (graph output boundary)
``int_requant``              rescale codes to another scale / zero point (fixed-point multiplier)
``int_clamp``                clamp codes (ReLU / ReLU6 on integers)
``int_add_requant``          residual add of two int8 tensors with different scales
``int_cat_requant``          concatenation rescaled to a common output scale
``int_avg_pool2d_requant``   average pooling: int32 window sums times a fixed-point multiplier
``int_conv2d_requant_sr`` / ``int_linear_requant_sr``  the int8 conv / linear kernels' semantics
                             with single rounding (option ``rounding="single"``; CPU reference only)
"""
from __future__ import annotations

import math
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ... import kernels as _kernels  # noqa: F401  registers int8_conv2d_requant / int8_linear_requant
from ...numerics.fixed_point import multiply_by_quantized_multiplier, quantize_multiplier

__all__ = ["int8_params", "multiplier", "ADD_LEFT_SHIFT", "REQUANT_LEFT_SHIFT", "pool_left_shift",
           "quantize_per_tensor_int", "dequantize_int", "int_requant", "int_clamp", "int_add_requant", "int_cat_requant", "int_avg_pool2d_requant",
           "INT_OPS", "integer_ops_report"]

#: TFLite's left shift for the add kernel: inputs are scaled by 2**20 before their multipliers,
#: so rescaling them to a common scale loses (almost) nothing.
ADD_LEFT_SHIFT = 20
#: pre-shift for requantizations whose multiplier is near 1 (int_requant, int_cat): |q - zp| <= 255
#: so ``(q - zp) << 20`` stays below 2**28.
REQUANT_LEFT_SHIFT = 20


def pool_left_shift(window: int) -> int:
    """Largest left shift (<= 20) keeping ``255 * window << shift`` below 2**30."""
    bits = int(math.ceil(math.log2(255 * max(int(window), 1) + 1)))
    return max(0, min(20, 30 - bits))


def int8_params(scale: float, zero_point: int, qmin: int, qmax: int) -> Tuple[float, int, int, int, int]:
    """``(scale, zp, qmin, qmax, offset)`` of an activation quantizer re-based into int8.

    Ranges inside ``[-128, 127]`` are kept (``offset = 0``); an unsigned 8-bit range such as
    ``[0, 255]`` is shifted by ``offset = 128``.  Ranges wider than 8 bits raise ``ValueError``.
    """
    qmin, qmax, zp = int(qmin), int(qmax), int(zero_point)
    if qmax - qmin > 255:
        raise ValueError(f"integer range [{qmin}, {qmax}] needs more than 8 bits")
    offset = 0
    if qmin < -128 or qmax > 127:
        offset = 128 if qmin >= 0 else 0
        if qmin - offset < -128 or qmax - offset > 127:
            raise ValueError(f"integer range [{qmin}, {qmax}] cannot be held in int8")
    return float(scale), zp - offset, qmin - offset, qmax - offset, offset


def multiplier(M: float) -> Tuple[int, int]:
    """``(M0, shift)`` for a real multiplier ``M`` (``M = M0 * 2**-31 * 2**-shift``)."""
    return quantize_multiplier(float(M))


def _check(cond, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


def _check_int8(x: Tensor, name: str) -> None:
    _check(x.dtype == torch.int8, f"{name} must be int8, got {x.dtype}")


def _check_range(qmin: int, qmax: int, zp: int) -> None:
    _check(-128 <= qmin <= qmax <= 127, f"need -128 <= qmin <= qmax <= 127, got [{qmin}, {qmax}]")
    _check(-128 <= zp <= 127, f"zero point {zp} outside int8")


def _mbqm(acc: Tensor, M0: int, shift: int) -> Tensor:
    return multiply_by_quantized_multiplier(acc.to(torch.int64), int(M0), int(shift)).to(torch.int64)


# ----------------------------------------------------------------------------------- boundaries
@torch.library.custom_op("qpasses::quantize_per_tensor_int", mutates_args=())
def quantize_per_tensor_int(x: Tensor, scale: float, zero_point: int, qmin: int, qmax: int) -> Tensor:
    """int8 codes ``clamp(round_half_even(x / scale) + zero_point, qmin, qmax)`` (the rounding of
    ``torch.fake_quantize_per_tensor_affine``, so codes match the fake-quant graph)."""
    _check(x.is_floating_point(), f"x must be floating point, got {x.dtype}")
    _check(scale > 0 and math.isfinite(scale), f"scale must be positive and finite, got {scale}")
    _check_range(qmin, qmax, zero_point)
    inv = 1.0 / scale
    q = torch.round(x.float() * inv) + zero_point
    return torch.clamp(q, qmin, qmax).to(torch.int8)


@quantize_per_tensor_int.register_fake
def _(x, scale, zero_point, qmin, qmax):
    return torch.empty_like(x, dtype=torch.int8)


@torch.library.custom_op("qpasses::dequantize_int", mutates_args=())
def dequantize_int(q: Tensor, scale: float, zero_point: int) -> Tensor:
    """float32 ``(q - zero_point) * scale``."""
    _check(not q.is_floating_point(), f"q must be an integer tensor, got {q.dtype}")
    return (q.to(torch.int32) - int(zero_point)).to(torch.float32) * float(scale)


@dequantize_int.register_fake
def _(q, scale, zero_point):
    return torch.empty_like(q, dtype=torch.float32)


# ----------------------------------------------------------------------------------- elementwise
@torch.library.custom_op("qpasses::int_requant", mutates_args=())
def int_requant(q: Tensor, in_zp: int, M0: int, shift: int, out_zp: int, qmin: int, qmax: int,
                left_shift: int = 0) -> Tensor:
    """``clamp(MBQM((q - in_zp) << left_shift, M0, shift) + out_zp, qmin, qmax)`` as int8: the same
    value on another scale, ``M0 * 2**-31 * 2**-shift = s_in / (s_out * 2**left_shift)``.

    The left shift (``REQUANT_LEFT_SHIFT`` when lowering) keeps the first of gemmlowp's two
    roundings (SRDHM, then RoundingDivideByPOT) far below one output step: with a multiplier near
    1 and no pre-shift, about a quarter of the codes would be off by one."""
    _check_int8(q, "q")
    _check_range(qmin, qmax, out_zp)
    _check(0 <= left_shift <= 22, f"left_shift must be in [0, 22], got {left_shift}")
    y = _mbqm((q.to(torch.int64) - int(in_zp)) << int(left_shift), M0, shift) + int(out_zp)
    return torch.clamp(y, qmin, qmax).to(torch.int8)


@int_requant.register_fake
def _(q, in_zp, M0, shift, out_zp, qmin, qmax, left_shift=0):
    return torch.empty_like(q, dtype=torch.int8)


@torch.library.custom_op("qpasses::int_clamp", mutates_args=())
def int_clamp(q: Tensor, qmin: int, qmax: int) -> Tensor:
    """``clamp(q, qmin, qmax)`` on int8 codes (ReLU is ``qmin = zero_point``)."""
    _check_int8(q, "q")
    _check(qmin <= qmax, f"empty clamp range [{qmin}, {qmax}]")
    return torch.clamp(q, qmin, qmax)


@int_clamp.register_fake
def _(q, qmin, qmax):
    return torch.empty_like(q, dtype=torch.int8)


@torch.library.custom_op("qpasses::int_add_requant", mutates_args=())
def int_add_requant(a: Tensor, a_zp: int, a_M0: int, a_shift: int, b: Tensor, b_zp: int, b_M0: int, b_shift: int,
                    out_M0: int, out_shift: int, out_zp: int, qmin: int, qmax: int,
                    left_shift: int = ADD_LEFT_SHIFT) -> Tensor:
    """Integer residual add (TFLite ``ADD``): each input is offset by its zero point, left-shifted by
    ``left_shift`` bits and scaled to the common scale ``2 * max(s_a, s_b) / 2**left_shift`` by its
    multiplier (``s_a / (2 max)``); the int32 sum is requantized by ``out = 2 max / (2**left_shift s_out)``."""
    _check_int8(a, "a")
    _check_int8(b, "b")
    _check_range(qmin, qmax, out_zp)
    _check(0 <= left_shift <= 22, f"left_shift must be in [0, 22], got {left_shift}")
    sa = _mbqm((a.to(torch.int64) - int(a_zp)) << left_shift, a_M0, a_shift)
    sb = _mbqm((b.to(torch.int64) - int(b_zp)) << left_shift, b_M0, b_shift)
    y = _mbqm(sa + sb, out_M0, out_shift) + int(out_zp)
    return torch.clamp(y, qmin, qmax).to(torch.int8)


@int_add_requant.register_fake
def _(a, a_zp, a_M0, a_shift, b, b_zp, b_M0, b_shift, out_M0, out_shift, out_zp, qmin, qmax, left_shift=20):
    return torch.empty(torch.broadcast_shapes(a.shape, b.shape), dtype=torch.int8, device=a.device)


@torch.library.custom_op("qpasses::int_cat_requant", mutates_args=())
def int_cat_requant(xs: List[Tensor], zps: List[int], M0s: List[int], shifts: List[int], dim: int, out_zp: int,
                    qmin: int, qmax: int, left_shift: int = 0) -> Tensor:
    """Concatenate int8 tensors after requantizing each to the output scale
    (``M0_i * 2**-31 * 2**-shift_i = s_i / (s_out * 2**left_shift)``; ``M0_i == 0`` and
    ``shift_i == -1`` marks an input already on the output scale: only its zero point changes)."""
    _check(len(xs) == len(zps) == len(M0s) == len(shifts) and len(xs) > 0, "one zp/M0/shift per input")
    _check_range(qmin, qmax, out_zp)
    parts = []
    for x, zp, m0, sh in zip(xs, zps, M0s, shifts):
        _check_int8(x, "cat input")
        if int(m0) == 0 and int(sh) == -1:
            y = x.to(torch.int64) - int(zp) + int(out_zp)
        else:
            y = _mbqm((x.to(torch.int64) - int(zp)) << int(left_shift), m0, sh) + int(out_zp)
        parts.append(torch.clamp(y, qmin, qmax).to(torch.int8))
    return torch.cat(parts, dim)


@int_cat_requant.register_fake
def _(xs, zps, M0s, shifts, dim, out_zp, qmin, qmax, left_shift=0):
    return torch.cat([torch.empty_like(x, dtype=torch.int8) for x in xs], dim)


@torch.library.custom_op("qpasses::int_avg_pool2d_requant", mutates_args=())
def int_avg_pool2d_requant(x: Tensor, kernel: List[int], stride: List[int], in_zp: int, M0: int, shift: int,
                           out_zp: int, qmin: int, qmax: int, left_shift: int = 0) -> Tensor:
    """Average pooling without padding: int32 window sums of ``x - in_zp``, left-shifted by
    ``left_shift`` bits, times the fixed-point multiplier ``s_in / (s_out * kh * kw * 2**left_shift)``,
    plus ``out_zp``, clamped."""
    _check_int8(x, "x")
    _check(x.dim() == 4, f"x must be [N, C, H, W], got {tuple(x.shape)}")
    _check_range(qmin, qmax, out_zp)
    kh, kw = int(kernel[0]), int(kernel[1])
    _check(kh * kw * 256 < 2 ** 31, "pooling window too large for int32 sums")
    xc = (x.to(torch.int64) - int(in_zp)).to(torch.float64)   # window sums are exact in float64
    s = F.avg_pool2d(xc, (kh, kw), tuple(int(v) for v in stride)) * (kh * kw)
    acc = torch.round(s).to(torch.int64)
    _check(int(acc.abs().max()) << int(left_shift) < 2 ** 31 if acc.numel() else True,
           "left_shift overflows the int32 window sums")
    y = _mbqm(acc << int(left_shift), M0, shift) + int(out_zp)
    return torch.clamp(y, qmin, qmax).to(torch.int8)


@int_avg_pool2d_requant.register_fake
def _(x, kernel, stride, in_zp, M0, shift, out_zp, qmin, qmax, left_shift=0):
    n, c, h, w = x.shape
    oh = (h - kernel[0]) // stride[0] + 1
    ow = (w - kernel[1]) // stride[1] + 1
    return x.new_empty((n, c, oh, ow), dtype=torch.int8)


# ----------------------------------------------------------------------------------- single rounding
def _single_round(acc: Tensor, M0: Tensor, shift: Tensor) -> Tensor:
    """``round(acc * M0 * 2**-(31 + shift))`` with one rounding (ties away from zero), per channel
    along the last dimension, exact in int64 (``|acc|, M0 < 2**31``)."""
    m0 = M0.to(torch.int64).reshape(-1)
    total = 31 + shift.to(torch.int64).reshape(-1)
    _check(bool((total >= 0).all()), "multiplier too large")
    acc = torch.clamp(acc.to(torch.int64), -(2 ** 31), 2 ** 31 - 1)
    prod = acc * m0
    zero = total > 62
    t = torch.clamp(total, max=62)
    mask = (torch.ones_like(t) << t) - 1
    rem = prod & mask
    thr = (mask >> 1) + (prod < 0).to(torch.int64)
    y = (prod >> t) + (rem > thr).to(torch.int64)
    return torch.where(zero, torch.zeros_like(y), y)


def _sr_epilogue(rows: Tensor, bias, M0, shift, out_zp, qmin, qmax) -> Tensor:
    if bias is not None:
        rows = rows + bias.to(torch.int64).reshape(-1)
    y = _single_round(rows, M0, shift) + int(out_zp)
    return torch.clamp(y, qmin, qmax).to(torch.int8)


@torch.library.custom_op("qpasses::int_conv2d_requant_sr", mutates_args=())
def int_conv2d_requant_sr(x_q: Tensor, x_zp: int, w_q: Tensor, bias_int32: Optional[Tensor], M0: Tensor,
                          shift: Tensor, out_zp: int, qmin: int, qmax: int, stride: List[int], padding: List[int],
                          dilation: List[int], groups: int) -> Tensor:
    """``int8_conv2d_requant`` (same arguments) with *single* rounding of ``acc * M`` (int64,
    ties away from zero) instead of gemmlowp's SRDHM + RoundingDivideByPOT; CPU reference only.

    Below 8 bits the requantization multipliers have small shifts and the double rounding puts a
    few per cent of the codes one step off; this op removes that (``integerize(rounding="single")``)."""
    from ...kernels import reference as ref
    _check_int8(x_q, "x_q")
    _check_range(qmin, qmax, out_zp)
    acc = ref.int8_conv2d_acc(x_q, w_q, stride, padding, dilation, groups, x_zp)
    n, _, oh, ow = acc.shape
    rows = acc.permute(0, 2, 3, 1).reshape(-1, acc.shape[1])
    y = _sr_epilogue(rows, bias_int32, M0, shift, out_zp, qmin, qmax)
    return y.reshape(n, oh, ow, -1).permute(0, 3, 1, 2).contiguous()


@int_conv2d_requant_sr.register_fake
def _(x_q, x_zp, w_q, bias_int32, M0, shift, out_zp, qmin, qmax, stride, padding, dilation, groups):
    n, _, h, w = x_q.shape
    cout, _, kh, kw = w_q.shape
    oh = (h + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    ow = (w + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    return x_q.new_empty((n, cout, oh, ow), dtype=torch.int8)


@torch.library.custom_op("qpasses::int_linear_requant_sr", mutates_args=())
def int_linear_requant_sr(x_q: Tensor, x_zp: int, w_q: Tensor, bias_int32: Optional[Tensor], M0: Tensor,
                          shift: Tensor, out_zp: int, qmin: int, qmax: int) -> Tensor:
    """``int8_linear_requant`` (same arguments, prepacked ``[N, Kp]`` weight) with single rounding;
    CPU reference only (see :func:`int_conv2d_requant_sr`)."""
    from ...kernels import reference as ref
    _check_int8(x_q, "x_q")
    _check_range(qmin, qmax, out_zp)
    lead = x_q.shape[:-1]
    acc = ref.int8_linear_acc(x_q.reshape(-1, x_q.shape[-1]), w_q, x_zp)
    return _sr_epilogue(acc, bias_int32, M0, shift, out_zp, qmin, qmax).reshape(*lead, w_q.shape[0])


@int_linear_requant_sr.register_fake
def _(x_q, x_zp, w_q, bias_int32, M0, shift, out_zp, qmin, qmax):
    return x_q.new_empty((*x_q.shape[:-1], w_q.shape[0]), dtype=torch.int8)


INT_OPS = {
    "quantize_int": torch.ops.qpasses.quantize_per_tensor_int.default,
    "dequantize_int": torch.ops.qpasses.dequantize_int.default,
    "int_requant": torch.ops.qpasses.int_requant.default,
    "int_clamp": torch.ops.qpasses.int_clamp.default,
    "int_add": torch.ops.qpasses.int_add_requant.default,
    "int_cat": torch.ops.qpasses.int_cat_requant.default,
    "int_avg_pool": torch.ops.qpasses.int_avg_pool2d_requant.default,
    "int_conv_sr": torch.ops.qpasses.int_conv2d_requant_sr.default,
    "int_linear_sr": torch.ops.qpasses.int_linear_requant_sr.default,
}


def integer_ops_report(gm) -> dict:
    """Counts of node kinds in a lowered graph: integer ops, kernels, and float compute left."""
    from ...opclasses import classify
    modules = dict(gm.named_modules())
    int_targets = set(INT_OPS.values()) | {torch.ops.qpasses.int8_conv2d_requant.default,
                                           torch.ops.qpasses.int8_linear_requant.default}
    out = {"integer_ops": 0, "float_ops": [], "other": 0}
    for n in gm.graph.nodes:
        if n.op in ("placeholder", "output", "get_attr"):
            continue
        if n.op == "call_module" and str(n.target) == "_guards_fn":
            continue  # torch.export's input guards, not compute
        if n.target in int_targets:
            out["integer_ops"] += 1
            continue
        dt = n.meta.get("qpasses.int_dtype")
        if dt is not None:
            out["other"] += 1  # layout / max-pool op running on integers
            continue
        out["float_ops"].append(f"{n.name} ({classify(n, modules) or n.target})")
    return out
