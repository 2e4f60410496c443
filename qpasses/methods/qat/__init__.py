"""Quantization-aware training (Jacob et al., CVPR 2018, sec. 3.2; LSQ, Esser et al., ICLR 2020).

``qat_prepare`` rewrites conv + BatchNorm into PT2E's QAT graph pattern with learned (LSQ) weight
and activation step sizes; after training ``qat_convert`` folds the BatchNorm into the conv.

Rule families (``PassManager([...])`` / ``rules:``):

* ``qat_prepare`` -- ``qat_prepare.yaml``, docs/rules/qat_prepare.md
* ``qat_convert`` -- ``qat_convert.yaml``, docs/rules/qat_convert.md

Recipes (``PassManager(name)``):

* ``qat`` -- ``recipes/qat.yaml``, docs/recipes/qat.md

Modules:

* :mod:`.lib` -- ``QATBatchNorm2d``, BatchNorm folding, ``FirstBatchFakeQuantize``, ``freeze_bn``
* :mod:`.actions` -- actions and constraints of ``qat_prepare`` / ``qat_convert``
* :mod:`.steps` -- data step ``first_batch_init``: LSQ scales from the first training batch
"""
from . import lib, actions, steps  # noqa: F401  registers the actions, constraints and data steps
