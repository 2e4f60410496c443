"""Static post-training quantization (PTQ): observers, calibration, fake quantization.

The method of Jacob et al. (CVPR 2018, "Quantization and Training of Neural Networks for
Efficient Integer-Arithmetic-Only Inference") as PyTorch's PT2E flow applies it: observe the
activation inputs of weighted ops, calibrate the observers on data, then read every weighted op's
weight and input through fake quantizers.  Most other methods build on its actions
(:mod:`.actions`: ``observe_input``, ``attach_weight_quantizer``, ``bits_for``) and on its
calibration step (:mod:`.calibrate`).

Rule families (``PassManager([...])`` / ``rules:``):

* ``observe`` -- ``observe.yaml``, docs/rules/observe.md
* ``convert`` -- ``convert.yaml``, docs/rules/convert.md
* ``int_bias`` -- ``int_bias.yaml``, docs/rules/int_bias.md
* ``ort_placement`` -- ``ort_placement.yaml``, docs/rules/ort_placement.md

Recipes (``PassManager(name)``):

* ``ptq_int8`` -- ``recipes/ptq_int8.yaml``, docs/recipes/ptq_int8.md

Modules:

* :mod:`.actions` -- observe / convert / int_bias / ort_placement actions and constraints
* :mod:`.calibrate` -- data step ``calibrate`` (run batches through the observers) and the batch helpers every data step uses
"""
from . import actions, calibrate  # noqa: F401  registers the actions, constraints and data steps
