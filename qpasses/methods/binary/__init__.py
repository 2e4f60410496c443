"""Binarized networks: BNN (Courbariaux, Hubara et al., 2016) and XNOR-Net scaling
(Rastegari et al., ECCV 2016).

Inner weighted ops get sign weights (optionally scaled by the mean absolute value per output
channel) and sign activations with straight-through estimators; trained graphs pack to 1-bit
kernels.

Rule families (``PassManager([...])`` / ``rules:``):

* ``binarize`` -- ``binarize.yaml``, docs/rules/binarize.md

Recipes (``PassManager(name)``):

* ``bnn`` -- ``recipes/bnn.yaml``, docs/recipes/bnn.md

Modules:

* :mod:`.lib` -- ``BinaryWeight``, ``BinaryActivation``, packed 1-bit layers, ``pack_binary``, ``make_optimizer``
* :mod:`.actions` -- actions and constraints of ``binarize``
"""
from . import lib, actions  # noqa: F401  registers the actions, constraints and data steps
