#!/usr/bin/env python
"""LDS benchmark on digits: TracIn, TRAK, D-TRAK and DAS (shared / per-group kernel, uniform / learned weights)
against pixel-space and random baselines, the per-group LDS picture and a counterfactual check.

    python bench/bench_lds.py --out bench_out/lds            # full: 1,000 images, 64 subsets (84 min measured here)
    python bench/bench_lds.py --quick --out bench_out/lds_q  # tiny settings, about a minute

Protocol (DESIGN §3): the tiny unconditional UNet trained with the default recipe, shortened to 1,250 steps,
on n_train digits (a seeded split); S subsets at α = 0.5 retrained with the same recipe (R seeds). 1,250 rather
than the default 3,000 steps: with two workers on the two cores here one step takes about 94 ms per worker
(measured in the full run), so 64 subset models of 3,000 steps would take about 2.5 hours, and 1,500 steps
took 111 min in all, both over the 90-minute budget. Evaluation queries = held-out digits (ids not in
training) and generated samples (sample seed EVAL_SAMPLE_SEED); learning queries for the weights and for the
λ choice (c = auto) = other generated samples (LEARN_SAMPLE_SEED), never the evaluation queries. LDS = mean
over all evaluation queries of the per-query Spearman correlation, with a bootstrap 95% CI over queries. TRAK
is also scored on Kronecker (LoGra-style) features of the same loss, uniform weights, to compare the
projection kinds by LDS: at the same dimension (shared and per-group kernel) and at 4x the dimension
(per-group kernel only: a shared kernel over 8,178 columns cost 8 of the 90 minutes). Writes results.json and
results.md into --out and prints the markdown. A rerun into the same --out reuses the feature stores, the
retrained models (the retraining resumes model by model) and the cached model outputs. Torch runs
single-threaded in this process (the tiny model gains little from a second thread, and on shared cores
OpenMP spin-waits make two threads several times slower); the retraining uses `workers` single-threaded
processes. Override any setting with --set KEY=VALUE (e.g. --set threads=2 --set workers=4).
"""
from __future__ import annotations

import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

from common import (
    EVAL_SAMPLE_SEED,
    GUARD_ROWS,
    LEARN_SAMPLE_SEED,
    Clock,
    bench_main,
    fmt_summary,
    lds_tables,
    learned_weights,
)

N_DIGITS = 1797
SETTINGS = {
    "full": {"n_train": 1000, "steps": 1250, "batch_size": 64, "subsets": 64, "fraction": 0.5, "seeds": 1,
             "workers": 2, "n_heldout": 100, "n_samples": 100, "n_learn": 100, "sample_steps": 50, "dim": 2048,
             "timesteps": 10, "grid_timesteps": 10, "grid_draws": 4, "learn_steps": 200, "cf_queries": 5, "cf_k": 10,
             "split_seed": 0, "c": "auto", "threads": 1},
    "quick": {"n_train": 24, "steps": 4, "batch_size": 8, "subsets": 3, "fraction": 0.5, "seeds": 1, "workers": 1,
              "n_heldout": 3, "n_samples": 3, "n_learn": 4, "sample_steps": 2, "dim": 32, "timesteps": 1,
              "grid_timesteps": 2, "grid_draws": 1, "learn_steps": 5, "cf_queries": 1, "cf_k": 2, "split_seed": 0,
              "c": "auto", "threads": 1},
}
METHODS = [("tracin", "identity"), ("trak", "shared"), ("trak", "per-group"), ("dtrak", "shared"),
           ("dtrak", "per-group"), ("das", "shared"), ("das", "per-group")]
MEASUREMENT = {"dtrak": "dtrak", "das": "das"}  # the others differentiate the loss


def run_bench(out, s: dict, *, progress: bool = True) -> dict:
    """Run every stage into `out` (finished retrained models, features and outputs are reused)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(int(s["threads"]))  # 1 avoids OpenMP spin-waits when the cores are shared
    try:
        return _run_bench(out, s, progress=progress)
    finally:
        torch.set_num_threads(threads)


def _run_bench(out, s: dict, *, progress: bool = True) -> dict:
    from gradtrace.adapters import get_adapter
    from gradtrace.attribution import fit_method, resolve_learning_c
    from gradtrace.evaluate import counterfactual_run, counterfactual_table, load_problem, retrain_run, summarize
    from gradtrace.evaluate.outputs import OutputGrid, store_examples
    from gradtrace.features.featurize import FeatureSpec
    from gradtrace.features.store import FeatureStore
    from gradtrace.io import versions, write_json_atomic
    from gradtrace.methods import get_method
    from gradtrace.pipeline import FeaturizeSpec, SampleSpec, TrainSpec, featurize_run, sample_run, train_run
    from gradtrace.report.lds import plot_per_group
    from gradtrace.weights.defaults import DEFAULT_K

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    clock = Clock("bench-lds")
    timings, stage = clock.timings, clock.stage

    perm = np.random.default_rng(s["split_seed"]).permutation(N_DIGITS)
    train_ids = np.sort(perm[:s["n_train"]])
    heldout_ids = np.sort(perm[s["n_train"]:s["n_train"] + s["n_heldout"]])
    run = str(stage("train", train_run, TrainSpec(data="digits", out=str(out / "run"), ids=train_ids,
                                                  steps=s["steps"], batch_size=s["batch_size"]), progress=progress))
    stage("sample", sample_run, SampleSpec(checkpoint=run, out=str(out / "samples_eval"), num=s["n_samples"],
                                           sample_steps=s["sample_steps"], seed=EVAL_SAMPLE_SEED), progress=progress)
    stage("sample", sample_run, SampleSpec(checkpoint=run, out=str(out / "samples_learn"), num=s["n_learn"],
                                           sample_steps=s["sample_steps"], seed=LEARN_SAMPLE_SEED), progress=progress)
    sources = {"train": {}, "heldout": {"data": "digits", "ids": heldout_ids},
               "samples": {"samples": str(out / "samples_eval")}, "learn": {"samples": str(out / "samples_learn")}}

    def featurize_all(features: dict, f: Path) -> dict[str, FeatureStore]:
        return {name: stage("featurize", featurize_run, FeaturizeSpec(checkpoint=run, out=str(f / name), **features,
                                                                      **src), progress=progress)
                for name, src in sources.items()}

    stores: dict[str, dict[str, FeatureStore]] = {}
    for meas in ("loss", "dtrak", "das"):
        stores[meas] = featurize_all(dict(projection="rademacher", dim=s["dim"], timesteps=s["timesteps"],
                                          measurement=meas),
                                     out / "features" / meas)
    # Kronecker (LoGra-style) features of the loss, at the same and at 4x the dimension: TRAK rows only
    kron = {dim: featurize_all(dict(projection="kronecker", dim=dim, timesteps=s["timesteps"]),
                               out / "features" / f"kronecker{dim}") for dim in (s["dim"], 4 * s["dim"])}
    retrain = stage("retrain", retrain_run, run, out / "retrain", n_subsets=s["subsets"], fraction=s["fraction"],
                    n_seeds=s["seeds"], workers=s["workers"], progress=progress)
    grid = OutputGrid(num_timesteps=s["grid_timesteps"], num_draws=s["grid_draws"])
    sets = ("heldout", "samples")
    problems = {q: stage("model outputs", load_problem, run, out / "retrain", stores["loss"]["train"],
                         stores["loss"][q], grid=grid, progress=progress) for q in sets}

    def per_query(scores_by_set: dict) -> dict[str, np.ndarray]:
        return {q: np.array([np.nan if v is None else v for v in problems[q].evaluate(scores_by_set[q])["per_query"]])
                for q in sets}

    def row(label, kernel, weighting, pq: dict, seconds: float, c=None) -> dict:
        both = summarize(np.concatenate([pq[q] for q in sets]))
        return {"method": label, "kernel": kernel, "weights": weighting, "c": c, "lds": both,
                **{f"lds_{q}": summarize(pq[q]) for q in sets}, "seconds": round(seconds, 2)}

    rows, learned, fits, lambdas, paired, uniform_pq = [], {}, {}, {}, [], {}

    def both(pq: dict) -> np.ndarray:
        return np.concatenate([pq[q] for q in sets])

    for method, kernel in METHODS:
        t = time.perf_counter()
        meas = MEASUREMENT.get(method, "loss")
        kernel_arg = "shared" if kernel == "identity" else kernel
        # λ scale c: a number, or "auto" = the SNR-best c on the learning queries (never the evaluation ones)
        c, grid_table = resolve_learning_c(stores[meas]["train"], stores[meas]["learn"], method, kernel_arg, s["c"],
                                           min(DEFAULT_K, s["n_train"]))
        lambdas[f"{method}/{kernel}"] = {"c": c, "snr_grid": grid_table}
        fitted = fit_method(stores[meas]["train"], method, kernel=kernel_arg, c=c, progress=False)
        fits[(method, kernel)] = fitted
        qf = {q: np.asarray(stores[meas][q].features) for q in sets}
        uniform_pq[(method, kernel)] = per_query({q: fitted.scores(qf[q]) for q in sets})
        rows.append(row(method, kernel, "uniform", uniform_pq[(method, kernel)], time.perf_counter() - t, c))
        if kernel == "per-group":  # paired over queries: per-group minus shared kernel, uniform weights
            paired.append({"comparison": f"{method}: per-group − shared kernel (uniform)",
                           "delta": summarize(both(uniform_pq[(method, kernel)])
                                              - both(uniform_pq[(method, "shared")]))})
        if grid_table:  # diagnostic only: LDS at every c of the grid, to check the label-free choice
            tr = stores[meas]["train"]
            gram = get_method(method, c=grid_table[0][0], kernel=kernel_arg).gram(tr.features, tr.group_slices)
            for entry in grid_table:
                f_c = get_method(method, c=entry[0], kernel=kernel_arg).fit(
                    tr.features, tr.group_slices, gram=gram, row_scale=tr.row_scale if method == "das" else None)
                pq = per_query({q: f_c.scores(qf[q]) for q in sets})
                entry.append(summarize(np.concatenate([pq[q] for q in sets])))
        for guard in GUARD_ROWS:  # learned on the learning queries only, read back as `eval lds --weights` does
            t = time.perf_counter()
            w, record = learned_weights(stores[meas], out / "weights", method, kernel, c, s["learn_steps"], guard)
            learned[record["key"]] = record
            pq = per_query({q: fitted.scores(qf[q], weights=w) for q in sets})
            rows.append(row(method, kernel, record["label"], pq, time.perf_counter() - t, c))
            paired.append({"comparison": f"{method} ({kernel}): {record['kind']} − uniform",
                           "delta": summarize(both(pq) - both(uniform_pq[(method, kernel)]))})
    for kernel in ("shared", "per-group"):  # the published ordering: DAS >= D-TRAK at uniform weights
        paired.append({"comparison": f"das − dtrak ({kernel}, uniform)",
                       "delta": summarize(both(uniform_pq[("das", kernel)]) - both(uniform_pq[("dtrak", kernel)]))})
    widths = set()
    for dim, ks in kron.items():
        if ks["train"].features.shape[1] in widths:  # tiny settings: every group at its minimum width
            continue
        widths.add(ks["train"].features.shape[1])
        for kernel in ("shared", "per-group") if dim == s["dim"] else ("per-group",):
            t = time.perf_counter()
            c, _ = resolve_learning_c(ks["train"], ks["learn"], "trak", kernel, s["c"], min(DEFAULT_K, s["n_train"]))
            fitted = fit_method(ks["train"], "trak", kernel=kernel, c=c, progress=False)
            pq = per_query({q: fitted.scores(np.asarray(ks[q].features)) for q in sets})
            rows.append(row(f"trak, kronecker {ks['train'].features.shape[1]}-dim", kernel, "uniform", pq,
                            time.perf_counter() - t, c))
    t = time.perf_counter()
    adapter = get_adapter()
    model_config = adapter.load(run).model_config
    train_img = store_examples(adapter, model_config, stores["loss"]["train"]).images.flatten(1).double().numpy()
    pix, rnd = {}, {}
    for k, q in enumerate(sets):
        query_img = store_examples(adapter, model_config, stores["loss"][q]).images.flatten(1).double().numpy()
        pix[q] = -((query_img[:, None, :] - train_img[None]) ** 2).sum(-1)
        rnd[q] = np.random.default_rng(100 + k).normal(size=pix[q].shape)
    rows.append(row("pixel -L2", "-", "-", per_query(pix), time.perf_counter() - t))
    rows.append(row("random", "-", "-", per_query(rnd), 0.0))

    per_group = {}
    for key in (("trak", "per-group"), ("trak", "shared")):
        fitted = fits[key]
        names = fitted.group_names
        table = {}
        for j, name in enumerate(names):
            onehot = np.eye(len(names))[j]
            pq = per_query({q: fitted.scores(np.asarray(stores["loss"][q].features), weights=onehot) for q in sets})
            table[name] = summarize(np.concatenate([pq[q] for q in sets]))
        overall = next(r["lds"] for r in rows if (r["method"], r["kernel"], r["weights"]) == (*key, "uniform"))
        path = out / f"lds_per_group_{key[0]}_{key[1]}.png"
        plot_per_group(table, overall, path, f"LDS of each parameter group alone ({key[0]}, {key[1]} kernel), "
                       "digits, held-out + generated queries")
        per_group[f"{key[0]}/{key[1]}"] = {"groups": table, "plot": str(path)}

    cf_weights = learned["trak/per-group"]["path"] if "trak/per-group" in learned else None
    cf = stage("counterfactual", counterfactual_run, run, stores["loss"]["train"].path, stores["loss"]["heldout"].path,
               out / "counterfactual", method="trak", kernel="per-group", c=lambdas["trak/per-group"]["c"],
               weights_path=cf_weights,
               num_queries=s["cf_queries"], k=s["cf_k"], n_seeds=s["seeds"], workers=s["workers"], grid=grid,
               progress=progress)
    per_model = list(retrain.get("model_wall_s", {}).values())
    results = {"settings": s, "feature_spec": asdict(FeatureSpec(projection="rademacher", total_dim=s["dim"],
                                                                     num_timesteps=s["timesteps"])),
               "splits": {"train_ids_n": len(train_ids), "heldout_ids": heldout_ids.tolist(),
                          "eval_sample_seed": EVAL_SAMPLE_SEED, "learn_sample_seed": LEARN_SAMPLE_SEED},
               "rows": rows, "paired": paired, "lambda": lambdas, "learned_weights": learned or None,
               "per_group": per_group,
               "counterfactual": {"summary": cf["summary"], "per_query": cf["per_query"],
                                  "table": counterfactual_table(cf), "method": "trak per-group kernel",
                                  "weights": "learned" if cf_weights is not None else "uniform"},
               "timings_s": timings, "retrain_model_s_mean": float(np.mean(per_model)) if per_model else None,
               "versions": versions(), "command": " ".join(["python", *sys.argv])}
    results["markdown"] = markdown(results)
    write_json_atomic(out / "results.json", results)
    (out / "results.md").write_text(results["markdown"] + "\n")
    return results


def markdown(results: dict) -> str:
    s = results["settings"]
    lines = [f"LDS on digits: {s['n_train']} training images, {s['subsets']} subsets at α = {s['fraction']}, "
             f"{s['seeds']} seed(s); {s['n_heldout']} held-out + {s['n_samples']} generated evaluation queries.", "",
             *lds_tables(results["rows"], results.get("paired"))]
    grids = {key: v["snr_grid"] for key, v in results.get("lambda", {}).items() if v["snr_grid"]}
    if grids:
        keys = list(grids)
        lines += ["", "λ grid (uniform weights): SNR objective on the learning queries (lower is better; the "
                  "label-free rule picks its minimum, marked *) and, as a check only, LDS on the evaluation queries.",
                  "", "| c | " + " | ".join(f"{k} SNR loss | {k} LDS" for k in keys) + " |",
                  "|---|" + "---|---|" * len(keys)]
        for i, c in enumerate(g[0] for g in grids[keys[0]]):
            cells = []
            for k in keys:
                c_k, loss, lds = grids[k][i]
                star = "*" if c_k == results["lambda"][k]["c"] else ""
                cells.append(f"{loss:.4f}{star} | {fmt_summary(lds)}")
            lines.append(f"| {c:g} | " + " | ".join(cells) + " |")
    lines += ["", "Counterfactual (TRAK, per-group kernel): change of the query's loss when its top-k or k random "
              "training images are removed.", "", results["counterfactual"]["table"], "",
              "Timings (s): " + ", ".join(f"{k} {v}" for k, v in results["timings_s"].items())]
    return "\n".join(lines)



def main(argv: list[str] | None = None) -> int:
    return bench_main(argv, __doc__, "lds", "tiny settings (about a minute)", run_bench, SETTINGS)


if __name__ == "__main__":
    sys.exit(main())
