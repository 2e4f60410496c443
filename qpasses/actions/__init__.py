"""Actions and constraints that rules call by name.

Importing this package registers them: every module in this package is imported, so a
new family of actions only needs a new file here (``@action`` / ``@constraint``).
"""
import importlib
import pkgutil

from ..context import Refuse

for _m in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
    if not _m.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_m.name}")

__all__ = ["Refuse"]
