"""Actions of the ``qat_prepare`` / ``qat_convert`` families (quantization-aware training).

``qat_prepare`` swaps ``conv2d -> batch_norm`` for :class:`~qpasses.methods.qat.QATConvBn2d`
(BatchNorm folded during training, LSQ weight quantizer) and observes its input;
``qat_convert`` turns a trained graph into the PTQ fake-quant form: ``QATConvBn2d`` becomes
``F.conv2d(x, weight_fq(W_folded), b_folded)`` and every learnable ``FakeQuantize`` a fixed one
with the learned scale, so ``integerize`` (``PassManager(["qat_convert", "integerize"])``)
lowers it like a PTQ graph.
"""
from __future__ import annotations

import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from ..lang.registry import action, constraint
from ..context import Refuse
from ..matcher import MatchContext
from ..methods.qat import QATConvBn2d, fold_qat_conv_bn, frozen_fake_quant
from ..numerics import FakeQuantize
from ..ops import register_module_class
from .graphutil import add_module, add_param, copy_meta, is_shared_module
from ..qnodes import insert_quantizer
from .quant import QUANT_KEY

register_module_class(QATConvBn2d, "qat_conv_bn")


@constraint("bn_module_pair")
def bn_module_pair(ctx: MatchContext, bn: fx.Node, conv: fx.Node):
    """``conv`` is an ``nn.Conv2d`` call and ``bn`` an ``nn.BatchNorm2d`` call, neither shared."""
    cm, bm = ctx.view(conv).module, ctx.view(bn).module
    if not isinstance(cm, nn.Conv2d) or not isinstance(bm, nn.BatchNorm2d):
        return False, "only nn.Conv2d -> nn.BatchNorm2d module calls are fused for QAT"
    if is_shared_module(ctx, conv) or is_shared_module(ctx, bn):
        return False, f"{conv.name} or {bn.name} calls a module used elsewhere"
    return True, ""


@action("qat_fuse_conv_bn", replaces=True, args={"w_bits": {"min": 2, "max": 16}, "freeze_bn_after": {"type": int, "min": 0}})
def qat_fuse_conv_bn(ctx: MatchContext, bn: fx.Node, conv: fx.Node, w_bits: int = 8, learnable: bool = True,
                     freeze_bn_after=None):
    """``bn(conv(x))`` -> ``QATConvBn2d(x)`` (BatchNorm folded into the fake-quantized weight)."""
    from .quant import bits_for
    cm, bm = ctx.view(conv).module, ctx.view(bn).module
    bits = bits_for(ctx, conv, "w_bits", w_bits)
    try:
        mod = QATConvBn2d(cm, bm, w_bits=bits, learnable=bool(learnable),
                          freeze_bn_after=None if freeze_bn_after is None else int(freeze_bn_after))
    except ValueError as e:
        raise Refuse(f"{conv.name}: {e}") from None
    mod.train(bm.training)  # the mode of the BatchNorm it replaces (a new module starts in training mode)
    target = add_module(ctx, "qat_conv_bn", mod)
    with ctx.graph.inserting_before(bn):
        new = ctx.graph.call_module(target, conv.args[:1])
    copy_meta(bn, new)
    for k in ("qpasses.bits",):
        if k in conv.meta:
            new.meta[k] = conv.meta[k]
    new.meta[QUANT_KEY] = {"weight": {"bits": bits, "axis": 0}}
    bn.replace_all_uses_with(new)
    ctx.graph.erase_node(bn)
    ctx.graph.erase_node(conv)


@action("qat_fold_conv_bn", replaces=True)
def qat_fold_conv_bn(ctx: MatchContext, op: fx.Node):
    """``QATConvBn2d(x)`` -> ``F.conv2d(x, weight_fq(W_folded), b_folded)`` with the running statistics
    and a fixed weight quantizer carrying the learned scales (the PTQ convert form)."""
    mod = ctx.view(op).module
    if not isinstance(mod, QATConvBn2d):
        raise Refuse(f"{op.name} is not a QATConvBn2d")
    w, b, fq = fold_qat_conv_bn(mod)
    wn = add_param(ctx, "qat_weight", w, op)
    bn_ = add_param(ctx, "qat_bias", b, op)
    target = add_module(ctx, "weight_fq", fq)
    wq = insert_quantizer(ctx, wn, target, before=op)
    with ctx.graph.inserting_before(op):
        new = ctx.graph.call_function(F.conv2d, (op.args[0], wq, bn_, tuple(mod.stride), tuple(mod.padding),
                                                 tuple(mod.dilation), int(mod.groups)))
    copy_meta(op, new)
    new.meta[QUANT_KEY] = {"weight": {"bits": fq.bits, "axis": fq.axis}}
    if "qpasses.bits" in op.meta:
        new.meta["qpasses.bits"] = op.meta["qpasses.bits"]
    op.replace_all_uses_with(new)
    ctx.graph.erase_node(op)


@constraint("learnable_fake_quant")
def learnable_fake_quant(ctx: MatchContext, fq: fx.Node):
    """The node calls a FakeQuantize with a learnable (LSQ) scale."""
    mod = ctx.view(fq).module
    return (isinstance(mod, FakeQuantize) and mod.learnable, f"{fq.name} is not a learnable FakeQuantize")


@action("freeze_fake_quant", replaces=True)
def freeze_fake_quant(ctx: MatchContext, fq: fx.Node):
    """Replace a learnable FakeQuantize by a fixed one with the learned scale."""
    mod = ctx.view(fq).module
    prefix = "weight_fq" if isinstance(fq.args[0], fx.Node) and fq.args[0].op == "get_attr" else "act_fq"
    target = add_module(ctx, prefix, frozen_fake_quant(mod))
    new = insert_quantizer(ctx, fq.args[0], target, before=fq)
    copy_meta(fq, new)
    fq.replace_all_uses_with(new)
    ctx.graph.erase_node(fq)
