"""gptq."""
from . import steps  # noqa: F401  registers actions, constraints and data steps
