#!/usr/bin/env python
"""Where do learned weights gain on top of the per-group kernel? A sweep on the LDS-on-digits setup.

    python bench/bench_lds_sweep.py --lds bench_out/lds --out bench_out/lds_sweep

Reuses a finished `bench/bench_lds.py` folder (`--lds`): its trained model, the 64 retrained subset models and
their cached outputs on the evaluation queries, and its learning samples. Only features, kernels, damping and
weights change. For every feature configuration (group preset × projection) it featurizes the training set,
the evaluation queries (held-out digits + generated samples) and the learning samples, for the loss (TRAK) and
D-TRAK measurements, then scores TRAK and D-TRAK with the shared and the per-group kernel:

- uniform weights, λ scale c chosen without labels on the learning queries (as bench_lds);
- learned weights (the label-free objective on the learning queries, `learn-weights` defaults);
- per-group kernel only: per-group damping c_j chosen without labels (`weights/group_damping.py`), uniform and
  with weights learned on that kernel.

Paired differences (per evaluation query, bootstrap 95% CI) are learned − uniform within a configuration and
each configuration's rows against the block × Rademacher-2,048 default. Each row's time is its fit + learn +
score time; featurization time is per configuration. Writes results.json and results.md into --out.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from common import EVAL_SAMPLE_SEED

# (name, featurize options): the default (block, Rademacher 2,048) first; "exact" = unprojected gradients
CONFIGS = [
    ("block/rademacher-2048", dict(groups="block", projection="rademacher", dim=2048)),
    ("tensor/rademacher-2048", dict(groups="tensor", projection="rademacher", dim=2048)),
    ("tensor/exact", dict(groups="tensor", projection="identity", dim=2048)),
    ("block/exact", dict(groups="block", projection="identity", dim=2048)),
    ("block/rademacher-8192", dict(groups="block", projection="rademacher", dim=8192)),
    ("tensor/rademacher-8192", dict(groups="tensor", projection="rademacher", dim=8192)),
    ("module/rademacher-2048", dict(groups="module", projection="rademacher", dim=2048)),
    ("block/kronecker-8192", dict(groups="block", projection="kronecker", dim=8192)),
]
METHODS = {"trak": "loss", "dtrak": "dtrak"}
KERNELS = ("shared", "per-group")
# the learner's dense path (Q x N x M contributions, 115 MB at 144 groups) for every configuration: its scalable
# path keeps a k x k matrix, which exact gradients (k = 176,849) cannot afford
DENSE_BUDGET = 2**31


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lds", default="bench_out/lds", help="a finished bench_lds.py output folder")
    p.add_argument("--out", default="bench_out/lds_sweep")
    p.add_argument("--configs", default=None, help="comma-separated configuration names (default: all)")
    p.add_argument("--learn-steps", type=int, default=None, help="default: the LDS benchmark's")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    results = run_sweep(Path(args.lds), Path(args.out), args.configs, args.learn_steps, not args.no_progress)
    print(results["markdown"])
    print(f"\nresults: {Path(args.out) / 'results.json'}")
    return 0


def run_sweep(lds: Path, out: Path, only: str | None, learn_steps: int | None, progress: bool) -> dict:
    import torch

    from gradtrace.attribution import fit_method, resolve_learning_c
    from gradtrace.evaluate import load_problem, summarize
    from gradtrace.evaluate.outputs import OutputGrid
    from gradtrace.features.store import FeatureStore
    from gradtrace.io import versions, write_json_atomic
    from gradtrace.methods import TRAK
    from gradtrace.pipeline import FeaturizeSpec, featurize_run
    from gradtrace.weights import learn_weights
    from gradtrace.weights.defaults import DEFAULT_K
    from gradtrace.weights.group_damping import choose_group_lambda_scales

    torch.set_num_threads(1)
    old = json.loads((lds / "results.json").read_text())
    s = old["settings"]
    steps = int(learn_steps or s["learn_steps"])
    run = lds / "run"
    heldout_ids = np.asarray(old["splits"]["heldout_ids"])
    sources = {"train": {}, "heldout": {"data": "digits", "ids": heldout_ids},
               "samples": {"samples": str(lds / "samples_eval")}, "learn": {"samples": str(lds / "samples_learn")}}
    sets = ("heldout", "samples")
    grid = OutputGrid(num_timesteps=s["grid_timesteps"], num_draws=s["grid_draws"])
    base = {q: FeatureStore.open(lds / "features" / "loss" / q) for q in ("train", *sets)}
    problems = {q: load_problem(run, lds / "retrain", base["train"], base[q], grid=grid, progress=progress)
                for q in sets}
    k = min(DEFAULT_K, s["n_train"])
    configs = [c for c in CONFIGS if only is None or c[0] in only.split(",")]
    out.mkdir(parents=True, exist_ok=True)
    rows, per_query_all, feat_s = [], {}, {}

    def per_query(scores: dict) -> np.ndarray:
        return np.concatenate([np.array([np.nan if v is None else v
                                         for v in problems[q].evaluate(scores[q])["per_query"]]) for q in sets])

    def add(config, method, kernel, damping, weighting, pq, seconds, extra=None):
        key = f"{config}|{method}|{kernel}|{damping}|{weighting}"
        per_query_all[key] = pq
        rows.append({"config": config, "method": method, "kernel": kernel, "damping": damping,
                     "weights": weighting, "lds": summarize(pq), "seconds": round(seconds, 2), **(extra or {})})
        print(f"[sweep] {key}: {rows[-1]['lds']['mean']:.3f} ({seconds:.0f} s)", file=sys.stderr, flush=True)

    for name, options in configs:
        for method, meas in METHODS.items():
            t = time.perf_counter()
            folder = out / "features" / name.replace("/", "_") / meas
            st = {q: featurize_run(FeaturizeSpec(checkpoint=str(run), out=str(folder / q), measurement=meas,
                                                 timesteps=s["timesteps"], **options, **src), progress=progress)
                  for q, src in sources.items()}
            feat_s[f"{name}|{meas}"] = round(time.perf_counter() - t, 1)
            for q in sets:  # the same evaluation queries, in the same order, as the cached model outputs
                assert np.array_equal(np.asarray(st[q].ids), np.asarray(base[q].ids)), q
            train, learn = st["train"], np.asarray(st["learn"].features, dtype=np.float64)
            qf = {q: np.asarray(st[q].features) for q in sets}
            for kernel in KERNELS:
                if kernel == "shared" and train.features.shape[1] > 16384 and train.features.shape[0] > 16384:
                    continue
                t = time.perf_counter()
                c, _ = resolve_learning_c(train, st["learn"], method, kernel, "auto", k)
                fitted = fit_method(train, method, kernel=kernel, c=c, progress=False)
                uniform = per_query({q: fitted.scores(qf[q]) for q in sets})
                add(name, method, kernel, "global", "uniform", uniform, time.perf_counter() - t,
                        {"c": c, "groups": len(train.group_slices), "dim": int(train.features.shape[1])})
                t = time.perf_counter()
                w = learn_weights(fitted, learn, steps=steps, memory_budget_bytes=DENSE_BUDGET, progress=False).weights
                add(name, method, kernel, "global", "learned",
                    per_query({q: fitted.scores(qf[q], weights=w) for q in sets}), time.perf_counter() - t, {"c": c})
                if kernel != "per-group":
                    continue
                t = time.perf_counter()
                group_c, record = choose_group_lambda_scales(train.features, train.group_slices, learn, start_c=c,
                                                             method=method, k=k)
                damped = TRAK(c=c, kernel="per-group", group_c=group_c, name=method).fit(train.features,
                                                                                         train.group_slices)
                add(name, method, kernel, "per-group", "uniform",
                    per_query({q: damped.scores(qf[q]) for q in sets}), time.perf_counter() - t,
                    {"c": c, "damping_search": {k2: record[k2]
                                                for k2 in ("start_loss", "loss", "moves", "sweeps_run")}})
                t = time.perf_counter()
                w = learn_weights(damped, learn, steps=steps, memory_budget_bytes=DENSE_BUDGET, progress=False).weights
                add(name, method, kernel, "per-group", "learned",
                    per_query({q: damped.scores(qf[q], weights=w) for q in sets}), time.perf_counter() - t, {"c": c})
            write_json_atomic(out / "results.json", {"rows": rows, "featurize_s": feat_s, "partial": True})

    paired = []
    default = CONFIGS[0][0]
    for r in rows:
        key = f"{r['config']}|{r['method']}|{r['kernel']}|{r['damping']}|{r['weights']}"
        uni = f"{r['config']}|{r['method']}|{r['kernel']}|global|uniform"
        if key != uni and uni in per_query_all:
            paired.append({"comparison": f"{r['config']} {r['method']} ({r['kernel']}, {r['damping']} damping): "
                                         f"{r['weights']} − uniform (global damping)",
                           "delta": summarize(per_query_all[key] - per_query_all[uni])})
        ref = f"{default}|{r['method']}|{r['kernel']}|global|uniform"
        if r["config"] != default and ref in per_query_all:
            paired.append({"comparison": f"{r['config']} {r['method']} ({r['kernel']}, {r['damping']}, "
                                         f"{r['weights']}) − default uniform",
                           "delta": summarize(per_query_all[key] - per_query_all[ref])})
    results = {"lds": str(lds), "settings": s, "learn_steps": steps, "eval_sample_seed": EVAL_SAMPLE_SEED,
               "rows": rows, "paired": paired, "featurize_s": feat_s, "versions": versions(),
               "command": " ".join(sys.argv)}
    results["markdown"] = markdown(results)
    write_json_atomic(out / "results.json", results)
    (out / "results.md").write_text(results["markdown"] + "\n")
    return results


def markdown(results: dict) -> str:
    lines = ["| configuration | method | kernel | damping | weights | groups | dim | LDS (95% CI) | s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in results["rows"]:
        ci = r["lds"]["ci95"]
        lines.append(f"| {r['config']} | {r['method']} | {r['kernel']} | {r['damping']} | {r['weights']} | "
                     f"{r.get('groups', '')} | {r.get('dim', '')} | {r['lds']['mean']:.3f} "
                     f"[{ci[0]:.3f}, {ci[1]:.3f}] | {r['seconds']} |")
    lines += ["", "| paired difference | Δ LDS (95% CI) |", "|---|---|"]
    for p in results["paired"]:
        d = p["delta"]
        lines.append(f"| {p['comparison']} | {d['mean']:+.3f} [{d['ci95'][0]:+.3f}, {d['ci95'][1]:+.3f}] |")
    lines += ["", "Featurization (s, 4 stores per configuration and measurement): " +
              ", ".join(f"{k} {v}" for k, v in results["featurize_s"].items())]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
