"""Weight learning at scale, and the sweep behind the learner's defaults.

    .venv/bin/python bench/bench_weights_scale.py                 # N=100k, Q=1000, M=200, k=2048: exact vs lazy
    .venv/bin/python bench/bench_weights_scale.py --refresh lazy  # the default (lazy) path only
    .venv/bin/python bench/bench_weights_scale.py --refresh lazy --baseline-src OLD/src   # then OLD/src's lazy path
    .venv/bin/python bench/bench_weights_scale.py --scaling       # the new path at 3 sizes each of N, Q, M
    .venv/bin/python bench/bench_weights_scale.py --refresh lazy --guard none holdout   # the default guard's cost
    .venv/bin/python bench/bench_weights_scale.py --sweep         # recall of planted items vs lr / steps / l2 / k

With --baseline-src, a last learning process imports gradtrace from that source tree (e.g. an older commit's `git
archive` of src/) and learns with its lazy refresh, so an older version and this one are measured in the same run on
the same problem. The scale run generates a planted problem (Ψ as a .npy memmap in --workdir) in one subprocess and
learns in a fresh one per refresh mode, one after the other (so their ratio is measured under the same load), so the
reported peak RSS (ru_maxrss) is the learner's own (it includes the pages of Ψ it touched). The last columns compare
each run with the first (by default the old exact path): largest weight difference and the number of queries whose
top-10 at the learned weights is the same set. Results are printed as markdown for docs/benchmarks.md.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from common import PLANTED_SCALE as SCALE, write_planted
from gradtrace.methods.fitted import FittedMethod
from gradtrace.weights import learn_weights
from gradtrace.weights.defaults import DEFAULT_K, DEFAULT_L2, DEFAULT_LR, DEFAULT_STEPS

QUICK = dict(n_train=5_000, n_queries=50, n_groups=50, dim=512, signal_dim=32, strength=30.0)  # smoke run


def learn(workdir: Path, refresh: str, guard: str = "none") -> dict:
    start = time.perf_counter()
    psi = np.load(workdir / "psi.npy", mmap_mode="r")
    fitted = FittedMethod(psi=psi, group_slices=json.loads((workdir / "slices.json").read_text()), info={})
    queries = np.load(workdir / "queries.npy")
    result = learn_weights(fitted, queries, refresh=refresh, progress=False,
                           **({} if guard == "none" else {"guard": guard}))
    wall = time.perf_counter() - start
    usage = resource.getrusage(resource.RUSAGE_SELF)
    peak = usage.ru_maxrss * 1024  # Linux reports KiB
    planted = np.load(workdir / "planted.npy")
    top, _ = fitted.topk(queries, 10, weights=result.weights)
    import gradtrace
    return {"wall_s": wall, "cpu_s": usage.ru_utime + usage.ru_stime, "peak_rss_bytes": peak,
            "source": str(Path(gradtrace.__file__).resolve().parents[1]),
            "info": result.info, "w_signal": float(result.weights[0]), "weights": result.weights.tolist(),
            "top10": top.tolist(),
            "recall_uniform": recall(planted, fitted.topk(queries, 10)[0]), "recall_learned": recall(planted, top)}


def recall(planted: np.ndarray, top: np.ndarray) -> float:
    """Fraction of each query's planted rows in its top rows, averaged over queries. The learning process uses
    only what every gradtrace version has (FittedMethod, learn_weights), so --baseline-src may be an older tree."""
    return float(np.mean([np.isin(p, t).mean() for p, t in zip(planted, top)]))


HEADER = ("| N | Q | M | refresh | wall s (CPU s) | precompute s (ΨᵀΨ / G) | steps s | passes (query refreshes) | "
          "misses undone (rollbacks) | peak RSS GB | final loss | max abs Δw vs first row | top-10 same as first row | "
          "w_signal | recall@10 uniform → learned |")


def run_spec(spec: dict, refreshes: list[str], workdir: str | None, baseline_src: str | None = None,
             guards: tuple[str, ...] = ("none",)) -> list[dict]:
    """Generate the planted problem `spec` in one subprocess, then learn in a fresh one per refresh mode and guard
    (last, with `baseline_src`, one with gradtrace imported from that source tree)."""
    out = []
    runs = [(refresh if guard == "none" else f"{refresh}, guard {guard}", refresh, guard, None)
            for refresh in refreshes for guard in guards]
    if baseline_src:
        runs.append((f"lazy ({Path(baseline_src).resolve().parent.name})", "lazy", "none", baseline_src))
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        me = [sys.executable, __file__, "--spec", json.dumps(spec)]
        t0 = time.perf_counter()
        subprocess.run(me + ["--generate", tmp], check=True)
        print(f"generated {spec} in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
        for label, refresh, guard, src in runs:
            env = dict(os.environ, **({"PYTHONPATH": str(Path(src).resolve())} if src else {}))
            load = os.getloadavg()[0]
            r = json.loads(subprocess.run(me + ["--learn", tmp, "--refresh", refresh, "--guard", guard], check=True,
                                          env=env, capture_output=True, text=True).stdout)
            r["refresh"], r["load_before"], r["load_after"] = label, load, os.getloadavg()[0]
            out.append(r)
            print(row(r, out[0]), flush=True)
    return out


def row(r: dict, first: dict) -> str:
    info, sec, pool = r["info"], r["info"]["seconds"], r["info"].get("pool", {})
    misses = (f"{pool.get('misses_found')} ({pool.get('rollbacks')})" if "rollbacks" in pool else "– (proved)")
    if "shortlist_rollbacks" in pool:
        misses += f"; shortlist {pool['shortlist_misses']} ({pool['shortlist_rollbacks']})"
    dw = np.abs(np.asarray(r["weights"]) - np.asarray(first["weights"])).max()
    same = sum(set(a) == set(b) for a, b in zip(r["top10"], first["top10"]))
    return (f"| {info['N']} | {info['Q']} | {info['M']} | {r['refresh']} | {r['wall_s']:.1f} ({r['cpu_s']:.1f}) | "
            f"{sec['precompute']:.1f} ({sec.get('psi_gram', 0):.1f} / {sec.get('query_grams', 0):.1f}) | "
            f"{sec['steps']:.1f} | {pool.get('passes')} ({pool.get('queries_refreshed')}) | {misses} | "
            f"{r['peak_rss_bytes'] / 1e9:.2f} | {info['final_loss']:.8f} | {dw:.1e} | {same}/{len(r['top10'])} | "
            f"{r['w_signal']:.3f} | {r['recall_uniform']:.3f} → {r['recall_learned']:.3f} |")


SCALING = [dict(SCALE, n_train=n, n_queries=q, n_groups=m) for n, q, m in
           [(25_000, 250, 200), (50_000, 250, 200), (100_000, 250, 200),      # N
            (25_000, 500, 200), (25_000, 1000, 200),                        # Q (with the first)
            (25_000, 250, 50), (25_000, 250, 100)]]                         # M (with the first)


def scale(args: argparse.Namespace) -> None:
    specs = [QUICK] if args.quick else (SCALING if args.scaling else [SCALE])
    print(f"started {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}; {os.cpu_count()} cores, "
          f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}")
    print(HEADER)
    print("|" + "---|" * HEADER.count(" |"))
    results = [run_spec(spec, args.refresh, args.workdir, args.baseline_src, tuple(args.guard)) for spec in specs]
    for runs in results:
        for r in runs:
            info = r["info"]
            print(f"N={info['N']} Q={info['Q']} M={info['M']} {r['refresh']} ({r['source']}): uniform loss "
                  f"{info['uniform_loss']:.8f}, final loss {info['final_loss']:.10f}, "
                  f"1-min load average {r['load_before']:.1f} → {r['load_after']:.1f}, pool {info.get('pool')}")
    print(f"finished {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}")


# ---- the sweep ------------------------------------------------------------------------------------
SWEEP_PROBLEMS = {
    "M=20": dict(n_train=3000, n_queries=80, n_groups=20, dim=256, signal_dim=16, strength=12.0),
    "M=200": dict(n_train=4000, n_queries=80, n_groups=200, dim=2048, signal_dim=32, strength=30.0),
}


def sweep(args: argparse.Namespace) -> None:
    from gradtrace.weights.planted import planted_problem, planted_recall

    print("| problem | k | lr | steps | l2 | w_signal | held-out recall@10 | learning loss |")
    print("|---|---|---|---|---|---|---|---|")
    for name, spec in SWEEP_PROBLEMS.items():
        prob = planted_problem(**spec, seed=3)
        half = spec["n_queries"] // 2
        learn_q, eval_q, eval_planted = prob.queries[:half], prob.queries[half:], prob.planted[half:]
        base = planted_recall(prob.fitted, eval_q, eval_planted, None, 10)
        print(f"| {name} | – | uniform | 0 | – | {1 / spec['n_groups']:.3f} | {base:.3f} | – |")
        grid = [(DEFAULT_K, lr, steps, DEFAULT_L2) for lr in (0.01, 0.03, 0.05, 0.1, 0.3)
                for steps in (25, 50, 100, 200, 400)]
        grid += [(DEFAULT_K, DEFAULT_LR, DEFAULT_STEPS, l2) for l2 in (0.01, 0.1, 1.0)]
        grid += [(k, DEFAULT_LR, DEFAULT_STEPS, DEFAULT_L2) for k in (5, 20, 50)]
        for k, lr, steps, l2 in grid:
            res = learn_weights(prob.fitted, learn_q, k=k, lr=lr, steps=steps, l2=l2, progress=False,
                                memory_budget_bytes=2**31)
            rec = planted_recall(prob.fitted, eval_q, eval_planted, res.weights, 10)
            print(f"| {name} | {k} | {lr} | {steps} | {l2} | {res.weights[0]:.3f} | {rec:.3f} | "
                  f"{res.info['final_loss']:.4f} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sweep", action="store_true")
    parser.add_argument("--refresh", nargs="+", default=["exact", "lazy"], choices=["lazy", "exact", "fast"],
                        help="refresh modes to learn with, in this order, on the same problem (default: old, new)")
    parser.add_argument("--scaling", action="store_true", help="the lazy path on three sizes each of N, Q and M")
    parser.add_argument("--guard", nargs="+", default=["none"], choices=["none", "holdout"],
                        help="learn once per guard (holdout: the stages' default guard, `learn-weights --guard auto`)")
    parser.add_argument("--baseline-src", default=None,
                        help="learn last with gradtrace imported from this source tree (its lazy path), e.g. an "
                             "older commit's src/, to compare it with this tree in the same run")
    parser.add_argument("--spec", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--quick", action="store_true", help="a small smoke run (N=5000, Q=50, M=50)")
    parser.add_argument("--workdir", default=None, help="where the temporary Ψ memmap goes (default: system tmp)")
    parser.add_argument("--generate", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--learn", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.generate:
        write_planted(Path(args.generate), json.loads(args.spec))
    elif args.learn:
        print(json.dumps(learn(Path(args.learn), args.refresh[0], args.guard[0]), default=float))
    elif args.sweep:
        sweep(args)
    else:
        scale(args)


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    main()
