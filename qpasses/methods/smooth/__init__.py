"""smooth."""
from . import balance, actions, steps  # noqa: F401  registers actions, constraints and data steps
