"""Weighted modules that quantize their input and/or weight themselves, and their expansion.

``observe`` and ``convert`` have two ways to put a quantizer on a weighted op:

* the **decomposed** form every later rule, the integer back-ends and ONNX export read:
  an observer / fake-quant ``call_module`` node between the activation and the op
  (``act_q_N``), and ``F.conv2d(x, weight_fq_N(get_attr weight), get_attr bias, ...)``
  for the weight (four nodes);
* the **compact** form: the op's ``call_module`` node stays as it is and its module becomes
  a :class:`FakeQuantConv2d` (a subclass of ``nn.Conv2d``, like torch.ao's QAT modules)
  holding its quantizers as children: ``input_q`` (the observer of its activation input,
  then the fake quant it becomes) and ``weight_fq`` (its weight's fake quant).  Its forward
  computes exactly what the decomposed form computes, so it runs the same numbers with one
  node instead of up to five, and a stage that only swaps modules leaves the generated code
  as it was.

``observe`` writes ``input_q`` when the op is the only weighted reader of its input (so no
observer needs sharing); ``convert`` turns it into a fake quant and adds ``weight_fq``.
``calibrate`` and ``convert`` read the compact form (their actions and constraints are
registered with ``compact=True``); before any other stage or data step, and before ONNX
export or a layer report, :func:`expand_compact` turns it into the decomposed form, so
those rules see one representation.  A module called from more than one node, a module
with a non-zero ``padding_mode`` and module classes other than the seven below always take
the decomposed form.
"""
from __future__ import annotations

from typing import Any, Dict, Optional

import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from .modcopy import own_containers

__all__ = ["FakeQuantLinear", "FakeQuantConv1d", "FakeQuantConv2d", "FakeQuantConv3d",
           "FakeQuantConvTranspose1d", "FakeQuantConvTranspose2d", "FakeQuantConvTranspose3d",
           "is_compact", "compact_module", "with_input_quantizer", "input_quantizer", "weight_quantizer",
           "plain_module", "has_compact", "expand_compact", "decomposed"]


class _WeightFakeQuant:
    """Mixin: ``forward`` passes its input through the child ``input_q`` and reads
    ``self.weight_fq(self.weight)`` instead of ``self.weight``, for each child it has."""

    _plain: type  # the torch.nn class this one extends

    def _quantized(self, x):
        """(the input as the op reads it, the weight as the op reads it)"""
        m = self._modules
        q = m.get("input_q")
        if q is not None:
            x = q(x)
        wq = m.get("weight_fq")
        return x, (self.weight if wq is None else wq(self.weight))

    def extra_repr(self) -> str:  # noqa: D401 - as the plain module, the quantizers are children
        m = self._modules  # type: ignore[attr-defined]
        read = [f"{what} through {name}" for name, what in (("input_q", "input"), ("weight_fq", "weight"))
                if name in m]
        return super().extra_repr() + ("".join(", " + r for r in read))  # type: ignore[misc]


class FakeQuantLinear(_WeightFakeQuant, nn.Linear):
    """``nn.Linear`` whose input / weight pass through ``self.input_q`` / ``self.weight_fq`` (those it has)."""
    _plain = nn.Linear

    def forward(self, x):
        x, w = self._quantized(x)
        return F.linear(x, w, self.bias)


def _conv(plain: type, fn):
    class _C(_WeightFakeQuant, plain):  # type: ignore[misc, valid-type]
        _plain = plain

        def forward(self, x):
            x, w = self._quantized(x)
            return fn(x, w, self.bias, self.stride, self.padding, self.dilation, self.groups)
    return _C


def _conv_transpose(plain: type, fn):
    class _C(_WeightFakeQuant, plain):  # type: ignore[misc, valid-type]
        _plain = plain

        def forward(self, x):
            x, w = self._quantized(x)
            return fn(x, w, self.bias, self.stride, self.padding, self.output_padding, self.groups, self.dilation)
    return _C


# module-level names (so the classes pickle) with their own docstrings
class FakeQuantConv1d(_conv(nn.Conv1d, F.conv1d)):
    """``nn.Conv1d`` whose input / weight pass through ``input_q`` / ``weight_fq`` (those it has)."""


class FakeQuantConv2d(_conv(nn.Conv2d, F.conv2d)):
    """``nn.Conv2d`` whose input / weight pass through ``input_q`` / ``weight_fq`` (those it has)."""


class FakeQuantConv3d(_conv(nn.Conv3d, F.conv3d)):
    """``nn.Conv3d`` whose input / weight pass through ``input_q`` / ``weight_fq`` (those it has)."""


class FakeQuantConvTranspose1d(_conv_transpose(nn.ConvTranspose1d, F.conv_transpose1d)):
    """``nn.ConvTranspose1d`` whose input / weight pass through ``input_q`` / ``weight_fq`` (those it has)."""


class FakeQuantConvTranspose2d(_conv_transpose(nn.ConvTranspose2d, F.conv_transpose2d)):
    """``nn.ConvTranspose2d`` whose input / weight pass through ``input_q`` / ``weight_fq`` (those it has)."""


class FakeQuantConvTranspose3d(_conv_transpose(nn.ConvTranspose3d, F.conv_transpose3d)):
    """``nn.ConvTranspose3d`` whose input / weight pass through ``input_q`` / ``weight_fq`` (those it has)."""


_COMPACT: Dict[type, type] = {c._plain: c for c in (
    FakeQuantLinear, FakeQuantConv1d, FakeQuantConv2d, FakeQuantConv3d,
    FakeQuantConvTranspose1d, FakeQuantConvTranspose2d, FakeQuantConvTranspose3d)}


def is_compact(mod: Any) -> bool:
    """True for a module of one of the ``FakeQuant*`` classes above."""
    return isinstance(mod, _WeightFakeQuant)


def input_quantizer(mod: Any) -> Optional[nn.Module]:
    """The compact module's ``input_q`` child (an observer or a fake quant), else None."""
    return mod._modules.get("input_q") if isinstance(mod, _WeightFakeQuant) else None


def weight_quantizer(mod: Any) -> Optional[nn.Module]:
    """The compact module's ``weight_fq`` child, else None."""
    return mod._modules.get("weight_fq") if isinstance(mod, _WeightFakeQuant) else None


def compact_class(mod: Any) -> Optional[type]:
    """The compact class for ``mod``: its ``FakeQuant*`` class for a plain module of one of the
    seven classes with zero padding, its own class for a compact module, else None."""
    if isinstance(mod, _WeightFakeQuant):
        return type(mod)
    cls = _COMPACT.get(type(mod))
    if cls is None or getattr(mod, "padding_mode", "zeros") != "zeros":
        return None
    return cls


def _rebuild(mod: nn.Module, cls: type, modules: Dict[str, nn.Module]) -> nn.Module:
    """A module of class ``cls`` with ``mod``'s attributes, parameters and buffers (shared) and
    ``modules`` as its children; built through ``__dict__`` (nn.Module.__setattr__ is slow).
    Its hook tables are its own (copies of ``mod``'s)."""
    new = object.__new__(cls)
    d = own_containers(mod, mod.__dict__.copy())
    d["_parameters"] = dict(mod._parameters)
    d["_buffers"] = dict(mod._buffers)
    d["_modules"] = modules
    object.__setattr__(new, "__dict__", d)
    return new


def _with_child(mod: nn.Module, name: str, q: nn.Module) -> nn.Module:
    cls = compact_class(mod)
    if cls is None:
        raise TypeError(f"{type(mod).__name__} has no compact fake-quantized form")
    children = dict(mod._modules)
    children[name] = q
    return _rebuild(mod, cls, children)


def compact_module(mod: nn.Module, fq: nn.Module) -> nn.Module:
    """``mod`` (a plain Linear / Conv / ConvTranspose, or a compact one) as its ``FakeQuant*``
    class reading its weight through ``fq``; it shares ``mod``'s parameters and its ``input_q``."""
    return _with_child(mod, "weight_fq", fq)


def with_input_quantizer(mod: nn.Module, q: nn.Module) -> nn.Module:
    """``mod`` (plain or compact) as its ``FakeQuant*`` class passing its input through ``q``
    (an observer or a fake quant); it shares ``mod``'s parameters and its ``weight_fq``."""
    return _with_child(mod, "input_q", q)


def plain_module(mod: nn.Module) -> nn.Module:
    """A compact module back as its torch.nn class (sharing its parameters), without its quantizers."""
    children = {k: v for k, v in mod._modules.items() if k not in ("weight_fq", "input_q")}
    return _rebuild(mod, type(mod)._plain, children)


def has_compact(gm: nn.Module, modules: Optional[Dict[str, nn.Module]] = None) -> bool:
    """Whether any submodule of ``gm`` is in the compact form (``modules``: its module table, if known)."""
    return any(isinstance(m, _WeightFakeQuant) for m in (gm.modules() if modules is None else modules.values()))


def expand_compact(gm: fx.GraphModule, state: Optional[Dict[str, Any]] = None) -> int:
    """Rewrite every compact module call of ``gm`` (in place) to the decomposed form.

    ``input_q`` becomes a ``call_module`` node ``act_q_N`` between the input and the call
    (what observe writes for an observer it does not put inside the op; its value keeps the
    input's meta); ``weight_fq`` gives ``F.convNd(x, weight_fq_N(get_attr weight), get_attr
    bias, ...)``, exactly what convert writes for a module it does not compact.  Returns the
    number of calls expanded (0: the graph is untouched).  The caller recompiles.
    """
    from .actions.quant import QUANT_KEY, attach_weight_quantizer, insert_input_quantizer
    from .fxfast import module_table, set_submodule
    from .manager import PROVENANCE_KEY, _state
    from .matcher import Matcher, MatchContext

    modules = module_table(gm)
    nodes = [n for n in gm.graph.nodes if n.op == "call_module" and is_compact(modules.get(n.target))]
    if not nodes:
        return 0
    if state is None:
        state = _state(gm)
    matcher = Matcher(gm, modules)
    ctx = MatchContext(gm, matcher, None, None, {}, state)
    for n in nodes:
        mod = matcher.modules[n.target]
        plain = plain_module(mod)
        set_submodule(gm, n.target, plain, matcher.modules)
        matcher.forget(n)
        q = mod._modules.get("input_q")
        if q is not None:
            qn = insert_input_quantizer(ctx, n, n.args[0], q)
            rule = ((n.meta.get(QUANT_KEY) or {}).get("input") or {}).get("rule")
            if rule is not None:
                qn.meta[PROVENANCE_KEY] = rule  # the rule that observed the input, as if it had made the node
        fq = mod._modules.get("weight_fq")
        if fq is not None:
            info = dict((n.meta.get(QUANT_KEY) or {}).get("weight") or {})
            attach_weight_quantizer(ctx, n, fq, "weight_fq", info)
    return len(nodes)


def decomposed(gm: fx.GraphModule) -> fx.GraphModule:
    """``gm`` in the decomposed form: ``gm`` itself when it holds no compact module, else a
    copy (``gm`` is not modified) with every compact call expanded and its code generated.

    ONNX export and the layer report call this first; use it to inspect a converted graph
    node by node (``weight_fq_N`` modules reading ``get_attr`` weights).
    """
    if not has_compact(gm):
        return gm
    from .manager import copy_graph_module
    work = copy_graph_module(gm, recompile=False)
    expand_compact(work)
    work.recompile()
    return work
