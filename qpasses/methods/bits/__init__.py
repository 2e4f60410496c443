"""bits."""
from . import haq, actions, edge_bits, steps  # noqa: F401  registers actions, constraints and data steps
