"""The quantization methods: one package per method, each holding everything the method is.

A method package ``qpasses/methods/<method>/`` holds its rule families (``<family>.yaml``),
its recipes (``recipes/<recipe>.yaml``), the actions and constraints its rules call
(``actions.py``), its data steps, and its library code (modules, training loops, search
agents); its ``__init__`` says what the method is and where its docs pages are.  Below the
method packages sit two helper modules that many methods share: :mod:`._common` (the generic
constraints every rule file may call) and :mod:`._graphutil` (graph-editing helpers for
actions).  ``params.yaml`` here holds the shared parameter declarations (``skip``,
``observer``, bit-widths, ...) that families and recipes take with ``inherit``.

Importing this package imports every method package, which registers their actions,
constraints and data steps (``@action`` / ``@constraint`` / ``@data_step``); a new method
only needs a new folder here.
"""
import importlib
import pkgutil

from . import _common  # noqa: F401  registers the generic constraints

for _m in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
    if _m.ispkg and not _m.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_m.name}")
