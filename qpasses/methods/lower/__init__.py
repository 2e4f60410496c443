"""lower."""
from . import actions  # noqa: F401  registers actions, constraints and data steps
