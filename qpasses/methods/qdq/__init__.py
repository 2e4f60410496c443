"""Quantize / dequantize forms: PT2E's folded Q/DQ convention, and Q/DQ clean-up.

``qdq`` freezes a converted graph's quantizers into the Q/DQ nodes torch.export, torch.onnx and
Inductor's x86 int8 passes understand; ``qdq_cleanup`` removes redundant quantize/dequantize pairs
(it also runs on ONNX graphs).

Rule families (``PassManager([...])`` / ``rules:``):

* ``qdq`` -- ``qdq.yaml``, docs/rules/qdq.md
* ``qdq_cleanup`` -- ``qdq_cleanup.yaml``, docs/rules/qdq_cleanup.md

Modules:

* :mod:`.actions` -- constraints of ``qdq_cleanup``
* :mod:`.pt2e` -- actions and constraints of ``qdq``
"""
from . import actions, pt2e  # noqa: F401  registers the actions, constraints and data steps
