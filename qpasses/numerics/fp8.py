"""float8 (e4m3, ``torch.float8_e4m3fn``) fake quantization: custom ops and the modules that call them.

fp8 e4m3 (Micikevicius et al., "FP8 Formats for Deep Learning", 2022) has 4 exponent bits, 3
mantissa bits, no infinities and a largest finite value of 448.  A scaled fp8 quantizer computes,
in float32,

    y = float32(float8_e4m3fn(clamp(x / s, -448, 448))) * s

(the cast rounds to nearest, ties to even; the clamp saturates instead of producing NaN, as ONNX
``QuantizeLinear(saturate=1)`` and the fp8 GEMMs of serving engines do), then casts ``y`` back to
the dtype of ``x``.  The scale ``s`` maps the absolute maximum of what it covers onto 448:
``s = max(amax, 1e-12) / 448`` (:func:`fp8_scale`).

Ops (namespace ``qpasses``, registered on import; each one graph node, with a fake impl and a
straight-through gradient for ``x``, zero where ``|x / s| > 448``):

* ``fp8_fake_quant_per_tensor(x, scale)`` -- one scale (static activations, calibrated);
* ``fp8_fake_quant_per_channel(x, scale, axis)`` -- a 1-D scale along ``axis`` (weights, one
  scale per output channel);
* ``fp8_fake_quant_per_token(x)`` -- dynamic, the scale measured on ``x`` itself for each row of
  the last dim (``[..., 1]`` scales): per-token activations of a linear layer;
* ``fp8_fake_quant_dynamic_tensor(x)`` -- dynamic, one scale measured on the whole of ``x``
  (convolution inputs under dynamic activations, where a "token" has no meaning);
* ``quantize_fp8_per_token(x) -> (codes float8_e4m3fn, scale float32 [..., 1])`` -- the real
  quantizer in front of the fp8 GEMM (``torch.ops.qpasses.fp8_linear``); its codes are those the
  fake quantizer above dequantizes.

Modules: :class:`Fp8FakeQuantize` (fixed scale, per tensor or per channel) and
:class:`Fp8DynamicQuantize` (per token or per tensor, no parameters).

In a graph (the one form of :mod:`qpasses.qnodes`) a static fp8 quantizer is one node,
``fp8_fake_quant_per_tensor(x, get_attr q.scale)`` / ``fp8_fake_quant_per_channel(x, get_attr
q.scale, axis)``, its ``Fp8FakeQuantize`` a holder the graph never calls
(:meth:`Fp8FakeQuantize.graph_call`).  A dynamic one has no state: it is a plain call of
``fp8_fake_quant_per_token(x)`` / ``fp8_fake_quant_dynamic_tensor(x)`` (:data:`FP8_DYNAMIC_OPS`),
no module at all.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn as nn
from torch import Tensor

from ._module import add_buffers

__all__ = ["FP8_DTYPE", "FP8_MAX", "FP8_MIN_AMAX", "fp8_scale", "fp8_cast", "Fp8FakeQuantize", "Fp8DynamicQuantize",
           "fp8_fake_quant_per_tensor", "fp8_fake_quant_per_channel", "fp8_fake_quant_per_token",
           "fp8_fake_quant_dynamic_tensor", "quantize_fp8_per_token", "FP8_DYNAMIC_OPS", "fp8_dynamic_op"]

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8_DTYPE).max)          # 448.0
FP8_MIN_AMAX = 1e-12                                  # an all-zero tensor gets scale 1e-12 / 448


def fp8_scale(amax: Tensor) -> Tensor:
    """float32 scale(s) mapping ``amax`` (absolute maxima) onto 448: ``max(amax, 1e-12) / 448``."""
    return torch.clamp(amax.to(torch.float32), min=FP8_MIN_AMAX) / FP8_MAX


def fp8_cast(x: Tensor, scale: Tensor) -> Tensor:
    """float8_e4m3fn codes of ``x / scale`` (float32 division, saturated to +-448)."""
    return torch.clamp(x.to(torch.float32) / scale, -FP8_MAX, FP8_MAX).to(FP8_DTYPE)


def _fq(x: Tensor, scale: Tensor) -> Tensor:
    return (fp8_cast(x, scale).to(torch.float32) * scale).to(x.dtype)


def _check_float(x: Tensor, name: str) -> None:
    if not x.is_floating_point():
        raise TypeError(f"qpasses::{name} needs a floating-point input, got {x.dtype}")


def _axis(axis: int, x: Tensor) -> int:
    ax = axis + x.dim() if axis < 0 else axis
    if not 0 <= ax < x.dim():
        raise ValueError(f"axis {axis} is out of range for a {x.dim()}-d tensor")
    return ax


def _channel_scale(x: Tensor, scale: Tensor, axis: int) -> Tensor:
    ax = _axis(axis, x)
    if scale.numel() != x.shape[ax]:
        raise ValueError(f"per-channel fp8 scale has {scale.numel()} elements, but axis {axis} of the input "
                         f"has {x.shape[ax]}")
    shape = [1] * x.dim()
    shape[ax] = -1
    return scale.to(torch.float32).reshape(shape)


def _token_scale(x: Tensor) -> Tensor:
    return fp8_scale(x.detach().to(torch.float32).abs().amax(dim=-1, keepdim=True))


def _tensor_scale(x: Tensor) -> Tensor:
    return fp8_scale(x.detach().to(torch.float32).abs().amax())


def _ste(grad: Tensor, x: Tensor, scale: Tensor) -> Tensor:
    return grad * ((x.to(torch.float32) / scale).abs() <= FP8_MAX)


# ------------------------------------------------------------------------------- static scales
@torch.library.custom_op("qpasses::fp8_fake_quant_per_tensor", mutates_args=())
def fp8_fake_quant_per_tensor(x: Tensor, scale: Tensor) -> Tensor:
    """``float8_e4m3fn(clamp(x / scale, +-448)) * scale`` with one (one-element) scale."""
    if scale.numel() != 1:
        raise ValueError(f"fp8_fake_quant_per_tensor needs one scale, got {scale.numel()}")
    return _fq(x, scale.to(torch.float32).reshape(()))


@fp8_fake_quant_per_tensor.register_fake
def _(x, scale):
    _check_float(x, "fp8_fake_quant_per_tensor")
    return torch.empty_like(x)


def _tensor_setup(ctx, inputs, output):
    x, scale = inputs
    ctx.save_for_backward(x, scale)


def _tensor_backward(ctx, grad):
    x, scale = ctx.saved_tensors
    return _ste(grad, x, scale.to(torch.float32).reshape(())), None


fp8_fake_quant_per_tensor.register_autograd(_tensor_backward, setup_context=_tensor_setup)


@torch.library.custom_op("qpasses::fp8_fake_quant_per_channel", mutates_args=())
def fp8_fake_quant_per_channel(x: Tensor, scale: Tensor, axis: int) -> Tensor:
    """fp8 fake quantization with one scale per index of ``axis`` (``scale`` 1-D)."""
    return _fq(x, _channel_scale(x, scale, axis))


@fp8_fake_quant_per_channel.register_fake
def _(x, scale, axis):
    _check_float(x, "fp8_fake_quant_per_channel")
    _axis(axis, x)
    return torch.empty_like(x)


def _channel_setup(ctx, inputs, output):
    x, scale, axis = inputs
    ctx.save_for_backward(x, scale)
    ctx.axis = axis


def _channel_backward(ctx, grad):
    x, scale = ctx.saved_tensors
    return _ste(grad, x, _channel_scale(x, scale, ctx.axis)), None, None


fp8_fake_quant_per_channel.register_autograd(_channel_backward, setup_context=_channel_setup)


# ------------------------------------------------------------------------------ dynamic scales
def _token_check(x: Tensor, name: str) -> None:
    _check_float(x, name)
    if x.dim() < 1:
        raise ValueError(f"qpasses::{name} needs at least one dimension (the token's features)")


@torch.library.custom_op("qpasses::fp8_fake_quant_per_token", mutates_args=())
def fp8_fake_quant_per_token(x: Tensor) -> Tensor:
    """Dynamic fp8 fake quantization, one scale ``amax(|row|) / 448`` per row of the last dim."""
    _token_check(x, "fp8_fake_quant_per_token")
    return _fq(x, _token_scale(x))


@fp8_fake_quant_per_token.register_fake
def _(x):
    _token_check(x, "fp8_fake_quant_per_token")
    return torch.empty_like(x)


def _dyn_setup(ctx, inputs, output):
    pass  # the backward is the identity: nothing to keep


def _token_backward(ctx, grad):
    # the scale covers the row's maximum: nothing saturates, the gradient passes unchanged
    return grad


fp8_fake_quant_per_token.register_autograd(_token_backward, setup_context=_dyn_setup)


@torch.library.custom_op("qpasses::fp8_fake_quant_dynamic_tensor", mutates_args=())
def fp8_fake_quant_dynamic_tensor(x: Tensor) -> Tensor:
    """Dynamic fp8 fake quantization with one scale ``amax(|x|) / 448`` for the whole tensor."""
    _check_float(x, "fp8_fake_quant_dynamic_tensor")
    return _fq(x, _tensor_scale(x))


@fp8_fake_quant_dynamic_tensor.register_fake
def _(x):
    _check_float(x, "fp8_fake_quant_dynamic_tensor")
    return torch.empty_like(x)


fp8_fake_quant_dynamic_tensor.register_autograd(_token_backward, setup_context=_dyn_setup)


@torch.library.custom_op("qpasses::quantize_fp8_per_token", mutates_args=())
def quantize_fp8_per_token(x: Tensor) -> Tuple[Tensor, Tensor]:
    """``(float8_e4m3fn codes, float32 scales [..., 1])`` of ``x``, one scale per row."""
    _token_check(x, "quantize_fp8_per_token")
    s = _token_scale(x)
    return fp8_cast(x, s), s


@quantize_fp8_per_token.register_fake
def _(x):
    _token_check(x, "quantize_fp8_per_token")
    return (torch.empty_like(x, dtype=FP8_DTYPE),
            x.new_empty(tuple(x.shape[:-1]) + (1,), dtype=torch.float32))


# ------------------------------------------------------------------------------------- modules
_QOPS = torch.ops.qpasses


class Fp8FakeQuantize(nn.Module):
    """fp8 e4m3 fake quantization with a fixed float32 scale: per tensor (``axis=None``, a 0-d
    scale) or per channel along ``axis`` (a 1-D scale).  Forward: one
    ``torch.ops.qpasses.fp8_fake_quant_per_tensor`` / ``fp8_fake_quant_per_channel`` call."""

    bits = 8
    symmetric = True
    fp8 = True

    def __init__(self, scale: Tensor, axis: Optional[int] = None):
        super().__init__()
        s = torch.as_tensor(scale, dtype=torch.float32).detach().clone()
        if axis is None:
            if s.numel() != 1:
                raise ValueError(f"a per-tensor fp8 quantizer needs one scale, got {s.numel()}; pass axis=")
            s = s.reshape(())
        else:
            s = s.reshape(-1)
        if not bool(torch.isfinite(s).all()) or not bool((s > 0).all()):
            raise ValueError("fp8 scales must be positive and finite")
        self.axis = None if axis is None else int(axis)
        self.enabled = True
        add_buffers(self, scale=s)

    @classmethod
    def fit(cls, w: Tensor, axis: Optional[int] = 0) -> "Fp8FakeQuantize":
        """Scale(s) ``amax / 448`` of ``w``: one per index of ``axis`` (None: one for the tensor)."""
        wf = w.detach().to(torch.float32).abs()
        if axis is None:
            amax = wf.amax()
        else:
            ax = _axis(axis, wf)
            amax = wf.movedim(ax, 0).reshape(wf.shape[ax], -1).amax(dim=1)
        return cls(fp8_scale(amax), axis)

    @classmethod
    def from_range(cls, lo: Tensor, hi: Tensor) -> "Fp8FakeQuantize":
        """Per-tensor quantizer covering the observed range ``[lo, hi]``."""
        amax = torch.maximum(lo.detach().abs().max(), hi.detach().abs().max())
        if not bool(torch.isfinite(amax)):
            raise ValueError(f"non-finite observed range [{float(lo.min())}, {float(hi.max())}]")
        return cls(fp8_scale(amax), None)

    def forward(self, x: Tensor) -> Tensor:
        if not self.enabled:
            return x
        if self.axis is None:
            return _QOPS.fp8_fake_quant_per_tensor.default(x, self.scale)
        return _QOPS.fp8_fake_quant_per_channel.default(x, self.scale, self.axis)

    def graph_call(self) -> Tuple[object, Tuple[str, ...], Tuple[object, ...]]:
        """``(op, tensor attribute names, constants)`` of this quantizer's graph node: the forward
        (when enabled) is ``op(x, *(getattr(self, a) for a in names), *constants)``."""
        if self.axis is None:
            return _QOPS.fp8_fake_quant_per_tensor.default, ("scale",), ()
        return _QOPS.fp8_fake_quant_per_channel.default, ("scale",), (self.axis,)

    def codes(self, x: Tensor) -> Tensor:
        """float8_e4m3fn codes of ``x`` (what the fp8 GEMM / a checkpoint stores)."""
        s = self.scale if self.axis is None else _channel_scale(x, self.scale, self.axis)
        return fp8_cast(x.detach(), s)

    def extra_repr(self) -> str:
        return f"float8_e4m3fn, axis={self.axis}"


class Fp8DynamicQuantize(nn.Module):
    """Dynamic fp8 e4m3 fake quantization: the scale is measured on each input, one per row of the
    last dim (``per_token=True``) or one for the whole tensor."""

    bits = 8
    symmetric = True
    fp8 = True

    def __init__(self, per_token: bool = True):
        super().__init__()
        self.per_token = bool(per_token)
        self.enabled = True

    def stateless_call(self):
        """``(op, constants)``: the graph node of this quantizer is the plain call ``op(x)``."""
        return fp8_dynamic_op(self.per_token), ()

    def forward(self, x: Tensor) -> Tensor:
        if not self.enabled:
            return x
        return fp8_dynamic_op(self.per_token)(x)

    def extra_repr(self) -> str:
        return f"float8_e4m3fn, {'per_token' if self.per_token else 'per_tensor'}, dynamic"


#: the stateless (dynamic) fp8 quantizer ops, a graph's whole dynamic fp8 quantizer: ``op(x)``
#: -> per token (one scale per row of the last dim) or not (one scale for the tensor)
FP8_DYNAMIC_OPS = {
    _QOPS.fp8_fake_quant_per_token.default: True,
    _QOPS.fp8_fake_quant_dynamic_tensor.default: False,
}


def fp8_dynamic_op(per_token: bool):
    """The op a dynamic fp8 quantizer node calls (``op(x)``): per token, or one scale per tensor."""
    return _QOPS.fp8_fake_quant_per_token.default if per_token else _QOPS.fp8_fake_quant_dynamic_tensor.default
