"""Method-specific library code (modules, training loops, search agents) used by actions and data steps."""
