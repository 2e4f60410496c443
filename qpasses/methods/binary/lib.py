"""Binarized networks (BNN / XNOR-Net): sign with straight-through estimators, and 1-bit packing.

* :class:`BinaryActivation` -- ``sign(x)`` in the forward pass (zero counts as +1, the
  convention of the 1-bit kernels); in the backward pass the *hardtanh* straight-through
  estimator of Courbariaux/Hubara et al. (2016): the gradient passes where ``|x| <= 1`` and is
  zero elsewhere.
* :class:`BinaryWeight` -- reads a latent float weight and returns ``alpha * sign(w)`` with
  ``alpha`` the mean absolute value per output channel (Rastegari et al., XNOR-Net, 2016), or
  ``sign(w)`` alone (``scale=False``, plain BNN). Gradient: clipped STE for the sign, the true
  gradient for ``alpha``. The latent weight stays a float parameter of the graph, so a plain
  PyTorch training loop trains it; :func:`clip_latent_weights` keeps it in [-1, 1] (BNN).
* :class:`PackedBinaryLinear` / :class:`PackedBinaryConv2d` -- inference modules holding the
  weight signs packed 32 per int32 word (``qpasses.kernels.packing.pack_bits``) and calling
  ``torch.ops.qpasses.binary_linear`` (conv through ``unfold``: im2col then the binary GEMM).
  :func:`pack_binary` turns every binarized linear/conv2d of a graph into one of these.

Both quantizers are ``torch.library`` custom ops, ``qpasses::binary_sign(x)`` and
``qpasses::binary_weight(w, axis, scale)`` (fake impls, the gradients above through
``register_autograd``), so ``torch.export`` keeps each one node.  They keep no tensors, so a graph
calls the op directly, with no module (:mod:`qpasses.qnodes`, ``stateless_call``); the modules are
the eager form, whose forward is that op.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["sign_pm1", "binary_sign", "binary_weight", "BINARY_OPS", "BinaryActivation", "BinaryWeight", "PackedBinaryLinear", "PackedBinaryConv2d",
           "clip_latent_weights", "pack_binary", "binary_modules", "make_optimizer"]


def sign_pm1(x: torch.Tensor) -> torch.Tensor:
    """``+1`` where ``x >= 0``, ``-1`` elsewhere (never 0: the 1-bit packing has no zero)."""
    return torch.where(x >= 0, torch.ones_like(x), -torch.ones_like(x))


def _sign_value(x: torch.Tensor) -> torch.Tensor:
    """The forward value of the straight-through sign: ``clamp(x, -1, 1) + (sign(x) - clamp(x, -1, 1))``
    (the expression the STE form evaluates; within an ulp of ``sign_pm1(x)``)."""
    clipped = torch.clamp(x, -1.0, 1.0)
    return clipped + (sign_pm1(x) - clipped)


def _reduce_dims(w: torch.Tensor, axis: int):
    return [d for d in range(w.dim()) if d != axis % w.dim()]


# ------------------------------------------------------------------------------ the quantizer ops
@torch.library.custom_op("qpasses::binary_sign", mutates_args=())
def binary_sign(x: torch.Tensor) -> torch.Tensor:
    """``±1`` (zero counts as +1) with the hardtanh straight-through gradient (1 where ``|x| <= 1``)."""
    return _sign_value(x)


@binary_sign.register_fake
def _(x):
    return torch.empty_like(x)


def _sign_setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[0])


def _sign_backward(ctx, grad):
    (x,) = ctx.saved_tensors
    return grad * ((x >= -1.0) & (x <= 1.0))


binary_sign.register_autograd(_sign_backward, setup_context=_sign_setup)


@torch.library.custom_op("qpasses::binary_weight", mutates_args=())
def binary_weight(w: torch.Tensor, axis: int, scale: bool) -> torch.Tensor:
    """``alpha * sign(w)`` with ``alpha = mean |w|`` per index of ``axis`` (XNOR-Net), or ``sign(w)``
    alone (``scale=False``).  Gradient: the straight-through sign times ``alpha``, plus the true
    gradient through ``alpha``."""
    b = _sign_value(w)
    if not scale:
        return b
    dims = _reduce_dims(w, axis)
    a = w.abs().mean(dim=dims, keepdim=True) if dims else w.abs()
    return b * a


@binary_weight.register_fake
def _(w, axis, scale):
    if not -w.dim() <= axis < max(w.dim(), 1):
        raise ValueError(f"qpasses::binary_weight: axis {axis} is out of range for a {w.dim()}-d weight")
    return torch.empty_like(w)


def _bw_setup(ctx, inputs, output):
    w, axis, scale = inputs
    ctx.save_for_backward(w)
    ctx.axis, ctx.scale = axis, bool(scale)


def _bw_backward(ctx, grad):
    (w,) = ctx.saved_tensors
    inside = (w >= -1.0) & (w <= 1.0)
    if not ctx.scale:
        return grad * inside, None, None
    dims = _reduce_dims(w, ctx.axis)
    if not dims:
        return grad * torch.sign(w), None, None
    a = w.abs().mean(dim=dims, keepdim=True)
    n = w.numel() // w.shape[ctx.axis % w.dim()]
    through_alpha = (grad * _sign_value(w)).sum(dim=dims, keepdim=True) / n * torch.sign(w)
    return grad * a * inside + through_alpha, None, None


binary_weight.register_autograd(_bw_backward, setup_context=_bw_setup)

#: the binary quantizer ops (stateless: a graph calls them as plain ops, no module)
BINARY_OPS = (torch.ops.qpasses.binary_sign.default, torch.ops.qpasses.binary_weight.default)


def _ste_sign(x: torch.Tensor) -> torch.Tensor:
    """sign in the forward pass, gradient of hardtanh (1 inside [-1, 1], 0 outside) backwards."""
    return torch.ops.qpasses.binary_sign.default(x)


class BinaryActivation(nn.Module):
    """Binarize activations: ``sign(x)`` forward, hardtanh straight-through gradient backward.

    ``float_activation`` (``None``, ``"relu"`` or ``"relu6"``) names the activation a rewrite
    dropped in front of it because ``sign`` made it redundant (``sign(relu(x))`` is constant, so
    the ReLU goes); the float function of the layer is that activation, not the identity
    (:func:`qpasses.layer_report.quantizers_off` uses it).
    """

    float_activation = None

    def stateless_call(self):
        """``(op, constants)``: the graph node of this quantizer is ``op(x, *constants)``."""
        return torch.ops.qpasses.binary_sign.default, ()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``±1`` tensor of the shape of ``x``."""
        return _ste_sign(x)

    @property
    def bits(self) -> int:
        """1 (for reports)."""
        return 1


class BinaryWeight(nn.Module):
    """Binarize a latent float weight: ``alpha * sign(w)`` (``scale=True``) or ``sign(w)``.

    Args:
        scale: multiply by ``alpha = mean |w|`` per output channel (XNOR-Net).
        axis: the output-channel axis of the weight (0 for conv / linear, 1 for conv_transpose).
    """

    def __init__(self, scale: bool = True, axis: int = 0):
        super().__init__()
        self.scale = bool(scale)
        self.axis = int(axis)

    def alpha(self, w: torch.Tensor) -> torch.Tensor:
        """Per-output-channel mean |w| of shape ``[C]``."""
        dims = [d for d in range(w.dim()) if d != self.axis]
        return w.abs().mean(dim=dims) if dims else w.abs()

    def stateless_call(self):
        """``(op, constants)``: the graph node of this quantizer is ``op(w, *constants)`` (it keeps
        no tensors, so no module: :mod:`qpasses.qnodes`)."""
        return torch.ops.qpasses.binary_weight.default, (self.axis, self.scale)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        """The binarized weight (float, same shape as ``w``): the graph's op."""
        return torch.ops.qpasses.binary_weight.default(w, self.axis, self.scale)

    def extra_repr(self) -> str:
        """``scale=..., axis=...``."""
        return f"scale={self.scale}, axis={self.axis}"

    @property
    def bits(self) -> int:
        """1 (for reports)."""
        return 1


def binary_modules(gm: nn.Module):
    """``(weights, activations)``: the BinaryWeight and BinaryActivation modules of ``gm`` (eager
    models; a binarized graph calls the ops and holds none)."""
    ws = [m for m in gm.modules() if isinstance(m, BinaryWeight)]
    acts = [m for m in gm.modules() if isinstance(m, BinaryActivation)]
    return ws, acts


@torch.no_grad()
def clip_latent_weights(gm: fx.GraphModule, step: Optional[int] = None, bound: float = 1.0) -> int:
    """Clamp every latent weight read through a binary weight quantizer (a ``qpasses.binary_weight``
    node, or a :class:`BinaryWeight` module call) to ``[-bound, bound]``.

    Usable as ``qpasses.datasets.fit(..., step_hook=clip_latent_weights)`` (BNN keeps latent
    weights in the range where the straight-through estimator passes gradients). Returns the
    number of tensors clamped. ``step`` is ignored (the ``step_hook`` calling convention).
    """
    n = 0
    for node in gm.graph.nodes:
        op_call = node.op == "call_function" and node.target is torch.ops.qpasses.binary_weight.default
        if not op_call and (node.op != "call_module" or not isinstance(gm.get_submodule(node.target), BinaryWeight)):
            continue
        src = node.args[0]
        if isinstance(src, fx.Node) and src.op == "get_attr":
            t = _attr(gm, src.target)
            t.clamp_(-bound, bound)
            n += 1
    return n


def _attr(gm: nn.Module, target: str):
    obj = gm
    for p in target.split("."):
        obj = getattr(obj, p)
    return obj


# ----------------------------------------------------------------------------- packed 1-bit
class PackedBinaryLinear(nn.Module):
    """``y = (sum_k x_k sign(w)_nk) * alpha_n + b_n`` with 1-bit packed weights.

    ``x`` is converted to int8 (it must hold integers in [-128, 127]: ``±1`` after a
    :class:`BinaryActivation`, zeros from padding) and the binary GEMM
    ``torch.ops.qpasses.binary_linear`` returns the exact integer accumulator scaled by
    ``alpha`` plus the bias.
    """

    def __init__(self, weight: torch.Tensor, alpha: Optional[torch.Tensor], bias: Optional[torch.Tensor]):
        super().__init__()
        from ...kernels.packing import pack_bits
        w = weight.detach().reshape(weight.shape[0], -1)
        self.out_features, self.in_features = int(w.shape[0]), int(w.shape[1])
        self.register_buffer("w_packed", pack_bits(sign_pm1(w)))
        ones = torch.ones(self.out_features)
        self.register_buffer("alpha", (alpha.detach().reshape(-1).float() if alpha is not None else ones).clone())
        self.register_buffer("bias", bias.detach().reshape(-1).float().clone() if bias is not None else None)

    def _gemm(self, x2: torch.Tensor) -> torch.Tensor:
        import qpasses.kernels  # noqa: F401  (registers torch.ops.qpasses.*)
        xi = x2.round().clamp(-128, 127).to(torch.int8)
        return torch.ops.qpasses.binary_linear(xi, self.w_packed, self.in_features, self.alpha, self.bias, False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the layer to float ``x`` of shape ``[..., in_features]``."""
        lead = x.shape[:-1]
        y = self._gemm(x.reshape(-1, x.shape[-1]))
        return y.reshape(*lead, self.out_features).to(x.dtype)

    def extra_repr(self) -> str:
        """Sizes."""
        return f"in_features={self.in_features}, out_features={self.out_features}, bits=1"


class PackedBinaryConv2d(PackedBinaryLinear):
    """A conv2d with 1-bit packed weights: ``unfold`` (im2col, zero padding) then the binary GEMM."""

    def __init__(self, weight: torch.Tensor, alpha, bias, stride: Sequence[int], padding: Sequence[int],
                 dilation: Sequence[int]):
        super().__init__(weight, alpha, bias)
        self.kernel_size = tuple(int(k) for k in weight.shape[2:])
        self.stride, self.padding, self.dilation = _pair(stride), _pair(padding), _pair(dilation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the conv to ``x`` of shape ``[N, C, H, W]``."""
        n, _, h, w = x.shape
        cols = F.unfold(x, self.kernel_size, dilation=self.dilation, padding=self.padding, stride=self.stride)
        oh = (h + 2 * self.padding[0] - self.dilation[0] * (self.kernel_size[0] - 1) - 1) // self.stride[0] + 1
        ow = (w + 2 * self.padding[1] - self.dilation[1] * (self.kernel_size[1] - 1) - 1) // self.stride[1] + 1
        y = self._gemm(cols.transpose(1, 2).reshape(-1, cols.shape[1]))          # [N*L, Cout]
        return y.reshape(n, oh * ow, self.out_features).transpose(1, 2).reshape(n, self.out_features, oh, ow
                                                                                  ).to(x.dtype)

    def extra_repr(self) -> str:
        """Sizes and geometry."""
        return (f"{self.in_features}->{self.out_features}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, dilation={self.dilation}, bits=1")


def _pair(v) -> tuple:
    if isinstance(v, int):
        return (v, v)
    v = tuple(int(i) for i in v)
    return v if len(v) == 2 else (v[0], v[0])


def pack_binary(gm: fx.GraphModule, **options) -> fx.GraphModule:
    """A copy of a binarized graph whose binary linear / conv2d layers (binary weight *and*
    binary activation) run on 1-bit packed weights (:class:`PackedBinaryLinear` /
    :class:`PackedBinaryConv2d`, ``torch.ops.qpasses.binary_linear``). Inference only.

    Runs the ``pack`` stage of the ``binarize`` family alone (rule ``pack_binary_layer``);
    ``pm.report`` of the run is attached as ``out.meta["qpasses.pack_report"]``.
    """
    import copy

    from ...lang.rules import find_named
    from ...manager import PassManager
    fam = find_named("binarize", None)
    rules = []
    for r in fam.rules:
        if r.stage == "pack":
            r = copy.copy(r)
            r.when = True
            rules.append(r)
    pm = PassManager(rules, **options)
    out = pm.run(gm)
    out.meta["qpasses.pack_report"] = pm.report
    return out


def make_optimizer(gm: nn.Module, lr: float, scale_lr_mult: float = 0.01, weight_decay: float = 0.0
                   ) -> torch.optim.Optimizer:
    """Adam over ``gm``'s parameters with LSQ scales (``FakeQuantize.scale``) in a group whose
    learning rate is ``lr * scale_lr_mult``.

    LSQ step sizes are small (1e-3 .. 1e-2): one Adam step of ``lr`` = 1e-3 can push them through
    zero, after which the scale is clamped and its gradient vanishes. A separate, smaller rate keeps
    them positive. Usable as ``qpasses.datasets.fit(..., optimizer=make_optimizer(gm, lr))``.
    """
    from ...numerics import FakeQuantize
    scales = {id(m.scale) for m in gm.modules() if isinstance(m, FakeQuantize) and m.learnable}
    rest = [p for p in gm.parameters() if p.requires_grad and id(p) not in scales]
    sc = [p for p in gm.parameters() if p.requires_grad and id(p) in scales]
    groups = [{"params": rest, "lr": lr}]
    if sc:
        groups.append({"params": sc, "lr": lr * scale_lr_mult})
    if weight_decay:
        return torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay)
    return torch.optim.Adam(groups, lr=lr)
