"""Canonicalization: graph clean-ups that keep the numerics exactly.

BatchNorm folding into the preceding conv / conv_transpose / linear, eval-mode dropout removal,
and weighted ops spelled as matrix products (GPT-2's ``Conv1D``, ``x @ W``) rewritten to
``linear``, so that every later family sees one form.  The first step of nearly every recipe.

Rule families (``PassManager([...])`` / ``rules:``):

* ``canonicalize`` -- ``canonicalize.yaml``, docs/rules/canonicalize.md

Modules:

* :mod:`.actions` -- matrix-product forms to ``linear``
* :mod:`.fold` -- BatchNorm folding (``fold_bn``; also used on ONNX graphs)
"""
from . import actions, fold  # noqa: F401  registers the actions, constraints and data steps
