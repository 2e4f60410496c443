"""qdq."""
from . import actions, pt2e  # noqa: F401  registers actions, constraints and data steps
