#!/usr/bin/env python
"""Classifier benchmark on digits: the LDS of TracIn, TRAK (shared / per-group kernel) and EK-FAC × uniform /
learned weights for a small ResNet and a small ViT, with paired 95% CIs, and the mislabel-detection AUC table for
the same methods (uniform vs learned).

    python bench/bench_classifier.py --out bench_out/classifier             # full: sized for 90 min on 2 cores
    python bench/bench_classifier.py --quick --out bench_out/classifier_q   # smoke run, a few minutes

Protocol, per model (`resnet`: BasicBlock stages [16, 32, 64], 78k parameters; `vit`: patch 2, width 32, 2 layers,
18k; both the adapter's defaults): trained with the classifier recipe (AdamW, warm-up + cosine) for `steps` steps
on n_train digits (a seeded split); the rest of digits is split into evaluation queries (`n_heldout`) and learning
queries (`n_learn`), never overlapping. Features: margin gradients (TRAK's output function for classifiers),
Rademacher-projected per `block` group to `dim` columns. LDS (DESIGN §3): S subsets at α = 0.5 retrained with the
same recipe; the target of a query is its margin under each subset model; LDS = mean over queries of the
per-query Spearman correlation, bootstrap 95% CI over queries; paired differences learned − uniform per query.
λ scale c = "auto" (SNR-best on the learning queries) per method, shared by its uniform and learned rows. Learned
weights: learned on the learning queries (`bench_lds.learned_weights`: as `learn-weights`, each guard of
`GUARD_ROWS`). Mislabel detection (`gradtrace eval mislabel`): 10% of the training labels flipped (seeded), the
same recipe trained on them (once; shared by the measurements), self-influence at the corrupted labels of the
margin and of the cross-entropy (`mislabel_measurements`), ROC AUC and the fraction found in the top
10% with bootstrap CIs over training examples (paired for learned − uniform); its learning queries are the same
held-out learning images. EK-FAC (kronfluence on the model, `ekfac_rows`): factors fitted on the training set,
damping c · mean(Λ) with c label-free on the learning images, weights learned from their per-group contributions
(as `learn-weights-ekfac`); its mislabel rows come from `eval mislabel --methods ...,ekfac` (MISLABEL_OWN). Each
row's time is its own scoring (fit, λ choice, weight learning, scores; EK-FAC's uniform row includes its factors).

Rows for other methods: add (method, kernel) to METHODS once `gradtrace.methods` and `eval mislabel` know it, or
append a function to ROW_HOOKS (see `run_hooks`), as `ekfac_rows` is.

A rerun into the same --out reuses the runs, stores, retrained models and mislabel work. Torch runs
single-threaded here; the retraining uses `workers` single-threaded processes. --set KEY=VALUE overrides a setting.
The quick run prints an estimate of the full run's time from its own measured step and featurization rates.
"""
from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np

from common import GUARD_ROWS, Clock, bench_main, fmt_summary as _fmt, learned_weights

N_DIGITS = 1797
MODELS = {"resnet": {}, "vit": {}}  # --model-options of each (the adapter's defaults)
METHODS = [("tracin", "identity"), ("trak", "shared"), ("trak", "per-group")]
PROJECTION = "rademacher"  # the documented protocol's features (pinned: not the library's default)
MISLABEL_OWN = ["ekfac"]  # `eval mislabel` methods with their own self-influence provider (not on the stores)
# Each hook: hook(ctx) -> {"rows": [LDS rows as `row` builds them], "paired": [...], "mislabel": [rows]}; ctx holds
# the model name, run, stores, LDS problem, settings and output folder (see `_run_model`).
ROW_HOOKS: list[Callable[[dict], dict]] = []
SETTINGS = {
    "full": {"n_train": 1000, "steps": 500, "batch_size": 64, "subsets": 64, "fraction": 0.5, "seeds": 1,
             "workers": 2, "n_heldout": 100, "n_learn": 100, "dim": 2048, "learn_steps": 200, "split_seed": 0,
             "c": "auto", "flip_fraction": 0.1, "flip_seed": 0, "bootstrap": 1000, "threads": 1,
             "models": "resnet,vit", "mislabel_measurements": "margin,loss"},
    "quick": {"n_train": 120, "steps": 40, "batch_size": 64, "subsets": 4, "fraction": 0.5, "seeds": 1,
              "workers": 1, "n_heldout": 12, "n_learn": 12, "dim": 128, "learn_steps": 20, "split_seed": 0,
              "c": "auto", "flip_fraction": 0.1, "flip_seed": 0, "bootstrap": 200, "threads": 1,
              "models": "resnet,vit", "mislabel_measurements": "margin,loss"},
}


def splits(s: dict) -> dict[str, np.ndarray]:
    perm = np.random.default_rng(s["split_seed"]).permutation(N_DIGITS)
    a, b = s["n_train"], s["n_train"] + s["n_heldout"]
    return {"train": np.sort(perm[:a]), "heldout": np.sort(perm[a:b]), "learn": np.sort(perm[b:b + s["n_learn"]])}


def run_hooks(ctx: dict) -> dict:
    out = {"rows": [], "paired": [], "mislabel": []}
    for hook in ROW_HOOKS:
        for key, value in hook(ctx).items():
            out[key] += value
    return out


def _run_model(name: str, out: Path, s: dict, ids: dict, timings: dict, progress: bool) -> dict:
    from gradtrace.adapters import get_adapter
    from gradtrace.attribution import fit_method, resolve_learning_c
    from gradtrace.evaluate import load_problem, retrain_run, summarize
    from gradtrace.evaluate.mislabel import mislabel_run
    from gradtrace.features.featurize import FeatureSpec
    from gradtrace.pipeline import FeaturizeSpec, TrainSpec, featurize_run, train_run
    from gradtrace.weights.defaults import DEFAULT_K

    clock = Clock("bench-classifier", timings)

    def stage(label, fn, *a, **kw):  # timed as "NAME label"
        return clock.stage(f"{name} {label}", fn, *a, **kw)

    out.mkdir(parents=True, exist_ok=True)
    run = str(stage("train", train_run, TrainSpec(
        data="digits", adapter="classifier", model=name, model_options=json.dumps(MODELS[name]),
        ids=ids["train"], steps=s["steps"], batch_size=s["batch_size"], out=str(out / "run")), progress=progress))
    stores = {}
    for part in ("train", "heldout", "learn"):
        where = {} if part == "train" else {"data": "digits", "ids": ids[part]}
        stores[part] = stage("featurize", featurize_run, FeaturizeSpec(
            checkpoint=run, out=str(out / "features" / part), projection=PROJECTION, dim=s["dim"], **where),
            progress=progress)
    retrain = stage("retrain", retrain_run, run, out / "retrain", n_subsets=s["subsets"], fraction=s["fraction"],
                    n_seeds=s["seeds"], workers=s["workers"], progress=progress)
    problem = stage("model outputs", load_problem, run, out / "retrain", stores["train"], stores["heldout"],
                    progress=progress)

    def per_query(scores: np.ndarray) -> np.ndarray:
        return np.array([np.nan if v is None else v for v in problem.evaluate(scores)["per_query"]])

    rows, paired = [], []
    for method, kernel in METHODS:
        t = time.perf_counter()
        kernel_arg = "shared" if kernel == "identity" else kernel
        c, _ = resolve_learning_c(stores["train"], stores["learn"], method, kernel_arg, s["c"],
                                  min(DEFAULT_K, s["n_train"]))
        fitted = fit_method(stores["train"], method, kernel=kernel_arg, c=c, progress=False)
        q = np.asarray(stores["heldout"].features)
        uniform = per_query(fitted.scores(q))
        rows.append({"model": name, "method": method, "kernel": kernel, "weights": "uniform", "c": c,
                     "lds": summarize(uniform), "seconds": round(time.perf_counter() - t, 2)})
        for guard in GUARD_ROWS:
            t = time.perf_counter()
            w, record = learned_weights(stores, out / "weights", method, kernel, c, s["learn_steps"], guard)
            pq = per_query(fitted.scores(q, weights=w))
            rows.append({"model": name, "method": method, "kernel": kernel, "weights": record["label"], "c": c,
                         "lds": summarize(pq), "seconds": round(time.perf_counter() - t, 2),
                         "learned_weights": record["weights"]})
            paired.append({"comparison": f"{name} {method} ({kernel}): {record['kind']} − uniform",
                           "delta": summarize(pq - uniform)})
    methods = ",".join([m if k == "identity" else f"{m}:{k}" for m, k in METHODS] + MISLABEL_OWN)
    mislabel, first = [], None
    for measurement in s["mislabel_measurements"].split(","):
        folder = out / f"mislabel-{measurement}"
        if first is not None and not (folder / "model").exists():  # the same flips and recipe: the same model
            shutil.copytree(first / "model", folder / "model")
        ml = stage("mislabel", mislabel_run, run, folder, fraction=s["flip_fraction"], flip_seed=s["flip_seed"],
                   methods=methods, feature_spec=FeatureSpec(projection=PROJECTION, total_dim=s["dim"],
                                                            measurement=measurement),
                   learning_ids=ids["learn"], learn_steps=s["learn_steps"], n_bootstrap=s["bootstrap"],
                   progress=progress)
        first = first or folder
        mislabel += [{"model": name, "measurement": measurement,
                      **{k: r[k] for k in ("method", "kernel", "c", "scores", "paired", "seconds")}}
                     for r in ml["results"]]
    extra = run_hooks({"model": name, "run": run, "stores": stores, "problem": problem, "settings": s, "out": out,
                       "per_query": per_query})
    wall = list(retrain.get("model_wall_s", {}).values())
    return {"rows": rows + extra["rows"], "paired": paired + extra["paired"], "mislabel": mislabel + extra["mislabel"],
            "n_flipped": ml["manifest"]["n_flipped"], "retrain_model_s_mean": float(np.mean(wall)) if wall else None,
            "params": sum(p.numel() for p in get_adapter("classifier").load(run).model.parameters())}


def ekfac_rows(ctx: dict) -> dict:
    """EK-FAC (kronfluence) × uniform / learned weights, as `learn-weights`/`attribute --method ekfac` do it:
    factors fitted on the model's training set (OUT/ekfac-factors), the true Fisher; damping c · mean(Λ) with c
    label-free on the learning images (`--lambda-c auto`), shared by the uniform and learned rows; weights learned
    from the learning images' per-group contributions (each guard of GUARD_ROWS, saved in OUT/weights); the
    held-out queries' scores Σ_j w_j c_j(q, n) of their margin. The uniform row's time includes the factors."""
    from gradtrace.attribution import choose_model_c
    from gradtrace.data.sources import dataset_source
    from gradtrace.evaluate import summarize
    from gradtrace.io import command_line
    from gradtrace.methods import get_method
    from gradtrace.weights import DEFAULT_K, learn_weights_dense, save_weights

    name, s, stores, out, per_query = ctx["model"], ctx["settings"], ctx["stores"], ctx["out"], ctx["per_query"]
    t = time.perf_counter()
    train = stores["train"]
    method = get_method("ekfac", groups=train.settings["groups_spec"],
                        measurement=train.settings["measurement"]["name"])
    ek = method.session(ctx["run"], default_factors=out / "ekfac-factors", progress=False).fit()
    digits = dataset_source("digits", n=None, size=None, seed=0)
    learning, heldout = (ek.examples(digits, np.asarray(stores[key].ids)) for key in ("learn", "heldout"))
    for got, store in ((ek.train, train), (learning, stores["learn"]), (heldout, stores["heldout"])):
        if not np.array_equal(got.ids, store.ids):  # the LDS problem's rows and columns are in the stores' order
            raise RuntimeError(f"{name}: EK-FAC examples are not in the order of {store.path}")
    k = min(DEFAULT_K, len(train.ids))
    c, grid, learn_contrib = choose_model_c(ek, learning, k)
    contrib = ek.contributions(heldout, c)
    uniform = per_query(contrib.sum(-1))
    rows = [{"model": name, "method": "ekfac", "kernel": "ekfac", "weights": "uniform", "c": c, "lambda_grid": grid,
             "lds": summarize(uniform), "seconds": round(time.perf_counter() - t, 2)}]
    paired = []
    for guard in GUARD_ROWS:
        t = time.perf_counter()
        result = learn_weights_dense(learn_contrib, ek.group_names, k=k, steps=s["learn_steps"], guard=guard,
                                     progress=False)
        w = np.asarray(result.weights, dtype=np.float64)
        pq = per_query(contrib @ w)
        kind = "learned" if guard == "none" else "guarded"
        shrink = (result.info.get("guard") or {}).get("shrink")
        save_weights(out / "weights" / f"ekfac{'' if guard == 'none' else '-guarded'}.json", result,
                     {"command": command_line(), "method": "ekfac", "kernel": "ekfac", "lambda_c": c,
                      "identity": ek.identity, "measurement": ek.measurement, "learner": result.info})
        rows.append({"model": name, "method": "ekfac", "kernel": "ekfac", "c": c, "lds": summarize(pq),
                     "weights": kind if shrink is None else f"{kind} (shrink {shrink:g})",
                     "seconds": round(time.perf_counter() - t, 2),
                     "learned_weights": dict(zip(result.group_names, w.tolist()))})
        paired.append({"comparison": f"{name} ekfac (ekfac): {kind} − uniform", "delta": summarize(pq - uniform)})
    return {"rows": rows, "paired": paired}


ROW_HOOKS.append(ekfac_rows)


def estimate_full_minutes(results: dict) -> float | None:
    """The full settings' time from this run's measured rates: per-model step time × the full run's training steps
    (full model, subsets over `workers`, mislabel model) + featurization per example × its examples + scoring
    (on the stores: × N and the dimension; EK-FAC on the model: × the examples)."""
    s, full = results["settings"], SETTINGS["full"]
    total = 0.0
    for name, m in results["models"].items():
        t = results["timings_s"]
        if m["retrain_model_s_mean"] is None:
            return None
        per_step = m["retrain_model_s_mean"] / s["steps"]
        train_steps = full["steps"] * (2 + full["subsets"] * full["seeds"] / full["workers"])
        k = len(s["mislabel_measurements"].split(","))
        n_feat = s["n_train"] + s["n_heldout"] + s["n_learn"] + k * (s["n_train"] + s["n_learn"])
        feat_s = t.get(f"{name} featurize", 0.0) + t.get(f"{name} mislabel", 0.0) - per_step * s["steps"]
        per_example = max(0.0, feat_s) / n_feat
        rows = m["rows"] + m["mislabel"]
        scoring = sum(r["seconds"] for r in rows if r["method"] != "ekfac")
        model_scoring = sum(r["seconds"] for r in rows if r["method"] == "ekfac")  # gradients of every example
        k_full = len(full["mislabel_measurements"].split(","))
        total += per_step * train_steps + per_example * (full["n_train"] + full["n_heldout"] + full["n_learn"]
                                                         + k_full * (full["n_train"] + full["n_learn"]))
        total += scoring * (full["n_train"] / s["n_train"]) * (full["dim"] / s["dim"])
        examples = [x["n_train"] + x["n_heldout"] + x["n_learn"] for x in (full, s)]
        total += model_scoring * examples[0] / examples[1]
    return round(total / 60.0, 1)


def run_bench(out, s: dict, *, progress: bool = True) -> dict:
    import torch

    from gradtrace.io import versions, write_json_atomic

    threads = torch.get_num_threads()
    torch.set_num_threads(int(s["threads"]))
    start = time.perf_counter()
    timings: dict[str, float] = {}
    out = Path(out)
    ids = splits(s)
    try:
        models = {name: _run_model(name, out / name, s, ids, timings, progress)
                  for name in s["models"].split(",")}
    finally:
        torch.set_num_threads(threads)
    results = {"settings": s, "models": models, "timings_s": timings, "wall_s": round(time.perf_counter() - start, 1),
               "splits": {k: len(v) for k, v in ids.items()}, "methods": METHODS, "guard_rows": GUARD_ROWS,
               "versions": versions(),
               "command": " ".join(["python", *sys.argv])}
    results["estimated_full_minutes"] = estimate_full_minutes(results)
    results["markdown"] = markdown(results)
    write_json_atomic(out / "results.json", results)
    (out / "results.md").write_text(results["markdown"] + "\n")
    return results


def _signed(summary: dict, key: str = "auc") -> str:
    lo, hi = summary[f"{key}_ci95"]
    return f"{summary[key]:+.3f}" + ("" if lo is None else f" [{lo:+.3f}, {hi:+.3f}]")


def _cell(summary: dict, key: str) -> str:
    lo, hi = summary[f"{key}_ci95"]
    return f"{summary[key]:.3f}" + ("" if lo is None else f" [{lo:.3f}, {hi:.3f}]")


def _excludes_zero(ci) -> str:
    return "—" if ci[0] is None else ("yes" if ci[0] > 0 or ci[1] < 0 else "no")


def markdown(results: dict) -> str:
    s = results["settings"]
    lines = [f"Classifiers on digits: {s['n_train']} training images, {s['steps']} steps; LDS over {s['n_heldout']} "
             f"held-out queries, {s['subsets']} subsets at α = {s['fraction']}; {s['n_learn']} held-out learning "
             f"queries; features {s['dim']}-dim Rademacher-projected margin gradients, `block` groups. EK-FAC: "
             "kronfluence on the model itself (no projection), damping c · mean(Λ).", "",
             "| model | params | method | kernel | weights | λ scale c | LDS (95% CI) | undefined | s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, m in results["models"].items():
        for r in m["rows"]:
            c = "-" if not r.get("c") else f"{r['c']:g}"
            lines.append(f"| {name} | {m['params']} | {r['method']} | {r['kernel']} | {r['weights']} | {c} | "
                         f"{_fmt(r['lds'])} | {r['lds']['n_undefined']} | {r['seconds']} |")
    lines += ["", "Paired LDS differences (per query; bootstrap 95% CI over queries):", "",
              "| comparison | Δ LDS (95% CI) | CI excludes 0 |", "|---|---|---|"]
    for m in results["models"].values():
        for d in m["paired"]:
            lines.append(f"| {d['comparison']} | {_fmt(d['delta'])} | {_excludes_zero(d['delta']['ci95'])} |")
    frac = s["flip_fraction"]
    lines += ["", f"Mislabel detection: {100 * frac:g}% of the training labels flipped; self-influence ranks the "
              "training set (flipped = positive); bootstrap 95% CIs over training examples, paired for Δ.", "",
              "| model | measurement | method | kernel | AUC uniform | AUC learned | Δ AUC (paired) | Δ excludes 0 | "
              "top-10% found uniform | learned | Δ found (paired) | s |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, m in results["models"].items():
        for r in m["mislabel"]:
            u, lw, d = r["scores"]["uniform"], r["scores"]["learned"], r["paired"]["learned - uniform"]
            lines.append(f"| {name} | {r['measurement']} | {r['method']} | {r['kernel']} | {_cell(u, 'auc')} | "
                         f"{_cell(lw, 'auc')} | "
                         f"{_signed(d)} | {_excludes_zero(d['auc_ci95'])} | {_cell(u, 'top_found')} | "
                         f"{_cell(lw, 'top_found')} | {_signed(d, 'top_found')} | {r['seconds']} |")
    lines += ["", "Timings (s): " + ", ".join(f"{k} {v}" for k, v in results["timings_s"].items()),
              f"Wall: {results['wall_s']} s; estimated full run from these rates: "
              f"{results.get('estimated_full_minutes')} min."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    return bench_main(argv, __doc__, "classifier", "tiny settings (a few minutes)", run_bench, SETTINGS)


if __name__ == "__main__":
    sys.exit(main())
