"""Quantization-aware training: a Conv+BatchNorm module folded during training (Jacob et al.,
CVPR 2018, sec. 3.2) whose folded weight goes through an LSQ fake quantizer.

:class:`QATConvBn2d` replaces ``conv2d -> batch_norm`` in a graph prepared by the ``qat`` recipe:

* training, BatchNorm not frozen: the batch statistics of ``conv(x, W)`` are computed (one extra
  float convolution), the running statistics are updated, and the output is
  ``conv(x, fq(W * gamma / sigma_B)) + beta + (b - mu_B) * gamma / sigma_B`` -- the weight is
  folded with the BatchNorm scale *before* weight fake quantization, as it will be at inference;
* frozen (after ``freeze_bn_after`` training steps, or :func:`freeze_bn`) or eval: the running
  statistics are used and no longer updated (Jacob's "freeze BN statistics" schedule).

The weight quantizer is a per-output-channel symmetric :class:`~qpasses.numerics.FakeQuantize`
(learnable scale = LSQ by default).  :func:`fold_qat_conv_bn` gives the inference form: the
folded weight and bias, and a fixed (non-learnable) weight quantizer with the learned scales.

:class:`FirstBatchFakeQuantize` lets a training recipe run without calibration data
(``PassManager("qat").run(gm)``): an activation quantizer whose scale comes from the first
batch it sees -- LSQ's initialisation ``2 * mean|x| / sqrt(Qp)`` (Esser et al. 2020, sec. 2.1)
for a learnable scale, the batch's min-max range for a fixed one.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..numerics import FakeQuantize

__all__ = ["QATConvBn2d", "freeze_bn", "fold_qat_conv_bn", "frozen_fake_quant", "FirstBatchFakeQuantize",
           "lsq_init_scale"]


class QATConvBn2d(nn.Module):
    """Conv2d + BatchNorm2d with BN folded into the fake-quantized weight during training.

    Args:
        conv: the ``nn.Conv2d`` (weights are copied; ``padding_mode`` must be ``"zeros"``).
        bn: the ``nn.BatchNorm2d`` (affine parameters and running statistics are copied).
        w_bits: weight bit-width (symmetric, narrow range, per output channel).
        learnable: LSQ-learnable weight scales.
        freeze_bn_after: after this many training forward passes use (and stop updating) the
            running statistics; ``None`` never freezes automatically.
    """

    def __init__(self, conv: nn.Conv2d, bn: nn.BatchNorm2d, w_bits: int = 8, learnable: bool = True,
                 freeze_bn_after: Optional[int] = None):
        super().__init__()
        if conv.padding_mode != "zeros":
            raise ValueError(f"padding_mode={conv.padding_mode!r} is not supported")
        if bn.num_features != conv.out_channels or not bn.affine or not bn.track_running_stats:
            raise ValueError("BatchNorm must be affine, track running statistics and match the conv's channels")
        self.stride, self.padding, self.dilation, self.groups = conv.stride, conv.padding, conv.dilation, conv.groups
        self.weight = nn.Parameter(conv.weight.detach().clone())
        self.bias = nn.Parameter(conv.bias.detach().clone()) if conv.bias is not None else None
        self.bn_weight = nn.Parameter(bn.weight.detach().clone())
        self.bn_bias = nn.Parameter(bn.bias.detach().clone())
        self.register_buffer("running_mean", bn.running_mean.detach().clone())
        self.register_buffer("running_var", bn.running_var.detach().clone())
        self.register_buffer("steps", torch.zeros((), dtype=torch.int64))
        self.eps = float(bn.eps)
        self.momentum = 0.1 if bn.momentum is None else float(bn.momentum)
        self.freeze_bn_after = None if freeze_bn_after is None or freeze_bn_after < 0 else int(freeze_bn_after)
        self.bn_frozen = False
        from ..actions.quant import weight_fake_quant
        w0, _ = self.folded(self.running_mean, self.running_var)
        self.weight_fq = weight_fake_quant(w0.detach(), "conv2d", self.groups, int(w_bits), True,
                                           learnable=bool(learnable))

    # ------------------------------------------------------------------ folding
    def _conv(self, x, w, b=None):
        return F.conv2d(x, w, b, self.stride, self.padding, self.dilation, self.groups)

    def folded(self, mean: torch.Tensor, var: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(W * gamma / sigma, beta + (b - mean) * gamma / sigma)`` for the given statistics."""
        scale = self.bn_weight / torch.sqrt(var + self.eps)
        w = self.weight * scale.reshape(-1, 1, 1, 1)
        b0 = self.bias if self.bias is not None else torch.zeros_like(mean)
        return w, self.bn_bias + (b0 - mean) * scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Fold BN (batch statistics while training and not frozen, else running statistics) into
        the weight, fake-quantize the folded weight, convolve, add the folded bias."""
        if self.training:
            self.steps += 1
            if self.freeze_bn_after is not None and int(self.steps) > self.freeze_bn_after:
                self.bn_frozen = True
        if self.training and not self.bn_frozen:
            y = self._conv(x, self.weight, self.bias)
            mean = y.mean(dim=(0, 2, 3))
            var = y.var(dim=(0, 2, 3), unbiased=False)
            n = y.numel() // y.shape[1]
            with torch.no_grad():
                unbiased = var * (n / max(n - 1, 1))
                self.running_mean.mul_(1 - self.momentum).add_(self.momentum * mean.detach())
                self.running_var.mul_(1 - self.momentum).add_(self.momentum * unbiased.detach())
            w, b = self.folded(mean, var)
        else:
            w, b = self.folded(self.running_mean, self.running_var)
        return self._conv(x, self.weight_fq(w), b)

    def extra_repr(self) -> str:
        """Conv geometry and the BN-freeze state."""
        return (f"{self.weight.shape[1] * self.groups}, {self.weight.shape[0]}, kernel={tuple(self.weight.shape[2:])}, "
                f"stride={self.stride}, padding={self.padding}, freeze_bn_after={self.freeze_bn_after}, "
                f"bn_frozen={self.bn_frozen}")


def freeze_bn(module: nn.Module, frozen: bool = True) -> int:
    """Freeze (or unfreeze) the BatchNorm statistics of every :class:`QATConvBn2d` in ``module``;
    returns how many were changed."""
    n = 0
    for m in module.modules():
        if isinstance(m, QATConvBn2d):
            m.bn_frozen = bool(frozen)
            n += 1
    return n


def frozen_fake_quant(fq: FakeQuantize) -> FakeQuantize:
    """A non-learnable copy of ``fq`` with its current (learned) scale and zero point.

    Raises :class:`~qpasses.errors.StepError` for a :class:`FirstBatchFakeQuantize` that has
    seen no batch yet (its scale is a placeholder)."""
    if getattr(fq, "pending", False):
        from ..errors import StepError
        raise StepError("a fake quantizer waiting for its first batch (qat / bnn run without data) has seen no "
                        "batch: train the model (or run one batch through it) before freezing it")
    out = FakeQuantize(fq.scale.detach().clone(), fq.zero_point.clone(), fq.qmin, fq.qmax, axis=fq.axis,
                       learnable=False, bits=fq.bits, symmetric=fq.symmetric)
    out.enabled = fq.enabled
    cfg = getattr(fq, "qpasses_config", None)
    if cfg is not None:
        out.qpasses_config = cfg  # type: ignore[attr-defined]
    return out


def fold_qat_conv_bn(m: QATConvBn2d) -> Tuple[torch.Tensor, torch.Tensor, FakeQuantize]:
    """Inference form of ``m``: folded weight and bias (running statistics) and a frozen copy of
    its weight quantizer."""
    with torch.no_grad():
        w, b = m.folded(m.running_mean, m.running_var)
    return w.detach().clone(), b.detach().clone(), frozen_fake_quant(m.weight_fq)


# ----------------------------------------------------------------------------- first-batch init
def lsq_init_scale(x: torch.Tensor, qmax_pos: int, axis: Optional[int] = None) -> torch.Tensor:
    """LSQ's initial step size ``2 * mean|x| / sqrt(Qp)`` (per tensor, or per channel along ``axis``)."""
    a = x.detach().abs().float()
    if axis is None:
        m = a.mean()
    else:
        m = a.movedim(axis, 0).reshape(a.shape[axis], -1).mean(1)
    return 2.0 * m / math.sqrt(max(int(qmax_pos), 1))


class FirstBatchFakeQuantize(FakeQuantize):
    """A :class:`FakeQuantize` whose scale (and zero point) come from the first batch it sees.

    The first forward call on a real tensor (training or not) sets, from that batch ``x``:

    * the zero point: that of the batch's min-max range (:func:`calc_qparams`; ``qmin`` for
      non-negative data quantized asymmetrically, the fixed one for a symmetric range);
    * the scale: ``2 * mean|x| / sqrt(Qp)`` (LSQ) for a learnable scale, with ``Qp`` the number of
      levels on the larger side of the zero point, else the min-max scale of the batch.

    The tensors are updated in place, so an optimizer built before that batch keeps training
    the same parameter.  Under ``torch.distributed`` the batch statistics are all-reduced (every
    rank must run its first batch, as data-parallel training does), so every rank starts from
    the same scale.  Tracing (``torch.fx`` proxies, ``torch.export`` fake tensors,
    ``torch.compile``) never initialises.  ``pending`` (a plain attribute) is True until then;
    loading a state dict clears it.
    """

    pending = True

    @classmethod
    def from_fake_quant(cls, fq: FakeQuantize) -> "FirstBatchFakeQuantize":
        """The first-batch version of ``fq`` (same range, axis, learnability and attributes)."""
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        s = fq.scale.detach().clone()
        new._fill(s, fq.zero_point.clone(), fq.qmin, fq.qmax, fq.axis, fq.learnable, fq.bits, fq.symmetric)
        for k, v in fq.__dict__.items():
            if k.startswith("qpasses_"):
                new.__dict__[k] = v
        cfg = getattr(fq, "qpasses_config", None)
        if isinstance(cfg, dict):
            from ..steps.calibrate import FIRST_BATCH_KEY
            new.__dict__["qpasses_config"] = {k: v for k, v in cfg.items() if k != FIRST_BATCH_KEY}
        new.__dict__["enabled"] = fq.enabled
        new.__dict__["pending"] = True
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Initialise from ``x`` if this is the first batch, then fake-quantize it."""
        if self.pending and self.enabled and type(x) is torch.Tensor and not torch.compiler.is_compiling():
            self.initialize(x)
        return super().forward(x)

    @torch.no_grad()
    def initialize(self, x: torch.Tensor) -> None:
        """Set the scale and zero point from batch ``x`` (see the class docstring)."""
        from ..numerics import calc_qparams
        xd = x.detach().float()
        if self.axis is None:
            lo, hi, am = xd.amin(), xd.amax(), xd.abs().mean()
        else:
            v = xd.movedim(self.axis, 0).reshape(xd.shape[self.axis], -1)
            lo, hi, am = v.amin(1), v.amax(1), v.abs().mean(1)
        import torch.distributed as dist
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(lo, op=dist.ReduceOp.MIN)
            dist.all_reduce(hi, op=dist.ReduceOp.MAX)
            dist.all_reduce(am, op=dist.ReduceOp.SUM)
            am = am / dist.get_world_size()
        scale, zp = calc_qparams(lo, hi, self.qmin, self.qmax, self.symmetric)
        if self.learnable:
            qp = torch.maximum(self.qmax - zp, zp - self.qmin).clamp_min(1).float()
            lsq = 2.0 * am / torch.sqrt(qp)
            # an all-zero batch has no magnitude to go by: keep the min-max scale there
            scale = torch.where(lsq > 0, lsq, scale)
        scale = scale.float().clamp_min(torch.finfo(torch.float32).eps).to(self.scale.device)
        zp = zp.to(torch.int32).to(self.zero_point.device)
        if self.axis is None:
            scale, zp = scale.reshape(()), zp.reshape(())
        if self.scale.shape == scale.shape:
            self.scale.copy_(scale)
        else:  # per channel: the placeholder had one channel (.data keeps the Parameter object)
            self.scale.data = scale
        if self.zero_point.shape == zp.shape:
            self.zero_point.copy_(zp)
        else:
            self._buffers["zero_point"] = zp
        self.__dict__["pending"] = False

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        for name in ("scale", "zero_point"):
            key = prefix + name
            cur = getattr(self, name)
            if key in state_dict and state_dict[key].shape != cur.shape:
                cur.data = torch.zeros(state_dict[key].shape, dtype=cur.dtype, device=cur.device)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)
        self.__dict__["pending"] = False

    def extra_repr(self) -> str:
        return super().extra_repr() + (", waiting for its first batch" if self.pending else "")
