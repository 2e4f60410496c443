"""Quantization-aware training: the conv + BatchNorm graph pattern's BatchNorm, BN folding, LSQ
initialisation on the first batch.

``qat_prepare`` (:mod:`qpasses.methods.qat.actions`) rewrites ``conv2d -> batch_norm`` into a graph
pattern, as PT2E's QAT does: the conv reads its weight scaled by the BatchNorm's running factor
``s = gamma / sqrt(running_var + eps)`` and fake-quantized (per output channel, LSQ), its output
is divided by ``s`` again (plus the conv bias), and the BatchNorm (a :class:`QATBatchNorm2d`)
normalises that -- with batch statistics while training, so the quantized weight is the folded one
the deployed conv will use (Jacob et al., CVPR 2018, sec. 3.2), and with the running statistics
once frozen or in eval mode, where the pattern equals the folded conv exactly.
:func:`fold_conv_bn` gives that folded conv (``qat_convert``).

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

from ...numerics import FakeQuantize

__all__ = ["QATBatchNorm2d", "bn_scale", "fold_conv_bn", "freeze_bn", "frozen_fake_quant", "FirstBatchFakeQuantize",
           "lsq_init_scale"]


class QATBatchNorm2d(nn.BatchNorm2d):
    """The BatchNorm of a QAT conv + BatchNorm pattern: a ``BatchNorm2d`` whose statistics can be
    frozen (Jacob et al. 2018's schedule).

    Training and not frozen, it is a ``BatchNorm2d``: batch statistics, running statistics
    updated.  Frozen (after ``freeze_bn_after`` training forward passes, or :func:`freeze_bn`)
    or in eval mode, it uses the running statistics and no longer updates them.  It holds no
    quantizer; the graph around it does (see :mod:`qpasses.methods.qat.actions`).
    """

    @classmethod
    def from_bn(cls, bn: nn.BatchNorm2d, freeze_bn_after: Optional[int] = None) -> "QATBatchNorm2d":
        """A copy of ``bn`` (parameters, statistics, eps, momentum, mode) with the freeze schedule."""
        new = cls(bn.num_features, eps=bn.eps, momentum=bn.momentum, affine=bn.affine,
                  track_running_stats=bn.track_running_stats)
        new.load_state_dict(bn.state_dict())
        new.to(device=bn.weight.device if bn.weight is not None else None)
        new.train(bn.training)
        new.freeze_bn_after = None if freeze_bn_after is None or freeze_bn_after < 0 else int(freeze_bn_after)
        new.register_buffer("steps", torch.zeros((), dtype=torch.int64, device=new.running_mean.device))
        new.bn_frozen = False
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            self.steps += 1
            if self.freeze_bn_after is not None and int(self.steps) > self.freeze_bn_after:
                self.bn_frozen = True
        if self.training and not self.bn_frozen:
            return super().forward(x)
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, freeze_bn_after={self.freeze_bn_after}, bn_frozen={self.bn_frozen}"


def bn_scale(bn: nn.BatchNorm2d) -> torch.Tensor:
    """``gamma / sqrt(running_var + eps)``: the per-channel factor a BatchNorm's running statistics
    put on its input."""
    return bn.weight / torch.sqrt(bn.running_var + bn.eps)


def fold_conv_bn(weight: torch.Tensor, bias: Optional[torch.Tensor],
                 bn: nn.BatchNorm2d) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(W * s, beta + (b - mean) * s)`` with ``s`` = :func:`bn_scale`: the conv that computes
    ``bn(conv(x, W, b))`` with the running statistics."""
    with torch.no_grad():
        s = bn_scale(bn)
        w = weight * s.reshape(-1, *([1] * (weight.dim() - 1)))
        b0 = bias if bias is not None else torch.zeros_like(bn.running_mean)
        return w.detach().clone(), (bn.bias + (b0 - bn.running_mean) * s).detach().clone()


def freeze_bn(module: nn.Module, frozen: bool = True) -> int:
    """Freeze (or unfreeze) the BatchNorm statistics of every QAT conv + BatchNorm pattern
    (:class:`QATBatchNorm2d`) in ``module``; returns how many were changed."""
    n = 0
    for m in module.modules():
        if isinstance(m, QATBatchNorm2d):
            m.bn_frozen = bool(frozen)
            n += 1
    return n


def frozen_fake_quant(fq: FakeQuantize) -> FakeQuantize:
    """A non-learnable copy of ``fq`` with its current (learned) scale and zero point.

    Raises :class:`~qpasses.errors.StepError` for a :class:`FirstBatchFakeQuantize` that has
    seen no batch yet (its scale is a placeholder)."""
    if getattr(fq, "pending", False):
        from ...errors import StepError
        raise StepError("a fake quantizer waiting for its first batch (qat / bnn run without data) has seen no "
                        "batch: train the model (or run one batch through it) before freezing it")
    out = FakeQuantize(fq.scale.detach().clone(), fq.zero_point.clone(), fq.qmin, fq.qmax, axis=fq.axis,
                       learnable=False, bits=fq.bits, symmetric=fq.symmetric)
    out.enabled = fq.enabled
    cfg = getattr(fq, "qpasses_config", None)
    if cfg is not None:
        out.qpasses_config = cfg  # type: ignore[attr-defined]
    return out


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
            from ..ptq.calibrate import FIRST_BATCH_KEY
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
        from ...numerics import calc_qparams
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
