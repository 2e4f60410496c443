"""Dynamic int8 quantization: weights quantized once, activations per batch (or per token).

PyTorch's dynamic quantization in PT2E's graph form ``linear(dyn_q(x), fq_w(W), b)``, ``dyn_q`` a
dynamic quantizer op node (``qpasses.fake_quant_per_token`` and the like, no module):
no calibration data is needed.

Rule families (``PassManager([...])`` / ``rules:``):

* ``dynamic`` -- ``dynamic.yaml``, docs/rules/dynamic.md

Recipes (``PassManager(name)``):

* ``dynamic_int8`` -- ``recipes/dynamic_int8.yaml``, docs/recipes/dynamic_int8.md

Modules:

* :mod:`.lib` -- ``dynamic_fake_quant`` (eager reference of the ops), ``DynamicQuantLinear`` (eager exact-integer reference), ``dynamic_linear_quantizers``
* :mod:`.actions` -- actions and constraints of the ``dynamic`` family
"""
from . import lib, actions  # noqa: F401  registers the actions, constraints and data steps
