"""Mixed precision: per-layer bit-widths, searched (HAQ) or given.

HAQ (Wang, Liu, Lin, Lin and Han, "HAQ: Hardware-Aware Automated Quantization with Mixed
Precision", CVPR 2019) searches per-layer weight / activation bit-widths under a resource budget
(model size, BOPs or latency) with a DDPG agent; a HAWQ-style sensitivity baseline is included.
The result is a bit map: graph annotations that ``observe`` and ``convert`` honour.
``edge_bits`` keeps the first and last weighted layers at a given width.

Rule families (``PassManager([...])`` / ``rules:``):

* ``assign_bits`` -- ``assign_bits.yaml``, docs/rules/assign_bits.md
* ``edge_bits`` -- ``edge_bits.yaml``, docs/rules/edge_bits.md

Recipes (``PassManager(name)``):

* ``haq`` -- ``recipes/haq.yaml``, docs/recipes/haq.md
* ``mixed_ptq`` -- ``recipes/mixed_ptq.yaml``, docs/recipes/haq.md

Modules:

* :mod:`.haq` -- the search: layer features, cost models, ``QuantSim``, the DDPG agent
* :mod:`.actions` -- ``assign_bits`` actions; bit maps (``apply_bit_map``, ``load_bit_map``, ``save_bit_map``)
* :mod:`.edge_bits` -- actions and constraints of ``edge_bits``
* :mod:`.steps` -- data step ``search_bits``
"""
from . import haq, actions, edge_bits, steps  # noqa: F401  registers the actions, constraints and data steps
