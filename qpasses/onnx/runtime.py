"""Run ONNX models in onnxruntime (CPU)."""
from __future__ import annotations

from typing import Any, List, Union

import numpy as np
import onnx

__all__ = ["ort_session", "run_onnx"]


def ort_session(model: Union[str, onnx.ModelProto], threads: int = 1, optimize: bool = True,
                fuse_qdq: bool = False):
    """An onnxruntime CPU ``InferenceSession`` for a path or a ModelProto.

    ``fuse_qdq=False`` (for validating what a model computes) keeps onnxruntime from fusing
    Q/DQ units into its integer kernels: on x86 CPUs without VNNI those accumulate uint8 x int8
    products in saturating int16 pairs, so their results depend on the machine (a ptq_int8 MLP
    drifted by 14 quantization steps on an AVX2-only CPU).  Speed measurements pass True.

    Validation sessions also turn off onnxruntime's level-2 rule-based rewrites (``Level2_RuleBasedTransformer``:
    its ``ReluQuantFusion`` rule cannot be disabled alone): that rule deletes a Relu
    that feeds a QuantizeLinear with zero point 0, which is exact for uint8 but wrong for a
    FLOAT8E4M3FN quantizer (negative values survive a float8 Q), seen on onnxruntime 1.22."""
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    if not fuse_qdq:
        so.add_session_config_entry("session.disable_quant_qdq", "1")
    if not optimize:
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    src = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    disabled = [] if fuse_qdq else ["Level2_RuleBasedTransformer"]
    return ort.InferenceSession(src, so, providers=["CPUExecutionProvider"], disabled_optimizers=disabled)


def run_onnx(model: Any, *inputs: Any, session=None) -> List[np.ndarray]:
    """Run ``model`` (path, ModelProto or session) on tensors / arrays; returns the outputs as arrays."""
    sess = session or (model if hasattr(model, "run") else ort_session(model))
    feeds = {}
    for meta, x in zip(sess.get_inputs(), inputs):
        arr = x.detach().cpu().numpy() if hasattr(x, "detach") else np.asarray(x)
        feeds[meta.name] = arr
    return sess.run(None, feeds)
