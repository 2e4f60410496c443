"""Learned rounding of weights: AdaRound and GENIE-M.

* Nagel, Amjad, van Baalen, Louizos and Blankevoort, "Up or Down? Adaptive Rounding for
  Post-Training Quantization", ICML 2020 (AdaRound): each weight is ``floor(w/s) + h(alpha)``
  with a soft bit ``h`` learned by layer-wise (or block-wise) reconstruction, pushed to {0, 1}
  by an annealed regulariser.
* Jeon, Lee, Kim, Park and Kwon, "GENIE: Show Me the Data for Quantization", CVPR 2023
  (GENIE-M): the same with the step size ``s`` learned jointly while the base integer
  ``floor(w/s_0)`` stays fixed, so the gradient reaches ``s`` through ``s * (w_floor + h)``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import torch
import torch.nn as nn

__all__ = ["AdaRoundQuantizer", "BetaSchedule", "rectified_sigmoid"]


def rectified_sigmoid(alpha: torch.Tensor, zeta: float = 1.1, gamma: float = -0.1) -> torch.Tensor:
    """``clamp(sigmoid(alpha) * (zeta - gamma) + gamma, 0, 1)`` (Louizos et al. 2018; AdaRound eq. 23).

    Stretching the sigmoid beyond [0, 1] before clamping lets ``h`` reach exactly 0 and 1 with
    non-vanishing gradients nearby.
    """
    return torch.clamp(torch.sigmoid(alpha) * (zeta - gamma) + gamma, 0.0, 1.0)


def _broadcast(p: torch.Tensor, ndim: int, axis: Optional[int]) -> torch.Tensor:
    if p.numel() == 1 or axis is None:
        if p.numel() != 1:
            raise ValueError("per-tensor parameters must have one element")
        return p.reshape([1] * ndim) if ndim else p.reshape(())
    shape = [1] * ndim
    shape[axis % ndim] = -1
    return p.reshape(shape)


class AdaRoundQuantizer(nn.Module):
    """Weight quantizer with a learnable rounding direction per element (AdaRound / GENIE-M).

    ``forward()`` returns the fake-quantized weight
    ``s * clamp(w_floor + h, qmin - zp, qmax - zp)`` -- the dequantized value of the integer code
    ``clamp(w_floor + h + zp, qmin, qmax)`` -- where ``w_floor = floor(w / s)`` is fixed at
    construction (buffer) and ``h`` is

    * soft, ``rectified_sigmoid(alpha)``, during optimisation (``hard=False``);
    * hard, ``1[h >= 0.5]`` (equivalently ``alpha >= 0``), once ``hard=True``.

    ``alpha`` is initialised so that the soft output equals the float weight (``h`` = the
    fractional part of ``w / s``) wherever it is not clipped.

    Args:
        weight: float weight tensor.
        scale, zero_point: quantization parameters, per tensor (one element) or per channel
            (``[C]`` along ``axis``); typically from a min-max or MSE observer.
        qmin, qmax: integer range.
        axis: channel axis of per-channel parameters (ignored for per-tensor ones).
        learn_scale: make ``scale`` an ``nn.Parameter`` learned jointly with ``alpha`` (GENIE-M).
        zeta, gamma: stretch of the rectified sigmoid.
    """

    def __init__(self, weight: torch.Tensor, scale: Union[float, torch.Tensor], zero_point: Union[int, torch.Tensor],
                 qmin: int, qmax: int, axis: Optional[int] = 0, learn_scale: bool = False,
                 zeta: float = 1.1, gamma: float = -0.1):
        super().__init__()
        w = weight.detach().to(torch.float32)
        s = torch.as_tensor(scale, dtype=torch.float32, device=w.device).detach().clone()
        z = torch.as_tensor(zero_point, device=w.device).detach().clone().to(torch.int32)
        if s.numel() > 1 and axis is None:
            raise ValueError("per-channel scales need an axis")
        if z.numel() == 1 and s.numel() > 1:
            z = z.reshape(1).expand(s.numel()).clone()
        if s.numel() == 1 and z.numel() > 1:
            s = s.reshape(1).expand(z.numel()).clone()
        if s.numel() > 1 and w.shape[axis % w.dim()] != s.numel():
            raise ValueError(f"{s.numel()} scales for {w.shape[axis % w.dim()]} channels along axis {axis}")
        if bool((s <= 0).any()):
            raise ValueError("scales must be positive")
        self.qmin, self.qmax = int(qmin), int(qmax)
        self.axis = None if s.numel() == 1 else int(axis)
        self.zeta, self.gamma = float(zeta), float(gamma)
        self.learn_scale = bool(learn_scale)
        self.hard = False
        self.weight_shape = tuple(w.shape)
        s = s.reshape(()) if s.numel() == 1 else s.reshape(-1)
        z = z.reshape(()) if z.numel() == 1 else z.reshape(-1)
        sb = _broadcast(s, w.dim(), self.axis)
        w_div = w / sb
        w_floor = torch.floor(w_div)
        frac = w_div - w_floor
        # h(alpha) = frac  <=>  sigmoid(alpha) = (frac - gamma) / (zeta - gamma)
        p = (frac - self.gamma) / (self.zeta - self.gamma)
        alpha = torch.log(p) - torch.log1p(-p)
        self.register_buffer("w_floor", w_floor)
        self.register_buffer("zero_point", z)
        self.alpha = nn.Parameter(alpha)
        if self.learn_scale:
            self.scale = nn.Parameter(s)
        else:
            self.register_buffer("scale", s)

    def h(self) -> torch.Tensor:
        """The rounding offsets: soft ``rectified_sigmoid(alpha)`` or hard ``{0, 1}`` when ``hard``."""
        soft = rectified_sigmoid(self.alpha, self.zeta, self.gamma)
        if self.hard:
            return (soft >= 0.5).to(soft.dtype)
        return soft

    def _scale(self) -> torch.Tensor:
        # a learned step size must stay positive: clamp (gradient flows while it is above the floor)
        s = torch.clamp(self.scale, min=1e-12) if self.learn_scale else self.scale
        return _broadcast(s, len(self.weight_shape), self.axis)

    def _zp(self) -> torch.Tensor:
        return _broadcast(self.zero_point, len(self.weight_shape), self.axis).to(torch.float32)

    def forward(self) -> torch.Tensor:
        """The fake-quantized weight (soft or hard rounding, see ``hard``)."""
        z = self._zp()
        q = torch.clamp(self.w_floor + self.h(), self.qmin - z, self.qmax - z)
        return self._scale() * q

    def regularizer(self, beta: float) -> torch.Tensor:
        """AdaRound's rounding regulariser ``sum(1 - |2h - 1|^beta)`` (soft ``h``; 0 iff all h in {0,1})."""
        h = rectified_sigmoid(self.alpha, self.zeta, self.gamma)
        return (1.0 - (2.0 * h - 1.0).abs().pow(beta)).sum()

    def int_weight(self) -> torch.Tensor:
        """Integer codes (int32) of the hard-rounded weight: ``clamp(w_floor + 1[h>=0.5] + zp, qmin, qmax)``."""
        with torch.no_grad():
            hb = (rectified_sigmoid(self.alpha, self.zeta, self.gamma) >= 0.5).to(torch.float32)
            q = torch.clamp(self.w_floor + hb + self._zp(), self.qmin, self.qmax)
        return q.to(torch.int32)

    def hard_weight(self) -> torch.Tensor:
        """The hard-rounded fake-quantized weight (detached), whatever ``hard`` is."""
        with torch.no_grad():
            was = self.hard
            self.hard = True
            try:
                return self.forward().detach()
            finally:
                self.hard = was

    def soft_bits_fraction(self, tol: float = 1e-3) -> float:
        """Fraction of soft bits ``h`` not yet within ``tol`` of 0 or 1 (a convergence measure)."""
        with torch.no_grad():
            h = rectified_sigmoid(self.alpha, self.zeta, self.gamma)
            return float(((h > tol) & (h < 1 - tol)).float().mean())

    def extra_repr(self) -> str:
        return (f"shape={self.weight_shape}, axis={self.axis}, qmin={self.qmin}, qmax={self.qmax}, "
                f"learn_scale={self.learn_scale}, hard={self.hard}")


@dataclass
class BetaSchedule:
    """Annealing of the regulariser exponent ``beta`` (AdaRound sec. 4.3).

    For the first ``warmup * iters`` steps the regulariser is off (:meth:`active` is False) and
    ``beta = start``; afterwards ``beta`` decreases linearly from ``start`` to ``end`` at step
    ``iters``. A high ``beta`` lets every ``h`` move freely; a low one pushes them to {0, 1}.
    Call the schedule with the step number: ``beta = schedule(step)``.
    """

    start: float = 20.0
    end: float = 2.0
    warmup: float = 0.2
    iters: int = 10000

    def __post_init__(self):
        if int(self.iters) < 1:
            raise ValueError("iters must be >= 1")
        if not 0.0 <= float(self.warmup) < 1.0:
            raise ValueError("warmup must be in [0, 1)")

    @property
    def warmup_iters(self) -> int:
        """Number of steps without regularisation."""
        return int(self.warmup * self.iters)

    def active(self, step: int) -> bool:
        """Whether the rounding regulariser applies at ``step`` (after warm-up)."""
        return step >= self.warmup_iters

    def __call__(self, step: int) -> float:
        """``beta`` at ``step`` (0-based)."""
        w = self.warmup_iters
        if step < w:
            return float(self.start)
        span = max(1, self.iters - w)
        t = min(1.0, (step - w) / span)
        return float(self.end + (self.start - self.end) * (1.0 - t))
