"""``FakeQuantize``: quantize-dequantize in floating point, with straight-through gradients or LSQ.

The module carries fixed quantization parameters (usually produced by an observer through
:meth:`FakeQuantize.from_observer`). Its forward is one call of a ``torch.library`` custom op
(:mod:`.qops`): ``torch.ops.qpasses.fake_quant_per_tensor`` / ``fake_quant_per_channel`` (bit-exact
with ``torch.fake_quantize_per_*_affine``), or ``fake_quant_lsq_per_tensor`` /
``fake_quant_lsq_per_channel`` for a learnable scale -- so ``torch.fx`` tracing through it,
``torch.export`` and ``torch.compile`` all see the quantizer as a single node, with its scale and
zero point as inputs. The only Python branches in ``forward`` test plain attributes (``enabled``,
``learnable``, ``axis``).
"""
from __future__ import annotations

import math
from typing import Optional, Tuple, Union

import torch
import torch.nn as nn

from . import qops  # noqa: F401  registers the torch.ops.qpasses quantizer ops
from ._module import add_buffers
from .qparams import dequantize as _dequantize
from .qparams import quantize as _quantize

__all__ = ["FakeQuantize", "bits_of_range"]

_F32_EPS = torch.finfo(torch.float32).eps
_QOPS = torch.ops.qpasses


def bits_of_range(qmin: int, qmax: int) -> int:
    """Smallest bit-width whose integer range holds ``qmax - qmin + 1`` codes."""
    n = int(qmax) - int(qmin) + 1
    if n < 2:
        raise ValueError(f"empty or degenerate integer range [{qmin}, {qmax}]")
    return int(math.ceil(math.log2(n)))


class FakeQuantize(nn.Module):
    """Fake quantization ``(clamp(round(x / scale) + zp, qmin, qmax) - zp) * scale``.

    Args:
        scale: float scale, shape ``[]`` (per tensor) or ``[C]`` (per channel along ``axis``).
        zero_point: integer zero point(s), same shape as ``scale`` (stored as int32).
        qmin, qmax: integer range.
        axis: ``None`` per tensor, else the channel axis of the per-channel parameters.
        learnable: make ``scale`` an ``nn.Parameter`` trained with LSQ (Esser et al., "Learned Step
            Size Quantization", ICLR 2020): ``x/s``, clamp, round with a straight-through
            estimator, times ``s``; the scale's gradient is multiplied by
            ``g = 1 / sqrt(N * qmax)`` with ``N`` the number of elements sharing one scale.
            The zero point stays fixed.
        bits: bit-width (derived from ``qmin``/``qmax`` when ``None``).
        symmetric: recorded for back-ends and reports.

    Attribute ``enabled`` (default True): when False, ``forward`` is the identity.
    Without ``learnable`` the forward calls ``torch.ops.qpasses.fake_quant_per_tensor`` /
    ``fake_quant_per_channel`` (the numerics of ``torch.fake_quantize_per_*_affine``:
    straight-through gradient for ``x``, masked outside the range; no gradient for the
    parameters); with it, ``fake_quant_lsq_per_tensor`` / ``fake_quant_lsq_per_channel``.
    """

    def __init__(self, scale: Union[float, torch.Tensor], zero_point: Union[int, torch.Tensor], qmin: int,
                 qmax: int, axis: Optional[int] = None, learnable: bool = False, bits: Optional[int] = None,
                 symmetric: bool = False):
        super().__init__()
        qmin, qmax = int(qmin), int(qmax)
        if qmin >= qmax:
            raise ValueError(f"empty integer range [{qmin}, {qmax}]")
        # own copies (float32 scale, int32 zero point), made with as few tensor ops as possible
        s = torch.as_tensor(scale, dtype=torch.float32)
        s = (s.detach() if s.requires_grad else s).clone()
        z = torch.as_tensor(zero_point)
        if z.requires_grad:
            z = z.detach()
        z = z.clone() if z.dtype == torch.int32 else z.to(torch.int32)
        if axis is None:
            if s.numel() != 1 or z.numel() != 1:
                raise ValueError(f"per-tensor FakeQuantize needs one scale and zero point "
                                 f"(got {s.numel()} / {z.numel()}); pass axis= for per-channel")
            if s.dim():
                s = s.reshape(())
            if z.dim():
                z = z.reshape(())
        else:
            if s.dim() != 1:
                s = s.reshape(-1)
            if z.dim() != 1:
                z = z.reshape(-1)
            if z.numel() == 1 and s.numel() > 1:
                z = z.expand(s.numel()).clone()
            if s.numel() != z.numel():
                raise ValueError(f"{s.numel()} scales but {z.numel()} zero points")
        if s.dim() == 0:
            lo = hi = float(s)
        elif s.numel():
            lo, hi = (float(v) for v in torch.aminmax(s))  # one reduction; NaN makes both NaN
        else:
            lo = hi = 1.0
        if not (lo > 0 and math.isfinite(hi)):
            raise ValueError("scales must be positive and finite")
        self._fill(s, z, qmin, qmax, axis, learnable, bits, symmetric)

    def _fill(self, s: torch.Tensor, z: torch.Tensor, qmin: int, qmax: int, axis: Optional[int], learnable: bool,
              bits: Optional[int], symmetric: bool) -> None:
        """Set the attributes and tensors of a fresh module (``s`` / ``z`` already its own)."""
        # plain attributes go straight into __dict__: on a fresh module that is exactly what
        # nn.Module.__setattr__ does, at a fraction of its cost (models hold thousands of these)
        self.__dict__.update(qmin=qmin, qmax=qmax, axis=None if axis is None else int(axis),
                             learnable=bool(learnable),
                             bits=int(bits) if bits is not None else bits_of_range(qmin, qmax),
                             symmetric=bool(symmetric), enabled=True)
        if self.learnable:
            self.scale = nn.Parameter(s)
            add_buffers(self, zero_point=z)
        else:
            add_buffers(self, scale=s, zero_point=z)

    @classmethod
    def from_checked(cls, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int,
                     axis: Optional[int] = None, bits: Optional[int] = None,
                     symmetric: bool = False) -> "FakeQuantize":
        """A fixed (not learnable) FakeQuantize from qparams the caller has already checked.

        For converters building thousands of these from one vectorised qparams pass: ``scale``
        must be float32, positive and finite, ``zero_point`` int32, both of shape ``[]``
        (``axis=None``) or ``[C]``, and ``qmin < qmax``.  Nothing is validated here (the
        constructor's checks cost more than the rest); each tensor is cloned, so views of a
        batch tensor are fine.
        """
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        self._fill(scale.clone(), zero_point.clone(), int(qmin), int(qmax), axis, False, bits, symmetric)
        return self

    @classmethod
    def from_observer(cls, obs, learnable: bool = False) -> "FakeQuantize":
        """A FakeQuantize with the observer's qparams, range, axis, bits and symmetry."""
        scale, zero_point = obs.calculate_qparams()
        return cls(scale, zero_point, obs.qmin, obs.qmax, axis=obs.axis, learnable=learnable,
                   bits=obs.bits, symmetric=obs.symmetric)

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Fake-quantize ``x`` (identity when ``enabled`` is False): one ``torch.ops.qpasses`` op call."""
        if not self.enabled:
            return x
        if self.axis is None:
            op = _QOPS.fake_quant_lsq_per_tensor if self.learnable else _QOPS.fake_quant_per_tensor
            return op.default(x, self.scale, self.zero_point, self.qmin, self.qmax)
        op = _QOPS.fake_quant_lsq_per_channel if self.learnable else _QOPS.fake_quant_per_channel
        return op.default(x, self.scale, self.zero_point, self.axis, self.qmin, self.qmax)

    # ------------------------------------------------------------------ helpers
    def calculate_qparams(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(scale, zero_point)`` as detached float32 / int32 tensors (observer-compatible)."""
        return torch.clamp(self.scale.detach().abs(), min=_F32_EPS), self.zero_point.clone()

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        """Integer codes (int32) of ``x``: ``clamp(round(x / scale) + zp, qmin, qmax)``."""
        return _quantize(x.detach(), self.scale.detach(), self.zero_point, self.qmin, self.qmax, self.axis)

    def dequantize(self, q: torch.Tensor) -> torch.Tensor:
        """Real values ``(q - zp) * scale`` of integer codes ``q``."""
        return _dequantize(q, self.scale.detach(), self.zero_point, self.axis)

    @property
    def int_dtype(self) -> torch.dtype:
        """The narrowest torch integer dtype holding ``[qmin, qmax]`` (int8, uint8, int16 or int32)."""
        for dt in (torch.int8, torch.uint8, torch.int16, torch.int32):
            info = torch.iinfo(dt)
            if info.min <= self.qmin and self.qmax <= info.max:
                return dt
        return torch.int64

    def int_repr(self, x: torch.Tensor) -> torch.Tensor:
        """Integer codes of ``x`` in :attr:`int_dtype` (e.g. int8 weights for a kernel)."""
        return self.quantize(x).to(self.int_dtype)

    def extra_repr(self) -> str:
        """``bits=..., axis=..., qmin=..., qmax=...`` (plus ``learnable`` / ``enabled`` when set)."""
        s = f"bits={self.bits}, axis={self.axis}, qmin={self.qmin}, qmax={self.qmax}, symmetric={self.symmetric}"
        if self.learnable:
            s += ", learnable=True"
        if not self.enabled:
            s += ", enabled=False"
        return s
