"""Data steps: passes that need data or optimisation rather than a rewrite."""
from . import calibrate  # noqa: F401  (registration)
