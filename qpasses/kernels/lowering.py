"""Library side of the ``lower`` rule family (``qpasses/methods/lower/lower_triton.yaml``).

* ``torch.ops.qpasses.quantize_int8``: the activation quantizer a lowered graph runs in front of
  an int8 kernel.  Its integer codes are *exactly* those of the fake quantizer it replaces
  (it calls ``torch.fake_quantize_per_tensor_affine`` and reads the codes back), shifted by
  ``offset`` into int8 (``[0, 255]`` activations become ``[-128, 127]`` with zero point
  ``zp - 128``).
* :class:`Int4GroupFakeQuantize`: group-wise int4 weight fake quantization (the ``w4a16``
  recipe).  Its forward computes exactly the weight ``int4_weight_only_linear`` dequantizes.
* :func:`int8_weight_codes`, :func:`act_int8_params`: read kernel operands off the FakeQuantize
  modules of a ``ptq_int8`` graph.
* ``torch.ops.qpasses.quantize_fp8``: the static (per-tensor) fp8 activation quantizer a lowered
  ``w8a8_fp8`` graph runs in front of ``fp8_linear``; its float8_e4m3fn codes are exactly those
  the ``Fp8FakeQuantize`` it replaces dequantizes.
* :func:`fp8_weight_codes`, :func:`fp8_act_scale`: read the fp8 GEMM's operands off the
  ``Fp8FakeQuantize`` modules of a ``w8a8_fp8`` graph.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn as nn
from torch import Tensor

from . import packing
from ..numerics import qops as _qops  # noqa: F401  (registers qpasses::fake_quant_per_group)

__all__ = ["quantize_int8", "Int4GroupFakeQuantize", "act_int8_params", "int8_weight_codes", "quantize_fp8",
           "fp8_weight_codes", "fp8_act_scale"]


# ================================================================================ activation quantizer
def _quantize_int8_check(x: Tensor, scale: float, qmin: int, qmax: int, offset: int) -> None:
    if not x.is_floating_point():
        raise ValueError(f"quantize_int8 expects a float tensor, got {x.dtype}")
    if not (scale > 0):
        raise ValueError(f"scale must be positive, got {scale}")
    if not (-128 <= qmin - offset <= qmax - offset <= 127):
        raise ValueError(f"[qmin, qmax] - offset = [{qmin - offset}, {qmax - offset}] does not fit int8")


@torch.library.custom_op("qpasses::quantize_int8", mutates_args=(),
                         schema="(Tensor x, float scale, int zero_point, int qmin, int qmax, int offset=0) -> Tensor")
def quantize_int8(x: Tensor, scale: float, zero_point: int, qmin: int, qmax: int, offset: int = 0) -> Tensor:
    """int8 codes ``clamp(round(x / scale) + zero_point, qmin, qmax) - offset`` (per tensor).

    The codes are bit-identical to those of ``torch.fake_quantize_per_tensor_affine`` with the
    same parameters (the fake-quant graph this replaces): the fake-quantized value
    ``(q - zp) * scale`` is computed by that very function and divided back exactly."""
    _quantize_int8_check(x, scale, qmin, qmax, offset)
    xf = x.to(torch.float32)
    fq = torch.fake_quantize_per_tensor_affine(xf, float(scale), int(zero_point), int(qmin), int(qmax))
    q = torch.round(fq / float(scale)) + float(int(zero_point) - int(offset))
    return q.to(torch.int8)


@quantize_int8.register_fake
def _(x, scale, zero_point, qmin, qmax, offset=0):
    _quantize_int8_check(x, scale, qmin, qmax, offset)
    return torch.empty_like(x, dtype=torch.int8)


def act_int8_params(fq: nn.Module) -> Optional[Tuple[float, int, int, int, int]]:
    """``(scale, zero_point, qmin, qmax, offset)`` of a per-tensor FakeQuantize whose range fits
    int8 after an offset, or None (per-channel activations, > 8 bits, learnable but disabled...)."""
    if getattr(fq, "axis", None) is not None or not getattr(fq, "enabled", True):
        return None
    qmin, qmax = int(fq.qmin), int(fq.qmax)
    if qmax - qmin > 255:
        return None
    offset = 0 if (qmin >= -128 and qmax <= 127) else qmin + 128
    scale = float(fq.scale.detach().reshape(()))
    zp = int(fq.zero_point.reshape(()))
    return scale, zp, qmin, qmax, offset


def int8_weight_codes(fq: nn.Module, w: Tensor) -> Optional[Tuple[Tensor, Tensor]]:
    """``(int8 codes, fp32 per-output-channel scale)`` of a weight FakeQuantize (symmetric,
    axis 0 or per tensor, range within int8), or None when the kernel cannot take it."""
    if not getattr(fq, "enabled", True):
        return None
    axis = getattr(fq, "axis", None)
    if axis not in (None, 0):
        return None
    if int(fq.qmin) < -128 or int(fq.qmax) > 127 or bool((fq.zero_point != 0).any()):
        return None
    codes = fq.quantize(w.detach().float()).to(torch.int8)
    scale = fq.scale.detach().to(torch.float32).reshape(-1).clone()
    return codes, scale


# ================================================================================ int4 weight-only
class Int4GroupFakeQuantize(nn.Module):
    """Group-wise int4 fake quantization of a ``[N, K]`` weight along K (``w4a16``).

    Codes are unsigned 0..15, value ``(q - z) * s`` with one scale ``s`` (and zero ``z``) per
    ``group_size`` consecutive inputs of an output row; ``symmetric`` means ``z = 8`` (signed
    int4, [-8, 7]).  The qparams are fitted once by :meth:`fit` (``packing.quantize_int4``).

    In a graph this module is a *holder* (:mod:`qpasses.qnodes`): the quantizer node is
    ``qpasses::fake_quant_per_group(w, get_attr scales, get_attr zeros, group_size, 0, 15)``
    (:meth:`graph_call`).  A symmetric quantizer has no ``zeros`` in its ``state_dict``; the graph
    reads its constant zero point 8 from the non-persistent buffer ``zero_point``.  The forward is
    that very op, and :meth:`codes` uses its rounding (``round(w * (1 / s))``, float32), so the
    codes :meth:`packed` hands ``int4_weight_only_linear`` dequantize to exactly what the graph
    computes.
    """

    def __init__(self, scales: Tensor, zeros: Optional[Tensor], group_size: int, in_features: int):
        super().__init__()
        if group_size <= 0 or group_size % 32:
            raise ValueError(f"group_size must be a positive multiple of 32, got {group_size}")
        self.group_size = int(group_size)
        self.in_features = int(in_features)
        self.symmetric = zeros is None
        self.bits = 4
        self.register_buffer("scales", scales.detach().to(torch.float32).clone())
        self.register_buffer("zeros", None if zeros is None else zeros.detach().to(torch.float32).clone())
        if zeros is None:   # the symmetric zero point, for the graph's get_attr; not part of the state_dict
            self.register_buffer("zero_point", torch.full_like(self.scales, 8.0), persistent=False)

    @classmethod
    def fit(cls, w: Tensor, group_size: int = 128, symmetric: bool = True) -> "Int4GroupFakeQuantize":
        if w.dim() != 2:
            raise ValueError(f"int4 group quantization needs a [N, K] weight, got shape {tuple(w.shape)}")
        _, s, z = packing.quantize_int4(w.detach().float(), group_size, symmetric=symmetric)
        return cls(s, z, group_size, w.shape[1])

    def graph_call(self) -> Tuple[object, Tuple[str, ...], Tuple[object, ...]]:
        """``(op, tensor attribute names, constants)`` of this quantizer's graph node (see
        :func:`qpasses.qnodes.graph_call`)."""
        return (torch.ops.qpasses.fake_quant_per_group.default,
                ("scales", "zero_point" if self.zeros is None else "zeros"), (self.group_size, 0, 15))

    def _zeros(self) -> Tensor:
        return self.zeros if self.zeros is not None else self.zero_point

    def _expand(self, t: Tensor) -> Tensor:
        gidx = torch.arange(self.in_features, device=t.device) // self.group_size
        return t[:, gidx]

    def codes(self, w: Tensor) -> Tensor:
        """Unsigned int4 codes (int8 tensor, values 0..15) of ``w``: those of ``qpasses::fake_quant_per_group``."""
        s = self._expand(self.scales)
        z = self._expand(self._zeros())
        return torch.clamp(torch.round(w.float() * torch.reciprocal(s)) + z, 0, 15).to(torch.int8)

    def forward(self, w: Tensor) -> Tensor:
        return torch.ops.qpasses.fake_quant_per_group(w, self.scales, self._zeros(), self.group_size, 0, 15)

    def packed(self, w: Tensor) -> Tuple[Tensor, Tensor, Optional[Tensor]]:
        """``(w_packed uint8 [N, ceil(K/2)], scales, zeros)`` operands of ``int4_weight_only_linear``."""
        return (packing.pack_int4(self.codes(w), self.group_size, signed=False), self.scales.clone(),
                None if self.zeros is None else self.zeros.clone())

    def extra_repr(self) -> str:
        return f"bits=4, group_size={self.group_size}, symmetric={self.symmetric}"


# ================================================================================ fp8 (e4m3)
def _quantize_fp8_check(x: Tensor, scale: Tensor) -> None:
    if not x.is_floating_point() or x.dtype == torch.float8_e4m3fn:
        raise ValueError(f"quantize_fp8 expects a float (not float8) tensor, got {x.dtype}")
    if scale.numel() != 1:
        raise ValueError(f"quantize_fp8 takes one (per-tensor) scale, got {scale.numel()}")


@torch.library.custom_op("qpasses::quantize_fp8", mutates_args=(), schema="(Tensor x, Tensor scale) -> Tensor")
def quantize_fp8(x: Tensor, scale: Tensor) -> Tensor:
    """float8_e4m3fn codes of ``clamp(x / scale, -448, 448)`` with one scale (static activations).

    The codes are those ``torch.ops.qpasses.fp8_fake_quant_per_tensor(x, scale)`` (the
    ``Fp8FakeQuantize`` this replaces in a lowered graph) multiplies back by ``scale``: both call
    :func:`qpasses.numerics.fp8.fp8_cast` (float32 division, saturation, round to nearest even)."""
    from ..numerics.fp8 import fp8_cast
    _quantize_fp8_check(x, scale)
    return fp8_cast(x, scale.to(torch.float32).reshape(()))


@quantize_fp8.register_fake
def _(x, scale):
    _quantize_fp8_check(x, scale)
    return torch.empty_like(x, dtype=torch.float8_e4m3fn)


def fp8_weight_codes(fq: nn.Module, w: Tensor) -> Tuple[Optional[Tuple[Tensor, Tensor]], str]:
    """``((float8_e4m3fn codes [N, K], fp32 scale [N] or [1]), "")`` of an ``Fp8FakeQuantize``
    reading the ``[N, K]`` weight ``w`` (per output channel, axis 0, or per tensor), else
    ``(None, why)``: the codes times the scale are exactly the fake-quantized weight."""
    if not getattr(fq, "enabled", True):
        return None, "its fp8 weight quantizer is disabled"
    if w.dim() != 2:
        return None, f"its weight is {w.dim()}-d, not an [N, K] matrix"
    axis = getattr(fq, "axis", None)
    if axis is not None and axis not in (0, -2):
        return None, f"its fp8 weight scales run along axis {axis}, not per output channel (axis 0)"
    scale = fq.scale.detach().to(torch.float32).reshape(-1).clone()
    codes = fq.codes(w.detach())
    return (codes, scale), ""


def fp8_act_scale(fq: nn.Module) -> Tuple[Optional[Tensor], str]:
    """``(fp32 scale [1], "")`` of a static per-tensor activation ``Fp8FakeQuantize``, else ``(None, why)``."""
    if not getattr(fq, "enabled", True):
        return None, "its input fp8 quantizer is disabled"
    if getattr(fq, "axis", None) is not None:
        return None, f"its input fp8 quantizer has one scale per channel (axis {fq.axis}), not per tensor"
    return fq.scale.detach().to(torch.float32).reshape(1).clone(), ""
