"""Per-layer report of a quantized GraphModule (``qpasses report``): op, bits, scales, SQNR, size.

Every quantizer module the recipes leave in a graph is described here by what it is, not by
its name:

===========================  ==========================  ==============================
module                       made by                     bits / scale shown
===========================  ==========================  ==============================
``FakeQuantize``             ptq_int8, qat, genie, ...   ``bits``, ``scale``
``Int4GroupFakeQuantize``    w4a16                       4, the group scales
``Fp8FakeQuantize``          w8a8_fp8                    8 (float8 e4m3), ``scale``
dynamic fp8 op node          w8a8_fp8 (dynamic)          8 (scale: per call)
``ChannelBitsFakeQuant``     aciq4                       per-channel bits (``min-max``)
``binary_weight`` op node    bnn                         1
``binary_sign`` op node      bnn                         1
dynamic quantizer op node    dynamic_int8                ``bits`` (scale: per call)
``PackedBinaryLinear/Conv``  lower after bnn             1, ``alpha``
===========================  ==========================  ==============================

SQNR is the layer output of the quantized graph against the same graph with every quantizer
switched off (replaced by the identity; a sign that replaced a ReLU by the ReLU; a packed binary
layer keeps its 1-bit weights, whose float original is not kept).  ``dynamic_int8``'s linears are
``linear(dyn_q(x), fq_w(W), b)`` (``dyn_q`` a dynamic quantizer op node,
:func:`~qpasses.qnodes.is_dynamic_quantizer`): their row is ``linear (per_token dynamic)`` (or
``per_tensor``), activation scale ``dynamic``.  The size is the weight's
element count times its bits (per channel for ``ChannelBitsFakeQuant``).  Integer kernel ops
(after ``lower``, or ``int_only``'s integerized layers) get a row too, without SQNR: they have no
float mode.
"""
from __future__ import annotations

import contextlib
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from .frontend import as_inputs
from .kernels.lowering import Int4GroupFakeQuantize
from .methods.aciq.lib import ChannelBitsFakeQuant
from .methods.binary.lib import BINARY_OPS, BinaryActivation, BinaryWeight, PackedBinaryLinear
from .methods.dynamic.lib import dynamic_linear_quantizers
from .numerics import FakeQuantize, sqnr
from .numerics.fp8 import Fp8DynamicQuantize, Fp8FakeQuantize
from .opclasses import ALIASES, OpView, _module_of as _node_module, classify, get_attr_value
from .qnodes import bypassed, fp8_dynamic_granularity, is_dynamic_quantizer
from .report import Coverage, set_coverage_function

__all__ = ["layer_table", "quantizer_bits", "quantizers_off", "WEIGHTED"]

WEIGHTED = ALIASES["weighted"]
_QUANTIZERS = (FakeQuantize, Fp8FakeQuantize, Fp8DynamicQuantize, Int4GroupFakeQuantize, ChannelBitsFakeQuant, BinaryWeight, BinaryActivation)
_DROPPED = {"relu": F.relu, "relu6": F.relu6}     # activations a sign() made redundant (drop_relu)


def quantizer_bits(mod: Any) -> Optional[Tuple[Any, Optional[torch.Tensor]]]:
    """``(bits, scale)`` of a quantizer module (bits an int, or ``"lo-hi"`` for per-channel bits;
    scale None where it is not fixed), or None for anything else (or a disabled FakeQuantize)."""
    if isinstance(mod, FakeQuantize):
        return (int(mod.bits), mod.scale.detach().float()) if mod.enabled else None
    if isinstance(mod, Int4GroupFakeQuantize):
        return 4, mod.scales.detach().float()
    if isinstance(mod, ChannelBitsFakeQuant):
        lo, hi = int(mod.bits.min()), int(mod.bits.max())
        return (lo if lo == hi else f"{lo}-{hi}"), mod.scale.detach().float()
    if isinstance(mod, (BinaryWeight, BinaryActivation)):
        return 1, None
    if isinstance(mod, (Fp8FakeQuantize, Fp8DynamicQuantize)):   # float8 e4m3
        return (8, mod.scale.detach().float() if isinstance(mod, Fp8FakeQuantize) else None) if mod.enabled else None
    return None


def _binary_bits(node: Any) -> Optional[Tuple[int, None]]:
    """``(1, None)`` for a binary quantizer op node (``binary_sign`` / ``binary_weight``), else None."""
    if isinstance(node, fx.Node) and node.op == "call_function" and node.target in BINARY_OPS:
        return 1, None
    return None


@contextlib.contextmanager
def quantizers_off(gm: nn.Module):
    """Within the block every quantizer of ``gm`` is the identity; their own forwards are back afterwards.  Quantizer op
    nodes (:mod:`qpasses.qnodes`) call a pass-through function meanwhile (the graph module's
    code is regenerated on the way in and out)."""
    patched = []
    ops_off = bypassed(gm, list(gm.graph.nodes)) if isinstance(gm, fx.GraphModule) else contextlib.nullcontext()
    # binary op nodes: the weight's is the latent weight, the sign's the activation it replaced (if any)
    binary = [(n, n.target) for n in gm.graph.nodes if n.op == "call_function" and n.target in BINARY_OPS] \
        if isinstance(gm, fx.GraphModule) else []
    for n, _ in binary:
        n.target = _DROPPED.get(n.meta.get("qpasses.float_activation"), _identity) \
            if n.target is BINARY_OPS[0] else _identity
    if binary:
        gm.recompile()
    try:
        for m in gm.modules():
            if isinstance(m, BinaryActivation) and m.float_activation in _DROPPED:
                m.forward = _DROPPED[m.float_activation]
                patched.append(m)
            elif isinstance(m, _QUANTIZERS):
                m.forward = lambda x, *a, **k: x
                patched.append(m)
        with ops_off:
            yield
    finally:
        for m in patched:
            m.__dict__.pop("forward", None)
        for n, t in binary:
            n.target = t
        if binary:
            gm.recompile()


def _identity(x, *args):
    """What a switched-off binary quantizer node calls: its input."""
    return x


def _outputs(gm: fx.GraphModule, example) -> Dict[str, torch.Tensor]:
    vals: Dict[str, torch.Tensor] = {}

    class Rec(fx.Interpreter):
        def run_node(self, nd):
            out = super().run_node(nd)
            if isinstance(out, torch.Tensor):
                vals[nd.name] = out.detach()
            return out

    with torch.no_grad():
        Rec(gm).run(*as_inputs(example))
    return vals


def _module_of(node: Any, mods: Dict[str, nn.Module]) -> Optional[nn.Module]:
    """The module a node calls, or the holder a quantizer op node reads (else None)."""
    return _node_module(node, mods) if isinstance(node, fx.Node) else None


def _fmt_scale(s: Optional[torch.Tensor]) -> str:
    if s is None or s.numel() == 0:
        return "-"
    if s.numel() == 1:
        return f"{s.item():.3g}"
    return f"{s.min().item():.3g}..{s.max().item():.3g}"


def _weight_kib(numel: int, wq: Any, bits: Any) -> float:
    if isinstance(wq, ChannelBitsFakeQuant) and numel:
        per = numel // max(int(wq.bits.numel()), 1)
        return float(wq.bits.sum()) * per / 8 / 1024
    return numel * (bits if isinstance(bits, int) else 32) / 8 / 1024


def layer_table(qgm: fx.GraphModule, example) -> List[Dict[str, Any]]:
    """One row per weighted layer of ``qgm``: layer, op, w_bits, a_bits, w_scale, a_scale,
    sqnr_db (output against the quantizers-off graph, on ``example``), size_kib, fp32_kib."""
    mods = dict(qgm.named_modules())
    q_vals = _outputs(qgm, example)
    with quantizers_off(qgm):
        f_vals = _outputs(qgm, example)
    rows = []
    for n in qgm.graph.nodes:
        cls = classify(n, mods)
        layer = _module_of(n, mods)
        if cls in WEIGHTED:
            v = OpView(n, qgm, cls, mods)
            w = v.get("weight")
            wq = _module_of(w, mods)
            x = v.get("input")
            aq = _module_of(x, mods)
            dyn = is_dynamic_quantizer(x)
            wi = quantizer_bits(wq) or _binary_bits(w)
            ai = (dyn.bits, None) if dyn is not None else (quantizer_bits(aq) or _binary_bits(x))
            if wi is not None:
                src = w.args[0] if w.args else None
                wt = q_vals.get(src.name) if isinstance(src, fx.Node) else None
            elif isinstance(w, fx.Node):
                wt = q_vals.get(w.name)
            else:
                wt = w if isinstance(w, torch.Tensor) else None
            numel = int(wt.numel()) if wt is not None else 0
            w_bits, w_scale = wi if wi is not None else (32, None)
            a_bits, a_scale = ai if ai is not None else (32, None)
            fp8_dyn = fp8_dynamic_granularity(x)       # a dynamic fp8 op node: no module
            if fp8_dyn is not None:
                a_bits, a_scale = 8, None
            a_text = "dynamic" if dyn is not None or fp8_dyn is not None else _fmt_scale(a_scale)
            if dyn is not None and cls == "linear":   # dynamic_int8's linear
                cls = f"linear ({dyn.granularity} dynamic)"
        elif isinstance(layer, PackedBinaryLinear):
            numel = int(layer.out_features * layer.in_features)
            wq, w_bits, w_scale = None, 1, layer.alpha.detach().float()
            ai = quantizer_bits(_module_of(n.args[0] if n.args else None, mods)) or \
                _binary_bits(n.args[0] if n.args else None)
            a_bits, a_scale = ai if ai is not None else (32, None)
            a_text = _fmt_scale(a_scale)
            cls = type(layer).__name__
        else:
            row = _kernel_row(qgm, n)
            if row is not None:
                rows.append(row)
            continue
        s = sqnr(f_vals[n.name].float(), q_vals[n.name].float()) if n.name in q_vals else float("nan")
        rows.append({
            "layer": n.meta.get("qpasses.module", n.target if n.op == "call_module" else n.name), "op": cls,
            "w_bits": w_bits, "a_bits": a_bits, "w_scale": _fmt_scale(w_scale), "a_scale": a_text,
            "sqnr_db": float(s), "size_kib": _weight_kib(numel, wq, w_bits), "fp32_kib": numel * 4 / 1024,
        })
    return rows


def _kernel_row(gm: fx.GraphModule, n: fx.Node) -> Optional[Dict[str, Any]]:
    """A row for an integer (or fp8) kernel op (``lower``, integerized ``int_only``), or None.

    Kernel ops have no float mode, so there is no SQNR (NaN); the size is the bytes the packed
    (padded) weight buffer holds, and "fp32" the same element count at 32 bits.
    """
    if n.op != "call_function" or not str(n.target).startswith("qpasses."):
        return None
    info = n.meta.get("qpasses.lowered")
    kernel = str(n.target).split(".")[1]
    if info is None and not kernel.endswith("_requant"):
        return None
    info = info or {}
    # the packed weight: the first integer 2-/4-d constant argument; its scales: the first float
    # constant after it; the activation scale: a float constant before it (int8_linear / int8_conv2d)
    vals = [get_attr_value(gm, a.target) if isinstance(a, fx.Node) and a.op == "get_attr" else None for a in n.args]
    is_t = [isinstance(v, torch.Tensor) for v in vals]
    iw = next((i for i, v in enumerate(vals) if is_t[i] and v.dim() in (2, 4)
               and (not v.is_floating_point() or v.dtype == torch.float8_e4m3fn)), None)
    if iw is None:
        return None
    packed = vals[iw]
    w_scale = next((v for i, v in enumerate(vals) if i > iw and is_t[i] and v.is_floating_point()), None)
    a_scale = next((v for i, v in enumerate(vals) if i < iw and is_t[i] and v.is_floating_point()), None)
    w_bits = int(info.get("w_bits", 8))
    a_bits = info.get("a_bits", 32 if kernel == "int4_weight_only_linear" else 8)
    nbytes = int(packed.numel() * packed.element_size())
    return {"layer": n.meta.get("qpasses.module", n.meta.get("qpasses.source", n.name)), "op": kernel,
            "w_bits": w_bits, "a_bits": a_bits, "w_scale": _fmt_scale(w_scale),
            "a_scale": "dynamic" if kernel in ("dynamic_int8_linear", "dynamic_fp8_linear") else _fmt_scale(a_scale),
            "sqnr_db": float("nan"), "size_kib": nbytes / 1024, "fp32_kib": nbytes * 8 / w_bits * 4 / 1024}


# ----------------------------------------------------------------------------- coverage

#: call_function targets (by name) of a weight frozen by the ``qdq`` family
_FROZEN_QUANTIZERS = ("quantized_decomposed.dequantize_per_", "qpasses.fake_quant_")


def _is_quantized_weighted(gm, n, mods, quantizer_bits, kernel_types) -> Optional[bool]:
    """True / False for a weighted op (quantized or not), None for anything else."""
    cls = classify(n, mods)
    if n.op == "call_module" and isinstance(mods.get(n.target), kernel_types):
        return True
    if n.op == "call_function" and str(n.target).startswith("qpasses."):
        return True if _kernel_row(gm, n) is not None else None  # an integer kernel with a packed weight
    if cls in ALIASES["weighted"]:
        w = OpView(n, gm, cls, mods).get("weight")
        if hasattr(w, "op") and w.op == "call_function" and str(w.target).startswith(_FROZEN_QUANTIZERS):
            return True                                # the qdq family's frozen weight (Q/DQ or custom op)
        wq = _module_of(w, mods)
        return wq is not None and quantizer_bits(wq) is not None
    if cls in ("addmm", "matmul"):
        v = OpView(n, gm, cls, mods)
        w = v.get("weight") if cls == "addmm" else v.get(v._names()[1])
        if hasattr(w, "op") and w.op == "get_attr":
            return False
    return None


def weighted_coverage(gm: Any, report: Any = None) -> Coverage:
    """The :class:`Coverage` of (quantized) graph module ``gm``; reasons for the ops left in float
    come from ``report`` (a rule's refusal or failure on that node), else say no rule took them."""
    kernel_types = tuple(t for t in (PackedBinaryLinear,) if t is not None)
    mods = dict(gm.named_modules())
    reasons: Dict[str, str] = {}
    if report is not None:
        for st in report.rules.values():
            for node, why in list(st.refused) + list(st.failures):
                reasons.setdefault(node, f"{st.rule}: {why}")
    cov = Coverage()
    for n in gm.graph.nodes:
        q = _is_quantized_weighted(gm, n, mods, quantizer_bits, kernel_types)
        if q is None:
            continue
        name = str(n.meta.get("qpasses.module", n.target if n.op == "call_module" else n.name))
        cls = classify(n, mods)
        if cls == "linear" and dynamic_linear_quantizers(mods, n) is not None:
            cls = "dynamic_linear"                     # dynamic_int8's linear(dyn_q(x), fq_w(W), b)
        if q:
            cov.quantized.append(name)
            cov.quantized_ops.append(cls)
            continue
        why = reasons.get(n.name) or reasons.get(str(n.target))
        if why is None and cls in ("addmm", "matmul"):
            why = "a product with a constant [in, out] weight not rewritten to linear (run the canonicalize family first)"
        cov.missing.append((name, cls, why or f"no rule of this run quantizes {cls} (outside the recipe's scope)"))
    return cov


set_coverage_function(weighted_coverage)
