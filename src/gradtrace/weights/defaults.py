"""Default settings of the weight learner; the sweep behind them is in docs/benchmarks.md.

k = 10 (the method's default); lr = 0.05 and steps = 200: lr·steps = 10, twice where the objective settled on the
planted problems; l2 = 0 (it only pulls towards uniform); pool of 256 candidates per query (512 cost more
per step than it saved in refreshes); refresh "lazy" (scheduled pool refreshes, misses found at a refresh undone
by rolling back; exact final top-k; see `gradtrace.weights.lazy`; "exact" proves every step at many more passes). The
dense path (the reference) is used only when its float64 (Q, N, M) tensor fits 64 MiB: above a few million
contributions the scalable path is faster (Q=50, N=5,000, M=50, 100 steps: 4.4 s vs 31 s dense, same loss to 1e-9).
DEFAULT_GUARD = "auto" is the stages' default (`learn-weights`, `eval mislabel`, the EK-FAC stage, `Tracer`): the
holdout guard from 4 learning queries up (`gradtrace.weights.guard`); `learn_weights` itself defaults to "none".
"""

from gradtrace.choices import DEFAULT_GUARD, DEFAULT_K, DEFAULT_L2, DEFAULT_LR, DEFAULT_STEPS  # noqa: F401  (the CLI's choices)

DEFAULT_POOL = 256
DEFAULT_REFRESH = "lazy"
DEFAULT_MEMORY_BUDGET = 64 * 2**20
