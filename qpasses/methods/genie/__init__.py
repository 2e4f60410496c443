"""genie."""
from . import lib, blocks, actions, distill, reconstruct  # noqa: F401  registers actions, constraints and data steps
