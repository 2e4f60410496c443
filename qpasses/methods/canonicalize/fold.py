"""BatchNorm folding into the preceding conv / conv_transpose / linear, at both graph levels.

For BN with statistics (mu, var), affine (gamma, beta) and epsilon, and a producer
``y = W*x + b`` whose output channel ``c`` BN normalises::

    s_c = gamma_c / sqrt(var_c + eps)
    W'[c] = W[c] * s_c          b'_c = (b_c - mu_c) * s_c + beta_c

New parameters are always created (never written in place), so a weight or module that
is shared with another call site stays correct for that other site.
"""
from __future__ import annotations

import copy

import torch
import torch.fx as fx
import torch.nn as nn

from ...frontend import node_shape
from ...lang.registry import action
from ...context import Refuse
from ...matcher import MatchContext
from .._graphutil import add_module, add_param, erase_if_unused, is_shared_module, retarget

__all__ = ["fold_bn_params"]


def fold_bn_params(weight: torch.Tensor, bias, mean, var, gamma, beta, eps: float, opclass: str,
                   groups: int = 1):
    """Return (W', b') for ``opclass`` in {conv*, conv_transpose*, linear}."""
    with torch.no_grad():
        w = weight.detach()
        cout = mean.numel()
        s = (gamma if gamma is not None else torch.ones_like(mean)) / (var + eps).sqrt_()
        b = bias.detach() if bias is not None else torch.zeros_like(mean)
        bt = beta if beta is not None else torch.zeros_like(mean)
        if opclass.startswith("conv_transpose"):
            # weight: [Cin, Cout/groups, k...]; output channel o = g * (Cout/groups) + j
            cin = w.shape[0]
            per = w.shape[1]
            wg = w.reshape(groups, cin // groups, per, *w.shape[2:])
            sg = s.reshape(groups, 1, per, *([1] * (w.dim() - 2)))
            w_new = (wg * sg).reshape(w.shape)
        else:
            w_new = w * s.reshape(cout, *([1] * (w.dim() - 1)))
        if b.dtype == mean.dtype == s.dtype == bt.dtype and b.shape == mean.shape == s.shape == bt.shape:
            b_new = (b - mean).mul_(s).add_(bt)  # the same arithmetic, without two temporaries
        else:
            b_new = (b - mean) * s + bt          # mixed dtypes: promote as written
    dt = weight.dtype
    return (w_new if w_new.dtype == dt else w_new.to(dt)), (b_new if b_new.dtype == dt else b_new.to(dt))


class _Pair:
    """What :func:`fold_bn` reads of a (producer, batch norm) pair, through op views (module
    calls, functionals and aten ops alike)."""
    __slots__ = ("cv", "module", "opclass", "groups", "training", "w", "b", "b_given", "mean", "var",
                 "gamma", "beta", "eps")

    def __init__(self, ctx: MatchContext, conv: fx.Node, bn: fx.Node):
        cv, bv = ctx.view(conv), ctx.view(bn)
        self.cv, self.module, self.opclass = cv, cv.module, cv.opclass
        self.groups = int(cv.get("groups", 1) or 1) if cv.oc is not None else 1
        self.training = bv.get("training", False)
        self.mean, self.var = bv.tensor("running_mean"), bv.tensor("running_var")
        self.gamma, self.beta = bv.tensor("weight"), bv.tensor("bias")
        self.eps = float(bv.get("eps", 1e-5))
        self.w = cv.tensor("weight") if cv.oc is not None else None
        self.b = cv.tensor("bias") if cv.oc is not None else None
        self.b_given = cv.oc is not None and cv.get("bias") is not None

    def inputs(self):
        return self.w, self.b, self.mean, self.var, self.gamma, self.beta, self.eps


def _out_channels(w: torch.Tensor, opclass: str, groups: int) -> int:
    if opclass.startswith("conv_transpose"):
        return w.shape[1] * groups
    return w.shape[0]


@action("fold_bn", replaces=True)
def fold_bn(ctx: MatchContext, conv: fx.Node, bn: fx.Node):
    """Fold an eval-mode BatchNorm that directly consumes ``conv``'s output into its weights."""
    p = _Pair(ctx, conv, bn)
    if p.training:
        raise Refuse(f"{bn.name} is in training mode; folding needs eval() statistics")
    w, b, mean, var, gamma, beta, eps = p.inputs()
    if mean is None or var is None:
        raise Refuse(f"{bn.name} has no running statistics (track_running_stats=False)")
    if w is None:
        raise Refuse(f"the weight of {conv.name} is not a constant (computed at run time)")
    if p.b_given and b is None:
        raise Refuse(f"the bias of {conv.name} is not a constant")
    opclass, groups = p.opclass, p.groups
    if _out_channels(w, opclass, groups) != mean.numel():
        raise Refuse(f"{bn.name} normalises {mean.numel()} channels, {conv.name} produces "
                     f"{_out_channels(w, opclass, groups)}")
    if opclass == "linear":
        shp = node_shape(conv)
        if shp is not None and len(shp) != 2:
            raise Refuse(f"BatchNorm after linear with a rank-{len(shp)} output normalises dim 1, "
                         f"not the linear's features")
    w_new, b_new = fold_bn_params(w, b, mean, var, gamma, beta, eps, opclass, groups)  # (no autograd inside)
    if p.module is not None:
        requires_grad = p.module.weight.requires_grad
        if is_shared_module(ctx, conv):
            # another call site keeps the unfolded module: this one gets its own copy
            mod = copy.deepcopy(p.module)
            retarget(ctx, conv, add_module(ctx, str(conv.target).replace(".", "_") + "_folded", mod))
        else:
            mod = p.module  # owned by the working copy PassManager.run made: update in place
        mod.weight = nn.Parameter(w_new, requires_grad=requires_grad)
        mod.bias = nn.Parameter(b_new, requires_grad=requires_grad)
    else:
        cv = p.cv
        old_w, old_b = cv.get("weight"), cv.get("bias")
        wn = add_param(ctx, "folded_weight", w_new, conv)
        bn_node = add_param(ctx, "folded_bias", b_new, conv)
        cv.set("weight", wn)
        cv.set("bias", bn_node)
        erase_if_unused(ctx, old_w)
        erase_if_unused(ctx, old_b)
    bn.replace_all_uses_with(conv)
    # BN's statistics inputs (get_attr at aten level) die with it
    stats_inputs = list(bn.all_input_nodes)
    ctx.erase(bn)
    for n in stats_inputs:
        if n is not conv:
            erase_if_unused(ctx, n)
    conv.meta["qpasses.folded_bn"] = bn.name
