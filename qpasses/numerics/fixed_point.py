"""Integer-only requantization with gemmlowp / TFLite fixed-point semantics.

Jacob, Kligys, Chen, Zhu, Tang, Howard, Adam and Kalenichenko, "Quantization and Training of
Neural Networks for Efficient Integer-Arithmetic-Only Inference", CVPR 2018, sec. 2.2: the real
multiplier ``M = s_x s_w / s_y`` is written ``M = M0 * 2**-31 * 2**-shift`` with a 31-bit
fixed-point ``M0`` in ``[2**30, 2**31)``; an int32 accumulator is rescaled by
``SaturatingRoundingDoublingHighMul(acc, M0)`` followed by ``RoundingDivideByPOT(., shift)``.

Sign convention (shared with :mod:`qpasses.kernels.reference`): a positive ``shift`` is a right
shift (``M < 0.5``), a negative one (``M >= 1``) a left shift applied to the accumulator before
the multiply, saturated to int32.

All functions take int32 values (held in int32 or int64 tensors), compute in int64 and
reproduce 32-bit gemmlowp bit for bit, including the saturation of ``INT32_MIN * INT32_MIN``.
"""
from __future__ import annotations

import math
from typing import Tuple, Union

import torch

__all__ = ["INT32_MIN", "INT32_MAX", "quantize_multiplier", "quantize_multiplier_tensor",
           "saturating_rounding_doubling_high_mul", "rounding_divide_by_pot", "multiply_by_quantized_multiplier",
           "requantize"]

INT32_MIN = -(1 << 31)
INT32_MAX = (1 << 31) - 1
_MAX_RIGHT_SHIFT = 62  # int64 shifts; anything beyond rounds every int32 product to 0


def quantize_multiplier(M: float) -> Tuple[int, int]:
    """``(M0, shift)`` with ``M ~= M0 * 2**-31 * 2**-shift`` and ``M0`` in ``[2**30, 2**31)``.

    ``M0`` is ``M``'s mantissa rounded (half away from zero) to 31 bits, so the relative error
    is at most ``2**-31``. ``M`` in (0, 1) gives ``shift >= 0`` (right shift); ``M >= 1`` gives
    a negative shift (left shift). ``M == 0`` -- or an ``M`` so small that every product
    rounds to 0 -- gives ``(0, 0)``. Raises ``ValueError`` for negative, non-finite or
    ``M >= 2**31`` multipliers.
    """
    M = float(M)
    if not math.isfinite(M) or M < 0:
        raise ValueError(f"multiplier must be finite and non-negative, got {M}")
    if M == 0.0:
        return 0, 0
    m, e = math.frexp(M)  # M = m * 2**e, m in [0.5, 1)
    m0 = int(math.floor(m * (1 << 31) + 0.5))
    if m0 == 1 << 31:
        m0 >>= 1
        e += 1
    shift = -e
    if shift > _MAX_RIGHT_SHIFT:
        return 0, 0
    if shift < -31:
        raise ValueError(f"multiplier {M} is too large for int32 requantization")
    return m0, shift


def quantize_multiplier_tensor(M: Union[torch.Tensor, list, float]) -> Tuple[torch.Tensor, torch.Tensor]:
    """Vectorised :func:`quantize_multiplier`: int64 tensors ``(M0, shift)`` of ``M``'s shape.

    Computed with ``torch.frexp`` in float64; agrees exactly with the scalar version.
    """
    m = torch.as_tensor(M, dtype=torch.float64)
    if not bool(torch.isfinite(m).all()) or bool((m < 0).any()):
        raise ValueError("multipliers must be finite and non-negative")
    mant, exp = torch.frexp(m)
    m0 = torch.floor(mant * float(1 << 31) + 0.5).to(torch.int64)
    exp = exp.to(torch.int64)
    carry = m0 == (1 << 31)
    m0 = torch.where(carry, m0 >> 1, m0)
    shift = -(exp + carry.to(torch.int64))
    if bool((shift < -31).any()):
        raise ValueError("a multiplier is too large for int32 requantization")
    zero = (m == 0) | (shift > _MAX_RIGHT_SHIFT)
    m0 = torch.where(zero, torch.zeros_like(m0), m0)
    shift = torch.where(zero, torch.zeros_like(shift), shift)
    return m0, shift


def saturating_rounding_doubling_high_mul(a: torch.Tensor, b: Union[torch.Tensor, int]) -> torch.Tensor:
    """gemmlowp ``SaturatingRoundingDoublingHighMul(a, b)`` for int32 values: the high 32 bits of
    ``2ab``, rounded to nearest (ties away from zero) -- ``(a*b + nudge) / 2**31`` with C's
    truncating division and ``nudge = 2**30`` (``1 - 2**30`` for a negative product) -- saturated
    to ``INT32_MAX`` in the single overflow case ``a == b == INT32_MIN``. Returns int32.
    """
    a64 = torch.as_tensor(a).to(torch.int64)
    b64 = torch.as_tensor(b, device=a64.device).to(torch.int64)
    ab = a64 * b64
    nudge = torch.where(ab >= 0, torch.full_like(ab, 1 << 30), torch.full_like(ab, 1 - (1 << 30)))
    res = torch.div(ab + nudge, 1 << 31, rounding_mode="trunc")
    overflow = (a64 == INT32_MIN) & (b64 == INT32_MIN)
    res = torch.where(overflow, torch.full_like(res, INT32_MAX), res)
    return res.to(torch.int32)


def rounding_divide_by_pot(x: torch.Tensor, exponent: Union[torch.Tensor, int]) -> torch.Tensor:
    """gemmlowp ``RoundingDivideByPOT(x, exponent)``: ``x / 2**exponent`` rounded to nearest,
    ties away from zero, for int32 ``x`` and ``0 <= exponent`` (a tensor broadcasting with ``x``,
    or an int). gemmlowp allows exponents up to 31; larger ones (<= 62) are computed in int64
    with the same rounding. Returns int32.
    """
    x64 = torch.as_tensor(x).to(torch.int64)
    e = torch.as_tensor(exponent, device=x64.device).to(torch.int64)
    if bool((e < 0).any()) or bool((e > _MAX_RIGHT_SHIFT).any()):
        raise ValueError(f"exponent must be in [0, {_MAX_RIGHT_SHIFT}]")
    mask = (torch.ones_like(e) << e) - 1
    remainder = x64 & mask
    threshold = (mask >> 1) + (x64 < 0).to(torch.int64)
    return ((x64 >> e) + (remainder > threshold).to(torch.int64)).to(torch.int32)


def _per_channel(p: Union[torch.Tensor, int], acc: torch.Tensor, axis: int) -> torch.Tensor:
    t = torch.as_tensor(p, device=acc.device).to(torch.int64)
    if t.numel() == 1:
        return t.reshape(())
    if acc.dim() == 0:
        raise ValueError("per-channel multipliers need a non-scalar accumulator")
    ax = axis % acc.dim()
    if t.numel() != acc.shape[ax]:
        raise ValueError(f"{t.numel()} multipliers for {acc.shape[ax]} channels along axis {axis}")
    shape = [1] * acc.dim()
    shape[ax] = -1
    return t.reshape(shape)


def multiply_by_quantized_multiplier(acc: torch.Tensor, M0: Union[torch.Tensor, int],
                                     shift: Union[torch.Tensor, int], axis: int = -1) -> torch.Tensor:
    """``acc * M0 * 2**-31 * 2**-shift`` with gemmlowp rounding (TFLite
    ``MultiplyByQuantizedMultiplier``): a negative ``shift`` left-shifts ``acc`` first (saturating
    to int32), then ``SaturatingRoundingDoublingHighMul`` and ``RoundingDivideByPOT``.
    Per-channel ``M0``/``shift`` (1-D) apply along ``axis`` of ``acc``. Returns int32.
    """
    acc64 = torch.as_tensor(acc).to(torch.int64)
    m0 = _per_channel(M0, acc64, axis)
    sh = _per_channel(shift, acc64, axis)
    left = torch.clamp(-sh, min=0)
    right = torch.clamp(sh, min=0)
    x = torch.clamp(acc64 << left, INT32_MIN, INT32_MAX)
    return rounding_divide_by_pot(saturating_rounding_doubling_high_mul(x, m0), right)


def requantize(acc_int32: torch.Tensor, M0: Union[torch.Tensor, int], shift: Union[torch.Tensor, int],
               zero_point: Union[torch.Tensor, int], qmin: int, qmax: int, axis: int = -1) -> torch.Tensor:
    """Integer-only requantization ``clamp(zero_point + RDBPOT(SRDHM(acc, M0), shift), qmin, qmax)``.

    ``acc_int32`` holds int32 accumulators; ``M0``/``shift`` come from
    :func:`quantize_multiplier` (scalars) or :func:`quantize_multiplier_tensor` (per channel along
    ``axis``, default the last dimension); ``zero_point`` is the output zero point (scalar or
    per channel). The result is within 1 of ``round(acc * M) + zero_point`` (before clamping)
    and is returned as int32.
    """
    acc64 = torch.as_tensor(acc_int32).to(torch.int64)
    y = multiply_by_quantized_multiplier(acc64, M0, shift, axis).to(torch.int64)
    y = y + _per_channel(zero_point, acc64, axis)
    return torch.clamp(y, int(qmin), int(qmax)).to(torch.int32)
