"""ONNX translations of the fp8 quantizer ops (:mod:`qpasses.numerics.fp8`) for ``torch.onnx.export(dynamo=True)``.

:data:`FP8_TRANSLATIONS` maps each ``torch.ops.qpasses`` fp8 overload to an onnxscript function
building standard QDQ with ``FLOAT8E4M3FN`` (opset >= 19: ``QuantizeLinear`` with a float8 zero
point and ``saturate=1``, then ``DequantizeLinear``).  Pass it as
``torch.onnx.export(..., dynamo=True, custom_translation_table=FP8_TRANSLATIONS, opset_version=21)``
(the onnx exporter's registry takes it as it is).

* per tensor: ``DQ(Q(x, scale, zp_e4m3), scale, zp_e4m3)``;
* per channel: the same with ``axis`` (a 1-D scale);
* per token / dynamic per tensor: the scale is computed in the graph exactly as the torch op
  computes it (``max(ReduceMax(|x|), 1e-12) / 448``); ``QuantizeLinear`` cannot take a ``[..., 1]``
  scale, so ``x`` is divided by it first and quantized with scale 1 (``x / 1`` is exact), then
  multiplied back: the same float32 operations in the same order as the torch op.

All arithmetic is float32, as in the torch ops: inputs of another float dtype are cast to float32
and the result cast back (``CastLike``).
"""
from __future__ import annotations

from typing import Callable, Dict

import torch
from onnxscript import FLOAT, FLOAT8E4M3FN
from onnxscript import opset21 as op

from ..numerics import fp8 as _fp8  # noqa: F401  registers the ops

__all__ = ["FP8_TRANSLATIONS", "fp8_per_tensor", "fp8_per_channel", "fp8_per_token", "fp8_dynamic_tensor",
           "quantize_fp8_per_token"]

_MAX = _fp8.FP8_MAX
_MIN_AMAX = _fp8.FP8_MIN_AMAX


def _zero():
    """A float8 e4m3fn zero point (a scalar): it makes QuantizeLinear's output FLOAT8E4M3FN."""
    return op.Cast(op.Constant(value_float=0.0), to=FLOAT8E4M3FN.dtype)


def _f32(x):
    return op.Cast(x, to=FLOAT.dtype)


def fp8_per_tensor(x, scale):
    """``qpasses::fp8_fake_quant_per_tensor(x, scale)`` as QDQ float8 e4m3fn."""
    s = op.Squeeze(_f32(scale))                      # [] or [1] -> a scalar
    zp = _zero()
    y = op.DequantizeLinear(op.QuantizeLinear(_f32(x), s, zp, saturate=1), s, zp)
    return op.CastLike(y, x)


def fp8_per_channel(x, scale, axis: int):
    """``qpasses::fp8_fake_quant_per_channel(x, scale, axis)`` as per-axis QDQ float8 e4m3fn."""
    s = op.Reshape(_f32(scale), op.Constant(value_ints=[-1]))
    zp = op.Expand(_zero(), op.Shape(s))
    y = op.DequantizeLinear(op.QuantizeLinear(_f32(x), s, zp, axis=axis, saturate=1), s, zp, axis=axis)
    return op.CastLike(y, x)


def _dynamic_scale(xf, keep_last: bool):
    a = op.Abs(xf)
    amax = op.ReduceMax(a, op.Constant(value_ints=[-1]), keepdims=1) if keep_last else op.ReduceMax(a, keepdims=0)
    return op.Div(op.Max(amax, op.Constant(value_float=_MIN_AMAX)), op.Constant(value_float=_MAX))


def _qdq_unit(v):
    one, zp = op.Constant(value_float=1.0), _zero()
    return op.DequantizeLinear(op.QuantizeLinear(v, one, zp, saturate=1), one, zp)


def fp8_per_token(x):
    """``qpasses::fp8_fake_quant_per_token(x)``: per-row scale computed in the graph."""
    xf = _f32(x)
    s = _dynamic_scale(xf, True)
    return op.CastLike(op.Mul(_qdq_unit(op.Div(xf, s)), s), x)


def fp8_dynamic_tensor(x):
    """``qpasses::fp8_fake_quant_dynamic_tensor(x)``: one scale for the tensor, computed in the graph."""
    xf = _f32(x)
    s = _dynamic_scale(xf, False)
    return op.CastLike(op.Mul(_qdq_unit(op.Div(xf, s)), s), x)


def quantize_fp8_per_token(x):
    """``qpasses::quantize_fp8_per_token(x) -> (codes, scale)``: FLOAT8E4M3FN codes and float scales."""
    xf = _f32(x)
    s = _dynamic_scale(xf, True)
    q = op.QuantizeLinear(op.Div(xf, s), op.Constant(value_float=1.0), _zero(), saturate=1)
    return q, s


FP8_TRANSLATIONS: Dict[Callable, Callable] = {
    torch.ops.qpasses.fp8_fake_quant_per_tensor.default: fp8_per_tensor,
    torch.ops.qpasses.fp8_fake_quant_per_channel.default: fp8_per_channel,
    torch.ops.qpasses.fp8_fake_quant_per_token.default: fp8_per_token,
    torch.ops.qpasses.fp8_fake_quant_dynamic_tensor.default: fp8_dynamic_tensor,
    torch.ops.qpasses.quantize_fp8_per_token.default: quantize_fp8_per_token,
}
