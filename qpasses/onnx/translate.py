"""ONNX translations of qpasses' quantizer ops, for ``torch.onnx.export(..., dynamo=True)``.

``torch.export`` keeps each ``torch.ops.qpasses.*`` quantizer (:mod:`qpasses.numerics.qops`) as one
node; torch.onnx's dispatcher then looks its target up in a ``custom_translation_table``.  This
module is that table, kept as a small registry that other modules add to::

    from qpasses.onnx.translate import register_translation, options, opset

    @register_translation(torch.ops.qpasses.my_quantizer.default)
    def my_quantizer(x, scale, zero_point, quant_min: int, quant_max: int):
        op = opset()                      # onnxscript opset of the running export
        return op.DequantizeLinear(op.QuantizeLinear(x, scale, ...), scale, ...)

A translation is a plain Python function in onnxscript's *trace-only* style: tensor arguments
arrive as ONNX values, the op's non-tensor arguments (ints, bools) as Python values, and it
returns the ONNX value(s) of the op's output(s).  :func:`options` gives the settings of the running
export (opset, 4-bit types).

The translations (QDQ semantics: ``QuantizeLinear`` computes ``saturate(round(x / scale) + zp)``
with round-half-to-even, ``DequantizeLinear`` ``(q - zp) * scale``):

* ``fake_quant_per_tensor`` / ``fake_quant_per_channel`` -> ``QuantizeLinear`` -> ``DequantizeLinear``
  (``axis`` for per channel).  The zero-point type is the narrowest that holds ``[qmin, qmax]``:
  uint8 / int8 (and uint16 / int16 at opset 21).  Where the range is narrower than that type a
  ``Clip`` to ``[qmin, qmax]`` follows the ``QuantizeLinear`` (int8 weights in ``[-127, 127]``,
  4-bit activation codes in uint8); with ``int4_activations=True`` at opset 21 the clean-up turns
  such a ``Q -> Clip -> DQ`` into ``UINT4`` / ``INT4`` Q/DQ.  (torchlib's own ``quantized_decomposed.quantize_per_tensor``
  drops ``quant_min`` / ``quant_max``, which is why qpasses does not go through it.)
* ``fake_quant_lsq_per_tensor`` / ``_per_channel`` -> the same, at the current scale
  ``max(|scale|, eps)`` (LSQ's forward).
* ``fake_quant_per_group`` -> blocked ``QuantizeLinear`` / ``DequantizeLinear`` with ``block_size``
  along the last axis (opset 21), 4-bit types for a 4-bit range.
* ``fake_quant_per_token`` -> the per-row scale / zero point computed with float ops
  (``ReduceMin`` / ``ReduceMax``, the range widened to hold 0, ``Div``, ``Round``, ``Clip``), then a
  blocked ``QuantizeLinear`` / ``DequantizeLinear`` with one block per row (opset 21; at earlier
  opsets the same arithmetic as float ops).
* ``quantize_per_token`` -> the same scale computation and int32 codes (``Clip(Round(x / s) + z)``).
* ``fake_quant_dynamic_per_tensor`` -> the same arithmetic with the range of the whole tensor,
  then a per-tensor ``QuantizeLinear`` / ``DequantizeLinear`` (``Clip`` for a narrow range).
* ``fake_quant_dynamic_per_slice`` -> the same arithmetic reduced over ``reduce_dim`` (float ops).

The exporter folds the ``QuantizeLinear`` of a constant weight into an integer initializer
afterwards (:mod:`qpasses.onnx.cleanup`).
"""
from __future__ import annotations

import contextlib
import contextvars
import dataclasses
from typing import Callable, Dict, Iterator, Optional, Tuple

import torch
from onnxscript import ir

__all__ = ["register_translation", "unregister_translation", "translation_table", "ExportOptions", "options",
           "opset", "using", "quant_type", "qdq", "TranslationError"]


class TranslationError(ValueError):
    """A quantizer whose parameters ONNX cannot express (the message says which and why)."""


@dataclasses.dataclass(frozen=True)
class ExportOptions:
    """Settings of one export, visible to translations through :func:`options`."""
    opset: int = 21
    int4_activations: bool = False


_OPTIONS: contextvars.ContextVar[ExportOptions] = contextvars.ContextVar("qpasses_onnx_options",
                                                                        default=ExportOptions())
_TABLE: Dict[torch._ops.OpOverload, Callable] = {}


def register_translation(op_overload, fn: Optional[Callable] = None):
    """Register ``fn`` as the ONNX translation of ``op_overload`` (an ``OpOverload`` such as
    ``torch.ops.qpasses.fake_quant_per_tensor.default``); usable as a decorator.  A later
    registration for the same op replaces the earlier one."""
    if not isinstance(op_overload, torch._ops.OpOverload):
        raise TypeError(f"register_translation needs an OpOverload (e.g. torch.ops.ns.op.default), "
                        f"got {type(op_overload).__name__}")

    def deco(f: Callable) -> Callable:
        if not callable(f):
            raise TypeError(f"the translation of {op_overload} must be callable")
        _TABLE[op_overload] = f
        return f
    return deco(fn) if fn is not None else deco


def unregister_translation(op_overload) -> None:
    """Remove the translation of ``op_overload`` (no error when there is none)."""
    _TABLE.pop(op_overload, None)


def translation_table() -> Dict[torch._ops.OpOverload, Callable]:
    """A copy of the registry: the ``custom_translation_table`` :func:`qpasses.export_onnx` passes
    to ``torch.onnx.export``."""
    return dict(_TABLE)


def options() -> ExportOptions:
    """The options of the running export."""
    return _OPTIONS.get()


@contextlib.contextmanager
def using(opts: ExportOptions) -> Iterator[ExportOptions]:
    """Run a block (the export) with ``opts`` visible to the translations."""
    tok = _OPTIONS.set(opts)
    try:
        yield opts
    finally:
        _OPTIONS.reset(tok)


def opset():
    """The onnxscript opset module of the running export (opset 21 when it allows, else 18)."""
    if options().opset >= 21:
        from onnxscript import opset21 as op
    else:
        from onnxscript import opset18 as op
    return op


# ------------------------------------------------------------------------------- helpers
_TYPES_8 = [(ir.DataType.UINT8, 0, 255), (ir.DataType.INT8, -128, 127)]
_TYPES_4 = [(ir.DataType.UINT4, 0, 15), (ir.DataType.INT4, -8, 7)]
_TYPES_16 = [(ir.DataType.UINT16, 0, 65535), (ir.DataType.INT16, -32768, 32767)]


def quant_type(qmin: int, qmax: int, opset_version: int, allow_4bit: bool = False) -> Tuple[ir.DataType, int, int]:
    """(ONNX element type, type min, type max) of the narrowest Q/DQ type holding ``[qmin, qmax]``."""
    cands = (_TYPES_4 if (opset_version >= 21 and allow_4bit) else []) + _TYPES_8 + \
        (_TYPES_16 if opset_version >= 21 else [])
    for t, lo, hi in cands:
        if lo <= qmin and qmax <= hi:
            return t, lo, hi
    raise TranslationError(f"integer range [{qmin}, {qmax}] has no ONNX QuantizeLinear type at opset {opset_version}"
                           + ("" if opset_version >= 21 else " (opset 21 adds 16-bit types)"))


def _const(op, value, dtype: ir.DataType):
    import numpy as np
    arr = np.array(value, dtype=dtype.numpy())
    return op.Constant(value=ir.tensor(arr, dtype=dtype))


def qdq(x, scale, zero_point, quant_min: int, quant_max: int, axis: Optional[int] = None,
        block_size: Optional[int] = None):
    """``QuantizeLinear`` [-> ``Clip``] -> ``DequantizeLinear`` of ``x``: fake quantization to
    ``[quant_min, quant_max]`` with ``scale`` / ``zero_point`` (ONNX values; the zero point of any
    integer type, cast to the Q/DQ type here)."""
    opts = options()
    op = opset()
    if block_size is not None and opts.opset < 21:
        raise TranslationError(f"blocked (group-wise) quantization needs opset 21, got opset {opts.opset}")
    # 4-bit ranges go in 8-bit containers + Clip here: the clean-up folds weights into INT4 /
    # UINT4 initializers and, with int4_activations, retypes activation Q/DQ pairs afterwards
    # (onnx-graphsurgeon cannot carry 4-bit constants through its passes)
    dt, lo, hi = quant_type(int(quant_min), int(quant_max), opts.opset, False)
    zp = op.Cast(zero_point, to=dt)
    kw = {}
    if axis is not None:
        kw["axis"] = int(axis)
    if block_size is not None:
        kw["block_size"] = int(block_size)
    q = op.QuantizeLinear(x, scale, zp, **kw)
    if quant_min > lo or quant_max < hi:
        q = op.Clip(q, _const(op, quant_min, dt), _const(op, quant_max, dt))
    return op.DequantizeLinear(q, scale, zp, **kw)


def _rank(x) -> Optional[int]:
    shape = getattr(x, "shape", None)
    return None if shape is None else len(shape)


def _f32(op, x):
    return op.Cast(x, to=ir.DataType.FLOAT)


# ------------------------------------------------------------------------------- quantizers
_QOPS = torch.ops.qpasses
from ..methods import binary as _binary  # noqa: E402,F401  (registers qpasses::binary_sign / binary_weight)
_EPS = float(torch.finfo(torch.float32).eps)


@register_translation(_QOPS.fake_quant_per_tensor.default)
def fake_quant_per_tensor(x, scale, zero_point, quant_min: int, quant_max: int):
    op = opset()
    return qdq(x, op.Reshape(_f32(op, scale), _const(op, [], ir.DataType.INT64)),
               op.Reshape(zero_point, _const(op, [], ir.DataType.INT64)), quant_min, quant_max)


@register_translation(_QOPS.fake_quant_per_channel.default)
def fake_quant_per_channel(x, scale, zero_point, axis: int, quant_min: int, quant_max: int):
    op = opset()
    r = _rank(x)
    ax = axis + r if (axis < 0 and r is not None) else axis
    flat = _const(op, [-1], ir.DataType.INT64)
    return qdq(x, op.Reshape(_f32(op, scale), flat), op.Reshape(zero_point, flat), quant_min, quant_max, axis=ax)


def _lsq_scale(op, scale):
    return op.Max(op.Abs(_f32(op, scale)), _const(op, _EPS, ir.DataType.FLOAT))


@register_translation(_QOPS.fake_quant_lsq_per_tensor.default)
def fake_quant_lsq_per_tensor(x, scale, zero_point, quant_min: int, quant_max: int):
    op = opset()
    scalar = _const(op, [], ir.DataType.INT64)
    return qdq(x, op.Reshape(_lsq_scale(op, scale), scalar), op.Reshape(zero_point, scalar), quant_min, quant_max)


@register_translation(_QOPS.fake_quant_lsq_per_channel.default)
def fake_quant_lsq_per_channel(x, scale, zero_point, axis: int, quant_min: int, quant_max: int):
    op = opset()
    r = _rank(x)
    ax = axis + r if (axis < 0 and r is not None) else axis
    flat = _const(op, [-1], ir.DataType.INT64)
    return qdq(x, op.Reshape(_lsq_scale(op, scale), flat), op.Reshape(zero_point, flat), quant_min, quant_max,
               axis=ax)


@register_translation(_QOPS.fake_quant_per_group.default)
def fake_quant_per_group(x, scale, zero_point, group_size: int, quant_min: int, quant_max: int):
    r = _rank(x)
    if r is None:
        raise TranslationError("fake_quant_per_group: the input's rank is unknown")
    op = opset()
    # a weight (constant) is folded to an INT4 / UINT4 initializer by the clean-up
    return qdq(x, _f32(op, scale), zero_point, quant_min, quant_max, axis=r - 1, block_size=group_size)


def _sign_ste_value(op, x):
    """``clip(x, -1, 1) + (sign(x) - clip(x, -1, 1))`` with sign(0) = +1: the binary quantizers'
    forward value, the same float operations in the same order."""
    one = op.CastLike(_const(op, 1.0, ir.DataType.FLOAT), x)
    neg = op.Neg(one)
    c = op.Clip(x, neg, one)
    s = op.Where(op.GreaterOrEqual(x, op.CastLike(_const(op, 0.0, ir.DataType.FLOAT), x)), one, neg)
    return op.Add(c, op.Sub(s, c))


@register_translation(_QOPS.binary_sign.default)
def binary_sign(x):
    return _sign_ste_value(opset(), x)


@register_translation(_QOPS.binary_weight.default)
def binary_weight(w, axis: int, scale: bool):
    op = opset()
    b = _sign_ste_value(op, w)
    if not scale:
        return b
    r = _rank(w)
    if r is None:
        raise TranslationError("binary_weight: the weight's rank is unknown")
    dims = [d for d in range(r) if d != axis % r]
    if not dims:
        return op.Mul(b, op.Abs(w))
    return op.Mul(b, op.ReduceMean(op.Abs(w), _const(op, dims, ir.DataType.INT64), keepdims=1))


def _token_qparams(op, x, quant_min: int, quant_max: int, symmetric: bool, axis: Optional[int] = -1):
    """float32 ``(scale, zero_point)`` of ``x`` per row (``axis=-1``, kept), per slice reduced over
    ``axis`` (kept), or for the whole tensor (``axis=None``, scalars): ``dynamic_range_qparams``."""
    f = ir.DataType.FLOAT
    zero = _const(op, 0.0, f)
    if axis is None:
        lo = op.Min(op.ReduceMin(x, keepdims=0), zero)
        hi = op.Max(op.ReduceMax(x, keepdims=0), zero)
    else:
        axes = _const(op, [int(axis)], ir.DataType.INT64)
        lo = op.Min(op.ReduceMin(x, axes, keepdims=1), zero)
        hi = op.Max(op.ReduceMax(x, axes, keepdims=1), zero)
    eps = _const(op, _EPS, f)
    if symmetric:
        scale = op.Max(op.Div(op.Max(op.Neg(lo), hi), _const(op, float(quant_max), f)), eps)
        return scale, op.Mul(scale, zero)
    scale = op.Max(op.Div(op.Sub(hi, lo), _const(op, float(quant_max - quant_min), f)), eps)
    zp = op.Round(op.Sub(_const(op, float(quant_min), f), op.Div(lo, scale)))
    zp = op.Clip(zp, _const(op, float(quant_min), f), _const(op, float(quant_max), f))
    return scale, zp


def _token_codes(op, x, scale, zp, quant_min: int, quant_max: int):
    f = ir.DataType.FLOAT
    return op.Clip(op.Add(op.Round(op.Div(x, scale)), zp), _const(op, float(quant_min), f),
                   _const(op, float(quant_max), f))


@register_translation(_QOPS.fake_quant_per_token.default)
def fake_quant_per_token(x, quant_min: int, quant_max: int, symmetric: bool):
    op = opset()
    xf = _f32(op, x)
    scale, zp = _token_qparams(op, xf, quant_min, quant_max, symmetric)
    shape = getattr(x, "shape", None)
    k = shape[-1] if shape is not None and len(shape) else None
    if options().opset >= 21 and isinstance(k, int):
        # one block per row: blocked Q/DQ along the last axis with block_size = K
        y = qdq(xf, scale, op.Cast(zp, to=ir.DataType.INT32), quant_min, quant_max, axis=len(shape) - 1,
                block_size=k)
    else:
        y = op.Mul(op.Sub(_token_codes(op, xf, scale, zp, quant_min, quant_max), zp), scale)
    return op.CastLike(y, x)


@register_translation(_QOPS.quantize_per_token.default)
def quantize_per_token(x, quant_min: int, quant_max: int, symmetric: bool):
    op = opset()
    xf = _f32(op, x)
    scale, zp = _token_qparams(op, xf, quant_min, quant_max, symmetric)
    codes = _token_codes(op, xf, scale, zp, quant_min, quant_max)
    i32 = ir.DataType.INT32
    return op.Cast(codes, to=i32), scale, op.Cast(zp, to=i32)


@register_translation(_QOPS.fake_quant_dynamic_per_tensor.default)
def fake_quant_dynamic_per_tensor(x, quant_min: int, quant_max: int, symmetric: bool):
    op = opset()
    xf = _f32(op, x)
    scale, zp = _token_qparams(op, xf, quant_min, quant_max, symmetric, None)
    y = qdq(xf, scale, op.Cast(zp, to=ir.DataType.INT32), quant_min, quant_max)
    return op.CastLike(y, x)


@register_translation(_QOPS.fake_quant_dynamic_per_slice.default)
def fake_quant_dynamic_per_slice(x, reduce_dim: int, quant_min: int, quant_max: int, symmetric: bool):
    op = opset()
    xf = _f32(op, x)
    scale, zp = _token_qparams(op, xf, quant_min, quant_max, symmetric, reduce_dim)
    y = op.Mul(op.Sub(_token_codes(op, xf, scale, zp, quant_min, quant_max), zp), scale)
    return op.CastLike(y, x)
