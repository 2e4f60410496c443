"""Affine quantization parameters and the quantize / dequantize / fake-quantize primitives.

Conventions (shared by every layer of qpasses, the integer kernels and ONNX export):

* integer grid ``[qmin, qmax]``; real value ``x ~= (q - zero_point) * scale``;
* ``quantize(x) = clamp(round(x * (1 / scale)) + zero_point, qmin, qmax)`` with round half to
  even, computed in float32 exactly like ``torch.fake_quantize_per_tensor_affine`` (which
  multiplies by the float32 reciprocal of the scale), so that fake quantization, the integer
  kernels and the reference functions here agree bit for bit;
* per-channel parameters are 1-D tensors of length ``C`` applied along ``axis``.

References: Jacob et al., "Quantization and Training of Neural Networks for Efficient
Integer-Arithmetic-Only Inference", CVPR 2018 (affine scheme, zero point exactly representable);
Krishnamoorthi, "Quantizing deep convolutional networks for efficient inference", 2018.
"""
from __future__ import annotations

import math
from typing import List, Optional, Tuple, Union

import torch

__all__ = ["qrange", "calc_qparams", "calc_symmetric_qparams", "absmax_qparams", "absmax_qparams_many", "quantize",
           "dequantize", "fake_quantize", "sqnr", "dynamic_qparams", "dynamic_range_qparams"]

Number = Union[int, float]
TensorLike = Union[torch.Tensor, Number]

_F32_EPS = torch.finfo(torch.float32).eps


def qrange(bits: int, signed: bool, narrow: bool = False) -> Tuple[int, int]:
    """Integer range ``(qmin, qmax)`` of a ``bits``-wide integer.

    * signed: ``[-2**(bits-1), 2**(bits-1) - 1]`` (e.g. int8 ``[-128, 127]``);
    * unsigned: ``[0, 2**bits - 1]`` (e.g. uint8 ``[0, 255]``);
    * ``narrow=True`` drops the most negative code of a signed range so that it is symmetric,
      ``[-(2**(bits-1) - 1), 2**(bits-1) - 1]`` (``[-127, 127]``), as used for symmetric weights;
      for an unsigned range it drops code 0 (``[1, 2**bits - 1]``, TensorFlow's "narrow range").

    Raises ``ValueError`` for ``bits < 1`` (or ``bits < 2`` with ``narrow``).
    """
    bits = int(bits)
    if bits < 1:
        raise ValueError(f"bits must be >= 1, got {bits}")
    if narrow and bits < 2:
        raise ValueError("a narrow range needs at least 2 bits")
    if signed:
        qmin, qmax = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    else:
        qmin, qmax = 0, (1 << bits) - 1
    if narrow:
        qmin += 1
    return qmin, qmax


def _as_f32(v: TensorLike) -> torch.Tensor:
    if isinstance(v, torch.Tensor):
        return v.detach().to(torch.float32)
    return torch.tensor(float(v), dtype=torch.float32)


def calc_qparams(min_val: TensorLike, max_val: TensorLike, qmin: int, qmax: int, symmetric: bool,
                 eps: float = _F32_EPS) -> Tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point mapping the real range ``[min_val, max_val]`` onto ``[qmin, qmax]``.

    Works elementwise, so per-channel ranges (1-D tensors) give per-channel parameters.
    The range is first widened to contain 0 (``min <= 0 <= max``) so that 0 is exactly
    representable (zero padding, ReLU).

    * asymmetric: ``scale = (max - min) / (qmax - qmin)``, ``zero_point = qmin - round(min / scale)``
      clamped to ``[qmin, qmax]``;
    * symmetric: ``scale = max(|min|, max) / ((qmax - qmin) / 2)``; ``zero_point = 0`` for a
      signed range (``qmin < 0``) and the mid code ``(qmin + qmax + 1) // 2`` for an unsigned one.
      With a narrow signed range (``[-127, 127]``) this is ``amax / 127``.

    ``scale`` is clamped to ``>= eps``. Returns ``(scale, zero_point)`` as float32 / int32 tensors
    of the broadcast shape of ``min_val`` and ``max_val``.
    """
    qmin, qmax = int(qmin), int(qmax)
    if qmin >= qmax:
        raise ValueError(f"empty integer range [{qmin}, {qmax}]")
    lo = torch.clamp(_as_f32(min_val), max=0.0)
    hi = torch.clamp(_as_f32(max_val), min=0.0)
    if lo.shape != hi.shape:
        lo, hi = torch.broadcast_tensors(lo, hi)
    if symmetric:
        amax = torch.maximum(-lo, hi)
        scale = torch.clamp(amax / ((qmax - qmin) / 2.0), min=eps)
        zp_val = 0 if qmin < 0 else (qmin + qmax + 1) // 2
        zero_point = torch.full_like(scale, zp_val, dtype=torch.int32)
    else:
        scale = torch.clamp((hi - lo) / float(qmax - qmin), min=eps)
        zp = qmin - torch.round(lo / scale)
        zero_point = torch.clamp(zp, qmin, qmax).to(torch.int32)
    return scale.to(torch.float32), zero_point


def calc_symmetric_qparams(amax: torch.Tensor, qmin: int, qmax: int,
                           eps: float = _F32_EPS) -> Tuple[torch.Tensor, torch.Tensor]:
    """``calc_qparams(-amax, amax, qmin, qmax, symmetric=True)`` for a signed range, in fewer ops.

    ``amax`` is a float32 tensor of absolute maxima (``>= 0``, or NaN); the result is
    bit-identical to :func:`calc_qparams` on ``[-amax, amax]`` (the weight quantizers of
    thousands of layers use it).  Returns float32 ``scale`` and an int32 zero point of 0.
    """
    qmin, qmax = int(qmin), int(qmax)
    if not qmin < 0 < qmax:
        raise ValueError(f"calc_symmetric_qparams needs a signed range, got [{qmin}, {qmax}]")
    scale = torch.clamp(amax / ((qmax - qmin) / 2.0), min=eps)
    return scale, torch.zeros(scale.shape, dtype=torch.int32)


def absmax_qparams(weight: torch.Tensor, axis: Optional[int], qmin: int, qmax: int
                   ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Symmetric qparams of ``weight`` from its largest magnitude, per tensor or per channel along ``axis``.

    ``calc_qparams(-amax, amax, qmin, qmax, symmetric=True)`` with ``amax = max |weight|`` (in
    float32): the min-max rule for weights on a signed range.
    """
    w = weight.detach().float()
    if axis is None:
        amax = w.abs().max()
    elif axis == 0 and w.dim() > 1:
        amax = w.abs().amax(dim=tuple(range(1, w.dim())))
    else:
        amax = w.transpose(0, axis).reshape(w.shape[axis], -1).abs().amax(1)
    return calc_symmetric_qparams(amax, qmin, qmax)


def absmax_qparams_many(weights, axis: Optional[int], qmin: int, qmax: int
                        ) -> List[Tuple[torch.Tensor, torch.Tensor]]:
    """:func:`absmax_qparams` of many weights of one shape, dtype and device, in one vectorised pass.

    Bit-identical to calling :func:`absmax_qparams` on each (a maximum is exact and the rest
    is elementwise); the results are views of one tensor (clone them to keep them).
    """
    w = torch.stack([t.detach() for t in weights]).float()
    n = w.shape[0]
    if axis is None:
        amax = w.reshape(n, -1).abs().amax(1)
    else:
        ax = axis + 1
        amax = w.transpose(1, ax).reshape(n, w.shape[ax], -1).abs().amax(2)
    scale, zp = calc_symmetric_qparams(amax, qmin, qmax)
    return list(zip(scale.unbind(0), zp.unbind(0)))


def _channel_view(p: torch.Tensor, x: torch.Tensor, axis: Optional[int]) -> torch.Tensor:
    """Reshape a per-channel parameter so that it broadcasts along ``axis`` of ``x``."""
    if axis is None:
        if p.numel() != 1:
            raise ValueError(f"per-tensor quantization needs one scale/zero point, got {p.numel()} "
                             f"(pass axis= for per-channel parameters)")
        return p.reshape(())
    ax = axis + x.dim() if axis < 0 else axis
    if not 0 <= ax < x.dim():
        raise ValueError(f"axis {axis} is out of range for a {x.dim()}-d tensor")
    shape = [1] * x.dim()
    shape[ax] = -1
    p = p.reshape(-1)
    if p.numel() == 1:
        return p.reshape(())
    if p.numel() != x.shape[ax]:
        raise ValueError(f"{p.numel()} per-channel parameters for {x.shape[ax]} channels along axis {axis}")
    return p.reshape(shape)


def _params(x: torch.Tensor, scale: TensorLike, zero_point: TensorLike, axis: Optional[int]):
    s = torch.as_tensor(scale, dtype=torch.float32, device=x.device)
    z = torch.as_tensor(zero_point, device=x.device)
    return _channel_view(s, x, axis), _channel_view(z, x, axis)


def quantize(x: torch.Tensor, scale: TensorLike, zero_point: TensorLike, qmin: int, qmax: int,
             axis: Optional[int] = None) -> torch.Tensor:
    """Integer codes ``clamp(round(x * (1/scale)) + zero_point, qmin, qmax)`` as an int32 tensor.

    Rounding is half to even (``torch.round``); the arithmetic is float32, matching
    ``torch.fake_quantize_per_tensor_affine`` / ``..._per_channel_affine``. ``axis=None`` is
    per-tensor; an int applies 1-D ``scale`` / ``zero_point`` along that axis.
    """
    s, z = _params(x, scale, zero_point, axis)
    inv = 1.0 / s
    q = torch.round(x.to(torch.float32) * inv) + z.to(torch.float32)
    return torch.clamp(q, int(qmin), int(qmax)).to(torch.int32)


def dequantize(q: torch.Tensor, scale: TensorLike, zero_point: TensorLike, axis: Optional[int] = None
               ) -> torch.Tensor:
    """Real values ``(q - zero_point) * scale`` (float32) of integer codes ``q``."""
    s, z = _params(q, scale, zero_point, axis)
    return (q.to(torch.float32) - z.to(torch.float32)) * s


def fake_quantize(x: torch.Tensor, scale: TensorLike, zero_point: TensorLike, qmin: int, qmax: int,
                  axis: Optional[int] = None) -> torch.Tensor:
    """``dequantize(quantize(x))`` with a straight-through gradient.

    The gradient w.r.t. ``x`` is 1 where the code was inside ``[qmin, qmax]`` before clamping and
    0 outside (Bengio et al., 2013; as in ``torch.fake_quantize_per_*_affine``, which this calls
    for float inputs). ``scale`` and ``zero_point`` receive no gradient (see
    :class:`~qpasses.numerics.FakeQuantize` with ``learnable=True`` for LSQ).
    """
    qmin, qmax = int(qmin), int(qmax)
    s = torch.as_tensor(scale, dtype=torch.float32, device=x.device).detach()
    z = torch.as_tensor(zero_point, device=x.device).detach().to(torch.int32)
    if not x.is_floating_point():
        raise TypeError(f"fake_quantize needs a floating-point tensor, got {x.dtype}")
    if axis is None or (s.numel() == 1 and z.numel() == 1):
        s0, z0 = s.reshape(()), z.reshape(())
        if s.numel() != 1 or z.numel() != 1:
            raise ValueError("per-tensor fake quantization needs one scale/zero point (pass axis=)")
        return torch.fake_quantize_per_tensor_affine(x, s0, z0, qmin, qmax)
    ax = axis + x.dim() if axis < 0 else axis
    if not 0 <= ax < x.dim():
        raise ValueError(f"axis {axis} is out of range for a {x.dim()}-d tensor")
    s1, z1 = s.reshape(-1), z.reshape(-1)
    if s1.numel() == 1:
        s1 = s1.expand(x.shape[ax]).contiguous()
    if z1.numel() == 1:
        z1 = z1.expand(x.shape[ax]).contiguous()
    return torch.fake_quantize_per_channel_affine(x, s1, z1, ax, qmin, qmax)


def dynamic_range_qparams(x: torch.Tensor, qmin: int, qmax: int, symmetric: bool, reduce_dim: Optional[int]
                          ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point of ``x`` from its own min / max (dynamic quantization), in ``x``'s dtype.

    ``reduce_dim=None``: one pair for the whole tensor (0-d); otherwise one pair per slice along
    every other dimension, reduced over ``reduce_dim`` (kept as a size-1 dim, so the result
    broadcasts; ``-1`` is per token).  The range is widened to hold 0.

    * symmetric (signed range): ``scale = max(|min|, max) / qmax``, zero point 0;
    * affine: ``scale = (max - min) / (qmax - qmin)``, ``zero_point = clamp(round(qmin - min / scale),
      qmin, qmax)`` (an integer value, returned as a float tensor).

    ``scale`` is clamped to ``>= eps`` (float32); ``x`` is read detached (the qparams get no gradient).
    """
    xf = x.detach()
    if reduce_dim is None:
        lo, hi = xf.amin(), xf.amax()
    else:
        lo, hi = xf.amin(dim=reduce_dim, keepdim=True), xf.amax(dim=reduce_dim, keepdim=True)
    lo = torch.clamp(lo, max=0.0)
    hi = torch.clamp(hi, min=0.0)
    if symmetric:
        scale = torch.clamp(torch.maximum(-lo, hi) / qmax, min=_F32_EPS)
        zp = torch.zeros_like(scale)
    else:
        scale = torch.clamp((hi - lo) / (qmax - qmin), min=_F32_EPS)
        zp = torch.clamp(torch.round(qmin - lo / scale), qmin, qmax)
    return scale, zp


def dynamic_qparams(x: torch.Tensor, bits: int, symmetric: bool, reduce_dim: Optional[int]):
    """``(scale, zero_point, qmin, qmax)`` of ``x`` for dynamic ``bits``-wide quantization.

    Affine: unsigned ``[0, 2**bits - 1]``; symmetric: signed narrow ``[-(2**(bits-1) - 1),
    2**(bits-1) - 1]`` with zero point 0.  ``scale`` / ``zero_point`` are float32 tensors from
    :func:`dynamic_range_qparams` (``reduce_dim`` as there), the range plain ints.  The per-token
    ops ``torch.ops.qpasses.quantize_per_token`` / ``fake_quant_per_token`` use the same qparams.
    """
    if symmetric:
        qmax = 2 ** (bits - 1) - 1
        qmin = -qmax
    else:
        qmin, qmax = 0, 2 ** bits - 1
    scale, zp = dynamic_range_qparams(x, qmin, qmax, symmetric, reduce_dim)
    return scale.float(), zp.float(), qmin, qmax


def sqnr(ref: torch.Tensor, test: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio ``10 log10(sum(ref^2) / sum((ref - test)^2))`` in dB.

    Returns ``inf`` when ``test`` equals ``ref`` exactly and ``-inf`` for an all-zero ``ref``
    with non-zero noise.
    """
    r = ref.detach().to(torch.float64)
    t = test.detach().to(torch.float64)
    signal = float((r * r).sum())
    noise = float(((r - t) ** 2).sum())
    if noise == 0.0:
        return math.inf
    if signal == 0.0:
        return -math.inf
    return 10.0 * math.log10(signal / noise)
