"""Scoring at the default width against its floor: N training rows x k = 8,192 columns, Q queries, top-100.

    nice .venv/bin/python bench/bench_scoring_floor.py --n 100000 --dtype float32
    nice .venv/bin/python bench/bench_scoring_floor.py --n 1000000 --dtype float16 --workdir /big/disk
    nice .venv/bin/python bench/bench_scoring_floor.py --n 100000 --write-docs   # '## Scoring at the default width'

A first subprocess writes synthetic features straight into one feature store (no model is featurized: 16 groups
of k/16 columns, rows clustered as in bench_scoring.py) and the query store. Then, each in its own fresh
subprocess, in this order:

    read      the time to read the store once (every chunk copied out of the memory map)
    floor     one plain matrix multiply of the same shapes over the same memory-mapped store: Q x k times k x N,
              chunk by chunk (the chunk `FittedMethod.topk` uses), float32, the product dropped
    tracin    what `gradtrace attribute --method tracin` does: fit, top-k, per-group contributions, write
    trak      the same for per-group TRAK (the query-side path of large stores) with group weights, its Gram blocks
              computed (any kept from an earlier run removed first) and kept beside the store (STORE/gram/)
    trak-cached  the same again, reading the Gram blocks the trak step kept (its top-k compared with trak's)

Group weights are a fixed random point of the simplex written as a weights file: their cost does not depend on
their values (they scale the query side). Memory: a sampler thread reads /proc/self/status every 0.1 s and keeps
the peaks of RssAnon (the process's own memory) and RssFile (pages of mapped files, i.e. the store in the page
cache), and VmHWM (their peak sum). The machine's cores are shared: the table gives the load average, and ratios
to the floor measured in the same run.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import sys
import threading
import time
from pathlib import Path

import numpy as np

from common import run_worker, write_docs

GROUPS = 16


class RssPeaks:
    """Peaks of RssAnon / RssFile / VmHWM (MiB) of this process, sampled by a daemon thread."""

    def __init__(self, every: float = 0.1):
        self.peak = {"RssAnon": 0.0, "RssFile": 0.0}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(every,), daemon=True)
        self._thread.start()

    def _sample(self) -> dict:
        out = {}
        for line in Path("/proc/self/status").read_text().splitlines():
            key = line.split(":")[0]
            if key in ("RssAnon", "RssFile", "VmHWM"):
                out[key] = int(line.split()[1]) / 1024
        return out

    def _run(self, every: float) -> None:
        while not self._stop.is_set():
            now = self._sample()
            for key in self.peak:
                self.peak[key] = max(self.peak[key], now[key])
            time.sleep(every)

    def stop(self) -> dict:
        self._stop.set()
        self._thread.join()
        now = self._sample()
        return {"anon_mb": max(self.peak["RssAnon"], now["RssAnon"]),
                "file_mb": max(self.peak["RssFile"], now["RssFile"]), "hwm_mb": now["VmHWM"]}


def _settings(dtype: str, k: int, seed: int) -> dict:
    w = k // GROUPS
    return {"model_fingerprint": "synthetic", "groups_spec": "synthetic",
            "groups": [{"name": f"g{j}", "start": j * w, "stop": (j + 1) * w, "size": w, "exact": True,
                        "params": []} for j in range(GROUPS)],
            "projection": {"kind": "synthetic"}, "measurement": {"name": "loss"}, "dtype": dtype,
            "dim": k, "chunk_rows": 8192, "source": {"synthetic_seed": seed}}


def generate(work: Path, n: int, k: int, q: int, dtype: str, seed: int, clusters: int = 1000) -> dict:
    from gradtrace.features.store import FeatureStore

    start = time.perf_counter()
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, k), dtype=np.float32)
    store = FeatureStore.create(work / "train", _settings(dtype, k, seed), np.arange(n))
    step = 8192
    for s in range(0, n, step):
        e = min(n, s + step)
        r = np.random.default_rng([seed, s])
        scale = np.exp(0.5 * r.standard_normal((e - s, 1))).astype(np.float32)
        store.write(s, scale * (centres[np.arange(s, e) % clusters] + 2.0 * r.standard_normal((e - s, k),
                                                                                           dtype=np.float32)))
    store.finish()
    r = np.random.default_rng([seed, n + 1])
    queries = centres[np.arange(q) % clusters] + 2.0 * r.standard_normal((q, k), dtype=np.float32)
    qs = FeatureStore.create(work / "queries", _settings(dtype, k, seed + 1), np.arange(q) + 10**9)
    qs.write(0, queries)  # one chunk of q rows when q <= 8192
    qs.finish()
    w = np.random.default_rng([seed, 7]).dirichlet(np.ones(GROUPS))
    (work / "weights.json").write_text(json.dumps({"weights": {f"g{j}": float(v) for j, v in enumerate(w)}}))
    return {"wall_s": time.perf_counter() - start, "bytes": os.path.getsize(work / "train" / "features.npy")}


def measure(work: Path, what: str, top: int) -> dict:
    """One configuration in this (fresh) process."""
    from gradtrace.attribution import query_side_for, score_queries
    from gradtrace.attribution.gram_cache import FOLDER as GRAM_FOLDER
    from gradtrace.attribution.output import topk_contributions, write_topk_attributions
    from gradtrace.features.store import FeatureStore
    from gradtrace.methods.rows import effective_chunk_rows, row_chunks

    peaks = RssPeaks()
    train, queries = FeatureStore.open(work / "train"), FeatureStore.open(work / "queries")
    raw, n, k = train.stored, len(train.ids), int(train.settings["dim"])
    qf = np.asarray(queries.features, dtype=np.float32)
    rows = effective_chunk_rows(65536, 4 * (k + len(qf)))  # FittedMethod.topk's chunk
    out: dict = {"what": what}
    t0 = time.perf_counter()
    if what == "read":
        for s, e in row_chunks(n, rows):
            np.array(raw[s:e])
        out["total_s"] = time.perf_counter() - t0
    elif what == "floor":
        for s, e in row_chunks(n, rows):
            qf @ np.asarray(raw[s:e], dtype=np.float32).T
        out["total_s"] = time.perf_counter() - t0
    else:
        method = "trak" if what.startswith("trak") else what
        if what == "trak":  # the first fit on this store: no Gram blocks kept from an earlier run
            shutil.rmtree(work / "train" / GRAM_FOLDER, ignore_errors=True)
        scored = score_queries(train, queries, method=method, weights_path=work / "weights.json",
                               query_side=query_side_for(train, "per-group"), progress=False)
        t1 = time.perf_counter()
        idx, top_scores = scored.fitted.topk(scored.query_features, top, scored.weights)
        t2 = time.perf_counter()
        contrib = topk_contributions(scored.fitted, scored.query_features, idx, scored.weights)
        t3 = time.perf_counter()
        write_topk_attributions(train, queries, work / f"out_{what}", idx=idx, top=top_scores, contrib=contrib,
                                scores=None, method_info=scored.fitted.info, weights_info=scored.weights_info,
                                lambda_info=scored.lambda_info, top_k=top, spec=None)
        t4 = time.perf_counter()
        np.save(work / f"top_{what}.npy", idx)
        if what == "trak-cached" and (work / "top_trak.npy").exists():  # the cached blocks give the same top-k
            out["same_topk_as_trak"] = bool(np.array_equal(idx, np.load(work / "top_trak.npy")))
        out["gram_cache"] = scored.fitted.info.get("gram_cache")
        out.update(fit_s=t1 - t0, topk_s=t2 - t1, contrib_s=t3 - t2, write_s=t4 - t3, total_s=t4 - t0,
                   contrib_error=float(np.abs(contrib.sum(axis=2) - top_scores).max() / np.abs(top_scores).max()))
    out.update(peaks.stop())
    return out


def run(args, *extra) -> dict:
    return run_worker(__file__, ["--workdir", str(args.workdir), "--n", str(args.n), "--k", str(args.k),
                                 "--queries", str(args.queries), "--top", str(args.top), "--dtype", args.dtype, *extra],
                      " ".join(extra))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=100_000)
    p.add_argument("--k", type=int, default=8192)
    p.add_argument("--queries", type=int, default=1000)
    p.add_argument("--top", type=int, default=100)
    p.add_argument("--dtype", default="float32", choices=("float32", "float16", "bfloat16"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--only", nargs="+", default=["read", "floor", "tracin", "trak", "trak-cached", "floor"],
                   help="steps in order (a repeated floor is averaged into the ratios' denominator)")
    p.add_argument("--workdir", default=None, help="where the store goes (default: a temporary directory)")
    p.add_argument("--keep", action="store_true", help="keep the store (and reuse it when it is there)")
    p.add_argument("--write-docs", action="store_true")
    p.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        work = Path(args.workdir)
        res = (generate(work, args.n, args.k, args.queries, args.dtype, args.seed) if args.worker[0] == "generate"
               else measure(work, args.worker[0], args.top))
        print(json.dumps(res))
        return
    import tempfile

    own = args.workdir is None
    args.workdir = Path(tempfile.mkdtemp(prefix="bench_floor_") if own else args.workdir)
    args.workdir.mkdir(parents=True, exist_ok=True)
    load = [os.getloadavg()[0]]
    try:
        if (args.workdir / "train" / "manifest.json").exists() and args.keep:
            gen = {"wall_s": float("nan"), "bytes": os.path.getsize(args.workdir / "train" / "features.npy")}
        else:
            gen = run(args, "--worker", "generate")
        print(f"store: {gen}", file=sys.stderr, flush=True)
        results = {}
        for i, what in enumerate(args.only):  # a repeated step (e.g. the floor, last) is kept as "floor (2)"
            key = what if what not in results else f"{what} ({args.only[:i + 1].count(what)})"
            results[key] = run(args, "--worker", what)
            load.append(os.getloadavg()[0])
            print(results[key], f"load {load[-1]:.1f}", file=sys.stderr, flush=True)
    finally:
        if own and not args.keep:
            shutil.rmtree(args.workdir, ignore_errors=True)
    floors = [r["total_s"] for key, r in results.items() if key.split(" ")[0] == "floor"]
    floor = float(np.mean(floors)) if floors else None  # the mean of the floors measured in this run
    lines = [f"Command: `nice .venv/bin/python bench/bench_scoring_floor.py {' '.join(sys.argv[1:])}`",
             f"Date: {datetime.date.today()}; machine: {platform.machine()}, {os.cpu_count()} CPUs shared with other "
             f"jobs (1-min load average {min(load):.1f}..{max(load):.1f} during the run), numpy {np.__version__}. "
             f"N={args.n:,} x k={args.k:,} ({GROUPS} groups) {args.dtype} store "
             f"({gen['bytes'] / 2**30:.2f} GiB), Q={args.queries:,}, top-{args.top}.", "",
             "| step | fit s | top-k s | contributions s | write s | total s | × floor (mean of the floors) | "
             "own memory GB (RssAnon) | store pages GB (RssFile) |", "|---|---|---|---|---|---|---|---|---|"]
    for what, r in results.items():
        ratio = "-" if floor is None else f"{r['total_s'] / floor:.2f}"
        cells = [f"{r[key]:.1f}" if key in r else "-" for key in ("fit_s", "topk_s", "contrib_s", "write_s")]
        lines.append(f"| {what} | {' | '.join(cells)} | {r['total_s']:.1f} | {ratio} | {r['anon_mb'] / 1024:.2f} | "
                     f"{r['file_mb'] / 1024:.2f} |")
    print("\n".join(lines))
    if args.write_docs:
        write_docs(lines, f"Scoring at the default width (N = {args.n:,}, {args.dtype})")


if __name__ == "__main__":
    main()
