"""Activation / weight balancing: SmoothQuant (Xiao et al., ICML 2023) and AWQ (Lin et al.,
MLSys 2024).

A balancing data step chooses one scale per producer channel of each layer group (groups found
from the graph's structure, not by module name); the ``smooth`` family folds the scales exactly.

Rule families (``PassManager([...])`` / ``rules:``):

* ``smooth`` -- ``smooth.yaml``, docs/rules/smooth.md

Recipes (``PassManager(name)``):

* ``smoothquant`` -- ``recipes/smoothquant.yaml``, docs/recipes/smoothquant.md
* ``smoothquant_dynamic`` -- ``recipes/smoothquant_dynamic.yaml``, docs/recipes/smoothquant.md
* ``awq`` -- ``recipes/awq.yaml``, docs/recipes/awq.md

Modules:

* :mod:`.balance` -- layer groups (``find_groups``) and the recording run
* :mod:`.actions` -- actions and constraints of ``smooth``
* :mod:`.steps` -- data steps ``smooth_scales`` (SmoothQuant), ``awq_scales`` and ``awq_clip`` (AWQ)
"""
from . import balance, actions, steps  # noqa: F401  registers the actions, constraints and data steps
