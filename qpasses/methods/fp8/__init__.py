"""fp8 W8A8 (float8 e4m3): per-output-channel weight scales, static per-tensor or dynamic
per-token activations (the scheme of vLLM / llm-compressor's FP8 checkpoints).

The fp8 quantizers are numerics (:mod:`qpasses.numerics.fp8`).

Rule families (``PassManager([...])`` / ``rules:``):

* ``fp8_prepare`` -- ``fp8_prepare.yaml``, docs/rules/fp8_prepare.md
* ``fp8_convert`` -- ``fp8_convert.yaml``, docs/rules/fp8_convert.md

Recipes (``PassManager(name)``):

* ``w8a8_fp8`` -- ``recipes/w8a8_fp8.yaml``, docs/recipes/w8a8_fp8.md

Modules:

* :mod:`.actions` -- actions, constraints and the data step ``calibrate_observers`` of ``fp8_prepare`` / ``fp8_convert``
"""
from . import actions  # noqa: F401  registers the actions, constraints and data steps
