"""Integer reference implementations (pure torch) of every kernel in ``qpasses.kernels``.

They are the CPU implementations of the custom ops and the oracles of the tests.

* Accumulators are exact: products and sums are computed in int64 (``torch.matmul`` /
  ``F.conv2d`` on int64 tensors on the CPU). On devices without int64 GEMM (CUDA) the same
  products are formed in float64, which is exact while every partial sum stays below 2**53
  (always the case for int8 x int8 with K < 2**37).
* The Triton kernels accumulate in int32; they agree with these references as long as the
  accumulator fits int32 (``K * 255 * 128 < 2**31``, i.e. K <= 65793 for the zero-point path,
  K <= 131072 otherwise), which the ops check.
* Requantization follows gemmlowp/TFLite fixed-point semantics (Jacob et al., 2018):
  ``SaturatingRoundingDoublingHighMul`` then ``RoundingDivideByPOT``; the real multiplier is
  ``M = M0 * 2**-31 * 2**-shift`` with ``M0`` in [2**30, 2**31). A negative ``shift`` is a left
  shift applied before the multiply, saturated to int32 (TFLite leaves that overflow undefined).
* Float epilogues are evaluated in fp32 in a fixed order -- ``((acc * x_scale[m]) * w_scale[n])
  + bias[n]``, activation, cast -- the same order the kernels use.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from ..numerics.qparams import dynamic_qparams
from . import packing

INT32_MIN = -(2 ** 31)
INT32_MAX = 2 ** 31 - 1
ACTIVATIONS = ("none", "relu", "relu6")
FLOAT_OUT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# ------------------------------------------------------------------------------ exact integer ops
def int_matmul(a: torch.Tensor, b_t: torch.Tensor) -> torch.Tensor:
    """Exact ``a[M, K] @ b_t[N, K].T`` of integer tensors, as int64 ``[M, N]``."""
    if a.device.type == "cpu":
        return a.to(torch.int64) @ b_t.to(torch.int64).t()
    return torch.round(a.to(torch.float64) @ b_t.to(torch.float64).t()).to(torch.int64)


def int_conv2d(x: torch.Tensor, w: torch.Tensor, stride, padding, dilation, groups: int) -> torch.Tensor:
    """Exact integer conv2d (zero padding) of NCHW ``x`` with OIHW ``w``, as int64 NCHW."""
    if x.device.type == "cpu":
        return F.conv2d(x.to(torch.int64), w.to(torch.int64), None, stride, padding, dilation, groups)
    y = F.conv2d(x.to(torch.float64), w.to(torch.float64), None, stride, padding, dilation, groups)
    return torch.round(y).to(torch.int64)


def popcount32(v: torch.Tensor) -> torch.Tensor:
    """Number of set bits of each int32 (as unsigned 32-bit), as int64."""
    u = v.to(torch.int64) & 0xFFFFFFFF
    u = u - ((u >> 1) & 0x55555555)
    u = (u & 0x33333333) + ((u >> 2) & 0x33333333)
    u = (u + (u >> 4)) & 0x0F0F0F0F
    return ((u * 0x01010101) & 0xFFFFFFFF) >> 24


# ----------------------------------------------------------------------------- fixed-point (gemmlowp)
def quantize_multiplier(M: float):
    """Real multiplier ``M > 0`` -> ``(M0, shift)`` with ``M ~= M0 * 2**-31 * 2**-shift`` and
    ``M0`` in [2**30, 2**31) (TFLite ``QuantizeMultiplier`` with the shift sign flipped: positive
    shift = right shift). ``M == 0`` gives ``(0, 0)``."""
    import math
    if M < 0:
        raise ValueError("multiplier must be non-negative")
    if M == 0:
        return 0, 0
    m, e = math.frexp(M)
    m0 = int(round(m * (1 << 31)))
    if m0 == 1 << 31:
        m0 //= 2
        e += 1
    return m0, -e


def quantize_multipliers(Ms) -> "tuple[torch.Tensor, torch.Tensor]":
    """Vector form of :func:`quantize_multiplier`: int64 tensors ``(M0, shift)``."""
    pairs = [quantize_multiplier(float(m)) for m in torch.as_tensor(Ms, dtype=torch.float64).reshape(-1)]
    return (torch.tensor([p[0] for p in pairs], dtype=torch.int64),
            torch.tensor([p[1] for p in pairs], dtype=torch.int64))


def saturating_rounding_doubling_high_mul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """gemmlowp ``SaturatingRoundingDoublingHighMul`` on int32 values held in int64 tensors:
    ``round_half_away(a * b / 2**31)``, saturating the single overflow case a == b == INT32_MIN."""
    a = a.to(torch.int64)
    b = b.to(torch.int64)
    ab = a * b
    nudge = torch.where(ab >= 0, torch.full_like(ab, 1 << 30), torch.full_like(ab, 1 - (1 << 30)))
    res = torch.div(ab + nudge, 1 << 31, rounding_mode="trunc")
    overflow = (a == INT32_MIN) & (b == INT32_MIN)
    return torch.where(overflow, torch.full_like(res, INT32_MAX), res)


def rounding_divide_by_pot(x: torch.Tensor, exponent: torch.Tensor) -> torch.Tensor:
    """gemmlowp ``RoundingDivideByPOT``: ``x / 2**exponent`` rounded half away from zero."""
    x = x.to(torch.int64)
    e = torch.as_tensor(exponent, dtype=torch.int64, device=x.device)
    mask = (torch.ones_like(e) << e) - 1
    remainder = x & mask
    threshold = (mask >> 1) + (x < 0).to(torch.int64)
    return (x >> e) + (remainder > threshold).to(torch.int64)


def multiply_by_quantized_multiplier(acc: torch.Tensor, M0: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """``acc * M0 * 2**-31 * 2**-shift`` with gemmlowp rounding; broadcasting along the last dim."""
    acc = acc.to(torch.int64)
    M0 = M0.to(torch.int64).to(acc.device)
    shift = shift.to(torch.int64).to(acc.device)
    left = torch.clamp(-shift, min=0)
    right = torch.clamp(shift, min=0)
    x = torch.clamp(acc << left, INT32_MIN, INT32_MAX)
    return rounding_divide_by_pot(saturating_rounding_doubling_high_mul(x, M0), right)


def requantize(acc: torch.Tensor, M0: torch.Tensor, shift: torch.Tensor, out_zp: int, qmin: int, qmax: int
               ) -> torch.Tensor:
    """Integer-only requantization of int32 accumulators ``[..., N]`` with per-column (or scalar)
    ``M0``/``shift``; returns int8 ``clamp(mbqm(acc) + out_zp, qmin, qmax)``."""
    y = multiply_by_quantized_multiplier(acc, M0.reshape(-1), shift.reshape(-1)) + int(out_zp)
    return torch.clamp(y, int(qmin), int(qmax)).to(torch.int8)


def float_epilogue(acc: torch.Tensor, x_scale: torch.Tensor, w_scale: torch.Tensor, bias: Optional[torch.Tensor],
                   activation: str, out_dtype: torch.dtype) -> torch.Tensor:
    """``act((acc * x_scale[:, None]) * w_scale[None, :] + bias)`` in fp32, cast to ``out_dtype``.

    ``acc`` is ``[M, N]``; ``x_scale`` has 1 or M entries, ``w_scale`` 1 or N."""
    y = acc.to(torch.float32)
    xs = x_scale.reshape(-1).to(torch.float32)
    ws = w_scale.reshape(-1).to(torch.float32)
    y = y * (xs[:, None] if xs.numel() > 1 else xs)
    y = y * ws
    if bias is not None:
        y = y + bias.reshape(-1).to(torch.float32)
    y = apply_activation(y, activation)
    return y.to(out_dtype)


def apply_activation(y: torch.Tensor, activation: str) -> torch.Tensor:
    if activation == "none":
        return y
    if activation == "relu":
        return torch.clamp_min(y, 0.0)
    if activation == "relu6":
        return torch.clamp(y, 0.0, 6.0)
    raise ValueError(f"unknown activation {activation!r}; expected one of {ACTIVATIONS}")


# ------------------------------------------------------------------------------------ int8 GEMM
def int8_linear_acc(x_q: torch.Tensor, w_q: torch.Tensor, x_zp: int = 0) -> torch.Tensor:
    """Exact ``sum_k (x_q[m, k] - x_zp) * w_q[n, k]`` as int64 ``[M, N]``; ``w_q`` may be padded
    along K (only its first ``K = x_q.shape[1]`` columns are used)."""
    k = x_q.shape[1]
    x = x_q.to(torch.int64) - int(x_zp)
    return int_matmul(x, w_q[:, :k].to(torch.int64))


def int8_linear(x_q, x_scale, w_q, w_scale, bias, activation, out_dtype, x_zp=0):
    acc = int8_linear_acc(x_q, w_q, x_zp)
    return float_epilogue(acc, x_scale, w_scale, bias, activation, out_dtype)


def dynamic_quantize_int8(x2: torch.Tensor, a_bits: int, symmetric: bool, per_token: bool):
    """Quantize ``x2 [M, K]`` with qparams measured on itself, as the graph's dynamic quantizer op does.

    Returns ``(x8, x_scale, x_zp)``: int8 codes ``[M, K]`` (unsigned 8-bit codes shifted by
    -128 into int8), fp32 scales ``[M]`` and int32 zero points ``[M]`` in the int8 domain, so
    that ``x ~= (x8 - x_zp) * x_scale`` row by row (per tensor: the same value in every row).
    """
    xf = x2.float()
    scale, zp, qmin, qmax = dynamic_qparams(xf, int(a_bits), bool(symmetric), -1 if per_token else None)
    shift = 128 if qmax > 127 else 0
    codes = torch.clamp(torch.round(xf / scale) + zp, qmin, qmax)
    m = xf.shape[0]
    x8 = (codes - shift).to(torch.int8)
    return (x8, scale.reshape(-1).expand(m).contiguous(),
            (zp - shift).reshape(-1).to(torch.int32).expand(m).contiguous())


def int8_linear_rows_zp(x_q, x_scale, w_q, w_scale, bias, activation, out_dtype, x_zp_rows):
    """:func:`int8_linear` with one zero point per row: ``sum_k (x_q[m, k] - x_zp[m]) * w_q[n, k]``."""
    k = x_q.shape[1]
    x = x_q.to(torch.int64) - x_zp_rows.reshape(-1, 1).to(torch.int64)
    acc = int_matmul(x, w_q[:, :k].to(torch.int64))
    return float_epilogue(acc, x_scale, w_scale, bias, activation, out_dtype)


def int8_linear_requant(x_q, x_zp, w_q, bias_int32, M0, shift, out_zp, qmin, qmax):
    acc = int8_linear_acc(x_q, w_q, x_zp)
    if bias_int32 is not None:
        acc = acc + bias_int32.to(torch.int64).reshape(-1)
    return requantize(acc, M0, shift, out_zp, qmin, qmax)


# ------------------------------------------------------------------------------------ int8 conv
def conv_out_size(size: int, k: int, stride: int, pad: int, dil: int) -> int:
    return (size + 2 * pad - dil * (k - 1) - 1) // stride + 1


def int8_conv2d_acc(x_q: torch.Tensor, w_q: torch.Tensor, stride: Sequence[int], padding: Sequence[int],
                    dilation: Sequence[int], groups: int, x_zp: int = 0) -> torch.Tensor:
    """Exact ``conv(x_q - x_zp, w_q)`` with the padded border equal to ``x_zp`` (so it contributes
    zero), as int64 NCHW ``[N, Cout, OH, OW]``."""
    x = x_q.to(torch.int64) - int(x_zp)
    return int_conv2d(x, w_q.to(torch.int64), tuple(stride), tuple(padding), tuple(dilation), groups)


def _to_rows(y_nchw: torch.Tensor) -> torch.Tensor:
    n, c, h, w = y_nchw.shape
    return y_nchw.permute(0, 2, 3, 1).reshape(n * h * w, c)


def _from_rows(rows: torch.Tensor, n: int, h: int, w: int) -> torch.Tensor:
    c = rows.shape[1]
    return rows.reshape(n, h, w, c).permute(0, 3, 1, 2).contiguous(memory_format=torch.channels_last)


def int8_conv2d(x_q, x_scale, w_q, w_scale, bias, stride, padding, dilation, groups, activation, out_dtype,
                x_zp=0):
    acc = int8_conv2d_acc(x_q, w_q, stride, padding, dilation, groups, x_zp)
    n, _, oh, ow = acc.shape
    y = float_epilogue(_to_rows(acc), x_scale.reshape(-1)[:1], w_scale, bias, activation, out_dtype)
    return _from_rows(y, n, oh, ow)


def int8_conv2d_requant(x_q, x_zp, w_q, bias_int32, M0, shift, out_zp, qmin, qmax, stride, padding, dilation,
                        groups):
    acc = int8_conv2d_acc(x_q, w_q, stride, padding, dilation, groups, x_zp)
    n, _, oh, ow = acc.shape
    rows = _to_rows(acc)
    if bias_int32 is not None:
        rows = rows + bias_int32.to(torch.int64).reshape(-1)
    return _from_rows(requantize(rows, M0, shift, out_zp, qmin, qmax), n, oh, ow)


# ----------------------------------------------------------------------------------------- int4
def int4_dequantize(w_packed: torch.Tensor, scales: torch.Tensor, zeros: Optional[torch.Tensor], group_size: int,
                    K: int, dtype: torch.dtype) -> torch.Tensor:
    """Dequantized ``[N, K]`` weight: ``((q - z) * s)`` in fp32, rounded to ``dtype`` -- exactly the
    operand the kernels feed to the tensor cores."""
    q = packing.unpack_int4(w_packed, K, signed=False).to(torch.float32)
    gidx = torch.arange(K, device=q.device) // group_size
    s = scales.to(torch.float32)[:, gidx]
    z = zeros.to(torch.float32)[:, gidx] if zeros is not None else 8.0
    return ((q - z) * s).to(dtype)


def int4_weight_only_linear(x, w_packed, scales, zeros, group_size, bias):
    k = x.shape[-1]
    w = int4_dequantize(w_packed, scales, zeros, group_size, k, x.dtype)
    y = x.reshape(-1, k).to(torch.float32) @ w.to(torch.float32).t()
    if bias is not None:
        y = y + bias.to(torch.float32)
    return y.to(x.dtype).reshape(*x.shape[:-1], w.shape[0])


# --------------------------------------------------------------------------------------- binary
def binary_linear_acc(x: torch.Tensor, w_packed: torch.Tensor, K: int, x_packed: bool) -> torch.Tensor:
    """Exact ``sum_k x[m, k] * sign(w)[n, k]`` as int64 ``[M, N]`` (signs unpacked to ±1, one
    integer GEMM). For packed activations this equals :func:`binary_linear_acc_xnor`."""
    w_sign = packing.unpack_bits(w_packed, K)
    xv = packing.unpack_bits(x, K) if x_packed else x[:, :K]
    return int_matmul(xv, w_sign)


def binary_linear_acc_xnor(x_words: torch.Tensor, w_packed: torch.Tensor, K: int) -> torch.Tensor:
    """``K - 2 * popcount(x xor w)`` per (m, n) for packed ±1 activations (the XNOR-net identity,
    Rastegari et al. 2016), bits at positions >= K masked off. int64 ``[M, N]``."""
    words = w_packed.shape[1]
    full, rem = divmod(K, 32)
    mask = torch.zeros(words, dtype=torch.int64, device=x_words.device)
    mask[:full] = 0xFFFFFFFF
    if rem:
        mask[full] = (1 << rem) - 1
    d = (x_words[:, :words].to(torch.int64)[:, None, :] ^ w_packed.to(torch.int64)[None, :, :]) & mask
    return K - 2 * popcount32(d).sum(-1)


def binary_linear(x, w_packed, K, alpha, bias, x_packed):
    lead = x.shape[:-1]
    acc = binary_linear_acc(x.reshape(-1, x.shape[-1]), w_packed, K, x_packed)
    if alpha is None and bias is None:
        out = acc.to(torch.int32)
    else:
        y = acc.to(torch.float32)
        if alpha is not None:
            y = y * alpha.reshape(-1).to(torch.float32)
        if bias is not None:
            y = y + bias.reshape(-1).to(torch.float32)
        out = y
    return out.reshape(*lead, w_packed.shape[0])


# ------------------------------------------------------------------------------ fp8 (e4m3) GEMM
def fp8_linear_acc(x_q: torch.Tensor, w_q: torch.Tensor) -> torch.Tensor:
    """float32 ``x_q[M, K] @ w_q[N, K].T`` of float8_e4m3fn operands (each product is exact in
    float32: 4 + 4 significant bits; the sum is exact while it fits 24 bits, e.g. integer-valued
    codes, and otherwise rounds in an order the kernels do not share)."""
    return x_q.to(torch.float32) @ w_q.to(torch.float32).t()


def fp8_linear(x_q, x_scale, w_q, w_scale, bias, out_dtype):
    """fp8 GEMM with the float epilogue ``(acc * x_scale[m]) * w_scale[n] + bias[n]`` (fp32), cast."""
    return float_epilogue(fp8_linear_acc(x_q, w_q), x_scale, w_scale, bias, "none", out_dtype)
