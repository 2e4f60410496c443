"""Lowering onto the integer kernel ops, and weight-only int4 (W4A16).

``lower_triton`` (declared family ``lower``) replaces a fake-quantized weighted op by the kernel op
of :mod:`qpasses.kernels` that computes the same thing (int8, int4 weight-only, fp8, dynamic
int8); ``weight_int4`` attaches group-wise int4 weight quantizers.

Rule families (``PassManager([...])`` / ``rules:``):

* ``lower_triton`` -- ``lower_triton.yaml``, docs/rules/lower.md
* ``weight_int4`` -- ``weight_int4.yaml``, docs/rules/weight_int4.md

Recipes (``PassManager(name)``):

* ``lower`` -- ``recipes/lower.yaml``, docs/rules/lower.md
* ``w4a16`` -- ``recipes/w4a16.yaml``, docs/rules/weight_int4.md

Modules:

* :mod:`.actions` -- actions and constraints of ``lower_triton`` and ``weight_int4``
"""
from . import actions  # noqa: F401  registers the actions, constraints and data steps
