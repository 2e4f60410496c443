"""Quantizers as ``torch.library`` custom ops (namespace ``qpasses``): one graph node per quantizer.

``torch.export``, ``torch.onnx`` (dynamo) and ``torch.compile`` keep a custom op as a single node
instead of inlining its arithmetic, so a quantizer stays recognisable -- by its name -- in every
graph a model goes through (the "one representation" of the design notes).  Every op has a fake
(meta) implementation for tracing and gradients registered with ``register_autograd``.

Fake quantization ``(clamp(round(x / s) + z, qmin, qmax) - z) * s`` with *fixed* qparams passed as
tensors (so a graph can read them from ``get_attr`` nodes); straight-through gradient for ``x``,
masked to 0 where the code fell outside ``[qmin, qmax]`` (as ``torch.fake_quantize_per_*_affine``),
none for ``scale`` / ``zero_point``:

* ``qpasses::fake_quant_per_tensor(x, scale, zero_point, quant_min, quant_max)`` -- one scale;
* ``qpasses::fake_quant_per_channel(x, scale, zero_point, axis, quant_min, quant_max)`` -- 1-D
  parameters along ``axis``;
* ``qpasses::fake_quant_per_group(x, scale, zero_point, group_size, quant_min, quant_max)`` -- one
  scale per ``group_size`` consecutive elements of the last dim (int4 weights): ``x [..., K]``,
  parameters ``[..., ceil(K / group_size)]``.

Per-channel bit-widths (ACIQ, Banner et al., "Post-training 4-bit quantization of convolution
networks for rapid-deployment", NeurIPS 2019):

* ``qpasses::fake_quant_channel_bits(x, scale, qmax, gain, offset, axis)`` -- symmetric, one scale
  and one range ``[-qmax, qmax]`` per channel along ``axis``, then ``* gain + offset`` per channel
  (bias correction); straight-through gradient (times ``gain``) inside each channel's range.

The first three are bit-exact with ``torch.fake_quantize_per_tensor_affine`` /
``torch.fake_quantize_per_channel_affine`` (the first two call them; the group op uses their
formula, ``round(x * (1 / s))`` in float32 with the float32 reciprocal).

Learned step size (LSQ, Esser et al., "Learned Step Size Quantization", ICLR 2020), the forward of
:class:`~qpasses.numerics.FakeQuantize` with ``learnable=True``:

* ``qpasses::fake_quant_lsq_per_tensor(x, scale, zero_point, quant_min, quant_max)``;
* ``qpasses::fake_quant_lsq_per_channel(x, scale, zero_point, axis, quant_min, quant_max)``.

Forward ``(round(clamp(x / s + z, qmin, qmax)) - z) * s`` with ``s = max(|scale|, eps)`` (|.|: an
optimizer step that pushes a small scale below zero does not kill its gradient).  Gradients, with
``v = x / s + z``: ``x`` gets ``1`` where ``qmin <= v <= qmax`` and ``0`` elsewhere; ``scale`` gets
``g * sign(scale) * sum(grad * d)`` over the elements sharing it, ``d = round(v) - v`` inside the
range, ``qmin - z`` below, ``qmax - z`` above, and the gradient scale ``g = 1 / sqrt(N * Qp)`` with
``N`` the number of elements per scale and ``Qp = max(qmax, 1)`` (computed from the input's shape,
so it follows a dynamic batch size).

Dynamic (per token), qparams measured on the input itself, one range per row (last dim):

* ``qpasses::quantize_per_token(x, quant_min, quant_max, symmetric) -> (codes, scale, zero_point)``
  -- int32 codes ``clamp(round(x / s) + z, qmin, qmax)`` (shape of ``x``), float32 scale and int32
  zero point ``[..., 1]``;
* ``qpasses::fake_quant_per_token(x, quant_min, quant_max, symmetric)`` -- ``(codes - z) * s``,
  straight-through gradient for ``x`` (the qparams are treated as constants).

Their qparams are :func:`~qpasses.numerics.qparams.dynamic_range_qparams` (the range widened to hold
0; symmetric ``s = amax / qmax``, ``z = 0``; affine ``s = (max - min) / (qmax - qmin)``, integer
``z``) and codes use ``x / s`` (a division), exactly as the integer kernels
(``qpasses::dynamic_int8_linear``) compute them.

Dynamic, the other granularities (same qparams and codes; straight-through gradient for ``x``):

* ``qpasses::fake_quant_dynamic_per_tensor(x, quant_min, quant_max, symmetric)`` -- one range for
  the whole tensor (0-d scale and zero point);
* ``qpasses::fake_quant_dynamic_per_slice(x, reduce_dim, quant_min, quant_max, symmetric)`` -- one
  range per slice reduced over ``reduce_dim`` (``-2``: one per column of a matmul's right operand).

The ops are registered when this module is imported (``import qpasses`` does), which is what
``torch.export.load`` of a graph holding them needs.
"""
from __future__ import annotations

from typing import Tuple

import torch
from torch import Tensor

from .qparams import dynamic_range_qparams

__all__ = ["fake_quant_per_tensor", "fake_quant_per_channel", "fake_quant_per_group", "fake_quant_channel_bits",
           "fake_quant_lsq_per_tensor",
           "fake_quant_lsq_per_channel", "fake_quant_per_token", "quantize_per_token", "lsq_grad_scale",
           "fake_quant_dynamic_per_tensor", "fake_quant_dynamic_per_slice"]

_F32_EPS = torch.finfo(torch.float32).eps


# ---------------------------------------------------------------------------------------- checks
def _check_range(quant_min: int, quant_max: int) -> None:
    if not quant_min < quant_max:
        raise ValueError(f"empty integer range [{quant_min}, {quant_max}]")


def _check_float(x: Tensor, name: str) -> None:
    if not x.is_floating_point():
        raise TypeError(f"qpasses::{name} needs a floating-point input, got {x.dtype}")


def _zp32(zero_point: Tensor, shape) -> Tensor:
    """``zero_point`` as an int32 tensor of ``shape`` (``()`` or ``(-1,)``), without copies when it is one."""
    if zero_point.dtype != torch.int32:
        if zero_point.is_floating_point() or zero_point.is_complex():
            raise TypeError(f"zero_point must be an integer tensor, got {zero_point.dtype}")
        zero_point = zero_point.to(torch.int32)
    return zero_point if zero_point.dim() == len(shape) else zero_point.reshape(shape)


def _f32(scale: Tensor, shape) -> Tensor:
    """``scale`` as a float32 tensor of ``shape`` (``()`` or ``(-1,)``), without copies when it is one."""
    if scale.dtype != torch.float32:
        scale = scale.to(torch.float32)
    return scale if scale.dim() == len(shape) else scale.reshape(shape)


def _axis(axis: int, x: Tensor) -> int:
    ax = axis + x.dim() if axis < 0 else axis
    if not 0 <= ax < x.dim():
        raise ValueError(f"axis {axis} is out of range for a {x.dim()}-d tensor")
    return ax


def _channel_shape(x: Tensor, ax: int) -> list:
    shape = [1] * x.dim()
    shape[ax] = -1
    return shape


def _group_params(x: Tensor, p: Tensor, group_size: int) -> Tensor:
    """Per-group parameters ``[..., G]`` expanded to the shape of ``x [..., K]``."""
    k = x.shape[-1]
    return p.repeat_interleave(group_size, dim=-1)[..., :k]


def _check_group(x: Tensor, scale: Tensor, zero_point: Tensor, group_size: int) -> None:
    if group_size <= 0:
        raise ValueError(f"group_size must be positive, got {group_size}")
    if x.dim() < 1:
        raise ValueError("per-group quantization needs at least one dimension")
    groups = (x.shape[-1] + group_size - 1) // group_size
    want = tuple(x.shape[:-1]) + (groups,)
    for name, p in (("scale", scale), ("zero_point", zero_point)):
        if tuple(p.shape) != want:
            raise ValueError(f"per-group {name} must have shape {want} (x {tuple(x.shape)}, group_size "
                             f"{group_size}), got {tuple(p.shape)}")


def _ste_mask(x: Tensor, inv_scale: Tensor, zero_point: Tensor, quant_min: int, quant_max: int) -> Tensor:
    """Where ``round(x * inv_scale) + zp`` lies in ``[qmin, qmax]`` (torch's fake-quantize mask)."""
    q = torch.round(x.to(torch.float32) * inv_scale) + zero_point.to(torch.float32)
    return (q >= quant_min) & (q <= quant_max)


# ------------------------------------------------------------------------------- fixed qparams
@torch.library.custom_op("qpasses::fake_quant_per_tensor", mutates_args=())
def fake_quant_per_tensor(x: Tensor, scale: Tensor, zero_point: Tensor, quant_min: int, quant_max: int) -> Tensor:
    """``torch.fake_quantize_per_tensor_affine`` as one node; ``scale`` / ``zero_point`` one-element tensors."""
    return torch.fake_quantize_per_tensor_affine(x, _f32(scale, ()), _zp32(zero_point, ()), quant_min, quant_max)


@fake_quant_per_tensor.register_fake
def _(x, scale, zero_point, quant_min, quant_max):
    _check_float(x, "fake_quant_per_tensor")
    _check_range(quant_min, quant_max)
    return torch.empty_like(x)


def _per_tensor_setup(ctx, inputs, output):
    x, scale, zero_point, quant_min, quant_max = inputs
    ctx.save_for_backward(x, scale, zero_point)
    ctx.qrange = (quant_min, quant_max)


def _per_tensor_backward(ctx, grad):
    x, scale, zero_point = ctx.saved_tensors
    inv = torch.reciprocal(scale.to(torch.float32).reshape(()))
    mask = _ste_mask(x, inv, zero_point.reshape(()), *ctx.qrange)
    return grad * mask, None, None, None, None


fake_quant_per_tensor.register_autograd(_per_tensor_backward, setup_context=_per_tensor_setup)


@torch.library.custom_op("qpasses::fake_quant_per_channel", mutates_args=())
def fake_quant_per_channel(x: Tensor, scale: Tensor, zero_point: Tensor, axis: int, quant_min: int,
                           quant_max: int) -> Tensor:
    """``torch.fake_quantize_per_channel_affine`` as one node (``axis`` may be negative)."""
    return torch.fake_quantize_per_channel_affine(x, _f32(scale, (-1,)), _zp32(zero_point, (-1,)), _axis(axis, x),
                                                  quant_min, quant_max)


@fake_quant_per_channel.register_fake
def _(x, scale, zero_point, axis, quant_min, quant_max):
    _check_float(x, "fake_quant_per_channel")
    _check_range(quant_min, quant_max)
    _axis(axis, x)
    return torch.empty_like(x)


def _per_channel_setup(ctx, inputs, output):
    x, scale, zero_point, axis, quant_min, quant_max = inputs
    ctx.save_for_backward(x, scale, zero_point)
    ctx.axis, ctx.qrange = axis, (quant_min, quant_max)


def _per_channel_backward(ctx, grad):
    x, scale, zero_point = ctx.saved_tensors
    shape = _channel_shape(x, _axis(ctx.axis, x))
    inv = torch.reciprocal(scale.to(torch.float32).reshape(shape))
    mask = _ste_mask(x, inv, zero_point.reshape(shape), *ctx.qrange)
    return grad * mask, None, None, None, None, None


fake_quant_per_channel.register_autograd(_per_channel_backward, setup_context=_per_channel_setup)


@torch.library.custom_op("qpasses::fake_quant_per_group", mutates_args=())
def fake_quant_per_group(x: Tensor, scale: Tensor, zero_point: Tensor, group_size: int, quant_min: int,
                         quant_max: int) -> Tensor:
    """Fake quantization with one ``(scale, zero_point)`` per ``group_size`` elements of the last dim."""
    _check_group(x, scale, zero_point, group_size)
    s = _group_params(x, scale.to(torch.float32), group_size)
    z = _group_params(x, zero_point.to(torch.float32), group_size)
    q = torch.clamp(torch.round(x.to(torch.float32) * torch.reciprocal(s)) + z, quant_min, quant_max)
    return ((q - z) * s).to(x.dtype)


@fake_quant_per_group.register_fake
def _(x, scale, zero_point, group_size, quant_min, quant_max):
    _check_float(x, "fake_quant_per_group")
    _check_range(quant_min, quant_max)
    _check_group(x, scale, zero_point, group_size)
    return torch.empty_like(x)


def _per_group_setup(ctx, inputs, output):
    x, scale, zero_point, group_size, quant_min, quant_max = inputs
    ctx.save_for_backward(x, scale, zero_point)
    ctx.group_size, ctx.qrange = group_size, (quant_min, quant_max)


def _per_group_backward(ctx, grad):
    x, scale, zero_point = ctx.saved_tensors
    inv = torch.reciprocal(_group_params(x, scale.to(torch.float32), ctx.group_size))
    mask = _ste_mask(x, inv, _group_params(x, zero_point, ctx.group_size), *ctx.qrange)
    return grad * mask, None, None, None, None, None


fake_quant_per_group.register_autograd(_per_group_backward, setup_context=_per_group_setup)


# ------------------------------------------------------------------------- per-channel bit-widths
def _channel_bits_parts(x: Tensor, scale: Tensor, qmax: Tensor, gain: Tensor, offset: Tensor, axis: int):
    ax = _axis(axis, x)
    n = x.shape[ax]
    for name, p in (("scale", scale), ("qmax", qmax), ("gain", gain), ("offset", offset)):
        if p.numel() != n:
            raise ValueError(f"qpasses::fake_quant_channel_bits: {name} has {p.numel()} elements, but axis {axis} "
                             f"of the input has {n}")
    shape = _channel_shape(x, ax)
    return tuple(p.reshape(shape) for p in (scale, qmax, gain, offset))


@torch.library.custom_op("qpasses::fake_quant_channel_bits", mutates_args=())
def fake_quant_channel_bits(x: Tensor, scale: Tensor, qmax: Tensor, gain: Tensor, offset: Tensor,
                            axis: int) -> Tensor:
    """Symmetric per-channel fake quantization, each channel (along ``axis``) with its own range
    ``[-qmax, qmax]`` (its own bit-width), then a per-channel affine correction (ACIQ's bias
    correction): ``gain * clamp(round(x / scale), -qmax, qmax) * scale + offset`` (a division, in the
    promoted dtype of the inputs, as :class:`~qpasses.methods.aciq.ChannelBitsFakeQuant` computes it)."""
    s, qm, g, o = _channel_bits_parts(x, scale, qmax, gain, offset, axis)
    q = torch.minimum(torch.maximum(torch.round(x / s), -qm), qm) * s
    return q * g + o


@fake_quant_channel_bits.register_fake
def _(x, scale, qmax, gain, offset, axis):
    _check_float(x, "fake_quant_channel_bits")
    _channel_bits_parts(x, scale, qmax, gain, offset, axis)
    dtype = torch.promote_types(torch.promote_types(x.dtype, scale.dtype),
                                torch.promote_types(gain.dtype, offset.dtype))
    return torch.empty_like(x, dtype=dtype)


def _channel_bits_setup(ctx, inputs, output):
    x, scale, qmax, gain, offset, axis = inputs
    ctx.save_for_backward(x, scale, qmax, gain, offset)
    ctx.axis = axis


def _channel_bits_backward(ctx, grad):
    x, scale, qmax, gain, offset = ctx.saved_tensors
    s, qm, g, _ = _channel_bits_parts(x, scale, qmax, gain, offset, ctx.axis)
    inside = torch.round(x / s).abs() <= qm        # straight through inside the channel's range
    return (grad * g * inside).to(x.dtype), None, None, None, None, None


fake_quant_channel_bits.register_autograd(_channel_bits_backward, setup_context=_channel_bits_setup)


# ------------------------------------------------------------------------------------------ LSQ
def lsq_grad_scale(numel_per_scale, quant_max: int):
    """LSQ's gradient scale ``g = 1 / sqrt(N * Qp)``, ``Qp = max(quant_max, 1)``."""
    return (numel_per_scale * max(int(quant_max), 1)) ** -0.5


def _lsq_parts(x: Tensor, scale: Tensor, zero_point: Tensor, axis):
    """``(x with the channel axis last, s = max(|scale|, eps), z)`` broadcasting along the last dim."""
    xm = x if axis is None else x.movedim(axis, -1)
    s = torch.clamp(scale.abs(), min=_F32_EPS)
    return xm, s, zero_point.to(s.dtype)


def _lsq_forward(x: Tensor, scale: Tensor, zero_point: Tensor, axis, quant_min: int, quant_max: int) -> Tensor:
    xm, s, z = _lsq_parts(x, scale, zero_point, axis)
    v = torch.clamp(xm / s + z, quant_min, quant_max)
    y = (torch.round(v) - z) * s
    if axis is not None:
        y = y.movedim(-1, axis)
    return y.to(x.dtype)


def _lsq_backward(grad: Tensor, x: Tensor, scale: Tensor, zero_point: Tensor, axis, quant_min: int,
                  quant_max: int):
    xm, s, z = _lsq_parts(x, scale, zero_point, axis)
    v = xm / s + z
    below, above = v < quant_min, v > quant_max
    inside = ~(below | above)
    gm = grad if axis is None else grad.movedim(axis, -1)
    gm = gm.to(torch.promote_types(gm.dtype, s.dtype))
    grad_x = gm * inside
    if axis is not None:
        grad_x = grad_x.movedim(-1, axis)
    grad_x = grad_x.to(x.dtype)
    d = torch.where(inside, torch.round(v) - v, torch.where(below, quant_min - z, quant_max - z))
    per = gm * d
    if axis is None:
        total, n = per.sum(), x.numel()
    else:
        total, n = per.reshape(-1, per.shape[-1]).sum(0), x.numel() // max(x.shape[axis], 1)
    if total.numel() != scale.numel():       # one scale broadcast over every channel
        total = total.sum()
    g = lsq_grad_scale(n, quant_max)
    # through |scale| (its sign) and the clamp at eps (no gradient below it)
    live = (scale.abs() >= _F32_EPS).to(total.dtype)
    grad_scale = (total.reshape(scale.shape) * g * torch.sign(scale) * live).to(scale.dtype)
    return grad_x, grad_scale


def _lsq_checks(x: Tensor, scale: Tensor, name: str, quant_min: int, quant_max: int) -> None:
    _check_float(x, name)
    _check_range(quant_min, quant_max)
    if not scale.is_floating_point():
        raise TypeError(f"qpasses::{name}: scale must be floating point, got {scale.dtype}")


@torch.library.custom_op("qpasses::fake_quant_lsq_per_tensor", mutates_args=())
def fake_quant_lsq_per_tensor(x: Tensor, scale: Tensor, zero_point: Tensor, quant_min: int,
                              quant_max: int) -> Tensor:
    """LSQ fake quantization with one (learnable) scale."""
    _lsq_checks(x, scale, "fake_quant_lsq_per_tensor", quant_min, quant_max)
    return _lsq_forward(x, scale.reshape(()), zero_point.reshape(()), None, quant_min, quant_max)


@fake_quant_lsq_per_tensor.register_fake
def _(x, scale, zero_point, quant_min, quant_max):
    _lsq_checks(x, scale, "fake_quant_lsq_per_tensor", quant_min, quant_max)
    return torch.empty_like(x)


def _lsq_tensor_backward(ctx, grad):
    x, scale, zero_point = ctx.saved_tensors
    gx, gs = _lsq_backward(grad, x, scale.reshape(()), zero_point.reshape(()), None, *ctx.qrange)
    return gx, gs.reshape(scale.shape), None, None, None


fake_quant_lsq_per_tensor.register_autograd(_lsq_tensor_backward, setup_context=_per_tensor_setup)


@torch.library.custom_op("qpasses::fake_quant_lsq_per_channel", mutates_args=())
def fake_quant_lsq_per_channel(x: Tensor, scale: Tensor, zero_point: Tensor, axis: int, quant_min: int,
                               quant_max: int) -> Tensor:
    """LSQ fake quantization with one (learnable) scale per channel along ``axis``."""
    _lsq_checks(x, scale, "fake_quant_lsq_per_channel", quant_min, quant_max)
    return _lsq_forward(x, scale.reshape(-1), zero_point.reshape(-1), _axis(axis, x), quant_min, quant_max)


@fake_quant_lsq_per_channel.register_fake
def _(x, scale, zero_point, axis, quant_min, quant_max):
    _lsq_checks(x, scale, "fake_quant_lsq_per_channel", quant_min, quant_max)
    _axis(axis, x)
    return torch.empty_like(x)


def _lsq_channel_backward(ctx, grad):
    x, scale, zero_point = ctx.saved_tensors
    gx, gs = _lsq_backward(grad, x, scale.reshape(-1), zero_point.reshape(-1), _axis(ctx.axis, x), *ctx.qrange)
    return gx, gs.reshape(scale.shape), None, None, None, None


fake_quant_lsq_per_channel.register_autograd(_lsq_channel_backward, setup_context=_per_channel_setup)


# ------------------------------------------------------------------------------ dynamic per token
def _token_codes(x: Tensor, quant_min: int, quant_max: int, symmetric: bool):
    """float32 ``(codes, scale, zero_point)`` of ``x`` with one range per row (last dim)."""
    xf = x.to(torch.float32)
    scale, zp = dynamic_range_qparams(xf, quant_min, quant_max, symmetric, -1)
    codes = torch.clamp(torch.round(xf / scale) + zp, quant_min, quant_max)
    return codes, scale, zp


def _token_checks(x: Tensor, name: str, quant_min: int, quant_max: int, symmetric: bool) -> None:
    _check_float(x, name)
    _check_range(quant_min, quant_max)
    if x.dim() < 1:
        raise ValueError(f"qpasses::{name} needs at least one dimension (the token's features)")
    if symmetric and not quant_min < 0 < quant_max:
        raise ValueError(f"symmetric per-token quantization needs a signed range, got [{quant_min}, {quant_max}]")


@torch.library.custom_op("qpasses::quantize_per_token", mutates_args=())
def quantize_per_token(x: Tensor, quant_min: int, quant_max: int, symmetric: bool) -> Tuple[Tensor, Tensor, Tensor]:
    """int32 codes of ``x`` with qparams measured per row, and those qparams (``[..., 1]``)."""
    _token_checks(x, "quantize_per_token", quant_min, quant_max, symmetric)
    codes, scale, zp = _token_codes(x, quant_min, quant_max, symmetric)
    return codes.to(torch.int32), scale, zp.to(torch.int32)


@quantize_per_token.register_fake
def _(x, quant_min, quant_max, symmetric):
    _token_checks(x, "quantize_per_token", quant_min, quant_max, symmetric)
    pshape = tuple(x.shape[:-1]) + (1,)
    return (torch.empty_like(x, dtype=torch.int32), x.new_empty(pshape, dtype=torch.float32),
            x.new_empty(pshape, dtype=torch.int32))


@torch.library.custom_op("qpasses::fake_quant_per_token", mutates_args=())
def fake_quant_per_token(x: Tensor, quant_min: int, quant_max: int, symmetric: bool) -> Tensor:
    """Dynamic fake quantization, qparams measured per row of ``x``."""
    _token_checks(x, "fake_quant_per_token", quant_min, quant_max, symmetric)
    codes, scale, zp = _token_codes(x, quant_min, quant_max, symmetric)
    return ((codes - zp) * scale).to(x.dtype)


@fake_quant_per_token.register_fake
def _(x, quant_min, quant_max, symmetric):
    _token_checks(x, "fake_quant_per_token", quant_min, quant_max, symmetric)
    return torch.empty_like(x)


def _dynamic_setup(ctx, inputs, output):
    """Setup of the dynamic ops ``op(x, quant_min, quant_max, symmetric)``: their backward
    recomputes the straight-through mask from ``x``."""
    x, quant_min, quant_max, symmetric = inputs
    ctx.save_for_backward(x)
    ctx.args = (quant_min, quant_max, bool(symmetric))


def _per_token_backward(ctx, grad):
    (x,) = ctx.saved_tensors
    return grad * _dynamic_mask(x, *ctx.args, -1), None, None, None


fake_quant_per_token.register_autograd(_per_token_backward, setup_context=_dynamic_setup)


# ------------------------------------------------------------------- dynamic per tensor / per slice
def _dynamic_codes(x: Tensor, quant_min: int, quant_max: int, symmetric: bool, reduce_dim):
    """float32 ``(codes, scale, zero_point)`` of ``x`` with qparams measured on itself: one range
    for the whole tensor (``reduce_dim=None``) or one per slice reduced over ``reduce_dim``."""
    xf = x.to(torch.float32)
    scale, zp = dynamic_range_qparams(xf, quant_min, quant_max, symmetric, reduce_dim)
    codes = torch.clamp(torch.round(xf / scale) + zp, quant_min, quant_max)
    return codes, scale, zp


def _dynamic_checks(x: Tensor, name: str, quant_min: int, quant_max: int, symmetric: bool, reduce_dim) -> None:
    _check_float(x, name)
    _check_range(quant_min, quant_max)
    if symmetric and not quant_min < 0 < quant_max:
        raise ValueError(f"symmetric dynamic quantization needs a signed range, got [{quant_min}, {quant_max}]")
    if reduce_dim is not None:
        _axis(reduce_dim, x)


def _dynamic_mask(x: Tensor, quant_min: int, quant_max: int, symmetric: bool, reduce_dim) -> Tensor:
    """Where the code before clamping lies in ``[qmin, qmax]`` (the straight-through mask)."""
    xf = x.to(torch.float32)
    scale, zp = dynamic_range_qparams(xf, quant_min, quant_max, symmetric, reduce_dim)
    q = torch.round(xf / scale) + zp
    return (q >= quant_min) & (q <= quant_max)


@torch.library.custom_op("qpasses::fake_quant_dynamic_per_tensor", mutates_args=())
def fake_quant_dynamic_per_tensor(x: Tensor, quant_min: int, quant_max: int, symmetric: bool) -> Tensor:
    """Dynamic fake quantization with one range for the whole tensor, measured on ``x`` itself:
    ``(clamp(round(x / s) + z, qmin, qmax) - z) * s`` with ``(s, z)`` of ``dynamic_range_qparams``."""
    _dynamic_checks(x, "fake_quant_dynamic_per_tensor", quant_min, quant_max, symmetric, None)
    codes, scale, zp = _dynamic_codes(x, quant_min, quant_max, symmetric, None)
    return ((codes - zp) * scale).to(x.dtype)


@fake_quant_dynamic_per_tensor.register_fake
def _(x, quant_min, quant_max, symmetric):
    _dynamic_checks(x, "fake_quant_dynamic_per_tensor", quant_min, quant_max, symmetric, None)
    return torch.empty_like(x)


def _dyn_tensor_backward(ctx, grad):
    (x,) = ctx.saved_tensors
    return grad * _dynamic_mask(x, *ctx.args, None), None, None, None


fake_quant_dynamic_per_tensor.register_autograd(_dyn_tensor_backward, setup_context=_dynamic_setup)


@torch.library.custom_op("qpasses::fake_quant_dynamic_per_slice", mutates_args=())
def fake_quant_dynamic_per_slice(x: Tensor, reduce_dim: int, quant_min: int, quant_max: int,
                                 symmetric: bool) -> Tensor:
    """Dynamic fake quantization with one range per slice of ``x`` reduced over ``reduce_dim``
    (``-2`` on a ``[..., K, N]`` matmul operand: one range per column).  ``reduce_dim=-1`` is
    ``fake_quant_per_token``'s arithmetic."""
    _dynamic_checks(x, "fake_quant_dynamic_per_slice", quant_min, quant_max, symmetric, reduce_dim)
    codes, scale, zp = _dynamic_codes(x, quant_min, quant_max, symmetric, reduce_dim)
    return ((codes - zp) * scale).to(x.dtype)


@fake_quant_dynamic_per_slice.register_fake
def _(x, reduce_dim, quant_min, quant_max, symmetric):
    _dynamic_checks(x, "fake_quant_dynamic_per_slice", quant_min, quant_max, symmetric, reduce_dim)
    return torch.empty_like(x)


def _dyn_slice_setup(ctx, inputs, output):
    x, reduce_dim, quant_min, quant_max, symmetric = inputs
    ctx.save_for_backward(x)
    ctx.args = (quant_min, quant_max, bool(symmetric), int(reduce_dim))


def _dyn_slice_backward(ctx, grad):
    (x,) = ctx.saved_tensors
    return grad * _dynamic_mask(x, *ctx.args), None, None, None, None


fake_quant_dynamic_per_slice.register_autograd(_dyn_slice_backward, setup_context=_dyn_slice_setup)
