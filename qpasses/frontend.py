"""Front-end: turn an ``nn.Module`` into a ``torch.fx.GraphModule`` with shapes in ``meta``.

``trace`` tries ``torch.fx.symbolic_trace`` first (module-level graph: ``call_module``
nodes for ``nn.Conv2d`` and friends) and falls back to ``torch.export`` (aten-level
graph) when symbolic tracing fails, e.g. on data-dependent Python or item assignment
on proxies.  Every node that produces a tensor gets ``meta["qpasses.shape"]`` and
``meta["qpasses.dtype"]``; the graph module records its level in
``gm.meta["qpasses.level"]`` (``"fx"`` or ``"aten"``) and the example inputs in
``gm.meta["qpasses.example_inputs"]`` (used by ``verify=True``).
"""
from __future__ import annotations

import inspect

from typing import Any, Optional, Tuple

import torch
import torch.fx as fx
from torch.fx.passes.shape_prop import ShapeProp

from .errors import TraceError

__all__ = ["trace", "as_inputs", "input_arity", "propagate_shapes", "graph_level", "node_shape", "node_dtype"]


def as_inputs(example_inputs: Any, arity: Optional[int] = None) -> Tuple[Any, ...]:
    """Normalise a batch (a tensor, or a tuple/list of positional inputs) to a tuple.

    ``arity``: how many positional inputs the model takes (:func:`input_arity`).  A batch that
    carries more -- a ``DataLoader``'s ``(inputs, labels)`` -- gives its leading ``arity``
    items; the trailing ones (labels) are not model inputs.
    """
    if isinstance(example_inputs, tuple):
        inputs = example_inputs
    elif isinstance(example_inputs, list):
        inputs = tuple(example_inputs)
    else:
        return (example_inputs,)
    if arity is not None and 1 <= arity < len(inputs):
        return inputs[:arity]
    return inputs


def input_arity(module: Any) -> Optional[int]:
    """How many positional inputs a batch gives ``module``: as many as the example inputs it was
    traced with (``qpasses.trace`` records them), else the positional parameters of its
    ``forward`` (None: ``*args``, or unknown)."""
    meta = getattr(module, "meta", None)
    ex = meta.get("qpasses.example_inputs") if isinstance(meta, dict) else None
    if isinstance(ex, tuple) and ex:
        return len(ex)
    try:
        params = inspect.signature(module.forward).parameters.values()
    except (TypeError, ValueError, AttributeError):
        return None
    n = 0
    for p in params:
        if p.kind is inspect.Parameter.VAR_POSITIONAL:
            return None
        if p.kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD):
            n += 1
    return n


def _gm_meta(gm: fx.GraphModule) -> dict:
    meta = getattr(gm, "meta", None)
    if meta is None:
        meta = {}
        gm.meta = meta
    return meta


def graph_level(gm: fx.GraphModule) -> str:
    """``"fx"`` for symbolic-traced graphs, ``"aten"`` for exported graphs."""
    level = _gm_meta(gm).get("qpasses.level")
    if level:
        return level
    for n in gm.graph.nodes:
        if n.op == "call_function" and isinstance(n.target, torch._ops.OpOverload):
            return "aten"
    return "fx"


def node_shape(node: fx.Node) -> Optional[Tuple[int, ...]]:
    """Static shape of a node's tensor value if known."""
    shp = node.meta.get("qpasses.shape")
    if shp is not None:
        return shp
    tm = node.meta.get("tensor_meta")
    if tm is not None and hasattr(tm, "shape"):
        return tuple(tm.shape)
    val = node.meta.get("val")
    if isinstance(val, torch.Tensor):
        try:
            return tuple(int(s) for s in val.shape)
        except Exception:  # symbolic sizes
            return None
    return None


def node_dtype(node: fx.Node) -> Optional[torch.dtype]:
    dt = node.meta.get("qpasses.dtype")
    if dt is not None:
        return dt
    tm = node.meta.get("tensor_meta")
    if tm is not None and hasattr(tm, "dtype"):
        return tm.dtype
    val = node.meta.get("val")
    return val.dtype if isinstance(val, torch.Tensor) else None


class _Recorder(ShapeProp):
    """ShapeProp that also writes the flat ``qpasses.shape`` / ``qpasses.dtype`` keys."""

    def run_node(self, n: fx.Node) -> Any:
        out = super().run_node(n)
        if isinstance(out, torch.Tensor):
            n.meta["qpasses.shape"] = tuple(out.shape)
            n.meta["qpasses.dtype"] = out.dtype
        return out


def propagate_shapes(gm: fx.GraphModule, example_inputs: Any) -> None:
    """Run ``gm`` once on ``example_inputs`` and record shapes/dtypes in node meta."""
    with torch.no_grad():
        _Recorder(gm).propagate(*as_inputs(example_inputs))


def trace(model: torch.nn.Module, example_inputs: Any, mode: str = "auto",
          concrete_args: Optional[dict] = None, strict: bool = False, dynamic_batch: bool = True) -> fx.GraphModule:
    """Trace ``model`` into a ``torch.fx.GraphModule``.

    Args:
        model: the module to trace.  Its parameters are shared with the returned graph
            module (as with ``torch.fx.symbolic_trace``); ``PassManager.run`` never
            mutates its input, so the model stays intact.
        example_inputs: one batch: a tensor or a tuple of positional inputs.  Used to
            propagate shapes and to check the traced graph runs.
        mode: ``"auto"`` (fx, then export on failure), ``"fx"`` or ``"export"``.  In ``auto``,
            ``nn.MultiheadAttention`` and the ``nn.Transformer*`` modules are traced into, so a
            model holding them goes to ``torch.export``, which shows their projections (fx keeps
            them as opaque calls, so nothing inside would be quantized; that is the last resort,
            and what ``"fx"`` gives).
        concrete_args: forwarded to ``torch.fx.symbolic_trace``.
        strict: forwarded to ``torch.export.export``.
        dynamic_batch: export with a dynamic leading (batch) dimension on every tensor
            input, so the exported graph accepts other batch sizes (calibration batches,
            a smaller last batch).  Falls back to static shapes if the model forbids it.

    Raises:
        TraceError: when the requested tracer(s) fail; the message gives each reason.
    """
    if mode not in ("auto", "fx", "export"):
        raise TraceError(f"unknown trace mode {mode!r}; choose 'auto', 'fx' or 'export'")
    if not isinstance(model, torch.nn.Module):
        raise TraceError(f"trace expects an nn.Module, got {type(model).__name__}")
    inputs = as_inputs(example_inputs)
    reasons = []
    # auto: fx tracing into attention / transformer modules (fails on them, by design), then
    # torch.export (decomposes them), then fx keeping them as opaque calls (nothing inside quantized)
    opaque = any(isinstance(m, _TRACE_INTO) for m in model.modules())
    if concrete_args is None:
        concrete_args = _defaults_beyond(model, len(inputs))
    plan = {"fx": ["fx"], "export": ["export"],
            "auto": ["fx_into", "export"] + (["fx"] if opaque else [])}[mode]
    for how in plan:
        if how in ("fx", "fx_into"):
            try:
                tracer = _Tracer() if how == "fx_into" else fx.Tracer()
                gm = fx.GraphModule(model, tracer.trace(model, concrete_args=concrete_args), type(model).__name__)
                stringly = [n for n in gm.graph.nodes if isinstance(n.type, str)]
                for n in stringly:  # string annotations (PEP 563) would make the module unpicklable
                    n.type = None
                if stringly:
                    gm.recompile()
                propagate_shapes(gm, inputs)  # a graph that does not run on the example is a failed trace
                _gm_meta(gm)["qpasses.level"] = "fx"
                _gm_meta(gm)["qpasses.example_inputs"] = inputs
                return gm
            except Exception as e:  # noqa: BLE001 - any tracer failure means: try the next tracer
                label = "" if not opaque else " (into attention modules)" if how == "fx_into" else \
                    " (attention modules as opaque calls)"
                reasons.append(f"torch.fx.symbolic_trace{label} failed: {type(e).__name__}: {_first_line(e)}")
        else:
            try:
                ep = _export(model, inputs, strict, dynamic_batch)
                gm = ep.module()
                propagate_shapes(gm, inputs)
                _gm_meta(gm)["qpasses.level"] = "aten"
                _gm_meta(gm)["qpasses.example_inputs"] = inputs
                return gm
            except Exception as e:  # noqa: BLE001
                reasons.append(f"torch.export.export failed: {type(e).__name__}: {_first_line(e)}")
    raise TraceError(f"could not trace {type(model).__name__}:\n  " + "\n  ".join(reasons))


#: torch.nn modules fx would keep as opaque calls although they hold the weighted ops (projections)
#: quantization is about: traced into instead.  Their forwards branch on tensor ranks, so fx fails
#: on them and ``mode="auto"`` goes on to ``torch.export``, which decomposes them into aten ops.
_TRACE_INTO = (torch.nn.MultiheadAttention, torch.nn.TransformerEncoderLayer, torch.nn.TransformerDecoderLayer,
               torch.nn.TransformerEncoder, torch.nn.TransformerDecoder, torch.nn.Transformer)


def _defaults_beyond(model: torch.nn.Module, n_given: int) -> Optional[dict]:
    """``forward``'s parameters after the ``n_given`` example inputs that have defaults, at their
    defaults (``forward(x, mask=None)`` traced with ``(x,)``: ``{"mask": None}``), so fx
    specialises on them as a call with those inputs would, instead of making them proxies."""
    try:
        params = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):
        return None
    out = {}
    for p in params[n_given:]:
        if p.kind in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD):
            continue
        if p.default is inspect.Parameter.empty:
            return None                  # a required input was not given: let the tracer say so
        out[p.name] = p.default
    return out or None


class _Tracer(fx.Tracer):
    """``torch.fx.symbolic_trace``'s tracer, except that it traces into :data:`_TRACE_INTO` modules."""

    def is_leaf_module(self, m: torch.nn.Module, module_qualified_name: str) -> bool:
        if isinstance(m, _TRACE_INTO):
            return False
        return super().is_leaf_module(m, module_qualified_name)


def _export(model, inputs, strict: bool, dynamic_batch: bool):
    if dynamic_batch:
        dims = tuple({0: torch.export.Dim.AUTO} if isinstance(t, torch.Tensor) and t.dim() > 0 else None
                     for t in inputs)
        try:
            return torch.export.export(model, inputs, strict=strict, dynamic_shapes=dims)
        except Exception:  # noqa: BLE001 - e.g. the model specialises on the batch size
            pass
    return torch.export.export(model, inputs, strict=strict)


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else repr(e)


def _exported_train(self, mode: bool = True):
    """``train(mode)`` for a graph quantized from a ``torch.export`` graph (whose own ``train()``
    raises): switches the module flags -- fake quantizers, observers, LSQ scales -- as
    :func:`set_training` does.  The graph's aten ops keep the mode they were exported in (a
    ``batch_norm`` keeps using its running statistics, a ``dropout`` stays off); a warning says
    so when the graph has such ops."""
    set_training(self, mode)
    if mode and not self.__dict__.get("_qpasses_warned_train"):
        baked = sorted({str(n.target) for n in self.graph.nodes if n.op == "call_function"
                        and any(k in str(n.target) for k in ("batch_norm", "dropout"))})
        if baked:
            import warnings
            warnings.warn(f"train(): this graph comes from torch.export; its {', '.join(baked)} ops keep their "
                          f"exported (eval-mode) form, only qpasses' modules switch to training", stacklevel=2)
            self.__dict__["_qpasses_warned_train"] = True
    return self


def _exported_eval(self):
    """``eval()``: ``train(False)``."""
    return _exported_train(self, False)


def make_exported_trainable(gm: torch.nn.Module, source: Optional[torch.nn.Module] = None) -> None:
    """Give a GraphModule from ``torch.export`` working ``train()`` / ``eval()`` methods
    (``ExportedProgram.module()`` replaces them with ones that raise), see :func:`_exported_train`.
    ``source``: the module ``gm`` is a copy of (a copy does not keep those methods; the source
    tells whether it came from ``torch.export``)."""
    import types
    src = gm if source is None else source
    if "train" in src.__dict__ or "eval" in src.__dict__:
        gm.__dict__["train"] = types.MethodType(_exported_train, gm)
        gm.__dict__["eval"] = types.MethodType(_exported_eval, gm)


def set_training(gm: torch.nn.Module, mode: bool) -> None:
    """``gm.train(mode)``, in one flat pass, that also works on graphs from ``torch.export``.

    A module whose class keeps ``nn.Module.train`` gets its flag set directly (the recursive
    ``train()`` costs a call and an ``nn.Module.__setattr__`` per module: noticeable on graphs
    with thousands of observers); a module with its own ``train()`` is asked through it and
    its subtree left to it.  The root of an exported graph refuses ``train()``/``eval()``: its
    flag is set directly and its submodules (observers, say) are switched one by one; the
    exported aten graph itself has its mode baked in."""
    mode = bool(mode)
    base = torch.nn.Module.train
    seen = set()
    stack = [gm]
    while stack:
        m = stack.pop()
        if id(m) in seen:
            continue
        seen.add(id(m))
        if type(m).train is not base:
            try:
                m.train(mode)
                continue
            except NotImplementedError:
                if m is not gm:
                    raise
        object.__setattr__(m, "training", mode)
        stack.extend(c for c in m._modules.values() if c is not None)
