"""onnx-graphsurgeon clean-up of exported / quantized ONNX models.

1. **weight folding**: a ``QuantizeLinear`` (and the ``Clip`` to a narrow range after it) of a
   constant weight is computed here, ``clamp(round(w * (1 / scale)) + zp, qmin, qmax)`` (torch's
   fake-quantize formula; the exporter feeds it weights the quantizer module already
   fake-quantized, so these are exactly the module's codes), and the ``DequantizeLinear`` reads an
   integer initializer: INT8 / UINT8, or INT4 / UINT4 at opset 21 when the codes fit 4 bits
   (``int4=True``), stored packed;
2. a ``Transpose`` of such a dequantized weight (torchlib's ``linear`` on a 3-D input) is folded
   into the initializer (the ``axis`` follows), so the ``MatMul`` reads ``DequantizeLinear``
   directly -- the pattern onnxruntime fuses;
3. ``Cast`` nodes to the type their input already has are removed (:func:`fold_relu_into_quantize`
   is available but not run: onnxruntime fuses ``Relu -> Q`` itself, and the float twin of a model
   with the Relu dropped would be wrong);
4. the ``qdq_cleanup`` rule family (``qpasses/methods/qdq/qdq_cleanup.yaml``, the same file that runs on fx
   graphs) through the ONNX rule adapter :mod:`qpasses.onnx.rewrite`: back-to-back Q/DQ pairs with
   identical parameters collapse to one;
5. the float bias of a ``DequantizeLinear -> Conv / Gemm -> QuantizeLinear`` unit, when it lies on
   the int32 grid ``s_x * s_w`` (``int_bias`` rules), becomes an INT32 initializer read by a
   ``DequantizeLinear`` (:func:`quantize_unit_biases`): onnxruntime fuses a unit into
   ``QLinearConv`` / ``QGemm`` only when *every* input comes from a ``DequantizeLinear`` (a float
   bias leaves the whole unit in float);
6. constant folding of float-only sub-graphs (never of ``DequantizeLinear``: integer weights
   must stay integer);
7. dead nodes and unused initializers removed, nodes put in topological order.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import TensorProto, helper, numpy_helper

__all__ = ["cleanup_model", "cleanup_graph", "fold_weight_quantizers", "quantize_unit_biases"]

_KEEP_OPS = {"QuantizeLinear", "DequantizeLinear"}
_RANGE = {np.dtype(np.uint8): (0, 255), np.dtype(np.int8): (-128, 127), np.dtype(np.uint16): (0, 65535),
          np.dtype(np.int16): (-32768, 32767)}


def _const(t) -> Optional[np.ndarray]:
    return np.asarray(t.values) if isinstance(t, gs.Constant) else None


def _axis_of(node: gs.Node, rank: int) -> int:
    ax = int(node.attrs.get("axis", 1))
    return ax + rank if ax < 0 else ax


def _expand(p: np.ndarray, x: np.ndarray, node: gs.Node) -> np.ndarray:
    """Q/DQ parameter ``p`` broadcast against ``x`` (per tensor, per axis or blocked)."""
    if p.size == 1 and p.ndim <= 1:
        return p.reshape(())
    ax = _axis_of(node, x.ndim)
    bs = int(node.attrs.get("block_size", 0) or 0)
    if bs:
        return np.repeat(p, bs, axis=ax).take(np.arange(x.shape[ax]), axis=ax)
    shape = [1] * x.ndim
    shape[ax] = -1
    return p.reshape(shape)


def _quantize(w: np.ndarray, scale: np.ndarray, zp: np.ndarray, lo: int, hi: int, node: gs.Node) -> np.ndarray:
    s = _expand(scale.astype(np.float32), w, node)
    z = _expand(zp.astype(np.float32), w, node)
    inv = np.reciprocal(s).astype(np.float32)
    q = np.rint(w.astype(np.float32) * inv) + z
    return np.clip(q, lo, hi).astype(np.int64)


def fold_weight_quantizers(graph: gs.Graph) -> Dict[str, Tuple[str, int, int]]:
    """Fold the ``QuantizeLinear`` [-> ``Clip``] of constant weights into integer initializers read by
    their ``DequantizeLinear``; returns ``{initializer name: (zero-point name, qmin, qmax)}`` of the
    folded weights (the candidates for 4-bit storage)."""
    folded: Dict[str, Tuple[str, int, int]] = {}
    for q in [n for n in graph.nodes if n.op == "QuantizeLinear"]:
        if len(q.inputs) < 3:
            continue
        w, s, z = (_const(t) for t in q.inputs[:3])
        if w is None or s is None or z is None or not np.issubdtype(w.dtype, np.floating):
            continue
        lo, hi = _RANGE.get(z.dtype, (None, None))
        if lo is None:
            continue
        out = q.outputs[0]
        readers = list(out.outputs)
        clip = None
        if len(readers) == 1 and readers[0].op == "Clip":
            clip = readers[0]
            bounds = [_const(t) for t in clip.inputs[1:3]]
            if any(b is None for b in bounds) or len(bounds) < 2:
                continue
            lo, hi = max(lo, int(bounds[0])), min(hi, int(bounds[1]))
            out = clip.outputs[0]
            readers = list(out.outputs)
        if not readers or any(r.op != "DequantizeLinear" or r.inputs[0] is not out for r in readers):
            continue
        codes = _quantize(w, s, z, lo, hi, q)
        name = q.inputs[0].name + "_quantized"
        c = gs.Constant(name, codes.astype(z.dtype))
        for r in readers:
            zp = gs.Constant(f"{name}_zp_{len(folded)}", z.copy())
            r.inputs[0] = c
            r.inputs[2] = zp
            folded[name] = (zp.name, lo, hi)
        q.outputs.clear()
        q.inputs.clear()
        if clip is not None:
            clip.outputs.clear()
            clip.inputs.clear()
    return folded


def fold_weight_transposes(graph: gs.Graph) -> int:
    """``DequantizeLinear(const) -> Transpose``: transpose the initializer (and a blocked scale)."""
    n = 0
    for t in [n for n in graph.nodes if n.op == "Transpose"]:
        src = t.inputs[0]
        if len(src.inputs) != 1 or src.inputs[0].op != "DequantizeLinear" or len(src.outputs) != 1:
            continue
        dq = src.inputs[0]
        codes = _const(dq.inputs[0])
        if codes is None:
            continue
        perm = list(t.attrs.get("perm", list(range(codes.ndim))[::-1]))
        ax = _axis_of(dq, codes.ndim)
        bs = int(dq.attrs.get("block_size", 0) or 0)
        new_inputs = [gs.Constant(dq.inputs[0].name + "_t", np.ascontiguousarray(codes.transpose(perm)))]
        for p in dq.inputs[1:]:
            v = _const(p)
            if v is None:
                new_inputs = None
                break
            if bs:
                v = np.ascontiguousarray(v.transpose(perm))
            new_inputs.append(gs.Constant(p.name + "_t", v))
        if new_inputs is None:
            continue
        attrs = dict(dq.attrs)
        if codes.ndim > 0 and (bs or _const(dq.inputs[1]).size > 1):
            attrs["axis"] = perm.index(ax)
        out = t.outputs[0]
        t.outputs.clear()
        t.inputs.clear()
        graph.nodes.append(gs.Node("DequantizeLinear", name=dq.name + "_t", attrs=attrs, inputs=new_inputs,
                                   outputs=[out]))
        n += 1
    return n


def drop_identity_casts(graph: gs.Graph) -> int:
    """Remove ``Cast`` nodes whose input already has the target type."""
    n = 0
    for c in [n for n in graph.nodes if n.op == "Cast"]:
        x, y = c.inputs[0], c.outputs[0]
        to = c.attrs.get("to")
        try:
            same = x.dtype is not None and helper.np_dtype_to_tensor_dtype(np.dtype(x.dtype)) == to
        except Exception:  # noqa: BLE001  a dtype numpy cannot name (4-bit, float8): keep the cast
            same = False
        if not same or y in graph.outputs:
            continue
        for r in list(y.outputs):
            for i, t in enumerate(r.inputs):
                if t is y:
                    r.inputs[i] = x
        c.outputs.clear()
        n += 1
    return n


def fold_relu_into_quantize(graph: gs.Graph) -> int:
    """``Relu -> QuantizeLinear`` whose zero point is the type's minimum (uint8 zp 0, every channel):
    the ``QuantizeLinear`` saturates negative inputs to the zero point, i.e. to 0.0, so the Relu is
    exact without being run and goes (when the Q nodes are its only readers).  The op before it
    then feeds a ``QuantizeLinear`` directly, which onnxruntime fuses (QLinearAdd, QLinearConv)."""
    n = 0
    for r in [n for n in graph.nodes if n.op == "Relu"]:
        y = r.outputs[0]
        readers = list(y.outputs)
        if not readers or y in graph.outputs or any(q.op != "QuantizeLinear" or len(q.inputs) < 3 for q in readers):
            continue
        ok = True
        for q in readers:
            z, sc = _const(q.inputs[2]), _const(q.inputs[1])
            lo = _RANGE.get(z.dtype, (None,))[0] if z is not None else None
            if lo is None or sc is None or np.any(z.astype(np.int64) != lo) or np.any(sc <= 0):
                ok = False
                break
        if not ok:
            continue
        for q in readers:
            q.inputs[0] = r.inputs[0]
        r.outputs.clear()
        n += 1
    return n


def _dq_producer(t) -> Optional[gs.Node]:
    if isinstance(t, gs.Constant) or len(t.inputs) != 1 or t.inputs[0].op != "DequantizeLinear":
        return None
    return t.inputs[0]


def _bias_scale(node: gs.Node) -> Optional[np.ndarray]:
    """``s_x * s_w`` per output channel of a Conv / Gemm whose activation and weight inputs are
    dequantized (8-bit per-tensor activation, 8-bit per-tensor or per-output-channel integer weight
    constant), else ``None``."""
    dx, dw = _dq_producer(node.inputs[0]), _dq_producer(node.inputs[1])
    if dx is None or dw is None or len(dx.inputs) < 2 or len(dw.inputs) < 2:
        return None
    sx, codes, sw = _const(dx.inputs[1]), _const(dw.inputs[0]), _const(dw.inputs[1])
    zx = _const(dx.inputs[2]) if len(dx.inputs) > 2 else np.zeros((), np.uint8)
    if sx is None or codes is None or sw is None or zx is None or sx.size != 1:
        return None
    if zx.dtype not in (np.uint8, np.int8) or codes.dtype not in (np.uint8, np.int8) or codes.ndim < 2:
        return None
    if dx.attrs.get("block_size") or dw.attrs.get("block_size"):
        return None
    if node.op == "Conv":
        n_out, out_axis = codes.shape[0], 0
    else:                                   # Gemm: W is [N, K] with transB, else [K, N]; no transA check needed
        if float(node.attrs.get("alpha", 1.0)) != 1.0 or float(node.attrs.get("beta", 1.0)) != 1.0:
            return None                     # alpha * A B + beta * C: another grid
        out_axis = 0 if int(node.attrs.get("transB", 0)) else 1
        n_out = codes.shape[out_axis]
    if sw.size != 1 and (sw.size != n_out or _axis_of(dw, codes.ndim) != out_axis):
        return None
    acc = sx.astype(np.float64).reshape(()) * np.broadcast_to(sw.astype(np.float64).reshape(-1), (n_out,))
    return acc if np.all(acc > 0) else None


def _quantized_output(graph: gs.Graph, y: gs.Variable, relu: bool = True) -> bool:
    """``y`` is read by ``QuantizeLinear`` nodes only, or (``relu``) by one ``Relu`` whose output is
    (onnxruntime drops a ``Relu`` before a ``QuantizeLinear`` that cannot represent a negative value --
    zero point at the type's minimum -- and then fuses the unit)."""
    if y in graph.outputs or not y.outputs:
        return False
    if relu and len(y.outputs) == 1 and y.outputs[0].op == "Relu":
        return _quantized_output(graph, y.outputs[0].outputs[0], relu=False)
    return all(r.op == "QuantizeLinear" for r in y.outputs)


def quantize_unit_biases(graph: gs.Graph) -> int:
    """Store the float bias of each ``DequantizeLinear -> Conv / Gemm -> QuantizeLinear`` unit as INT32
    codes ``round(b / (s_x s_w))`` read by a ``DequantizeLinear`` (scale ``s_x s_w`` per output channel,
    zero point 0, axis 0) -- the bias form onnxruntime's QDQ selectors require (all inputs of the op
    dequantized) and the int32 bias its integer kernels add to the accumulator.

    Only units whose output is read by ``QuantizeLinear`` nodes alone, directly or through one ``Relu``
    (the ones onnxruntime fuses), are changed, and only when the bias already lies on the int32 grid
    (up to float32 rounding), so the model computes what it did up to float32 rounding: ``ptq_int8`` with
    ``ort_fusable`` (``qpasses.onnx.quantize_for_onnx``) and ``int_only`` put their biases there (the
    ``int_bias`` rules).  A bias off the grid (plain ``ptq_int8``) stays float and its unit unfused.
    Returns the number of biases quantized."""
    n = 0
    for op in [n for n in graph.nodes if n.op in ("Conv", "Gemm")]:
        if len(op.inputs) < 3 or not isinstance(op.inputs[2], gs.Constant):
            continue
        b = _const(op.inputs[2])
        if b is None or not np.issubdtype(b.dtype, np.floating) or b.ndim != 1:
            continue
        if not _quantized_output(graph, op.outputs[0]):
            continue
        acc = _bias_scale(op)
        if acc is None or acc.shape[0] != b.shape[0]:
            continue
        r = b.astype(np.float64) / acc
        q = np.rint(r)
        # on the grid up to float32 rounding of the stored bias (relative 2^-24 of |b|)
        if np.any(np.abs(q) > np.iinfo(np.int32).max) or np.any(np.abs(r - q) > 1e-3 + 1e-6 * np.abs(r)):
            continue
        base = f"{op.name or op.inputs[2].name}_bias"
        scale = acc.astype(np.float32)
        deq = gs.Variable(f"{base}_dequantized", dtype=np.float32, shape=list(b.shape))
        graph.nodes.append(gs.Node("DequantizeLinear", name=f"{base}_DequantizeLinear", attrs={"axis": 0},
                                   inputs=[gs.Constant(f"{base}_int32", q.astype(np.int32)),
                                           gs.Constant(f"{base}_scale", scale),
                                           gs.Constant(f"{base}_zero_point", np.zeros(b.shape, np.int32))],
                                   outputs=[deq]))
        op.inputs[2] = deq
        n += 1
    return n


def cleanup_graph(graph: gs.Graph, rules: bool = True, fold: bool = True) -> gs.Graph:
    """Clean a graphsurgeon graph in place and return it (steps 3-7 of the module doc)."""
    drop_identity_casts(graph)
    # fold_relu_into_quantize(graph): onnxruntime fuses Relu -> Q itself; a dropped Relu would make
    # the float twin of the model (Q/DQ stripped, qpasses.onnx.inspect) wrong
    for n in graph.nodes:       # torchlib writes the defaults out (block_size=0: not blocked); drop them
        if n.op in _KEEP_OPS:
            if n.attrs.get("block_size", None) == 0:
                del n.attrs["block_size"]
            if n.attrs.get("output_dtype", None) == 0:
                del n.attrs["output_dtype"]
    if rules:
        from .rewrite import run_rules
        run_rules(graph, "qdq_cleanup")
    quantize_unit_biases(graph)
    if fold:
        try:
            graph.fold_constants(fold_shapes=True, error_ok=True,
                                 should_exclude_node=lambda n: n.op in _KEEP_OPS)
        except Exception:  # noqa: BLE001  folding is an optimisation; never fail the export on it
            pass
    graph.cleanup(remove_unused_graph_inputs=False).toposort()
    return graph


def _retype_int4(model: onnx.ModelProto, folded: Dict[str, Tuple[str, int, int]]) -> None:
    """Initializers of folded weights whose codes fit 4 bits (and their zero points) become packed
    INT4 / UINT4 tensors."""
    inits = {i.name: i for i in model.graph.initializer}
    for name, (zp_name, _, _) in folded.items():
        for w_name, z_name in ((name, zp_name), (name + "_t", zp_name + "_t")):
            w, z = inits.get(w_name), inits.get(z_name)
            if w is None or z is None:
                continue
            wa, za = numpy_helper.to_array(w).astype(np.int64), numpy_helper.to_array(z).astype(np.int64)
            lo, hi = min(int(wa.min(initial=0)), int(za.min(initial=0))), max(int(wa.max(initial=0)),
                                                                                int(za.max(initial=0)))
            if w.data_type == TensorProto.UINT8 and 0 <= lo and hi <= 15:
                t = TensorProto.UINT4
            elif w.data_type == TensorProto.INT8 and -8 <= lo and hi <= 7:
                t = TensorProto.INT4
            else:
                continue
            # the zero point is read by this weight's DequantizeLinear only (fresh per fold)
            for arr, proto in ((wa, w), (za, z)):
                new = helper.make_tensor(proto.name, t, list(arr.shape), arr.reshape(-1).tolist())
                proto.CopyFrom(new)


def _retype_int4_activations(model: onnx.ModelProto) -> int:
    """``QuantizeLinear -> Clip -> DequantizeLinear`` whose Clip bounds fit 4 bits become
    ``UINT4`` / ``INT4`` Q/DQ without the Clip (each pair gets its own zero-point initializer)."""
    g = model.graph
    inits = {i.name: i for i in g.initializer}
    consts = dict(inits)
    for n in g.node:
        if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value":
            consts[n.output[0]] = n.attribute[0].t
    users: Dict[str, List[onnx.NodeProto]] = {}
    for n in g.node:
        for i in n.input:
            users.setdefault(i, []).append(n)
    outs = {o.name for o in g.output}
    drop, n_done = [], 0
    for q in list(g.node):
        if q.op_type != "QuantizeLinear" or len(q.input) < 3 or q.input[2] not in consts:
            continue
        cl = users.get(q.output[0], [])
        if len(cl) != 1 or cl[0].op_type != "Clip" or len(cl[0].input) < 3 or q.output[0] in outs:
            continue
        clip = cl[0]
        if clip.input[1] not in consts or clip.input[2] not in consts or clip.output[0] in outs:
            continue
        lo = int(numpy_helper.to_array(consts[clip.input[1]]))
        hi = int(numpy_helper.to_array(consts[clip.input[2]]))
        zt = consts[q.input[2]]
        if zt.data_type == TensorProto.UINT8 and lo == 0 and hi == 15:
            t = TensorProto.UINT4
        elif zt.data_type == TensorProto.INT8 and lo == -8 and hi == 7:
            t = TensorProto.INT4
        else:
            continue
        dqs = users.get(clip.output[0], [])
        if not dqs or any(d.op_type != "DequantizeLinear" or d.input[0] != clip.output[0] for d in dqs):
            continue
        za = numpy_helper.to_array(zt).astype(np.int64)
        zname = f"{q.name or q.output[0]}_zp4"
        g.initializer.append(helper.make_tensor(zname, t, list(za.shape), za.reshape(-1).tolist()))
        q.input[2] = zname
        for d in dqs:
            d.input[0] = q.output[0]
            d.input[2] = zname
        drop.append(clip)
        n_done += 1
    for c in drop:
        g.node.remove(c)
    if drop:   # the Q outputs changed type: let shape inference recompute what it needs
        retyped = {c.input[0] for c in drop}
        keep = [vi for vi in g.value_info if vi.name not in retyped]
        del g.value_info[:]
        g.value_info.extend(keep)
    return n_done


def cleanup_model(model: onnx.ModelProto, rules: bool = True, fold: bool = True, int4: bool = True,
                  int4_activations: bool = False) -> onnx.ModelProto:
    """Clean an ONNX model (see the module doc); returns a new ModelProto."""
    graph = gs.import_onnx(model)
    folded = fold_weight_quantizers(graph)
    fold_weight_transposes(graph)
    cleanup_graph(graph, rules=rules, fold=fold)
    out = gs.export_onnx(graph)
    out.ir_version = model.ir_version
    del out.opset_import[:]
    out.opset_import.extend(model.opset_import)
    out.producer_name = model.producer_name
    out.producer_version = model.producer_version
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if int4 and opset >= 21 and folded:
        _retype_int4(out, folded)
    if int4_activations and opset >= 21:
        _retype_int4_activations(out)
    return out
