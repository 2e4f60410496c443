"""BatchNorm folding into the preceding conv / conv_transpose / linear, at both graph levels.

For BN with statistics (mu, var), affine (gamma, beta) and epsilon, and a producer
``y = W*x + b`` whose output channel ``c`` BN normalises::

    s_c = gamma_c / sqrt(var_c + eps)
    W'[c] = W[c] * s_c          b'_c = (b_c - mu_c) * s_c + beta_c

New parameters are always created (never written in place), so a weight or module that
is shared with another call site stays correct for that other site.
"""
from __future__ import annotations

import torch
import torch.fx as fx
import torch.nn as nn

from ..frontend import node_shape
from ..lang.registry import action
from ..manager import Refuse
from ..matcher import MatchContext
from ..modcopy import copy_module_tree
from ..numerics._module import replace_parameters
from .graphutil import add_module, add_param, erase_if_unused, is_shared_module, retarget

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


def fold_bn_params_many(items, opclass: str):
    """:func:`fold_bn_params` for many folds of one kind at once (one vectorised pass).

    ``items``: ``(weight, bias, mean, var, gamma, beta, eps)`` tuples of one shape and dtype
    (float32 only, so a Python ``eps`` and a float32 tensor of it add alike; ``bias``,
    ``gamma``, ``beta`` either all given or all None) for ``conv*`` / ``linear`` (not
    transposed).  The same elementwise arithmetic in the same order, so the results are
    bit-identical to :func:`fold_bn_params` on each; each is its own tensor (cloned).
    """
    with torch.no_grad():
        _, b0, m0, _, g0, bt0, _ = items[0]
        n, cout = len(items), m0.numel()
        w = torch.stack([it[0].detach() for it in items])
        mean = torch.stack([it[2] for it in items])
        var = torch.stack([it[3] for it in items])
        eps = torch.tensor([float(it[6]) for it in items], dtype=var.dtype, device=var.device).reshape(n, 1)
        gamma = torch.stack([it[4] for it in items]) if g0 is not None else torch.ones_like(mean)
        s = gamma / (var + eps).sqrt_()
        b = torch.stack([it[1].detach() for it in items]) if b0 is not None else torch.zeros_like(mean)
        bt = torch.stack([it[5] for it in items]) if bt0 is not None else torch.zeros_like(mean)
        w_new = w * s.reshape(n, cout, *([1] * (w.dim() - 2)))
        b_new = (b - mean).mul_(s).add_(bt)
        return [(wi.clone(), bi.clone()) for wi, bi in zip(w_new.unbind(0), b_new.unbind(0))]


_FOLD_INTO = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear, nn.ConvTranspose1d, nn.ConvTranspose2d,
              nn.ConvTranspose3d)
_BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


class _Pair:
    """What :func:`fold_bn` reads of a (producer, batch norm) pair.

    Module calls of the torch.nn classes above are read straight from their parameter and
    buffer tables (thousands of pairs: the generic :class:`~qpasses.ops.OpView` lookups cost
    more than the folding); anything else (aten ops, functionals, other classes) through
    op views."""
    __slots__ = ("cv", "module", "opclass", "groups", "training", "w", "b", "b_given", "mean", "var",
                 "gamma", "beta", "eps")

    def __init__(self, ctx: MatchContext, conv: fx.Node, bn: fx.Node):
        cm = ctx.modules.get(conv.target) if conv.op == "call_module" else None
        bm = ctx.modules.get(bn.target) if bn.op == "call_module" else None
        if type(cm) in _FOLD_INTO and type(bm) in _BATCH_NORMS:
            self.cv, self.module = None, cm
            self.opclass = ctx.classify(conv)
            self.groups = int(getattr(cm, "groups", 1) or 1) if not isinstance(cm, nn.Linear) else 1
            self.training = bm.training
            bufs, bps, cps = bm._buffers, bm._parameters, cm._parameters
            self.mean, self.var = bufs.get("running_mean"), bufs.get("running_var")
            self.gamma, self.beta, self.eps = bps.get("weight"), bps.get("bias"), float(bm.eps)
            self.w, self.b = cps.get("weight"), cps.get("bias")
            self.b_given = self.b is not None
            return
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

    def foldable(self) -> bool:
        """Whether :func:`fold_bn` would go as far as folding (it refuses otherwise)."""
        return (self.opclass is not None and not self.training and self.mean is not None and self.var is not None
                and self.w is not None and (self.b is not None or not self.b_given))

    def inputs(self):
        return self.w, self.b, self.mean, self.var, self.gamma, self.beta, self.eps


def _batched_fold(ctx: MatchContext, conv: fx.Node, bn: fx.Node, inputs):
    """The folded ``(W', b')`` of the pair from the stage's batch, or None.

    The rule's first rewrite folds the parameters of every candidate pair at once
    (:func:`fold_bn_params_many`, one pass per shape); later rewrites look theirs up, checking
    the inputs are the same tensors, unchanged since.
    """
    batch = ctx.matcher.scratch.get("fold.batch")
    if batch is None:
        batch = {}
        groups = {}
        for b_node in ctx.matcher.index(ctx.rule.anchor_classes()):
            src = b_node.args[0] if b_node.args else None
            if getattr(b_node, "_erased", False) or not isinstance(src, fx.Node):
                continue
            pair = _Pair(ctx, src, b_node)
            if not pair.foldable():
                continue
            its, opclass = pair.inputs(), pair.opclass
            if not (opclass.startswith("conv") and not opclass.startswith("conv_transpose") or opclass == "linear"):
                continue
            tensors = [t for t in its[:6] if t is not None]
            if any(t.dtype != torch.float32 for t in tensors) or its[2].dim() != 1 \
                    or its[0].shape[0] != its[2].numel() or len({t.device for t in tensors}) != 1:
                continue  # left to the per-pair path (which refuses or promotes as it should)
            if any(t.shape != its[2].shape for t in its[1:6] if t is not None):
                continue
            key = (opclass, its[0].shape, its[2].shape, its[0].device) + tuple(t is None for t in its[:6])
            groups.setdefault(key, []).append(((src, b_node), its))
        for (opclass, *_), members in groups.items():
            for ((c, b_), its), res in zip(members, fold_bn_params_many([m[1] for m in members], opclass)):
                batch[(c, b_)] = ([(t, t._version) for t in its[:6] if t is not None], its[6]) + res
        ctx.matcher.scratch["fold.batch"] = batch
    hit = batch.get((conv, bn))
    if hit is None or hit[1] != inputs[6]:
        return None
    now = [t for t in inputs[:6] if t is not None]
    if len(now) != len(hit[0]) or any(t is not h or t._version != v for t, (h, v) in zip(now, hit[0])):
        return None
    return hit[2], hit[3]


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
    folded = _batched_fold(ctx, conv, bn, (w, b, mean, var, gamma, beta, eps))
    if folded is None:
        folded = fold_bn_params(w, b, mean, var, gamma, beta, eps, opclass, groups)  # (no autograd inside)
    w_new, b_new = folded
    if p.module is not None:
        requires_grad = p.module.weight.requires_grad
        if is_shared_module(ctx.gm, conv):
            # another call site keeps the unfolded module: this one gets its own copy
            mod = copy_module_tree(p.module)
            retarget(ctx.gm, conv, add_module(ctx, str(conv.target).replace(".", "_") + "_folded", mod))
        else:
            mod = p.module  # owned by the working copy PassManager.run made: update in place
        replace_parameters(mod, weight=nn.Parameter(w_new, requires_grad=requires_grad),
                           bias=nn.Parameter(b_new, requires_grad=requires_grad))
    else:
        cv = p.cv
        old_w, old_b = cv.get("weight"), cv.get("bias")
        wn = add_param(ctx, "folded_weight", w_new, conv)
        bn_node = add_param(ctx, "folded_bias", b_new, conv)
        cv.set("weight", wn)
        cv.set("bias", bn_node)
        erase_if_unused(ctx.graph, old_w)
        erase_if_unused(ctx.graph, old_b)
    bn.replace_all_uses_with(conv)
    # BN's statistics inputs (get_attr at aten level) die with it
    stats_inputs = list(bn.all_input_nodes)
    ctx.graph.erase_node(bn)
    for n in stats_inputs:
        if n is not conv:
            erase_if_unused(ctx.graph, n)
    conv.meta["qpasses.folded_bn"] = bn.name
