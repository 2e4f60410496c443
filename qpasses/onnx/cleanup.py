"""onnx-graphsurgeon clean-up of exported / quantized ONNX models.

1. the ``qdq_cleanup`` rule family (``rules/qdq_cleanup.yaml``, the same file that runs on
   fx graphs) through the ONNX rule adapter :mod:`qpasses.onnx.rewrite`: back-to-back
   Q/DQ pairs with identical parameters collapse to one;
2. constant folding of float-only sub-graphs (never of ``DequantizeLinear``: integer
   weights must stay integer);
3. dead nodes and unused initializers removed, nodes put in topological order.
"""
from __future__ import annotations

import onnx
import onnx_graphsurgeon as gs

__all__ = ["cleanup_model", "cleanup_graph"]

_KEEP_OPS = {"QuantizeLinear", "DequantizeLinear"}


def cleanup_graph(graph: gs.Graph, rules: bool = True, fold: bool = True) -> gs.Graph:
    """Clean a graphsurgeon graph in place and return it."""
    if rules:
        from .rewrite import run_rules
        run_rules(graph, "qdq_cleanup")
    if fold:
        try:
            graph.fold_constants(fold_shapes=True, error_ok=True,
                                 should_exclude_node=lambda n: n.op in _KEEP_OPS)
        except Exception:  # noqa: BLE001  folding is an optimisation; never fail the export on it
            pass
    graph.cleanup(remove_unused_graph_inputs=False).toposort()
    return graph


def cleanup_model(model: onnx.ModelProto, rules: bool = True, fold: bool = True) -> onnx.ModelProto:
    """Clean an ONNX model (see the module doc); returns a new ModelProto."""
    graph = gs.import_onnx(model)
    cleanup_graph(graph, rules=rules, fold=fold)
    out = gs.export_onnx(graph)
    out.ir_version = model.ir_version
    del out.opset_import[:]
    out.opset_import.extend(model.opset_import)
    out.producer_name = model.producer_name
    out.producer_version = model.producer_version
    return out
