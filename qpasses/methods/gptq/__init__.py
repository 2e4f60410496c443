"""GPTQ (Frantar, Ashkboos, Hoefler and Alistarh, "GPTQ: Accurate Post-Training
Quantization for Generative Pre-trained Transformers", ICLR 2023).

A data step that changes the numbers of weights already read through quantizers (attached by
``weight_int4`` or ``convert``).  The Hessian accumulation and the column-by-column update are
numerics (:mod:`qpasses.numerics.gptq`).

Recipes (``PassManager(name)``):

* ``gptq`` -- ``recipes/gptq.yaml``, docs/recipes/gptq.md

Modules:

* :mod:`.steps` -- data step ``gptq``
"""
from . import steps  # noqa: F401  registers the actions, constraints and data steps
