"""Default settings of the weight learner (chosen by the sweep in docs/benchmarks.md)."""

DEFAULT_K = 10
DEFAULT_STEPS = 200
DEFAULT_LR = 0.05
DEFAULT_L2 = 0.0
DEFAULT_POOL = 256
DEFAULT_REFRESH = "exact"
DEFAULT_MEMORY_BUDGET = 1 * 2**30
