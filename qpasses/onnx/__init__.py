"""ONNX back-end: QDQ export, onnx-graphsurgeon clean-up, rules on ONNX graphs, ONNX quantization.

* :func:`export_onnx` -- a (fake-)quantized fx graph to a standard QDQ ONNX model, through
  ``torch.onnx.export(dynamo=True)`` with the quantizer translations of :mod:`qpasses.onnx.translate`;
* :func:`quantize_for_onnx` -- ``ptq_int8`` with ORT-fusable placement (op outputs observed);
* :mod:`qpasses.onnx.rewrite` -- the op-class rule language on onnx-graphsurgeon graphs
  (``run_rules(graph, "canonicalize")``);
* :func:`quantize_onnx` -- quantize an FP32 ONNX file by running a recipe on the ONNX graph
  (rule files through the adapter, calibration in onnxruntime);
* :func:`run_onnx` / :func:`ort_session` -- run a model in onnxruntime on the CPU.
"""
from .export import DEFAULT_OPSET, ExportError, build_model, export_onnx, quantize_for_onnx
from .translate import register_translation, translation_table
from .fp8 import FP8_TRANSLATIONS

for _op, _fn in FP8_TRANSLATIONS.items():  # fp8 quantizers export as FLOAT8E4M3FN Q/DQ (opset >= 19)
    register_translation(_op, _fn)
from .runtime import ort_session, run_onnx
from .quantize import quantize_onnx  # also registers the ONNX quantization actions / data steps
from .rewrite import run_rules

__all__ = ["export_onnx", "quantize_for_onnx", "register_translation", "translation_table", "build_model", "ExportError", "DEFAULT_OPSET", "run_onnx", "ort_session",
           "quantize_onnx", "run_rules"]
