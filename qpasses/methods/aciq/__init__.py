"""aciq."""
from . import lib, actions  # noqa: F401  registers actions, constraints and data steps
