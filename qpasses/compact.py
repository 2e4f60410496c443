"""Weighted modules that read their weight through a fake quantizer, and their expansion.

``convert`` has two ways to make a weighted op read a fake-quantized weight:

* the **decomposed** form every later rule, the integer back-ends and ONNX export read:
  ``F.conv2d(x, weight_fq_N(get_attr weight), get_attr bias, ...)`` (four nodes);
* the **compact** form: the ``call_module`` node stays as it is and its module becomes a
  :class:`FakeQuantConv2d` (a subclass of ``nn.Conv2d`` holding the quantizer as
  ``weight_fq``), like torch.ao's QAT modules.  Its forward computes exactly what the
  decomposed form computes, so it runs the same numbers with one node instead of four,
  and a stage that only swaps modules leaves the generated code as it was.

The compact form is what a run that *ends* in ``convert`` returns.  Before any later
stage or data step (and before ONNX export or a layer report) :func:`expand_weight_quantizers`
turns it into the decomposed form, so the rules that read quantized weights see one
representation.  A module called from more than one node, a module with a non-zero
``padding_mode`` and module classes other than the seven below always take the
decomposed form.
"""
from __future__ import annotations

from typing import Any, Dict, Optional

import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from .modcopy import own_containers

__all__ = ["FakeQuantLinear", "FakeQuantConv1d", "FakeQuantConv2d", "FakeQuantConv3d",
           "FakeQuantConvTranspose1d", "FakeQuantConvTranspose2d", "FakeQuantConvTranspose3d",
           "is_compact", "compact_module", "plain_module", "has_compact", "expand_weight_quantizers", "decomposed"]


class _WeightFakeQuant:
    """Mixin: ``forward`` reads ``self.weight_fq(self.weight)`` instead of ``self.weight``."""

    _plain: type  # the torch.nn class this one extends

    def extra_repr(self) -> str:  # noqa: D401 - as the plain module, the quantizer is a child
        return super().extra_repr() + ", weight read through weight_fq"  # type: ignore[misc]


class FakeQuantLinear(_WeightFakeQuant, nn.Linear):
    """``nn.Linear`` whose weight passes through ``self.weight_fq`` on every call."""
    _plain = nn.Linear

    def forward(self, x):
        return F.linear(x, self.weight_fq(self.weight), self.bias)


def _conv(plain: type, fn):
    class _C(_WeightFakeQuant, plain):  # type: ignore[misc, valid-type]
        _plain = plain

        def forward(self, x):
            return fn(x, self.weight_fq(self.weight), self.bias, self.stride, self.padding, self.dilation,
                      self.groups)
    return _C


def _conv_transpose(plain: type, fn):
    class _C(_WeightFakeQuant, plain):  # type: ignore[misc, valid-type]
        _plain = plain

        def forward(self, x):
            return fn(x, self.weight_fq(self.weight), self.bias, self.stride, self.padding, self.output_padding,
                      self.groups, self.dilation)
    return _C


# module-level names (so the classes pickle) with their own docstrings
class FakeQuantConv1d(_conv(nn.Conv1d, F.conv1d)):
    """``nn.Conv1d`` whose weight passes through ``self.weight_fq`` on every call."""


class FakeQuantConv2d(_conv(nn.Conv2d, F.conv2d)):
    """``nn.Conv2d`` whose weight passes through ``self.weight_fq`` on every call."""


class FakeQuantConv3d(_conv(nn.Conv3d, F.conv3d)):
    """``nn.Conv3d`` whose weight passes through ``self.weight_fq`` on every call."""


class FakeQuantConvTranspose1d(_conv_transpose(nn.ConvTranspose1d, F.conv_transpose1d)):
    """``nn.ConvTranspose1d`` whose weight passes through ``self.weight_fq`` on every call."""


class FakeQuantConvTranspose2d(_conv_transpose(nn.ConvTranspose2d, F.conv_transpose2d)):
    """``nn.ConvTranspose2d`` whose weight passes through ``self.weight_fq`` on every call."""


class FakeQuantConvTranspose3d(_conv_transpose(nn.ConvTranspose3d, F.conv_transpose3d)):
    """``nn.ConvTranspose3d`` whose weight passes through ``self.weight_fq`` on every call."""


_COMPACT: Dict[type, type] = {c._plain: c for c in (
    FakeQuantLinear, FakeQuantConv1d, FakeQuantConv2d, FakeQuantConv3d,
    FakeQuantConvTranspose1d, FakeQuantConvTranspose2d, FakeQuantConvTranspose3d)}


def is_compact(mod: Any) -> bool:
    """True for a module of one of the ``FakeQuant*`` classes above."""
    return isinstance(mod, _WeightFakeQuant)


def compact_class(mod: Any) -> Optional[type]:
    """The compact class for ``mod``'s exact class, when it has one and zero padding."""
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


def compact_module(mod: nn.Module, fq: nn.Module) -> nn.Module:
    """``mod`` (a plain Linear / Conv / ConvTranspose) as its ``FakeQuant*`` class reading its
    weight through ``fq``; it shares ``mod``'s parameters."""
    cls = compact_class(mod)
    if cls is None:
        raise TypeError(f"{type(mod).__name__} has no fake-quantized-weight form")
    children = dict(mod._modules)
    children["weight_fq"] = fq
    return _rebuild(mod, cls, children)


def plain_module(mod: nn.Module) -> nn.Module:
    """A compact module back as its torch.nn class (sharing its parameters), without ``weight_fq``."""
    children = {k: v for k, v in mod._modules.items() if k != "weight_fq"}
    return _rebuild(mod, type(mod)._plain, children)


def has_compact(gm: nn.Module, modules: Optional[Dict[str, nn.Module]] = None) -> bool:
    """Whether any submodule of ``gm`` is in the compact form (``modules``: its module table, if known)."""
    return any(isinstance(m, _WeightFakeQuant) for m in (gm.modules() if modules is None else modules.values()))


def expand_weight_quantizers(gm: fx.GraphModule, state: Optional[Dict[str, Any]] = None) -> int:
    """Rewrite every compact module call of ``gm`` (in place) to the decomposed form.

    ``F.convNd(x, weight_fq_N(get_attr weight), get_attr bias, ...)``, exactly what convert
    writes for a module it does not compact; the quantizer is registered as ``weight_fq_N``.
    Returns the number of calls expanded (0: the graph is untouched).  The caller recompiles.
    """
    from .actions.quant import QUANT_KEY, attach_weight_quantizer
    from .fxfast import module_table, set_submodule
    from .manager import _state
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
        info = dict((n.meta.get(QUANT_KEY) or {}).get("weight") or {})
        attach_weight_quantizer(ctx, n, mod._modules["weight_fq"], "weight_fq", info)
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
    expand_weight_quantizers(work)
    work.recompile()
    return work
