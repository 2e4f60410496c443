"""qat."""
from . import lib, actions, steps  # noqa: F401  registers actions, constraints and data steps
