"""qpasses: a declarative graph-rewriting compiler for neural-network quantization.

    import qpasses
    gm  = qpasses.trace(model, example_inputs)
    pm  = qpasses.PassManager("ptq_int8", w_bits=8)
    qgm = pm.run(gm, data=calibration_batches)
    print(pm.report)
"""
from __future__ import annotations

from .errors import (MatchError, MissingParameterError, OptionError, QPassesError, RewriteError, RuleError,
                     RuleSyntaxError, StepError, TraceError, UnknownNameError, VerifyError)
from .frontend import trace
from .lang import Recipe, Rule, RuleFamily, action, constraint, data_step, load_file
from .lang.rules import available_names
from .context import Refuse
from .manager import PassManager
from .io import load, save
from .deploy import compile  # noqa: A004  qpasses.compile: int8 on x86 CPUs through Inductor
from . import methods  # noqa: F401  registers every method's actions, constraints and data steps
from . import layer_report  # noqa: F401  registers the coverage count of reports

__version__ = "0.1.0"

__all__ = [
    "trace", "PassManager", "Rule", "RuleFamily", "Recipe", "load_file", "available_names", "action",
    "constraint", "data_step", "Refuse", "export_onnx", "compile", "save", "load", "save_compressed", "QPassesError",
    "TraceError", "RuleError",
    "RuleSyntaxError", "UnknownNameError", "MissingParameterError", "OptionError", "RewriteError",
    "StepError", "VerifyError", "MatchError", "__version__",
]


def export_onnx(gm, example_inputs, path, **kwargs):
    """Export a (fake-)quantized GraphModule as a standard QDQ ONNX model (see :mod:`qpasses.onnx`)."""
    from .onnx import export_onnx as _export
    return _export(gm, example_inputs, path, **kwargs)


def save_compressed(qgm, hf_model, directory, **kwargs):
    """Write a quantized HF model as a compressed-tensors checkpoint (see :mod:`qpasses.checkpoint`)."""
    from .checkpoint import save_compressed as _save
    return _save(qgm, hf_model, directory, **kwargs)
