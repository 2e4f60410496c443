"""Data steps: passes that need data or optimisation rather than a rewrite.

Every module in this package is imported (registration by ``@data_step``), so a new
step only needs a new file here.
"""
import importlib
import pkgutil

for _m in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
    if not _m.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_m.name}")
