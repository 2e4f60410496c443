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
import operator

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
          concrete_args: Optional[dict] = None, strict: bool = False, dynamic_batch: bool = True,
          dynamic: Any = None) -> fx.GraphModule:
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
        dynamic_batch: ``False`` exports with static shapes (when ``dynamic`` is not given).
        dynamic: which dimensions of a ``torch.export`` graph stay symbolic.  ``None`` (the
            default) or ``True``: detected from the example -- the batch dimension (0) and the
            sequence dimension (1) of every tensor input of rank 2 or more, as ``Dim.AUTO``
            (export keeps a dimension static where the model specialises on it, e.g. channels);
            so a graph calibrated on batches and sentences of other sizes runs.  ``False``: static.
            Or declared per input, positionally (a tuple) or by ``forward`` parameter name (a dict),
            each entry a list of dimension indices (``{"input_ids": [0, 1]}``) or a
            ``torch.export`` spec (``{0: Dim("batch")}``).  If the dynamic export fails the
            batch dimension alone is tried, then static shapes (``gm.meta["qpasses.dynamic_dims"]``
            says what came out).

    Non-tensor inputs are constants: a ``forward`` parameter with a default that the example does
    not give, and a non-tensor value the example gives (``(ids, None, pos)``, ``(x, True)``), are
    specialised into the graph, which then takes the tensor inputs only (in order): no
    placeholder, no ``eq`` / ``_assert`` check is left for them.  Export graphs lose their
    ``_assert_tensor_metadata`` nodes and the ``to`` conversions that do not change dtype or
    device (they would be outside users of the values quantization rewrites).

    Raises:
        TraceError: when the requested tracer(s) fail; the message gives each reason.
    """
    if mode not in ("auto", "fx", "export"):
        raise TraceError(f"unknown trace mode {mode!r}; choose 'auto', 'fx' or 'export'")
    if not isinstance(model, torch.nn.Module):
        raise TraceError(f"trace expects an nn.Module, got {type(model).__name__}")
    given = as_inputs(example_inputs)
    const_pos = {i: v for i, v in enumerate(given) if _is_constant(v)}
    inputs = tuple(v for i, v in enumerate(given) if i not in const_pos)   # what the graph takes
    reasons = []
    # auto: fx tracing into attention / transformer modules (fails on them, by design), then
    # torch.export (decomposes them), then fx keeping them as opaque calls (nothing inside quantized)
    opaque = any(isinstance(m, _TRACE_INTO) for m in model.modules())
    if concrete_args is None:
        concrete_args = _defaults_beyond(model, len(given))
    if const_pos:
        names = _positional_names(model)
        if names is None or len(names) < len(given):
            raise TraceError(f"{type(model).__name__}: non-tensor example inputs need a forward with named "
                             f"positional parameters")
        concrete_args = dict(concrete_args or {})
        concrete_args.update({names[i]: v for i, v in const_pos.items()})
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
                if concrete_args:
                    _drop_fx_constant_inputs(gm, concrete_args)
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
                spec = _dynamic_spec(model, given, dynamic, dynamic_batch)
                ep = _export(model, given, strict, spec)
                gm = ep.module()
                if const_pos:
                    _drop_export_constant_inputs(gm, inputs)
                clean_export_graph(gm)
                _gm_meta(gm)["qpasses.dynamic_dims"] = _symbolic_dims(gm)
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


def _is_constant(v: Any) -> bool:
    """A non-tensor leaf input (None, bool, number, string): specialised into the graph."""
    return v is None or isinstance(v, (bool, int, float, str, torch.dtype, torch.device))


def _positional_names(model: torch.nn.Module) -> Optional[list]:
    try:
        params = inspect.signature(model.forward).parameters.values()
    except (TypeError, ValueError):
        return None
    return [p.name for p in params
            if p.kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)]


#: callables fx inserts to check a specialised (concrete) argument: ``_assert(x == value)``,
#: ``_assert_is_none(x)``, and the comparisons that feed them
_FX_CHECKS = {operator.eq, operator.is_, torch._assert}
try:
    from torch.fx._symbolic_trace import _assert_is_none
    _FX_CHECKS.add(_assert_is_none)
except ImportError:  # pragma: no cover - older torch
    pass


def _substitute(node: fx.Node, old: fx.Node, value: Any) -> None:
    """Make ``node`` read the constant ``value`` where it read ``old``."""
    node.args = fx.node.map_arg(node.args, lambda a: value if a is old else a)
    node.kwargs = fx.node.map_arg(node.kwargs, lambda a: value if a is old else a)


def _drop_fx_constant_inputs(gm: fx.GraphModule, concrete: dict) -> None:
    """Remove the placeholders fx keeps for ``concrete_args`` (and the ``eq`` / ``_assert``
    checks on them): the values are constants of the graph, not inputs."""
    g = gm.graph
    changed = False
    for ph in [n for n in g.nodes if n.op == "placeholder"]:
        # fx names the placeholder after the parameter, with a suffix when the name is taken
        key = ph.target if ph.target in concrete else next(
            (k for k in concrete if ph.target.startswith(k + "_") and ph.target[len(k) + 1:].isdigit()), None)
        if key is None:
            continue
        value = concrete[key]
        if isinstance(value, torch.Tensor) or isinstance(value, fx.proxy.Proxy) or type(value).__name__ == "PHBase":
            continue
        for u in list(ph.users):  # the checks: comparisons of the placeholder, the asserts they feed
            if u.op == "call_function" and u.target in _FX_CHECKS:
                for a in list(u.users):
                    if a.op == "call_function" and a.target in _FX_CHECKS and not a.users:
                        g.erase_node(a)
                if not u.users:
                    g.erase_node(u)
        for u in list(ph.users):
            _substitute(u, ph, value)
        g.erase_node(ph)
        changed = True
    if changed:
        g.lint()
        gm.recompile()


def _drop_export_constant_inputs(gm: fx.GraphModule, tensor_inputs: tuple) -> None:
    """An exported module keeps a placeholder for each non-tensor input it was given (export
    specialised on its value; ``None`` has none): those become constants, and the module takes
    the tensor inputs only (its input spec is rewritten to match)."""
    import torch.utils._pytree as pytree
    g = gm.graph
    info = getattr(g._codegen, "pytree_info", None)
    for ph in [n for n in g.nodes if n.op == "placeholder"]:
        val = ph.meta.get("val", ph)
        if val is ph or isinstance(val, (torch.Tensor, torch.SymInt, torch.SymFloat, torch.SymBool)):
            continue
        for u in list(ph.users):
            _substitute(u, ph, val)
        g.erase_node(ph)
    kept = [n.name for n in g.nodes if n.op == "placeholder"]
    in_spec = pytree.tree_flatten((tuple(tensor_inputs), {}))[1]
    if len(kept) != in_spec.num_leaves:
        raise TraceError(f"the exported graph has {len(kept)} inputs for {in_spec.num_leaves} tensor inputs")
    if info is not None:
        g._codegen.pytree_info = info._replace(orig_args=kept, in_spec=in_spec)
    if hasattr(gm, "_in_spec"):
        gm._in_spec = in_spec
    g.lint()
    gm.recompile()


_aten_ops = torch.ops.aten
_TO_OPS = tuple(op for op in (getattr(_aten_ops.to, "dtype", None), getattr(_aten_ops.to, "dtype_layout", None),
                              getattr(_aten_ops.to, "device", None), getattr(_aten_ops, "_to_copy", None) and
                              _aten_ops._to_copy.default) if op is not None)


def _is_noop_to(n: fx.Node) -> bool:
    """An aten ``to`` conversion whose input already has its dtype, device and layout."""
    if n.op != "call_function" or n.target not in _TO_OPS or not n.args:
        return False
    src = n.args[0]
    if not isinstance(src, fx.Node):
        return False
    a, b = src.meta.get("val"), n.meta.get("val")
    if not isinstance(a, torch.Tensor) or not isinstance(b, torch.Tensor):
        return False
    if a.dtype != b.dtype or a.device != b.device or a.layout != b.layout:
        return False
    if n.kwargs.get("copy", False) or n.kwargs.get("memory_format") not in (None, torch.preserve_format):
        return False
    if n.target == _aten_ops._to_copy.default:
        return False  # a copy: an alias of the input would be a different program if either is mutated
    return True


def clean_export_graph(gm: fx.GraphModule) -> int:
    """Remove ``_assert_tensor_metadata`` nodes and ``to`` conversions that change nothing
    (same dtype, device and layout) from an exported graph; returns how many were removed.

    Such nodes sit between the ops of HF models' export graphs (``x.to(dtype)`` in their code)
    and make values look used outside the patterns the rules match."""
    g = gm.graph
    meta_assert = getattr(_aten_ops, "_assert_tensor_metadata", None)
    meta_assert = getattr(meta_assert, "default", None)
    removed = 0
    for n in list(g.nodes):
        if n.op != "call_function":
            continue
        if meta_assert is not None and n.target is meta_assert and not n.users:
            g.erase_node(n)
            removed += 1
        elif _is_noop_to(n):
            n.replace_all_uses_with(n.args[0])
            g.erase_node(n)
            removed += 1
    if removed:
        g.lint()
        gm.recompile()
    return removed


def _symbolic_dims(gm: fx.GraphModule) -> dict:
    """``{input name: [dims that are symbolic]}`` of an exported graph's tensor inputs."""
    out = {}
    for n in gm.graph.nodes:
        if n.op != "placeholder":
            continue
        val = n.meta.get("val")
        if isinstance(val, torch.Tensor):
            out[n.name] = [d for d, s in enumerate(val.shape)
                           if isinstance(s, torch.SymInt) and not s.node.expr.is_number]
    return out


def _dynamic_spec(model: torch.nn.Module, given: tuple, dynamic: Any, dynamic_batch: bool):
    """The ``dynamic_shapes`` candidates to export with, most dynamic first (None: static)."""
    from torch.export import Dim

    def dims_of(entry, t):
        if entry is None or not isinstance(t, torch.Tensor):
            return None
        if isinstance(entry, dict):
            return entry or None
        return {int(d) % max(t.dim(), 1): Dim.AUTO for d in entry if t.dim() > 0}

    if dynamic is False or (dynamic is None and not dynamic_batch):
        return [None]
    if dynamic is None or dynamic is True:
        auto = tuple(dims_of([d for d in (0, 1) if d < t.dim()], t) if isinstance(t, torch.Tensor) and t.dim() > 0
                     else None for t in given)
        batch = tuple(dims_of([0], t) if isinstance(t, torch.Tensor) and t.dim() > 0 else None for t in given)
        return [auto, batch, None]
    if isinstance(dynamic, dict):
        names = _positional_names(model) or []
        unknown = set(dynamic) - set(names[:len(given)])
        if unknown:
            raise TraceError(f"dynamic= names {sorted(unknown)}: not among the example's inputs {names[:len(given)]}")
        entries = [dynamic.get(nm) for nm in names[:len(given)]]
    elif isinstance(dynamic, (list, tuple)):
        if len(dynamic) != len(given):
            raise TraceError(f"dynamic= gives {len(dynamic)} entries for {len(given)} inputs")
        entries = list(dynamic)
    else:
        raise TraceError(f"dynamic= expects None, a bool, a dict or a tuple, got {type(dynamic).__name__}")
    return [tuple(dims_of(e, t) for e, t in zip(entries, given))]


def _export(model, inputs, strict: bool, specs):
    last = None
    for spec in specs:
        try:
            if spec is None or all(s is None for s in spec):
                return torch.export.export(model, inputs, strict=strict)
            return torch.export.export(model, inputs, strict=strict, dynamic_shapes=spec)
        except Exception as e:  # noqa: BLE001 - e.g. the model specialises on the batch size
            last = e
    raise last


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
