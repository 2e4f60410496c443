"""Actions of the ``aciq`` rule family (Banner et al. 2019 weight quantization).

Representation after ``aciq`` (both graph levels): the weighted op is in functional form and
reads its weight through ``qpasses.fake_quant_channel_bits(get_attr <float weight>, get_attr
weight_aciq_N.scale, .qmax, .gain, .offset, axis)``, its ``ChannelBitsFakeQuant`` a holder the graph
never calls (op class ``channel_bits_fq``); node meta ``qpasses.quant["weight"] = {"bits": mean bits, "axis", "aciq":
{per-channel bits, budget, clipped fraction, prior, ...}}`` -- so the ``convert`` family's weight
rule leaves it alone, while its activation rule turns the (ACIQ) observers into fake quant.
"""
from __future__ import annotations

import torch.fx as fx

from ...errors import OptionError
from ...lang.registry import action
from ...context import Refuse
from ...matcher import MatchContext
from .lib import ChannelBitsFakeQuant, aciq_weight_quantizer
from ...opclasses import register_module_class
from ..ptq.actions import attach_weight_quantizer, bits_for, weight_axis

register_module_class(ChannelBitsFakeQuant, "channel_bits_fq")


@action("aciq_quantize_weight", args={"bits": {"min": 2, "max": 8}, "min_bits": {"min": 1, "max": 16}, "max_bits": {"min": 1, "max": 16}, "prior": {"choices": ("laplace", "gauss", "gaussian", "normal")}, "alloc_rule": {"choices": ("paper", "mse")}})
def aciq_quantize_weight(ctx: MatchContext, op: fx.Node, bits: int = 4, prior: str = "laplace", clip: bool = True,
                         allocate: bool = True, bias_correction: bool = True, min_bits: int = 2, max_bits: int = 8,
                         alloc_rule: str = "paper"):
    """Quantize ``op``'s weight with ACIQ clipping, per-channel bit allocation and bias correction."""
    view = ctx.view(op)
    w = view.tensor("weight")
    if w is None:
        raise Refuse(f"the weight of {op.name} is not a constant")
    bits = bits_for(ctx, op, "w_bits", bits)
    groups = int(view.get("groups", 1) or 1)
    axis = weight_axis(view.opclass, groups)
    if axis is None:
        raise Refuse(f"{op.name}: grouped transposed convolution has no single output-channel axis")
    if not int(min_bits) <= bits <= int(max_bits):
        raise OptionError(f"aciq: w_bits={bits} (for {op.name}) must lie in [min_bits={min_bits}, "
                          f"max_bits={max_bits}]")
    mod, info = aciq_weight_quantizer(w, bits, axis, prior, bool(clip), bool(allocate), bool(bias_correction),
                                      int(min_bits), int(max_bits), str(alloc_rule))
    info.update(prior=prior, clip=bool(clip), allocate=bool(allocate), bias_correction=bool(bias_correction))
    attach_weight_quantizer(ctx, op, mod, "weight_aciq",
                            {"bits": info["used"] / max(1, len(info["bits"])), "axis": axis, "aciq": info})
