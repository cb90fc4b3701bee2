"""Scoring at scale: 1M stored training features x 1,000 queries -> top-100 per query, streamed.

    .venv/bin/python bench/bench_scoring.py                 # N=1M, k=512, Q=1000, top-100; float32/16, bfloat16
    .venv/bin/python bench/bench_scoring.py --write-docs    # also replace '## Scoring at scale' in docs/benchmarks.md
    .venv/bin/python bench/bench_scoring.py --n 100000      # smaller

A first subprocess writes the synthetic training features into three feature stores (float32, float16,
bfloat16 storage; the same values) chunk by chunk, plus the float32 queries. Every scoring configuration
then runs in its own fresh subprocess, so its peak RSS (ru_maxrss; it includes the file pages of the stores
it mapped) is its own:

    tracin       TracIn().fit(Φ) (a check pass; Ψ = Φ referenced) + FittedMethod.topk
    trak         TRAK (shared kernel) fit with Ψ written to a .npy memmap (psi_path) + FittedMethod.topk on Ψ
    trak-qside   the same scores with the kernel moved to the queries (K symmetric: φ(q)ᵀKφ(x) = (Kφ(q))ᵀφ(x)):
                 TRAK.fit(Φ, query_side=True) (a Gram pass) + FittedMethod.topk -- no Ψ is written; this
                 is the path `gradtrace attribute` takes for stores whose Ψ would exceed 256 MiB

float16 / bfloat16 stores are scored by FittedMethod on the stored array itself (chunks upcast to float32).
Their effect is measured against float32: top-100 overlap over all queries, and the Spearman rank correlation
of the full score vectors (all N rows) for the first --spearman-queries queries.

Synthetic features: 8 groups of k/8 columns; row n = s_n · (centre of cluster n mod 1000) + noise, with a
log-normal row scale s_n; query i is near centre i mod 1000 (so each query has a real top-100).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

from common import peak_rss_mb, run_worker, write_docs

DTYPES = ("float32", "float16", "bfloat16")
ROOT = Path(__file__).resolve().parents[1]


def _settings(dtype: str, k: int, groups: int, seed: int) -> dict:
    w = k // groups
    return {"model_fingerprint": "synthetic", "groups_spec": "synthetic",
            "groups": [{"name": f"g{j}", "start": j * w, "stop": (j + 1) * w, "size": w, "exact": True,
                        "params": []} for j in range(groups)],
            "projection": {"kind": "synthetic"}, "measurement": {"name": "synthetic"}, "dtype": dtype,
            "dim": k, "chunk_rows": 65536, "source": {"synthetic_seed": seed}}


def generate(work: Path, n: int, k: int, q: int, seed: int, groups: int = 8, clusters: int = 1000) -> dict:
    from gradtrace.features.store import FeatureStore

    start = time.perf_counter()
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, k)).astype(np.float32)
    stores = {d: FeatureStore.create(work / f"store_{d}", _settings(d, k, groups, seed), np.arange(n))
              for d in DTYPES}
    step = 65536
    for s in range(0, n, step):
        e = min(n, s + step)
        r = np.random.default_rng([seed, s])
        scale = np.exp(0.5 * r.standard_normal((e - s, 1))).astype(np.float32)
        block = scale * (centres[np.arange(s, e) % clusters] + 2.0 * r.standard_normal((e - s, k), dtype=np.float32))
        for store in stores.values():
            store.write(s, block)
    for store in stores.values():
        store.finish()
    r = np.random.default_rng([seed, n + 1])  # the query stream (chunk seeds are row offsets < n)
    queries = centres[np.arange(q) % clusters] + 2.0 * r.standard_normal((q, k), dtype=np.float32)
    np.save(work / "queries.npy", queries.astype(np.float32))
    return {"wall_s": time.perf_counter() - start, "bytes": {d: os.path.getsize(work / f"store_{d}" / "features.npy")
                                                             for d in DTYPES}}


def score(work: Path, config: str, dtype: str, top: int, c: float = 0.01) -> dict:
    """One configuration in this (fresh) process: fit + top-k; saves the top-k indices and scores."""
    from gradtrace.features.store import FeatureStore
    from gradtrace.methods import FittedMethod, TracIn, get_method

    queries = np.load(work / "queries.npy")
    store = FeatureStore.open(work / f"store_{dtype}")
    phi, slices = store.features, store.group_slices
    t0 = time.perf_counter()
    if config == "tracin":
        fitted = (TracIn().fit(phi, slices) if dtype == "float32" else
                  FittedMethod(psi=phi, group_slices=slices, info={"method": "tracin"}))
        qk = queries
    elif config == "trak":
        fitted = get_method("trak", kernel="shared", c=c).fit(phi, slices, psi_path=work / f"psi_{dtype}.npy")
        del store, phi  # unmap Φ: only Ψ is read from here on
        qk = queries
    else:  # trak-qside: what `gradtrace attribute` does for stores above PSI_IN_MEMORY
        fitted = get_method("trak", kernel="shared", c=c).fit(phi, slices, query_side=True)
        qk = queries
    t1 = time.perf_counter()
    idx, top_scores = fitted.topk(qk, top)
    t2 = time.perf_counter()
    np.save(work / f"top_{config}_{dtype}.npy", idx)
    np.save(work / f"topscores_{config}_{dtype}.npy", top_scores)
    return {"config": config, "dtype": dtype, "fit_s": t1 - t0, "topk_s": t2 - t1,
            "peak_rss_mb": peak_rss_mb()}


def agreement(work: Path, config: str, n_spearman: int, c: float = 0.01) -> dict:
    """Top-100 overlap and score Spearman of float16 / bfloat16 storage against float32."""
    from scipy.stats import spearmanr

    from gradtrace.features.store import FeatureStore
    from gradtrace.methods import FittedMethod, accumulate_gram, regularised_inverse

    queries = np.load(work / "queries.npy")[:n_spearman]
    ref_top = np.load(work / f"top_{config}_float32.npy")
    full = {}
    for d in DTYPES:
        store = FeatureStore.open(work / f"store_{d}")
        q = queries
        if config != "tracin":
            gram = accumulate_gram(store.features, store.group_slices, "shared")
            q = (queries.astype(np.float64) @ regularised_inverse(gram.blocks[0], c)[0]).astype(np.float32)
        full[d] = FittedMethod(psi=store.features, group_slices=store.group_slices).scores(q)
    out = {}
    for d in DTYPES[1:]:
        path = work / f"top_{config}_{d}.npy"
        top = np.load(path) if path.exists() else None
        overlap = (None if top is None else
                   float(np.mean([len(set(a) & set(b)) / a.size for a, b in zip(top, ref_top)])))
        rho = [spearmanr(full["float32"][i], full[d][i]).statistic for i in range(len(queries))]
        out[d] = {"top100_overlap": overlap, "spearman_mean": float(np.mean(rho)), "spearman_min": float(np.min(rho))}
    return out


def run(args, *extra) -> dict:
    return run_worker(__file__, ["--workdir", str(args.workdir), "--n", str(args.n), "--k", str(args.k),
                                 "--queries", str(args.queries), "--top", str(args.top), *extra],
                      " ".join(extra))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=1_000_000)
    p.add_argument("--k", type=int, default=512)
    p.add_argument("--queries", type=int, default=1000)
    p.add_argument("--top", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--spearman-queries", type=int, default=20)
    p.add_argument("--workdir", default=None, help="where the stores go (default: a temporary directory)")
    p.add_argument("--keep", action="store_true", help="keep the stores")
    p.add_argument("--write-docs", action="store_true")
    p.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        work, what = Path(args.workdir), args.worker
        if what[0] == "generate":
            res = generate(work, args.n, args.k, args.queries, args.seed)
        elif what[0] == "agreement":
            res = agreement(work, what[1], args.spearman_queries)
        else:
            res = score(work, what[0], what[1], args.top)
        print(json.dumps(res))
        return
    import shutil
    import tempfile

    own = args.workdir is None
    args.workdir = Path(tempfile.mkdtemp(prefix="bench_scoring_") if own else args.workdir)
    args.workdir.mkdir(parents=True, exist_ok=True)
    try:
        gen = run(args, "--worker", "generate")
        print(f"generated in {gen['wall_s']:.0f} s: {gen['bytes']}", file=sys.stderr, flush=True)
        plan = [("tracin", d) for d in DTYPES] + [("trak", "float32"), ("trak", "float16")] + \
               [("trak-qside", d) for d in DTYPES]
        results = []
        for config, dtype in plan:
            results.append(run(args, "--worker", config, dtype))
            print(results[-1], file=sys.stderr, flush=True)
        agree = {cfg: run(args, "--worker", "agreement", cfg) for cfg in ("tracin", "trak-qside")}
        ref = np.load(args.workdir / "top_trak_float32.npy")
        qside = np.load(args.workdir / "top_trak-qside_float32.npy")
        same = float(np.mean([len(set(a) & set(b)) / a.size for a, b in zip(ref, qside)]))
    finally:
        if own and not args.keep:
            shutil.rmtree(args.workdir, ignore_errors=True)
    lines = [f"Command: `{' '.join(['.venv/bin/python bench/bench_scoring.py'] + sys.argv[1:])}`",
             f"Date: {datetime.date.today()}; machine: {platform.machine()}, {os.cpu_count()} CPUs (shared), "
             f"numpy {np.__version__}. N={args.n:,} training rows x k={args.k} (8 groups), {args.queries} queries, "
             f"top-{args.top}; stores written in {gen['wall_s']:.0f} s "
             f"({gen['bytes']['float32'] / 2**30:.2f} GiB float32).", "",
             "| method | storage | fit s | top-k s | peak RSS GB |", "|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['config']} | {r['dtype']} | {r['fit_s']:.1f} | {r['topk_s']:.1f} | "
                     f"{r['peak_rss_mb'] / 1024:.2f} |")
    lines += ["", f"trak-qside vs trak (float32): top-{args.top} overlap {same:.4f}.", "",
              f"Reduced-precision storage vs float32 (top-{args.top} overlap over all queries; Spearman ρ of all "
              f"{args.n:,} scores, first {args.spearman_queries} queries):", "",
              "| method | storage | top-100 overlap | Spearman mean | Spearman min |", "|---|---|---|---|---|"]
    for cfg, res in agree.items():
        for d, r in res.items():
            ov = "-" if r["top100_overlap"] is None else f"{r['top100_overlap']:.4f}"
            lines.append(f"| {cfg} | {d} | {ov} | {r['spearman_mean']:.6f} | {r['spearman_min']:.6f} |")
    print("\n".join(lines))
    if args.write_docs:
        write_docs(lines, "Scoring at scale")


if __name__ == "__main__":
    main()
