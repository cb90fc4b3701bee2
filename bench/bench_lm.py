#!/usr/bin/env python
"""Language-model benchmark on fortunes: the LDS and the tail-patch score of TracIn, TRAK (shared / per-group
kernel), LoGra and EK-FAC × uniform / learned group weights on the small `build-lm` GPT-2, with paired 95% CIs,
and the featurization cost against the forward + backward floor (full model and LoRA-only features).

    python bench/bench_lm.py --out bench_out/lm             # full: 8 min measured on the shared 2-core machine
    python bench/bench_lm.py --quick --out bench_out/lm_q   # smoke run, under a minute

Protocol: `build-lm` (2 blocks, width 64, context 64, byte-level BPE of 512 tokens trained on the fortunes) trained
`steps` steps (AdamW, lr `lr`, batch `batch_size`, `seq_len` tokens) on the first `n_train` fortunes; the next
`n_heldout` fortunes are the evaluation queries and the `n_learn` after them the learning queries (never
overlapping). Retrained once: `subsets` subsets at α = `fraction` (one seed), shared by every row. LDS target of a
query: minus its mean token loss under each subset model; LDS = mean over queries of the per-query Spearman
correlation, bootstrap 95% CI over queries, paired learned − uniform per query.

Rows (each: λ scale c = "auto", SNR-best on the learning queries with uniform weights, shared by its uniform and
learned rows; learned weights learned on the learning queries with the default recipe):
- TracIn, TRAK shared, TRAK per-group: `featurize` (Rademacher projection, `block` groups, `dim` columns);
- LoGra: `featurize --projection kronecker --groups module` (`dim` columns; "LoGra wide": `logra_wide_dim`) +
  TRAK's per-group kernel (one kernel per layer);
- EK-FAC: `learn-weights --method ekfac` (kronfluence factors, `block` groups) then
  `attribute --method ekfac --weights`; the uniform row is the sum of the same output's unweighted per-group
  contributions (same factors, same c).
With `guarded`, also the weights learned with the holdout guard (`--guard holdout`; LDS only). Each row's time is
its own scoring (c choice, fit, weight learning, scores); the shared feature stores' times are
listed with the other stage timings. Tail-patch (`eval tail-patch`): one SGD step (lr `tp_lr`) on each query's
top-`top_k` training fortunes under uniform and learned weights and on `top_k` random ones; mean increase of the
query's mean per-token log-likelihood with bootstrap CIs, paired learned − uniform. Featurization cost:
`bench_lm_featurize.measure` (256 fortunes at 64 tokens, block groups, 4,096 columns, one thread).

A rerun into the same --out reuses the model, stores and retrained models. Torch runs single-threaded here; the
retraining uses `workers` single-threaded processes. --set KEY=VALUE overrides a setting.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np

from common import Clock, bench_main, fmt_summary as _fmt, learned_weights, lm_featurization_cost

SETTINGS = {
    "full": {"n_train": 320, "n_heldout": 30, "n_learn": 50, "steps": 200, "batch_size": 16, "lr": 3e-3,
             "seq_len": 48, "subsets": 32, "fraction": 0.5, "workers": 2, "dim": 2048, "learn_steps": 200,
             "c": "auto", "top_k": 10, "tp_lr": 0.01, "ekfac_batch": 32, "bootstrap_seed": 0, "threads": 1,
             "featurize_cost": 1, "guarded": 1, "logra_wide_dim": 8192},
    "quick": {"n_train": 40, "n_heldout": 6, "n_learn": 8, "steps": 20, "batch_size": 8, "lr": 3e-3,
              "seq_len": 32, "subsets": 4, "fraction": 0.5, "workers": 1, "dim": 256, "learn_steps": 20,
              "c": "auto", "top_k": 3, "tp_lr": 0.01, "ekfac_batch": 16, "bootstrap_seed": 0, "threads": 1,
              "featurize_cost": 0, "guarded": 1, "logra_wide_dim": 1024},
}
STORE_ROWS = [("TracIn", "tracin", "identity", "rademacher"), ("TRAK shared", "trak", "shared", "rademacher"),
              ("TRAK per-group", "trak", "per-group", "rademacher"), ("LoGra", "trak", "per-group", "kronecker"),
              ("LoGra wide", "trak", "per-group", "kronecker-wide")]


def store_kinds(s: dict) -> dict[str, dict]:
    """Feature store name → its featurize settings (LoGra: Kronecker, one group and so one kernel per layer)."""
    kinds = {"rademacher": {"groups": "block", "projection": "rademacher", "dim": s["dim"]},
             "kronecker": {"groups": "module", "projection": "kronecker", "dim": s["dim"]}}
    if s["logra_wide_dim"]:
        kinds["kronecker-wide"] = {"groups": "module", "projection": "kronecker", "dim": s["logra_wide_dim"]}
    return kinds


def write_texts(out: Path, s: dict) -> dict[str, str]:
    from gradtrace.data.text import load_fortunes

    texts = load_fortunes().texts
    a, b, c = s["n_train"], s["n_train"] + s["n_heldout"], s["n_train"] + s["n_heldout"] + s["n_learn"]
    parts = {"train": texts[:a], "heldout": texts[a:b], "learn": texts[b:c]}
    out.mkdir(parents=True, exist_ok=True)
    specs = {}
    for name, part in parts.items():
        path = out / f"{name}.jsonl"
        body = "".join(json.dumps({"text": t}) + "\n" for t in part)
        if not path.exists() or path.read_text(encoding="utf-8") != body:
            path.write_text(body, encoding="utf-8")
        specs[name] = f"jsonl:{path.resolve()}"
    return specs


def _per_query(problem, scores: np.ndarray) -> np.ndarray:
    return np.array([np.nan if v is None else v for v in problem.evaluate(scores)["per_query"]])


def _tail(doc: dict) -> dict:
    return {k: v for k, v in doc["summary"].items()}


def store_rows(out: Path, s: dict, run: str, stores: dict, problem, clock: Clock, progress: bool):
    from gradtrace.attribution import fit_method, resolve_learning_c
    from gradtrace.evaluate import summarize
    from gradtrace.evaluate.tail_patch import tail_patch_run
    from gradtrace.weights.defaults import DEFAULT_K

    rows, paired, tails = [], [], []
    for label, method, kernel, projection in STORE_ROWS:
        if projection not in stores:
            continue
        st = stores[projection]
        t = time.perf_counter()
        kernel_arg = "shared" if kernel == "identity" else kernel
        c, _ = resolve_learning_c(st["train"], st["learn"], method, kernel_arg, s["c"], min(DEFAULT_K, s["n_train"]))
        fitted = fit_method(st["train"], method, kernel=kernel_arg, c=c, progress=False)
        q = np.asarray(st["heldout"].features)
        uniform = _per_query(problem, fitted.scores(q))
        rows.append({"row": label, "weights": "uniform", "c": c, "lds": summarize(uniform),
                     "seconds": round(time.perf_counter() - t, 2)})
        t = time.perf_counter()
        w, record = learned_weights(st, out / "weights" / projection, method, kernel, c, s["learn_steps"], "none")
        learned = _per_query(problem, fitted.scores(q, weights=w))
        rows.append({"row": label, "weights": "learned", "c": c, "lds": summarize(learned),
                     "seconds": round(time.perf_counter() - t, 2), "learned_weights": record["weights"]})
        paired.append({"row": label, "weights": "learned", "delta": summarize(learned - uniform)})
        if s["guarded"]:
            t = time.perf_counter()
            wg, rg = learned_weights(st, out / "weights" / projection, method, kernel, c, s["learn_steps"], "holdout")
            guarded = _per_query(problem, fitted.scores(q, weights=wg))
            rows.append({"row": label, "weights": rg["label"], "c": c, "lds": summarize(guarded),
                         "seconds": round(time.perf_counter() - t, 2), "learned_weights": rg["weights"]})
            paired.append({"row": label, "weights": "guarded", "delta": summarize(guarded - uniform)})
        tp = clock.stage(f"tail-patch {label}", tail_patch_run, run, st["train"].path, st["heldout"].path,
                         out / "tail-patch" / label.replace(" ", "-"), method=method, kernel=kernel_arg, c=c,
                         weights_path=record["path"], k=s["top_k"], lr=s["tp_lr"], seed=s["bootstrap_seed"],
                         progress=progress)
        tails.append({"row": label, "summary": _tail(tp)})
    return rows, paired, tails


def ekfac_rows(out: Path, s: dict, run: str, specs: dict, ids: dict, problem, train_ids, clock: Clock,
               progress: bool):
    from gradtrace.evaluate import summarize
    from gradtrace.evaluate.saved_attributions import read_attributions
    from gradtrace.evaluate.tail_patch import tail_patch_run
    from gradtrace.pipeline import AttributeSpec, LearnWeightsSpec, attribute_run, learn_weights_run

    common = {"method": "ekfac", "checkpoint": run, "factors": str(out / "ekfac-factors"),
              "batch_size": s["ekfac_batch"]}
    t = time.perf_counter()
    path, doc = learn_weights_run(LearnWeightsSpec(
        **common, data=specs["learn"], ids=ids["learn"], out=str(out / "weights" / "ekfac.json"), lambda_c=s["c"],
        steps=s["learn_steps"], guard="none"), progress=progress)
    learn_s = time.perf_counter() - t
    t = time.perf_counter()
    attribute_run(AttributeSpec(**common, data=specs["heldout"], ids=ids["heldout"], out=str(out / "ekfac-attr"),
                                weights=str(path), top_k=s["top_k"]), progress=progress)
    attr_s = time.perf_counter() - t
    attr = read_attributions(out / "ekfac-attr")
    col = {int(i): j for j, i in enumerate(attr.train_ids)}
    row = {int(i): j for j, i in enumerate(attr.query_ids)}
    order_n = [col[int(i)] for i in train_ids]
    order_q = [row[int(i)] for i in problem.query_ids]
    contrib = attr.contributions[order_q][:, order_n].astype(np.float64)
    learned_scores = attr.scores[order_q][:, order_n]
    uniform = _per_query(problem, contrib.sum(-1))
    learned = _per_query(problem, learned_scores)
    c = doc["provenance"]["lambda_c"]
    seconds = round(learn_s + attr_s, 2)
    rows = [{"row": "EK-FAC", "weights": "uniform", "c": c, "lds": summarize(uniform), "seconds": seconds},
            {"row": "EK-FAC", "weights": "learned", "c": c, "lds": summarize(learned), "seconds": seconds,
             "learned_weights": attr.manifest["weights"]["weights"]}]
    paired = [{"row": "EK-FAC", "weights": "learned", "delta": summarize(learned - uniform)}]
    if s["guarded"]:  # the guarded weights applied to the same unweighted contributions (as `attribute` does)
        t = time.perf_counter()
        gpath, gdoc = learn_weights_run(LearnWeightsSpec(
            **common, data=specs["learn"], ids=ids["learn"], out=str(out / "weights" / "ekfac-guarded.json"),
            lambda_c=s["c"], steps=s["learn_steps"], guard="holdout"), progress=progress)
        wg = np.array([gdoc["weights"][g] for g in attr.doc["groups"]])
        guarded = _per_query(problem, contrib @ wg)
        prov = gdoc["provenance"]
        shrink = (prov.get("guard") or prov["learner"].get("guard") or {}).get("shrink")
        rows.append({"row": "EK-FAC", "weights": "guarded" if shrink is None else f"guarded (shrink {shrink:g})",
                     "c": gdoc["provenance"]["lambda_c"], "lds": summarize(guarded),
                     "seconds": round(time.perf_counter() - t, 2), "learned_weights": gdoc["weights"]})
        paired.append({"row": "EK-FAC", "weights": "guarded", "delta": summarize(guarded - uniform)})
    tp = clock.stage("tail-patch EK-FAC", tail_patch_run, run, None, None, out / "tail-patch" / "EK-FAC",
                     attributions=str(out / "ekfac-attr"), k=s["top_k"], lr=s["tp_lr"], seed=s["bootstrap_seed"],
                     progress=progress)
    return rows, paired, [{"row": "EK-FAC", "summary": _tail(tp)}], {"learn_weights_s": round(learn_s, 2),
                                                                     "attribute_s": round(attr_s, 2)}


def run_bench(out, s: dict, *, progress: bool = True) -> dict:
    import torch

    from gradtrace.evaluate import load_problem, retrain_run
    from gradtrace.io import versions, write_json_atomic
    from gradtrace.pipeline import FeaturizeSpec, TrainSpec, featurize_run, train_run
    from gradtrace.pipeline.build_lm import BuildLMSpec, build_lm_run

    threads = torch.get_num_threads()
    torch.set_num_threads(int(s["threads"]))
    start, clock, out = time.perf_counter(), Clock("bench-lm"), Path(out)
    try:
        specs = write_texts(out, s)
        ids = {"heldout": np.arange(s["n_heldout"]), "learn": np.arange(s["n_learn"])}
        base = clock.stage("build-lm", build_lm_run, BuildLMSpec(out=str(out / "base")), progress=progress)
        run = str(clock.stage("train", train_run, TrainSpec(
            base=str(base), data=specs["train"], steps=s["steps"], batch_size=s["batch_size"], lr=s["lr"],
            model_options=json.dumps({"seq_len": s["seq_len"]}), out=str(out / "run")), progress=progress))
        stores = {}
        for name, kind in store_kinds(s).items():
            stores[name] = {}
            for part in ("train", "heldout", "learn"):
                where = {} if part == "train" else {"data": specs[part], "ids": ids[part]}
                stores[name][part] = clock.stage(f"featurize {name}", featurize_run, FeaturizeSpec(
                    checkpoint=run, out=str(out / "features" / name / part), **kind, **where), progress=progress)
        retrain = clock.stage("retrain", retrain_run, run, out / "retrain", n_subsets=s["subsets"],
                              fraction=s["fraction"], n_seeds=1, workers=s["workers"], progress=progress)
        problem = clock.stage("model outputs", load_problem, run, out / "retrain", stores["rademacher"]["train"],
                              stores["rademacher"]["heldout"], progress=progress)
        for name in stores:
            for part in ("train", "heldout"):
                if not np.array_equal(stores[name][part].ids, stores["rademacher"][part].ids):
                    raise RuntimeError("the feature stores hold different ids")
        rows, paired, tails = store_rows(out, s, run, stores, problem, clock, progress)
        e_rows, e_paired, e_tails, e_times = ekfac_rows(out, s, run, specs, ids, problem,
                                                        stores["rademacher"]["train"].ids, clock, progress)
        rows, paired, tails = rows + e_rows, paired + e_paired, tails + e_tails
        cost = []
        if s["featurize_cost"]:
            cost = clock.stage("featurization cost", lm_featurization_cost, str(out / "featurize-cost"),
                               log=lambda line: print(f"[bench-lm] {line}", file=sys.stderr, flush=True))
    finally:
        torch.set_num_threads(threads)
    from gradtrace.adapters import get_adapter

    params = sum(p.numel() for p in get_adapter("causal-lm").load(run).model.parameters())
    wall = list(retrain.get("model_wall_s", {}).values())
    results = {"settings": s, "params": params, "rows": rows, "paired": paired, "tail_patch": tails,
               "featurization_cost": cost, "ekfac_times_s": e_times, "timings_s": clock.timings,
               "retrain_model_s_mean": float(np.mean(wall)) if wall else None,
               "wall_s": round(time.perf_counter() - start, 1), "versions": versions(),
               "command": " ".join(["python", *sys.argv])}
    results["markdown"] = markdown(results)
    write_json_atomic(out / "results.json", results)
    (out / "results.md").write_text(results["markdown"] + "\n")
    return results


def _excludes_zero(ci) -> str:
    return "—" if ci[0] is None else ("yes" if ci[0] > 0 or ci[1] < 0 else "no")


def _signed(stat: dict | None) -> str:
    if stat is None:
        return "-"
    lo, hi = stat["ci95"]
    return f"{stat['mean']:+.4f}" + ("" if lo is None else f" [{lo:+.4f}, {hi:+.4f}]")


def markdown(results: dict) -> str:
    s = results["settings"]
    lines = [f"GPT-2 ({results['params']} parameters) trained {s['steps']} steps on {s['n_train']} fortunes; LDS "
             f"over {s['n_heldout']} held-out fortunes, {s['subsets']} subsets at α = {s['fraction']}; "
             f"{s['n_learn']} learning fortunes; {s['dim']} feature columns (LoGra wide: {s['logra_wide_dim']}).", "",
             "| row | weights | λ scale c | LDS (95% CI) | undefined | s |", "|---|---|---|---|---|---|"]
    for r in results["rows"]:
        c = "-" if not r.get("c") else f"{r['c']:g}"
        lines.append(f"| {r['row']} | {r['weights']} | {c} | {_fmt(r['lds'])} | {r['lds']['n_undefined']} | "
                     f"{r['seconds']} |")
    lines += ["", "Paired LDS differences against uniform (per query; bootstrap 95% CI over queries):", "",
              "| row | weights − uniform | Δ LDS (95% CI) | CI excludes 0 |", "|---|---|---|---|"]
    for d in results["paired"]:
        lines.append(f"| {d['row']} | {d['weights']} | {_fmt(d['delta'])} | {_excludes_zero(d['delta']['ci95'])} |")
    lines += ["", f"Tail-patch: one SGD step (lr {s['tp_lr']}) on each query's top-{s['top_k']} training fortunes; "
              "mean increase of the query's mean per-token log-likelihood (95% CI):", "",
              "| row | uniform | learned | random | learned − uniform | excludes 0 |", "|---|---|---|---|---|---|"]
    for t in results["tail_patch"]:
        u = t["summary"]
        d = u.get("delta_learned_minus_uniform")
        lines.append(f"| {t['row']} | {_signed(u.get('delta_uniform'))} | {_signed(u.get('delta_learned'))} | "
                     f"{_signed(u.get('delta_random'))} | {_signed(d)} | {_excludes_zero(d['ci95']) if d else '-'} |")
    if results["featurization_cost"]:
        lines += ["", "Featurization against the forward + backward floor (same run, one thread):", "",
                  "| model | trainable parameters | projection | sequences/s | floor /s | ratio |",
                  "|---|---|---|---|---|---|"]
        for r in results["featurization_cost"]:
            lines.append(f"| {r['model']} | {r['params']} | {r['projection']} | {r['sequences_per_s']} | "
                         f"{r['floor_per_s']} | {r['ratio']} |")
    lines += ["", "Timings (s): " + ", ".join(f"{k} {v}" for k, v in results["timings_s"].items()),
              f"EK-FAC: learn-weights --method ekfac {results['ekfac_times_s']['learn_weights_s']} s (factors, c, "
              f"weights), attribute --method ekfac {results['ekfac_times_s']['attribute_s']} s (the uniform and "
              f"learned EK-FAC rows' time); wall {results['wall_s']} s."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    return bench_main(argv, __doc__, "lm", "tiny settings (a few minutes)", run_bench, SETTINGS)


if __name__ == "__main__":
    sys.exit(main())
