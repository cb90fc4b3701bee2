"""Per-row cost of the weight learner's N-proportional parts at the default width: ΨᵀΨ and one top-257 pass of
Q = 1,000 queries, on the first ROWS rows of a feature store (e.g. bench_scoring_floor.py's, kept with --keep);
printed per 1,000 rows, for an extrapolation to N = 1,000,000.

    nice .venv/bin/python bench/bench_weights_parts_wide.py STORE ROWS
"""
import os
import sys
import time

import numpy as np
import torch

from gradtrace.features.store import FeatureStore
from gradtrace.weights.psi_passes import PsiSource, psi_stats_fast, top_pass

rows = int(sys.argv[2])
store = FeatureStore.open(sys.argv[1])
psi = np.asarray(store.features[:rows])
src = PsiSource(psi, torch.device("cpu"))
slices = store.group_slices
q = np.random.default_rng(0).standard_normal((1000, psi.shape[1])).astype(np.float32)
t = time.perf_counter()
psi_stats_fast(src, slices)
a = time.perf_counter() - t
t = time.perf_counter()
top_pass(src, q, 257)
b = time.perf_counter() - t
print(f"rows {rows} k {psi.shape[1]}: PsiTPsi {a:.1f} s ({a / rows * 1000:.3f} s per 1,000 rows); one top-257 pass of "
      f"1,000 queries {b:.1f} s ({b / rows * 1000:.3f} s per 1,000 rows); load {os.getloadavg()[0]:.1f}; "
      f"torch threads {torch.get_num_threads()}")
