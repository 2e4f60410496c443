"""GENIE: zero-shot quantization (Jeon et al., "GENIE: Show Me the Data for Quantization",
CVPR 2023), and AdaRound-style few-shot reconstruction.

GENIE-D distills a synthetic calibration set from the float model's BatchNorm statistics (with
swing convolutions); GENIE-M reconstructs block by block (BRECQ, Li et al., ICLR 2021; QDrop,
Wei et al., ICLR 2022) with AdaRound soft rounding (Nagel et al., ICML 2020) and a jointly
learned step size.  ``adaround`` runs the same reconstruction on real data.

Rule families (``PassManager([...])`` / ``rules:``):

* ``swing_conv`` -- ``swing_conv.yaml``, docs/rules/swing_conv.md
* ``swing_off`` -- ``swing_off.yaml``, docs/rules/swing_off.md

Recipes (``PassManager(name)``):

* ``genie`` -- ``recipes/genie.yaml``, docs/recipes/genie.md
* ``genie_distill`` -- ``recipes/genie_distill.yaml``, docs/recipes/genie.md
* ``adaround`` -- ``recipes/adaround.yaml``, docs/recipes/genie.md

Modules:

* :mod:`.lib` -- swing convolutions, the generator, ``synthesize``, the GENIE-M quantizers, distributed helpers
* :mod:`.blocks` -- single-entry / single-exit blocks from dominator analysis
* :mod:`.actions` -- actions and constraints of ``swing_conv`` / ``swing_off``
* :mod:`.distill` -- data steps ``distill`` and ``calibrate_synthetic``: GENIE-D
* :mod:`.reconstruct` -- data step ``reconstruct``: GENIE-M / AdaRound block reconstruction
"""
from . import lib, blocks, actions, distill, reconstruct  # noqa: F401  registers the actions, constraints and data steps
