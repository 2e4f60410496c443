"""canonicalize."""
from . import actions, fold  # noqa: F401  registers actions, constraints and data steps
