"""Weight quantization of Banner, Nahshan and Soudry 2019 (ACIQ, arXiv:1810.05723).

:func:`aciq_weight_quantizer` builds a :class:`ChannelBitsFakeQuant` for one weight tensor:

1. *per-channel bit allocation* (sec. 4.2, optional): channel ``i`` gets ``M_i`` bits with
   ``sum_i M_i <= N * bits`` via :func:`qpasses.numerics.allocate_bits` (the paper's rule
   ``2**M_i ∝ R_i**(2/3)`` by default);
2. *analytical clipping* (sec. 4.1, optional): channel ``i`` is clipped to
   ``alpha_i = min(aciq_alpha(M_i, prior, b_i), max|w_i|)`` with ``b_i`` the Laplace scale
   ``E|w_i|`` (or the Gaussian ``sqrt(E w_i^2)``) of the channel about zero (the grid is
   symmetric about zero);
3. symmetric narrow-range quantization of channel ``i`` to ``[-(2**(M_i-1) - 1), 2**(M_i-1) - 1]``
   steps of ``alpha_i / (2**(M_i-1) - 1)``;
4. *bias correction* (sec. 4.3, optional): per channel, the quantized weights are shifted and
   scaled so that their mean and standard deviation equal the float channel's:
   ``w_c = gain_i * w_q + offset_i`` with ``gain_i = std(w_i) / std(w_q,i)`` and
   ``offset_i = mean(w_i) - gain_i * mean(w_q,i)``.  ``gain`` folds into the channel's scale; the
   offset is a per-channel constant (``offset_i * sum(x)`` in the integer output).

Everything is computed once from the weight and stored as buffers; the module is a pure
function of its input and the buffers, so the same graph runs anywhere.
"""
from __future__ import annotations

import math
from typing import Any, Dict, Optional

import torch
import torch.nn as nn

from ...numerics.aciq import aciq_alpha, allocate_bits, bias_correct_weight

__all__ = ["ChannelBitsFakeQuant", "aciq_weight_quantizer", "effective_bits"]


def effective_bits(bits: int) -> float:
    """``log2`` of the number of quantization steps of a symmetric narrow ``bits``-bit grid.

    ``[-(2**(M-1) - 1), 2**(M-1) - 1]`` has ``2**M - 2`` steps over ``[-alpha, alpha]`` -- the
    ``2**M`` bins of the paper's MSE model with ``M`` replaced by ``log2(2**M - 2)``.
    """
    return math.log2(2 ** int(bits) - 2)


def _bcast(v: torch.Tensor, ndim: int, axis: int) -> torch.Tensor:
    shape = [1] * ndim
    shape[axis] = -1
    return v.reshape(shape)


class ChannelBitsFakeQuant(nn.Module):
    """Per-channel symmetric fake quantization with a bit-width, a scale and an affine
    correction per channel: ``gain * clamp(round(w / scale), -qmax, qmax) * scale + offset``."""

    def __init__(self, scale: torch.Tensor, bits: torch.Tensor, axis: int = 0,
                 gain: Optional[torch.Tensor] = None, offset: Optional[torch.Tensor] = None):
        super().__init__()
        scale = scale.detach().float().reshape(-1)
        bits = bits.detach().to(torch.long).reshape(-1)
        if scale.numel() != bits.numel():
            raise ValueError(f"{scale.numel()} scales for {bits.numel()} channels")
        if bits.numel() and int(bits.min()) < 2:
            raise ValueError(f"every channel needs at least 2 bits, got {int(bits.min())}")
        self.axis = int(axis)
        self.register_buffer("scale", scale)
        self.register_buffer("bits", bits)
        self.register_buffer("qmax", (2.0 ** (bits.float() - 1) - 1))
        self.register_buffer("gain", torch.ones_like(scale) if gain is None else gain.detach().float().reshape(-1))
        self.register_buffer("offset", torch.zeros_like(scale) if offset is None
                             else offset.detach().float().reshape(-1))

    def int_repr(self, w: torch.Tensor) -> torch.Tensor:
        """The integer codes (before the bias-correction affine), as int8."""
        ax = self.axis % w.dim()
        s, qm = _bcast(self.scale, w.dim(), ax), _bcast(self.qmax, w.dim(), ax)
        return torch.minimum(torch.maximum(torch.round(w / s), -qm), qm).to(torch.int8)

    def graph_call(self):
        """``(op, tensor attribute names, constants)`` of this quantizer's graph node
        (:mod:`qpasses.qnodes`): ``fake_quant_channel_bits(w, scale, qmax, gain, offset, axis)``."""
        return torch.ops.qpasses.fake_quant_channel_bits.default, ("scale", "qmax", "gain", "offset"), (self.axis,)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        """``gain * clamp(round(w / scale), -qmax, qmax) * scale + offset`` per channel: the graph's op."""
        return torch.ops.qpasses.fake_quant_channel_bits.default(w, self.scale, self.qmax, self.gain, self.offset,
                                                                 self.axis)

    def extra_repr(self) -> str:
        b = self.bits.float()
        return (f"channels={self.scale.numel()}, axis={self.axis}, bits=[{int(b.min())}..{int(b.max())}] "
                f"mean {b.mean().item():.2f}" if b.numel() else "channels=0")


def aciq_weight_quantizer(w: torch.Tensor, bits: int = 4, axis: int = 0, prior: str = "laplace",
                          clip: bool = True, allocate: bool = True, bias_correction: bool = True,
                          min_bits: int = 2, max_bits: int = 8, alloc_rule: str = "paper"
                          ) -> "tuple[ChannelBitsFakeQuant, Dict[str, Any]]":
    """Build the weight quantizer of one layer; returns ``(module, info)``.

    ``info`` holds the per-channel bits, the total budget, and the fraction of weights clipped.
    """
    wf = w.detach().float()
    ax = axis % wf.dim()
    chans = wf.movedim(ax, 0).reshape(wf.shape[ax], -1)
    n = chans.shape[0]
    budget = n * int(bits)
    if allocate and n > 1:
        ranges = chans.amax(dim=1) - chans.amin(dim=1)
        ch_bits = allocate_bits(ranges, budget, min_bits=min_bits, max_bits=max_bits, rule=alloc_rule)
    else:
        ch_bits = torch.full((n,), int(bits), dtype=torch.long)
    absmax = chans.abs().amax(dim=1)
    if clip:
        if prior in ("gauss", "gaussian", "normal"):
            sp = chans.pow(2).mean(dim=1).sqrt()
        else:
            sp = chans.abs().mean(dim=1)
        alpha = torch.stack([torch.as_tensor(aciq_alpha(effective_bits(int(m)), prior, float(s)))
                             for m, s in zip(ch_bits, sp)]).float().reshape(-1) if n else absmax
        alpha = torch.minimum(alpha, absmax)
    else:
        alpha = absmax
    qmax = 2.0 ** (ch_bits.float() - 1) - 1
    scale = torch.clamp(alpha / qmax, min=torch.finfo(torch.float32).eps)
    mod = ChannelBitsFakeQuant(scale, ch_bits, ax)
    with torch.no_grad():
        wq = mod(wf)
    if bias_correction:
        wc = bias_correct_weight(wf, wq, axis=ax)
        red = [d for d in range(wf.dim()) if d != ax]
        if red:
            # w_c = gain * w_q + offset per channel (bias_correct_weight's affine map, made explicit)
            mean_q = wq.mean(dim=red)
            std_q = wq.std(dim=red, unbiased=False)
            std_f = wf.std(dim=red, unbiased=False)
            mean_f = wf.mean(dim=red)
            ok = std_q > 1e-12
            gain = torch.where(ok, std_f / torch.where(ok, std_q, torch.ones_like(std_q)), torch.ones_like(std_q))
            offset = mean_f - gain * mean_q
            mod.gain.copy_(gain)
            mod.offset.copy_(offset)
            with torch.no_grad():
                assert torch.allclose(mod(wf), wc, atol=1e-5, rtol=1e-4)
    clipped = (chans.abs() > alpha[:, None] + 1e-12).float().mean().item() if n else 0.0
    info = {"bits": [int(b) for b in ch_bits], "budget": budget, "used": int(ch_bits.sum()),
            "clipped_fraction": clipped}
    return mod, info
