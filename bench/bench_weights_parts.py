"""CPU seconds of each part of the lazy weight learner at the full benchmark size, one at a time.

    .venv/bin/python bench/bench_weights_parts.py [--workdir DIR]

Generates bench_weights_scale's SCALE problem (N = 100,000, Q = 1,000, M = 200, k = 2,048) and times, in
wall and process CPU seconds: ΨᵀΨ (float32 products, float64 sums), all G_q, one full pool pass (top-257
of every query), the pools' first contributions, and ten steps' worth of pool scores and of the noise
matvec (w G_q w with its gradient).
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from gradtrace.methods.fitted import FittedMethod
from gradtrace.weights.kernels import PsiSource, psi_stats_fast, query_grams_fast, top_pass
from gradtrace.weights.lazy import LazyPool
from gradtrace.weights.scalable import QuadraticNorm

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_weights_scale as scale


def timed(label: str, fn):
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    print(f"| {label} | {time.perf_counter() - wall:.2f} | {time.process_time() - cpu:.2f} |", flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        scale.generate(Path(tmp), scale.SCALE)
        psi = np.load(Path(tmp) / "psi.npy", mmap_mode="r")
        slices = json.loads((Path(tmp) / "slices.json").read_text())
        phi = np.load(Path(tmp) / "queries.npy").astype(np.float64)
        print(f"{time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}, torch threads {torch.get_num_threads()}")
        print("| part | wall s | CPU s |\n|---|---|---|")
        source = PsiSource(psi, torch.device("cpu"))
        stats = timed("ΨᵀΨ", lambda: psi_stats_fast(source, slices))
        grams = timed("all G_q", lambda: query_grams_fast(phi, stats.gram, slices))
        idx, _ = timed("one full pool pass", lambda: top_pass(source, phi, 257))
        pool = LazyPool(FittedMethod(psi=psi, group_slices=slices, info={}), phi, stats, source, size=256, k=10)
        contrib, _ = timed("first pool contributions", lambda: pool._new_contributions(
            np.arange(len(phi)), idx[:, :256], reuse=np.zeros(len(phi), dtype=bool)))
        pool.contrib[:] = contrib
        w = np.full(len(slices), 1 / len(slices))
        timed("10 steps: pool scores", lambda: [pool.pool_scores(w) for _ in range(10)])
        wt = torch.from_numpy(w).requires_grad_()
        timed("10 steps: noise and its gradient", lambda: [QuadraticNorm.apply(wt, grams).sum().backward()
                                                           for _ in range(10)])
        print(f"1-min load average {__import__('os').getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
