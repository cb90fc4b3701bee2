"""Weight learning at scale, and the sweep behind the learner's defaults.

    .venv/bin/python bench/bench_weights_scale.py                 # N=100k, Q=1000, M=200, k=2048; defaults
    .venv/bin/python bench/bench_weights_scale.py --refresh fast  # the approximate pool refresh
    .venv/bin/python bench/bench_weights_scale.py --sweep         # recall of planted items vs lr / steps / l2 / k

The scale run generates a planted problem (Ψ as a .npy memmap in --workdir) in one subprocess and learns
in a fresh one, so the reported peak RSS (ru_maxrss) is the learner's own (it includes the pages of Ψ
it touched). Results are printed as markdown for docs/benchmarks.md.
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

from gradtrace.methods.fitted import FittedMethod
from gradtrace.weights import learn_weights
from gradtrace.weights.defaults import DEFAULT_K, DEFAULT_L2, DEFAULT_LR, DEFAULT_STEPS

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the planted problems are a test fixture
from fixtures.planted import planted_problem, planted_recall  # noqa: E402

SCALE = dict(n_train=100_000, n_queries=1000, n_groups=200, dim=2048, signal_dim=32, strength=45.0)
QUICK = dict(n_train=5_000, n_queries=50, n_groups=50, dim=512, signal_dim=32, strength=30.0)  # smoke run


def generate(workdir: Path, spec: dict) -> None:
    prob = planted_problem(spec["n_train"], spec["n_queries"], spec["n_groups"], spec["dim"],
                           signal_dim=spec["signal_dim"], strength=spec["strength"], seed=0,
                           psi_path=workdir / "psi.npy")
    np.save(workdir / "queries.npy", prob.queries)
    np.save(workdir / "planted.npy", prob.planted)
    (workdir / "slices.json").write_text(json.dumps(prob.fitted.group_slices))


def learn(workdir: Path, refresh: str) -> dict:
    start = time.perf_counter()
    psi = np.load(workdir / "psi.npy", mmap_mode="r")
    fitted = FittedMethod(psi=psi, group_slices=json.loads((workdir / "slices.json").read_text()), info={})
    queries = np.load(workdir / "queries.npy")
    result = learn_weights(fitted, queries, refresh=refresh, progress=False)
    wall = time.perf_counter() - start
    usage = resource.getrusage(resource.RUSAGE_SELF)
    peak = usage.ru_maxrss * 1024  # Linux reports KiB
    planted = np.load(workdir / "planted.npy")
    return {"wall_s": wall, "cpu_s": usage.ru_utime + usage.ru_stime, "peak_rss_bytes": peak,
            "info": result.info, "w_signal": float(result.weights[0]),
            "recall_uniform": planted_recall(fitted, queries, planted, None, 10),
            "recall_learned": planted_recall(fitted, queries, planted, result.weights, 10)}


def scale(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        me = [sys.executable, __file__] + (["--quick"] if args.quick else [])
        t0 = time.perf_counter()
        subprocess.run(me + ["--generate", tmp], check=True)
        print(f"generated the planted problem in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
        load_before = os.getloadavg()
        out = subprocess.run(me + ["--learn", tmp, "--refresh", args.refresh], check=True, capture_output=True,
                             text=True).stdout
        load_after = os.getloadavg()
    r = json.loads(out)
    info, sec, pool = r["info"], r["info"]["seconds"], r["info"].get("pool", {})
    print("| N | Q | M | k (features) | refresh | path | wall s (CPU s) | precompute s (ΨᵀΨ / G) | steps s | "
          "passes (query refreshes) | entrants | peak RSS GB | w_signal | recall@10 uniform → learned |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    print(f"| {info['N']} | {info['Q']} | {info['M']} | {(QUICK if args.quick else SCALE)['dim']} | {args.refresh} | {info['path']} | "
          f"{r['wall_s']:.1f} ({r['cpu_s']:.1f}) | {sec['precompute']:.1f} "
          f"({sec.get('psi_gram', 0):.1f} / {sec.get('query_grams', 0):.1f}) | {sec['steps']:.1f} | "
          f"{pool.get('passes')} ({pool.get('queries_refreshed')}) | "
          f"{pool.get('entrants_at_refresh')} | {r['peak_rss_bytes'] / 1e9:.2f} | {r['w_signal']:.3f} | "
          f"{r['recall_uniform']:.3f} → {r['recall_learned']:.3f} |")
    print(f"\nfinal loss {info['final_loss']:.5f}, uniform loss {info['uniform_loss']:.5f}, steps {info['steps']}, "
          f"lr {info['lr']}, l2 {info['l2']}, k {info['k']}; 1-min load average before/after the learning run: "
          f"{load_before[0]:.1f} / {load_after[0]:.1f} on {os.cpu_count()} cores")


# ---- the sweep ------------------------------------------------------------------------------------
SWEEP_PROBLEMS = {
    "M=20": dict(n_train=3000, n_queries=80, n_groups=20, dim=256, signal_dim=16, strength=12.0),
    "M=200": dict(n_train=4000, n_queries=80, n_groups=200, dim=2048, signal_dim=32, strength=30.0),
}


def sweep(args: argparse.Namespace) -> None:
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
    parser.add_argument("--refresh", default="lazy", choices=["lazy", "exact", "fast"])
    parser.add_argument("--quick", action="store_true", help="a small smoke run (N=5000, Q=50, M=50)")
    parser.add_argument("--workdir", default=None, help="where the temporary Ψ memmap goes (default: system tmp)")
    parser.add_argument("--generate", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--learn", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.generate:
        generate(Path(args.generate), QUICK if args.quick else SCALE)
    elif args.learn:
        print(json.dumps(learn(Path(args.learn), args.refresh), default=float))
    elif args.sweep:
        sweep(args)
    else:
        scale(args)


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    main()
