"""Dynamic int8 quantization: weights quantized once, activations per batch (or per token).

PyTorch's dynamic quantization in PT2E's graph form ``linear(DynamicFakeQuant(x), fq_w(W), b)``:
no calibration data is needed.

Rule families (``PassManager([...])`` / ``rules:``):

* ``dynamic`` -- ``dynamic.yaml``, docs/rules/dynamic.md

Recipes (``PassManager(name)``):

* ``dynamic_int8`` -- ``recipes/dynamic_int8.yaml``, docs/recipes/dynamic_int8.md

Modules:

* :mod:`.lib` -- ``DynamicFakeQuant``, ``DynamicQuantLinear`` (eager exact-integer reference), ``dynamic_linear_quantizers``
* :mod:`.actions` -- actions and constraints of the ``dynamic`` family
"""
from . import lib, actions  # noqa: F401  registers the actions, constraints and data steps
