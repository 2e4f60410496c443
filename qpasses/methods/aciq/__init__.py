"""ACIQ: analytical clipping and per-channel bit allocation (Banner, Nahshan and Soudry,
"Post training 4-bit quantization of convolutional networks for rapid-deployment", NeurIPS 2019,
arXiv:1810.05723).

The closed forms (clipping value, bit allocation, bias correction) are numerics and live in
:mod:`qpasses.numerics.aciq`; this package holds the quantizer module and the rules.

Rule families (``PassManager([...])`` / ``rules:``):

* ``aciq`` -- ``aciq.yaml``, docs/rules/aciq.md

Recipes (``PassManager(name)``):

* ``aciq4`` -- ``recipes/aciq4.yaml``, docs/recipes/aciq4.md

Modules:

* :mod:`.lib` -- ``ChannelBitsFakeQuant``, ``aciq_weight_quantizer``
* :mod:`.actions` -- actions of the ``aciq`` family
"""
from . import lib, actions  # noqa: F401  registers the actions, constraints and data steps
