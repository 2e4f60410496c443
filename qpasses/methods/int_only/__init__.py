"""Integer-arithmetic-only inference (Jacob et al., CVPR 2018).

A calibrated fake-quant graph is lowered to int8 tensors, int32 accumulators and fixed-point
requantization (``int8_conv2d_requant`` / ``int8_linear_requant`` and the integer element-wise
ops), so that no float arithmetic is left between the quantized input and output.

Rule families (``PassManager([...])`` / ``rules:``):

* ``int_observe`` -- ``int_observe.yaml``, docs/rules/int_observe.md
* ``integerize`` -- ``integerize.yaml``, docs/rules/integerize.md

Recipes (``PassManager(name)``):

* ``int_only`` -- ``recipes/int_only.yaml``, docs/recipes/int_only.md

Modules:

* :mod:`.lib` -- integer custom ops, fixed-point parameter helpers, ``integer_ops_report``
* :mod:`.actions` -- actions and constraints of ``int_observe`` / ``integerize``, data step ``check_integer``
"""
from . import lib, actions  # noqa: F401  registers the actions, constraints and data steps
