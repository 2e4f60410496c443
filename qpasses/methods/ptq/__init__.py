"""ptq."""
from . import actions, calibrate  # noqa: F401  registers actions, constraints and data steps
