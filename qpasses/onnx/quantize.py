"""Quantize an FP32 ONNX model by running a qpasses recipe *on the ONNX graph*.

The recipe is loaded exactly as for a PyTorch graph (``PassManager(recipe, **options)``:
same files, same parameter validation), and its units run on an onnx-graphsurgeon graph:

* rule stages run through the ONNX rule adapter (:mod:`qpasses.onnx.rewrite`) with ONNX
  implementations of the actions and constraints registered here under the same names:
  ``observe_input`` / ``observe_output`` (an observer is an ``Identity`` node named
  ``qpasses_observer_*``, its configuration kept aside), ``to_fake_quant`` (observer ->
  ``QuantizeLinear``/``DequantizeLinear`` pair), ``quantize_weight`` (per-channel symmetric
  integer weight + ``DequantizeLinear``), ``float_input``, ``input_quantized``,
  ``weight_quantized``, ``skipped``;
* the ``calibrate`` data step runs in onnxruntime: every observer's output becomes an extra
  graph output, the batches run, and the qpasses observer of that configuration (minmax,
  percentile, mse, entropy, aciq, ...) sees each tensor.

So ``ptq_int8`` on an ONNX file is literally ``canonicalize.yaml`` (BatchNorm folding),
``observe.yaml``, calibration and ``convert.yaml``, then the ``qdq_cleanup`` rules and the
onnx-graphsurgeon clean-up.  A recipe that needs anything without an ONNX implementation
(training, distillation, search, custom modules) raises a clear error naming it.
"""
from __future__ import annotations

import fnmatch
import time
from typing import Any, Dict, Iterable, Optional

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import torch

from ..errors import OptionError, QPassesError, StepError
from ..report import Report, StageRecord, StepRecord
from .cleanup import cleanup_graph
from .export import ExportError, int_tensor, quant_type
from .rewrite import (OnnxRefuse, OnnxView, _apply, onnx_action, onnx_constraint, onnx_opclass, producer,
                      qdq_source)

__all__ = ["quantize_onnx", "ONNX_DATA_STEPS"]

OBS_PREFIX = "qpasses_observer_"

ONNX_DATA_STEPS: Dict[str, Any] = {}


def _np_int(values: np.ndarray, elem: int) -> np.ndarray:
    return np.asarray(onnx.numpy_helper.to_array(int_tensor("t", np.asarray(values).astype(np.int64), elem)))


def _state_obs(ctx) -> Dict[str, Dict[str, Any]]:
    return ctx.state.setdefault("observers", {})


def _is_observer(node: Optional[gs.Node]) -> bool:
    return node is not None and node.op == "Identity" and node.name.startswith(OBS_PREFIX)


def _uid(ctx, base: str) -> str:
    n = ctx.state.get("_uid", 0) + 1
    ctx.state["_uid"] = n
    return f"{base}{n}"


def _opset(ctx) -> int:
    return int(ctx.state.get("opset", 13))


# ----------------------------------------------------------------------------- constraints

@onnx_constraint("float_input")
def _float_input(ctx, node, index: int = 0):
    ins = OnnxView(node).inputs()
    if index >= len(ins) or isinstance(ins[index], gs.Constant):
        return False, "no such activation input"
    dt = ins[index].dtype
    ok = dt is None or np.issubdtype(np.dtype(dt), np.floating)
    return ok, f"input dtype is {dt}"


@onnx_constraint("input_quantized")
def _input_quantized(ctx, node, index: int = 0):
    ins = OnnxView(node).inputs()
    if index >= len(ins):
        return False, ""
    p = producer(ins[index])
    ok = _is_observer(p) or (p is not None and qdq_source(p) is not None)
    return ok, f"input {index} of {node.name} is already observed/quantized"


@onnx_constraint("weight_quantized")
def _weight_quantized(ctx, node):
    p = producer(node.inputs[1]) if len(node.inputs) > 1 else None
    ok = p is not None and p.op == "DequantizeLinear"
    return ok, f"{node.name} already has a quantized weight"


@onnx_constraint("skipped")
def _skipped(ctx, node, patterns: Any = None):
    if not patterns:
        return False
    pats = [patterns] if isinstance(patterns, str) else list(patterns)
    hit = next((p for p in pats if fnmatch.fnmatchcase(node.name, str(p))), None)
    return hit is not None, f"{node.name} matches skip pattern {hit!r}" if hit else ""


# ----------------------------------------------------------------------------- actions

def _cfg(kind, bits, symmetric, signed=None, **extra) -> Dict[str, Any]:
    from ..methods.ptq.actions import _observer_config
    return _observer_config(kind, bits, symmetric, signed, **extra)


def _new_observer_node(ctx, x: gs.Tensor, cfg: Dict[str, Any]) -> gs.Variable:
    name = _uid(ctx, OBS_PREFIX)
    out = gs.Variable(name + "_out", dtype=x.dtype, shape=x.shape)
    ctx.graph.nodes.append(gs.Node("Identity", name=name, inputs=[x], outputs=[out]))
    _state_obs(ctx)[name] = cfg
    return out


@onnx_action("observe_input")
def _observe_input(ctx, op, index: int = 0, kind: str = "minmax", bits: int = 8, symmetric: bool = False,
                   signed: Optional[bool] = None, **extra):
    """Put an observer (an Identity node) between activation input ``index`` of ``op`` and ``op``."""
    view = OnnxView(op)
    ins = view.inputs()
    if index >= len(ins) or isinstance(ins[index], gs.Constant):
        raise OnnxRefuse(f"{op.name} has no activation input {index}")
    x = ins[index]
    cfg = _cfg(kind, bits, symmetric, signed, **extra)
    shared = None
    for c in x.outputs:  # an observer of this value with this configuration already?
        if _is_observer(c) and _state_obs(ctx).get(c.name) == cfg:
            shared = c.outputs[0]
    obs_out = shared if shared is not None else _new_observer_node(ctx, x, cfg)
    pos = [i for i, t in enumerate(op.inputs) if t is x]
    op.inputs[pos[0]] = obs_out


@onnx_action("observe_output")
def _observe_output(ctx, op, kind: str = "minmax", bits: int = 8, symmetric: bool = False,
                    signed: Optional[bool] = None, **extra):
    """Put an observer after ``op``: every consumer of ``op`` reads the observed value."""
    y = op.outputs[0]
    if any(_is_observer(c) for c in y.outputs):
        raise OnnxRefuse(f"{op.name} is already observed")
    if any(t is y for t in ctx.graph.outputs):
        raise OnnxRefuse(f"{op.name} produces a graph output (outputs stay float)")
    consumers = list(y.outputs)
    out = _new_observer_node(ctx, y, _cfg(kind, bits, symmetric, signed, **extra))
    for c in consumers:
        for i, t in enumerate(c.inputs):
            if t is y:
                c.inputs[i] = out


@onnx_action("to_fake_quant")
def _to_fake_quant(ctx, obs, learnable: bool = False):
    """Replace a calibrated observer by a QuantizeLinear -> DequantizeLinear pair with its qparams."""
    from ..numerics import FakeQuantize
    mod = ctx.state.get("observer_modules", {}).get(obs.name)
    if mod is None or not getattr(mod, "has_data", True):
        raise StepError(f"observer {obs.name} has seen no data: the recipe must calibrate before convert")
    fq = FakeQuantize.from_observer(mod)
    elem, lo, hi = quant_type(fq.qmin, fq.qmax, min(_opset(ctx), 20))  # 8/16-bit containers
    clip = fq.qmin > lo or fq.qmax < hi
    if clip and fq.axis is not None:
        raise OnnxRefuse(f"{obs.name}: per-channel {fq.bits}-bit activations need a per-channel clamp")
    x = obs.inputs[0]
    base = x.name
    scale = gs.Constant(_uid(ctx, base + "_scale"), fq.scale.numpy().astype(np.float32))
    zp = gs.Constant(_uid(ctx, base + "_zp"), _np_int(fq.zero_point.numpy(), elem).reshape(fq.zero_point.shape))
    attrs = {} if fq.axis is None else {"axis": int(fq.axis)}
    q_out = gs.Variable(_uid(ctx, base + "_quantized"), dtype=zp.values.dtype)
    ctx.graph.nodes.append(gs.Node("QuantizeLinear", name=_uid(ctx, base + "_Q"), inputs=[x, scale, zp],
                                   outputs=[q_out], attrs=dict(attrs)))
    y = obs.outputs[0]
    obs.outputs = [gs.Variable(_uid(ctx, base + "_dead"), dtype=y.dtype)]
    dq_out = y
    if clip:  # e.g. 4-bit codes in a uint8 container: clamp to [qmin, qmax] in the real domain
        dq_out = gs.Variable(_uid(ctx, base + "_dequantized"), dtype=np.float32)
    ctx.graph.nodes.append(gs.Node("DequantizeLinear", name=_uid(ctx, base + "_DQ"), inputs=[q_out, scale, zp],
                                   outputs=[dq_out], attrs=dict(attrs)))
    if clip:
        s, z = float(fq.scale), float(fq.zero_point)
        lo_c = gs.Constant(_uid(ctx, base + "_lo"), np.array((fq.qmin - z) * s, dtype=np.float32))
        hi_c = gs.Constant(_uid(ctx, base + "_hi"), np.array((fq.qmax - z) * s, dtype=np.float32))
        ctx.graph.nodes.append(gs.Node("Clip", name=_uid(ctx, base + "_clip"), inputs=[dq_out, lo_c, hi_c],
                                       outputs=[y]))


def _weight_axis(node: gs.Node, groups: int) -> Optional[int]:
    if node.op == "ConvTranspose":
        return 1 if groups == 1 else None
    if node.op == "MatMul":
        return 1  # weight stored [in, out]
    if node.op == "Gemm":
        return 0 if node.attrs.get("transB", 0) else 1
    return 0


@onnx_action("quantize_weight")
def _quantize_weight(ctx, op, bits: int = 8, per_channel: bool = True, observer: str = "minmax",
                     learnable: bool = False):
    """Per-channel symmetric narrow-range integer weight + DequantizeLinear (the fx weight quantizer)."""
    from ..methods.ptq.actions import weight_fake_quant
    wt = op.inputs[1] if len(op.inputs) > 1 else None
    if not isinstance(wt, gs.Constant):
        raise OnnxRefuse(f"the weight of {op.name} is not a constant")
    if op.op == "Gemm" and op.attrs.get("transA", 0):
        raise OnnxRefuse(f"{op.name}: Gemm with transA=1")
    if int(bits) > 8 and _opset(ctx) < 21:
        raise ExportError(f"w_bits={bits} needs 16-bit QuantizeLinear types (opset 21); the model is opset {_opset(ctx)}")
    w = torch.from_numpy(np.array(wt.values, dtype=np.float32))
    groups = int(op.attrs.get("group", 1))
    axis = _weight_axis(op, groups)
    cls = onnx_opclass(op) or "linear"
    as_out_in = axis == 1 and op.op != "ConvTranspose"   # [in, out] storage: fit on the [out, in] view
    fq = weight_fake_quant(w.t() if as_out_in else w, cls if op.op not in ("MatMul", "Gemm") else "linear",
                           groups, int(bits), bool(per_channel), str(observer))
    q = fq.quantize(w.t()).t().contiguous() if as_out_in else fq.quantize(w)
    elem, _, _ = quant_type(fq.qmin, fq.qmax, min(_opset(ctx), 20))  # 4-bit codes in int8 containers
    base = wt.name
    qc = gs.Constant(_uid(ctx, base + "_int"), _np_int(q.numpy(), elem))
    sc = gs.Constant(_uid(ctx, base + "_wscale"), fq.scale.numpy().astype(np.float32))
    zc = gs.Constant(_uid(ctx, base + "_wzp"), _np_int(fq.zero_point.numpy(), elem).reshape(fq.zero_point.shape))
    out = gs.Variable(_uid(ctx, base + "_dq"), dtype=np.float32, shape=list(q.shape))
    attrs = {"axis": int(axis)} if fq.axis is not None and axis is not None else {}
    ctx.graph.nodes.append(gs.Node("DequantizeLinear", name=_uid(ctx, base + "_DQ"), inputs=[qc, sc, zc],
                                   outputs=[out], attrs=attrs))
    op.inputs[1] = out


# ----------------------------------------------------------------------------- data steps

#: data step name -> the ``with:`` arguments its ONNX twin implements (a subset of the
#: PyTorch step's declaration, :func:`qpasses.lang.registry.describe_args`)
ONNX_DATA_STEP_ARGS: Dict[str, Dict[str, Any]] = {}


def onnx_data_step(name: str, args: Optional[Dict[str, Any]] = None):
    """Register ``fn(graph, data, args, state, progress) -> info dict`` as the ONNX twin of a data step.

    ``args`` names the ``with:`` arguments the twin implements (each must be declared by the
    PyTorch data step of that name, which checks their values when the recipe is loaded); a
    recipe giving any other one is refused before the ONNX graph is touched.
    """
    def deco(fn):
        ONNX_DATA_STEPS[name] = fn
        ONNX_DATA_STEP_ARGS[name] = dict(args or {})
        return fn
    return deco


@onnx_data_step("calibrate", args={"calib_batches": {"type": int, "min": 1, "default": None}})
def _calibrate(graph: gs.Graph, data: Iterable, args: Dict[str, Any], state: Dict[str, Any], progress: bool):
    """Run the batches in onnxruntime; every observer node's tensor feeds its qpasses observer."""
    from ..methods.ptq.actions import new_observer
    from ..methods.ptq.calibrate import iterate_batches
    from .runtime import ort_session
    obs_nodes = [n for n in graph.nodes if _is_observer(n)]
    cfgs = state.get("observers", {})
    probe = gs.import_onnx(gs.export_onnx(graph))
    tmap = probe.tensors()
    extra = []
    for n in obs_nodes:
        t = tmap[n.outputs[0].name]
        if t.dtype is None:
            t.dtype = np.float32
        extra.append(t)
    n_out = len(probe.outputs)
    probe.outputs = list(probe.outputs) + extra
    sess = ort_session(gs.export_onnx(probe))
    mods = {n.name: new_observer(cfgs[n.name]) for n in obs_nodes}
    names = [i.name for i in sess.get_inputs()]
    seen = 0
    for batch in iterate_batches(data, args.get("calib_batches"), "calibrate (onnxruntime)", progress):
        feeds = {nm: (x.detach().cpu().numpy() if hasattr(x, "detach") else np.asarray(x)).astype(np.float32)
                 for nm, x in zip(names, batch)}
        outs = sess.run(None, feeds)
        with torch.no_grad():
            for n, v in zip(obs_nodes, outs[n_out:]):
                mods[n.name](torch.from_numpy(np.asarray(v)))
        seen += 1
    if seen == 0:
        raise StepError("calibrate got an empty data iterable")
    state.setdefault("observer_modules", {}).update(mods)
    return {"batches": seen, "observers": len(obs_nodes)}


# ----------------------------------------------------------------------------- driver

def quantize_onnx(model: Any, data: Iterable, recipe: str = "ptq_int8", path: Optional[str] = None,
                  progress: bool = False, report: Optional[Report] = None, **options: Any) -> onnx.ModelProto:
    """Quantize an FP32 ONNX model (path or ModelProto) to QDQ by running ``recipe`` on the ONNX graph.

    Args:
        model: an ``.onnx`` path or an ``onnx.ModelProto`` (opset >= 13).
        data: calibration batches (tensors / arrays, or tuples for several inputs).
        recipe: a recipe whose rules and data steps all have ONNX implementations
            (``ptq_int8``; see the module doc); anything else raises a clear error.
        path: write the result there.
        progress: tqdm progress bar over calibration batches.
        report: a :class:`qpasses.report.Report` to fill (per-rule counters, steps).
        **options: the recipe's parameters (``w_bits``, ``a_bits``, ``observer``, ``per_channel``,
            ``symmetric``, ``calib_batches``, ``skip`` as ONNX node-name globs), validated
            exactly as by ``PassManager``.

    Returns:
        The quantized, checked ``onnx.ModelProto``.
    """
    from ..manager import PassManager
    from ..lang.registry import ACTIONS
    pm = PassManager(recipe, **options)  # same files, same option validation as on PyTorch graphs
    report = report if report is not None else Report()
    missing = sorted({r.rewrite.name for u in pm.units if u.kind == "stage" for r in u.rules
                      if ACTIONS[r.rewrite.name].onnx is None and r.when not in (False, "false")})
    steps = [u.step.name for u in pm.units if u.kind == "step" and u.step.name not in ONNX_DATA_STEPS]
    unsupported = [f"argument {k!r} of data step {u.step.name!r} ({u.step.loc})" for u in pm.units
                   if u.kind == "step" and u.step.name in ONNX_DATA_STEPS
                   for k in u.step.args if k not in ONNX_DATA_STEP_ARGS[u.step.name]]
    if missing or steps or unsupported:
        what = ", ".join([f"action {a!r}" for a in missing] + [f"data step {s!r}" for s in steps] + unsupported)
        raise QPassesError(f"recipe {recipe!r} cannot run on an ONNX model: no ONNX implementation of {what}; "
                           f"quantize the PyTorch model and use qpasses.export_onnx")
    if isinstance(model, (str, bytes)) or hasattr(model, "__fspath__"):
        model = onnx.load(str(model))
    if not isinstance(model, onnx.ModelProto):
        raise OptionError(f"quantize_onnx expects an ONNX path or ModelProto, got {type(model).__name__}")
    opset = max([o.version for o in model.opset_import if o.domain in ("", "ai.onnx")] or [13])
    if opset < 13:
        raise ExportError(f"the model uses opset {opset}; per-channel QDQ needs opset >= 13 "
                          "(convert it with onnx.version_converter first)")
    graph = gs.import_onnx(model)
    try:  # Constant nodes / constant sub-graphs (other exporters) become initializers the rules can read
        graph.fold_constants(error_ok=True).cleanup(remove_unused_graph_inputs=False)
    except Exception:  # noqa: BLE001
        pass
    state: Dict[str, Any] = {"opset": opset}
    for unit in pm.units:
        t = time.perf_counter()
        if unit.kind == "stage":
            limit = unit.stage.max_iterations if unit.stage.mode == "fixpoint" else 1
            total, it = 0, 0
            for it in range(1, limit + 1):
                changed = sum(_apply(graph, r, unit.family, report, state) for r in unit.rules)
                graph.cleanup(remove_unused_graph_inputs=False).toposort()
                total += changed
                if not changed:
                    break
            report.stages.append(StageRecord(unit.family, unit.stage.name, time.perf_counter() - t, it, total))
        else:
            info = ONNX_DATA_STEPS[unit.step.name](graph, data, dict(pm.params, **unit.step.args), state, progress)
            report.steps.append(StepRecord(unit.step.name + " (onnxruntime)", time.perf_counter() - t, info))
    left = [n.name for n in graph.nodes if _is_observer(n)]
    if left:
        raise QPassesError(f"recipe {recipe!r} left {len(left)} observer(s) unconverted on the ONNX graph "
                           f"(e.g. {left[0]}): see the report's refusals")
    cleanup_graph(graph)
    out = gs.export_onnx(graph)
    out.ir_version = model.ir_version
    del out.opset_import[:]
    out.opset_import.extend(model.opset_import)
    onnx.checker.check_model(out)
    if path is not None:
        onnx.save(out, str(path))
    return out
