"""``qpasses.compile``: int8 on x86 CPUs through Inductor.

    fast = qpasses.compile(qgm, example_inputs)     # qgm: a converted graph (ptq_int8, int_only, ...)
    y = fast(x)
    print(fast.report)

1. The graph is put into PT2E's folded Q/DQ form by the ``qdq`` rule family
   (:mod:`qpasses.methods.qdq.pt2e`), unless it is in that form already; ``qgm`` is never modified.
2. Each quantized op is checked against what Inductor's x86 int8 passes
   (``torch/_inductor/fx_passes/quantization.py``, run as *freezing* passes) lower:
   ``conv1d`` / ``conv2d`` and ``linear`` whose input is ``dequantize_per_tensor`` of a ``uint8``
   activation (static qparams; or ``dequantize_per_tensor.tensor`` after
   ``choose_qparams.tensor`` -> ``quantize_per_tensor.tensor``, PT2E's dynamic form, which
   ``dynamic_int8`` with ``granularity=per_tensor`` freezes into) and whose weight is
   ``dequantize_per_channel`` (axis 0) of a symmetric ``int8`` constant.  Those become oneDNN ``qconv_pointwise`` / ``qlinear_pointwise`` with a prepacked
   weight.  Everything else that is quantized (conv3d, transposed convs, matmuls between
   activations, per-tensor or unsigned weights, quantizers kept as qpasses custom ops: narrow
   ranges, LSQ, group-wise int4, dynamic per-token or symmetric) is *refused*: it runs in the compiled graph
   in its frozen fake-quant (float) form, which gives the same numbers but no int8 speed, and
   :attr:`CompiledQuantized.report` lists it with the reason.  ``strict=True`` raises
   :class:`CompileError` instead.
3. ``torch.compile`` is called on the frozen graph; every call of the result runs under
   ``torch.no_grad()`` with ``torch._inductor.config.freezing = True`` set for that call only
   (Inductor compiles on the first call, and again when shapes change; the setting is restored
   afterwards, so other compiled code in the process is not affected).  With ``example_inputs``
   the graph is compiled at once, and the report says how many int8 patterns Inductor applied
   (its ``qconv_weight_prepack_matcher_count`` / ``qlinear_weight_prepack_matcher_count``
   counters).

Inductor's C++ back-end needs a C++ compiler (``g++``) at run time.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.fx as fx
import torch.nn as nn

from .errors import QPassesError

__all__ = ["compile", "CompiledQuantized", "CompileReport", "CompileError", "in_qdq_form", "int8_candidates",
           "has_vnni"]


class CompileError(QPassesError):
    """``qpasses.compile(strict=True)`` found quantized ops Inductor does not lower to int8."""


#: Inductor's counters of the int8 patterns it applied
INDUCTOR_COUNTERS = ("qconv_weight_prepack_matcher_count", "qlinear_weight_prepack_matcher_count")


@dataclass
class CompileReport:
    """What :func:`compile` hands to Inductor's int8 passes and what it refuses, with reasons."""
    #: (node, op class) of the ops in the int8 pattern Inductor lowers
    lowered: List[Tuple[str, str]] = field(default_factory=list)
    #: (node, reason) of the quantized ops left in their frozen float form
    refused: List[Tuple[str, str]] = field(default_factory=list)
    #: whether the ``qdq`` family ran here (False: the graph was in Q/DQ form already)
    ran_qdq: bool = False
    #: Inductor's counters after compiling with the example inputs (empty without them)
    inductor: Dict[str, int] = field(default_factory=dict)
    #: layers whose int8 products may saturate on this CPU (no VNNI), with the reason
    warnings: List[str] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"int8 through Inductor: {len(self.lowered)} op(s) "
                 f"({', '.join(sorted({c for _, c in self.lowered})) or 'none'}); refused {len(self.refused)}"]
        if not self.lowered and not self.refused:
            lines.append("  no quantized op found: is this a converted graph (ptq_int8, int_only, ...)?")
        lines += [f"  refused {n}: {r}" for n, r in self.refused]
        lines += [f"  warning: {w}" for w in self.warnings]
        if self.inductor:
            lines.append("  Inductor applied: " + ", ".join(f"{k}={v}" for k, v in self.inductor.items()))
        return "\n".join(lines)

    __repr__ = __str__


# --------------------------------------------------------------------------------------- analysis
def _quantizer_module_types():
    from .kernels.lowering import Int4GroupFakeQuantize
    from .numerics import FakeQuantize, Observer
    return (FakeQuantize, Int4GroupFakeQuantize, Observer)


def in_qdq_form(gm: fx.GraphModule) -> bool:
    """True when no quantizer of ``gm`` is a module call any more (the ``qdq`` family has run)."""
    types = _quantizer_module_types()
    mods = dict(gm.named_modules())
    from .qnodes import quantizer_module
    return not any(quantizer_module(mods, n, types) is not None for n in gm.graph.nodes)


def _is(node: Any, target) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target is target


def _const(gm: fx.GraphModule, node: Any) -> Optional[torch.Tensor]:
    from .opclasses import get_attr_value
    if isinstance(node, fx.Node) and node.op == "get_attr":
        v = get_attr_value(gm, node.target)
        return v if isinstance(v, torch.Tensor) else None
    return None


def _quantized_kind(node: Any) -> Optional[str]:
    """'qdq' / 'custom' when ``node`` is a frozen quantizer's output, else None."""
    from .methods.qdq.pt2e import CUSTOM_OPS, DQ_CHANNEL, DQ_TENSOR, DQ_TENSOR_T
    if not (isinstance(node, fx.Node) and node.op == "call_function"):
        return None
    if node.target in (DQ_TENSOR, DQ_TENSOR_T, DQ_CHANNEL):
        return "qdq"
    if node.target in CUSTOM_OPS:
        return "custom"
    if node.target in (torch.movedim, torch.reshape) or node.target == "reshape_as":
        return _quantized_kind(node.args[0]) if node.args else None
    return None


def _reads_quantized(n: fx.Node) -> bool:
    for a in n.all_input_nodes:
        k = _quantized_kind(a)
        if k is not None:
            return True
        if a.op == "call_method" and a.args and _quantized_kind(a.args[0]) is not None:
            return True
    return False


def int8_candidates(gm: fx.GraphModule) -> CompileReport:
    """Sort the quantized ops of a graph in Q/DQ form into those Inductor's x86 int8 passes lower
    (conv1d / conv2d / linear: uint8 per-tensor input, int8 symmetric per-channel axis-0 weight)
    and the rest, each with the reason."""
    from .methods.qdq.pt2e import CHOOSE_QPARAMS, DQ_CHANNEL, DQ_TENSOR, DQ_TENSOR_T, Q_TENSOR, Q_TENSOR_T, QDQ_KEY
    from .opclasses import OpView, classify
    mods = dict(gm.named_modules())
    rep = CompileReport()
    for n in gm.graph.nodes:
        if n.op not in ("call_function", "call_module", "call_method"):
            continue
        if n.target in (DQ_TENSOR, DQ_TENSOR_T, DQ_CHANNEL, Q_TENSOR, Q_TENSOR_T, CHOOSE_QPARAMS) or \
                _quantized_kind(n) is not None:
            continue
        if n.op == "call_method" and n.target in ("float", "type_as", "to", "contiguous"):
            continue
        if not _reads_quantized(n):
            continue
        cls = classify(n, mods)
        if cls not in ("conv1d", "conv2d", "linear"):
            info = [(_quantized_kind(a) or "") for a in n.all_input_nodes]
            what = "qpasses custom-op quantizer" if "custom" in info else "Q/DQ"
            rep.refused.append((n.name, f"{cls or n.target}: Inductor's x86 int8 passes lower conv1d / conv2d / "
                                         f"linear only; reads a {what} value, runs in float"))
            continue
        view = OpView(n, gm, cls, mods)
        x = view.inputs()[0] if view.inputs() else None
        w = view.get("weight")
        why = _why_not_int8(gm, n, x, w, QDQ_KEY)
        if why:
            rep.refused.append((n.name, f"{cls}: {why}"))
            continue
        rep.lowered.append((n.name, cls))
        if not has_vnni():
            amax = int(x.args[4])                                    # top uint8 code of the input
            wmax = int(_const(gm, w.args[0]).abs().max())
            if 2 * amax * wmax > 32767:
                rep.warnings.append(
                    f"{n.name} ({cls}): this CPU has no VNNI, and oneDNN's u8 x s8 kernels add pairs of "
                    f"products in saturating int16: 2 x {amax} x {wmax} > 32767, so results may be off; "
                    f"quantize weights with w_bits=7 (|code| <= 63) for exact int8 here")
    return rep


def has_vnni() -> bool:
    """Whether this CPU has VNNI (AVX-512 VNNI or AVX-VNNI), where oneDNN's int8 products are
    accumulated in int32 without the int16 pair saturation of plain AVX2 / AVX-512."""
    fn = getattr(torch.cpu, "_is_vnni_supported", None)
    return bool(fn()) if fn is not None else True


def _why_not_int8(gm: fx.GraphModule, n: fx.Node, x: Any, w: Any, qdq_key: str) -> str:
    from .methods.qdq.pt2e import DQ_CHANNEL, DQ_TENSOR, DQ_TENSOR_T
    if _is(x, DQ_TENSOR) or _is(x, DQ_TENSOR_T):
        if x.args[-1] is not torch.uint8:
            return f"its input is dequantized from {x.args[-1]}, the x86 patterns take uint8"
    elif _quantized_kind(x) == "custom":
        from .qnodes import is_dynamic_quantizer
        meta = x.meta.get(qdq_key) or {}
        dyn = is_dynamic_quantizer(x)
        if dyn is not None and not meta.get("reason"):
            return (f"its input quantizer stays a qpasses custom op ({x.target}: dynamic {dyn.granularity}; "
                    f"Inductor's x86 patterns take dynamic activations per tensor, affine uint8 -- "
                    f"dynamic_int8 with granularity=per_tensor)")
        return f"its input quantizer stays a qpasses custom op ({meta.get('reason', x.target)})"
    else:
        return "its input is not quantized (float activation: no int8 pattern)"
    if _is(w, DQ_CHANNEL):
        codes, zp, axis = _const(gm, w.args[0]), _const(gm, w.args[2]), w.args[3]
        if codes is None or codes.dtype is not torch.int8:
            return "its weight codes are not an int8 constant"
        if axis != 0:
            return f"its weight is per channel along axis {axis}, the x86 patterns take axis 0"
        if zp is not None and bool((zp != 0).any()):
            return "its weight has non-zero zero points (the x86 patterns take symmetric weights)"
        return ""
    if _is(w, DQ_TENSOR):
        return "its weight is quantized per tensor (the x86 patterns take per-channel weights)"
    if _quantized_kind(w) == "custom":
        return f"its weight quantizer stays a qpasses custom op ({w.target})"
    return "its weight is not an int8 constant read by dequantize_per_channel"


# ------------------------------------------------------------------------------------------ compile
@contextlib.contextmanager
def _freezing():
    import torch._inductor.config as cfg
    with cfg.patch(freezing=True), torch.no_grad():
        yield


def _counters() -> Dict[str, int]:
    from torch._dynamo.utils import counters
    return {k: int(counters["inductor"][k]) for k in INDUCTOR_COUNTERS}


class CompiledQuantized(nn.Module):
    """The result of :func:`compile`: calls the ``torch.compile``-d Q/DQ graph under
    ``no_grad`` with Inductor's freezing on (for the call only).  ``qdq`` is the frozen
    graph (eager), ``report`` the :class:`CompileReport`.

    Tensor arguments are passed as copies: Inductor's x86 ``qlinear`` binary fusion (torch 2.13,
    ``_register_qlinear_binary_fusion`` in ``torch/_inductor/fx_passes/quantization.py``) turns
    ``add(x, qlinear(...))`` into oneDNN's in-place ``sum`` post-op on ``x`` even when ``x`` is a
    graph input -- its check (``_get_remaining_users``) does not exclude placeholders -- so a residual
    connection on the model's input (a Transformer block) would overwrite the caller's tensor.
    (PT2E's compiled models do the same; measured here, ``tests/test_compile.py``.)"""

    def __init__(self, qdq: fx.GraphModule, compiled, report: CompileReport):
        super().__init__()
        self.qdq = qdq
        self.__dict__["_compiled"] = compiled
        self.report = report

    def forward(self, *args, **kwargs):
        args = tuple(a.clone() if isinstance(a, torch.Tensor) else a for a in args)
        kwargs = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in kwargs.items()}
        with _freezing():
            return self._compiled(*args, **kwargs)


def compile(qgm: fx.GraphModule, example_inputs: Any = None, *, strict: bool = False, **kwargs) -> CompiledQuantized:
    """``torch.compile`` a converted graph for int8 on x86 CPUs (see the module doc).

    Args:
        qgm: a quantized GraphModule (its quantizers as modules, or already in Q/DQ form).
        example_inputs: a tensor or a tuple of positional inputs: compile now, and record in the
            report how many int8 patterns Inductor applied.
        strict: raise :class:`CompileError` when a quantized op is not lowered to int8.
        **kwargs: passed to ``torch.compile`` (``mode``, ``dynamic``, ``options``, ...).
    """
    if not isinstance(qgm, fx.GraphModule):
        raise TypeError(f"qpasses.compile needs a torch.fx.GraphModule, got {type(qgm).__name__}")
    if kwargs.get("backend", "inductor") != "inductor":
        raise CompileError(f"qpasses.compile lowers int8 through Inductor; backend={kwargs['backend']!r} "
                           f"is not supported")
    ran = False
    if not in_qdq_form(qgm):
        from .manager import PassManager
        pm = PassManager("qdq")
        gm = pm.run(qgm)
        ran = True
        left = [f"{node}: {why}" for st in pm.report.rules.values() if st.rule == "unfrozen_quantizer"
                for node, why in st.refused]
        if left:
            raise CompileError("quantizers with no frozen form are left in the graph: " + "; ".join(left))
    else:
        gm = qgm
    report = int8_candidates(gm)
    report.ran_qdq = ran
    if strict and (report.refused or report.warnings):
        raise CompileError("quantized ops Inductor does not lower to exact int8 here: "
                           + "; ".join([f"{n}: {r}" for n, r in report.refused] + report.warnings))
    gm.eval()
    compiled = torch.compile(gm, **kwargs)
    out = CompiledQuantized(gm, compiled, report)
    if example_inputs is not None:
        args = example_inputs if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
        before = _counters()
        out(*args)
        after = _counters()
        report.inductor = {k: after[k] - before[k] for k in INDUCTOR_COUNTERS}
    return out
