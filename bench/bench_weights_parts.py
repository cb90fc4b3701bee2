"""CPU seconds of each part of the lazy weight learner at the full benchmark size, one at a time.

    .venv/bin/python bench/bench_weights_parts.py [--workdir DIR]

Generates bench_weights_scale's SCALE problem (N = 100,000, Q = 1,000, M = 200, k = 2,048) and times, in
wall and process CPU seconds: ΨᵀΨ (float32 products, float64 sums), all G_q, one full pool pass (top-257
of every query), the pools' first contributions, and ten times each per-step part as the
learner runs them (one thread): choosing the shortlists, scoring them, the noise (w G_q w with its
gradient), and one shortlist check over 8 steps.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from common import PLANTED_SCALE, write_planted
from gradtrace.methods.fitted import FittedMethod
from gradtrace.weights.lazy import LazyPool
from gradtrace.weights.noise import GramNorm
from gradtrace.weights.psi_passes import PsiSource, psi_stats_fast, query_grams_fast, top_pass
from gradtrace.weights.row_source import RowSource
from gradtrace.weights.threads import threads


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
        write_planted(Path(tmp), PLANTED_SCALE)
        psi = np.load(Path(tmp) / "psi.npy", mmap_mode="r")
        slices = json.loads((Path(tmp) / "slices.json").read_text())
        phi = np.load(Path(tmp) / "queries.npy").astype(np.float64)
        print(f"{time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}, torch threads {torch.get_num_threads()}")
        print("| part | wall s | CPU s |\n|---|---|---|")
        source = PsiSource(psi, torch.device("cpu"))
        stats = timed("ΨᵀΨ", lambda: psi_stats_fast(source, slices))
        grams = timed("all G_q", lambda: query_grams_fast(phi, stats.gram, slices))
        idx, _ = timed("one full pool pass", lambda: top_pass(source, phi, 257))
        fitted = FittedMethod(psi=psi, group_slices=slices, info={})
        pool = LazyPool(fitted, phi, stats, RowSource(fitted), size=256, k=10)
        contrib, _ = timed("first pool contributions", lambda: pool._new_contributions(
            np.arange(len(phi)), idx[:, :256], reuse=np.zeros(len(phi), dtype=bool)))
        pool.contrib[:] = contrib
        pool.idx[:] = idx[:, :256]
        m = len(slices)
        rng = np.random.default_rng(0)
        ws = [w / w.sum() for w in (1 / m + 1e-3 * rng.standard_normal((10, m)) / m)]
        short = pool.shortlist
        gt = torch.from_numpy(grams)
        with threads(1):
            timed("10 shortlist choices", lambda: [short.choose(w, 0) for w in ws])
            for t, w in enumerate(ws):
                pool.w_hist[t] = w
            kth = timed("10 steps: score the shortlists", lambda: [short.select(w, 10)[1] for w in ws])
            pool.kth_hist.update(enumerate(kth))
            wt = [torch.from_numpy(w).requires_grad_() for w in ws]
            timed("10 steps: noise and its gradient", lambda: [GramNorm.apply(w, gt).sum().backward() for w in wt])
            short.chosen = 0
            timed("one shortlist check (8 steps)", lambda: short.check(8, ws[8]))
        print(f"1-min load average {__import__('os').getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
