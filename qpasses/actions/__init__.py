"""Actions and constraints that rules call by name.  Importing this package registers them."""
from ..manager import Refuse
from . import common, fold, quant  # noqa: F401  (registration side effects)

__all__ = ["Refuse"]
