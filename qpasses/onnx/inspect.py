"""Per-layer facts of a QDQ ONNX model: bits, scales, output SQNR against its float twin, size.

The float twin is the same graph with every ``QuantizeLinear -> DequantizeLinear`` pair
bypassed and every integer weight replaced by its dequantized value.  A QDQ file does not
hold the original float weights, so the SQNR of a layer measures the quantization of the
*activations* only (``qpasses report`` on a PyTorch model measures weights and activations).
"""
from __future__ import annotations

from typing import Any, Dict, Iterable, List

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from .rewrite import const_value, onnx_opclass, producer, qdq_source, replace_uses
from .runtime import ort_session

__all__ = ["onnx_layer_table"]

_BITS = {onnx.TensorProto.INT8: 8, onnx.TensorProto.UINT8: 8, onnx.TensorProto.INT4: 4, onnx.TensorProto.UINT4: 4,
         onnx.TensorProto.INT16: 16, onnx.TensorProto.UINT16: 16}


def _dq_value(dq: gs.Node) -> np.ndarray:
    q = const_value(dq.inputs[0]).astype(np.float32)
    s = const_value(dq.inputs[1]).astype(np.float32)
    z = const_value(dq.inputs[2]).astype(np.float32) if len(dq.inputs) > 2 else np.zeros_like(s)
    axis = dq.attrs.get("axis", 1)
    if s.size > 1 and "block_size" not in dq.attrs:
        shp = [1] * q.ndim
        shp[axis] = -1
        s, z = s.reshape(shp), z.reshape(shp)
    elif "block_size" in dq.attrs:
        b = int(dq.attrs["block_size"])
        s, z = np.repeat(s, b, axis=axis), np.repeat(z, b, axis=axis)
    return (q - z) * s


def _elem_bits(t: Any) -> int:
    v = const_value(t)
    if v is None:
        return 32
    return {np.dtype(np.int8): 8, np.dtype(np.uint8): 8, np.dtype(np.int16): 16, np.dtype(np.uint16): 16}.get(
        v.dtype, 4 if "4" in str(v.dtype) else 8)


def _floatify(graph: gs.Graph) -> None:
    for n in list(graph.nodes):
        if n.op == "DequantizeLinear" and qdq_source(n) is not None:
            replace_uses(graph, n.outputs[0], qdq_source(n).inputs[0])
        elif n.op == "DequantizeLinear" and isinstance(n.inputs[0], gs.Constant):
            replace_uses(graph, n.outputs[0], gs.Constant(n.name + "_float", _dq_value(n)))
    graph.cleanup(remove_unused_graph_inputs=False).toposort()


def onnx_layer_table(model: Any, batches: Iterable) -> List[Dict[str, Any]]:
    """One row per weighted node (Conv / ConvTranspose / Gemm / MatMul with a constant weight)."""
    if not isinstance(model, onnx.ModelProto):
        model = onnx.load(str(model))
    g = gs.import_onnx(model)
    rows, probe = [], []
    for n in g.nodes:
        cls = onnx_opclass(n)
        if cls is None or not (cls.startswith("conv") or cls == "linear"):
            continue
        wp = producer(n.inputs[1])
        xp = producer(n.inputs[0])
        if wp is not None and wp.op == "DequantizeLinear" and isinstance(wp.inputs[0], gs.Constant):
            wq = const_value(wp.inputs[0])
            w_bits = _elem_bits(wp.inputs[0])
            ws = const_value(wp.inputs[1]).astype(np.float32)
            numel = int(wq.size)
        else:
            wv = const_value(n.inputs[1])
            w_bits, ws, numel = 32, None, int(wv.size) if wv is not None else 0
        a_bits, a_scale = 32, None
        if xp is not None and qdq_source(xp) is not None:
            a_bits = _elem_bits(xp.inputs[2]) if len(xp.inputs) > 2 else 8
            a_scale = const_value(xp.inputs[1])
        rows.append({"layer": n.name, "op": cls, "w_bits": w_bits, "a_bits": a_bits,
                     "w_scale": "-" if ws is None else (f"{ws.min():.3g}..{ws.max():.3g}" if ws.size > 1 else f"{float(ws):.3g}"),
                     "a_scale": "-" if a_scale is None or a_scale.size != 1 else f"{float(a_scale):.3g}",
                     "sqnr_db": float("nan"), "size_kib": numel * w_bits / 8 / 1024, "fp32_kib": numel * 4 / 1024})
        probe.append(n.outputs[0].name)
    batches = list(batches)
    if probe and batches:
        outs = {}
        for label, graph in (("q", gs.import_onnx(model)), ("f", gs.import_onnx(model))):
            if label == "f":
                _floatify(graph)
            t = graph.tensors()
            for name in probe:
                if t[name].dtype is None:
                    t[name].dtype = np.float32
            graph.outputs = [t[name] for name in probe]
            sess = ort_session(gs.export_onnx(graph), optimize=False)
            names = [i.name for i in sess.get_inputs()]
            first = batches[0] if isinstance(batches[0], (tuple, list)) else (batches[0],)
            feeds = {nm: (x.detach().cpu().numpy() if hasattr(x, "detach") else np.asarray(x)) for nm, x in zip(names, first)}
            outs[label] = sess.run(None, feeds)
        for row, q, f in zip(rows, outs["q"], outs["f"]):
            noise = float(((q - f) ** 2).sum())
            row["sqnr_db"] = float("inf") if noise == 0 else 10 * np.log10(max(float((f ** 2).sum()), 1e-30) / noise)
    return rows
