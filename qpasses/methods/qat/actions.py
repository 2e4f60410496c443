"""Actions of the ``qat_prepare`` / ``qat_convert`` families (quantization-aware training).

``qat_prepare`` rewrites ``conv2d -> batch_norm`` (module calls) into a graph pattern, as PT2E's
QAT does, with ``s = gamma / sqrt(running_var + eps)`` read from the BatchNorm's tensors::

    s      = bn.weight / sqrt(bn.running_var + eps)
    w_q    = qpasses.fake_quant_lsq_per_channel(conv.weight * s[:, None, None, None], <weight_fq_N>)
    y      = conv2d(x, w_q, None, stride, padding, dilation, groups) / s[None, :, None, None]
    y      = y + conv.bias[None, :, None, None]           (when the conv has a bias)
    out    = bn(y)                                         (a QATBatchNorm2d: freezable statistics)

Every tensor stays where it was (``conv.weight``, ``bn.running_var`` ...: the state_dict keys do
not change), the weight quantizer is one node like any other, and no module holds a quantizer.
``qat_convert`` folds the pattern into ``F.conv2d(x, weight_fq(W * s), beta + (b - mean) * s)``
with the running statistics and a fixed weight quantizer carrying the learned scales, and makes
every learnable ``FakeQuantize`` a fixed one, so ``integerize``
(``PassManager(["qat_convert", "integerize"])``) lowers it like a PTQ graph.
"""
from __future__ import annotations

import operator

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from ...lang.registry import action, constraint
from ...context import Refuse
from ...matcher import MatchContext
from .lib import QATBatchNorm2d, fold_conv_bn, frozen_fake_quant
from ...numerics import FakeQuantize
from ...qnodes import insert_quantizer, quantizer_module
from .._graphutil import add_module, add_param, copy_meta, is_shared_module
from ..ptq.actions import QUANT_KEY

#: node meta of a QAT pattern's BatchNorm node: the conv module's path and the weight quantizer's holder
QAT_KEY = "qpasses.qat_conv_bn"
#: node meta marking the nodes inside a QAT pattern (not outputs of their own)
QAT_INTERIOR = "qpasses.qat_interior"


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
    """``bn(conv(x))`` -> the QAT conv + BatchNorm pattern (see the module docstring)."""
    from ..ptq.actions import bits_for, weight_fake_quant
    cm, bm = ctx.view(conv).module, ctx.view(bn).module
    if cm.padding_mode != "zeros":
        raise Refuse(f"{conv.name}: padding_mode={cm.padding_mode!r} is not supported")
    if bm.num_features != cm.out_channels or not bm.affine or not bm.track_running_stats:
        raise Refuse(f"{bn.name}: BatchNorm must be affine, track running statistics and match the conv's channels")
    if len(conv.args) != 1 or conv.kwargs:
        raise Refuse(f"{conv.name} is called with extra arguments")
    bits = bits_for(ctx, conv, "w_bits", w_bits)
    w0, _ = fold_conv_bn(cm.weight, cm.bias, bm)
    fq = weight_fake_quant(w0, "conv2d", cm.groups, bits, True, learnable=bool(learnable))
    qbn = QATBatchNorm2d.from_bn(bm, None if freeze_bn_after is None else int(freeze_bn_after))
    ctx.rewrite.replace_module(str(bn.target), qbn)
    made = []

    def call(fn, *args, like=None):
        n = ctx.rewrite.insert("call_function", fn, args, before=bn, like=like)
        made.append(n)
        return n

    def attr(target):
        n = ctx.rewrite.get_attr(target, before=bn)
        made.append(n)
        return n

    x = conv.args[0]
    w = attr(f"{conv.target}.weight")
    var = attr(f"{bn.target}.running_var")
    gamma = attr(f"{bn.target}.weight")
    s = call(torch.div, gamma, call(torch.sqrt, call(torch.add, var, float(qbn.eps))))
    ws = call(torch.mul, w, call(torch.reshape, s, (-1, 1, 1, 1)), like=w)
    target = add_module(ctx, "weight_fq", fq)
    wq = insert_quantizer(ctx, ws, target, before=bn)
    made.append(wq)
    y = call(F.conv2d, x, wq, None, tuple(cm.stride), tuple(cm.padding), tuple(cm.dilation), int(cm.groups),
             like=conv)
    y.meta[QUANT_KEY] = {"weight": {"bits": bits, "axis": 0}}
    if "qpasses.bits" in conv.meta:
        y.meta["qpasses.bits"] = conv.meta["qpasses.bits"]
    y.meta["qpasses.module"] = str(conv.target)
    y.meta["qpasses.module_type"] = type(cm).__name__
    out = call(operator.truediv, y, call(torch.reshape, s, (1, -1, 1, 1)), like=conv)
    if cm.bias is not None:
        out = call(operator.add, out, call(torch.reshape, attr(f"{conv.target}.bias"), (1, -1, 1, 1)), like=conv)
    for n in made:
        n.meta[QAT_INTERIOR] = True
    bn.args = (out,)
    bn.meta[QAT_KEY] = {"conv": str(conv.target), "weight_fq": target}
    ctx.rewrite.erase(conv)


@constraint("qat_interior")
def qat_interior(ctx: MatchContext, node: fx.Node):
    """The node is inside a QAT conv + BatchNorm pattern (its output is not one of the model's)."""
    return bool(node.meta.get(QAT_INTERIOR)), f"{node.name} is inside a QAT conv + BatchNorm pattern"


@constraint("qat_conv_bn")
def qat_conv_bn(ctx: MatchContext, bn: fx.Node):
    """The node is the BatchNorm of a QAT conv + BatchNorm pattern."""
    info = bn.meta.get(QAT_KEY)
    ok = isinstance(info, dict) and isinstance(ctx.rewrite.module(bn), QATBatchNorm2d)
    return ok, f"{bn.name} is not the BatchNorm of a QAT conv + BatchNorm pattern"


@action("qat_fold_conv_bn", replaces=True)
def qat_fold_conv_bn(ctx: MatchContext, bn: fx.Node):
    """The QAT conv + BatchNorm pattern -> ``F.conv2d(x, weight_fq(W * s), beta + (b - mean) * s)`` with the
    running statistics and a fixed weight quantizer carrying the learned scales (the PTQ convert form)."""
    info = bn.meta.get(QAT_KEY)
    bm = ctx.rewrite.module(bn)
    if not isinstance(info, dict) or not isinstance(bm, QATBatchNorm2d):
        raise Refuse(f"{bn.name} is not the BatchNorm of a QAT conv + BatchNorm pattern")
    interior = _pattern_nodes(bn)
    y = next((n for n in interior if n.op == "call_function" and n.target is F.conv2d), None)
    cm = ctx.modules.get(info["conv"])
    wfq = quantizer_module(ctx.modules, y.args[1], (FakeQuantize,)) if y is not None else None
    if y is None or not isinstance(cm, nn.Conv2d) or wfq is None:
        raise Refuse(f"{bn.name}: the QAT pattern around it was changed (conv {info['conv']})")
    w, b = fold_conv_bn(cm.weight, cm.bias, bm)
    fq = frozen_fake_quant(wfq)
    wn = add_param(ctx, "qat_weight", w, bn)
    bn_ = add_param(ctx, "qat_bias", b, bn)
    target = add_module(ctx, "weight_fq", fq)
    wq = insert_quantizer(ctx, wn, target, before=bn)
    # the conv's input as it is now (an observer or quantizer may have been put on it since)
    new = ctx.rewrite.insert("call_function", F.conv2d, (y.args[0], wq, bn_, *y.args[3:]), before=bn, like=bn)
    for k in (QUANT_KEY, "qpasses.bits", "qpasses.module", "qpasses.module_type"):
        if k in y.meta:
            new.meta[k] = y.meta[k]
    new.meta[QUANT_KEY] = {"weight": {"bits": fq.bits, "axis": fq.axis}}
    bn.replace_all_uses_with(new)
    ctx.rewrite.erase(bn)
    while True:      # the pattern's nodes, users before their inputs
        dead = [n for n in interior if not n.users]
        if not dead:
            break
        for n in dead:
            ctx.rewrite.erase(n)
            interior.remove(n)


def _pattern_nodes(bn: fx.Node) -> list:
    """The nodes of the QAT pattern feeding ``bn``: those marked :data:`QAT_INTERIOR`, reached
    backwards from it (the walk stops at the conv's input and at anything added since)."""
    seen, todo = [], list(bn.all_input_nodes)
    while todo:
        n = todo.pop()
        if n.meta.get(QAT_INTERIOR) and n not in seen:
            seen.append(n)
            todo.extend(n.all_input_nodes)
    return seen


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
