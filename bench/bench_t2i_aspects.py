#!/usr/bin/env python
"""Aspect retrieval with prompt-defined aspects on a text-to-image LoRA fine-tune: do weights learned on prompts
that name only one aspect retrieve training images that share that aspect with the query?

    python bench/bench_t2i_aspects.py --pipeline PIPE --out bench_out/t2i_aspects    # full settings
    python bench/bench_t2i_aspects.py --quick --out bench_out/t2i_aspects_q            # tiny smoke run

Protocol. The small SD-layout pipeline (`gradtrace build-pipeline`, or --pipeline) is fine-tuned with LoRA on
n_train captioned shapes. Evaluation queries: images generated from full captions ("a striped circle on a
checker background") of seeded random attribute combinations (EVAL_SEED). Learning queries (never the
evaluation ones): "general" = images generated from training captions drawn at random (what `learn-weights
--generate` does), and per aspect a = images generated from prompts that name only a ("a striped shape"), as
`learn-weights --generate --aspect a` makes them (`query_request(aspect=a)`). Per base method and kernel, general
and per-aspect weights are learned with λ chosen label-free on that learning set. A training image is relevant to
a query for aspect a when it has the query's value of a, judged two ways: (prompt) the value the query's prompt
asked for; (shown) the value a pixel logistic-regression classifier, trained on the real training images and
reported with its held-out accuracy, reads off the generated image. Recall@10 and mAP per aspect for uniform,
general and each aspect's weights, pixel −L2 and random; paired bootstrap CI of Recall@10(aspect weights) −
Recall@10(uniform) on the own aspect. Writes results.json and results.md.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

from common import EVAL_SAMPLE_SEED, T2I_ASPECTS, Clock, apply_overrides, effective_groups, t2i_eval_prompts
from gradtrace.metrics.stats import paired_ci

EVAL_SEED = EVAL_SAMPLE_SEED
LEARN_SEED = 2002  # general; aspect i uses LEARN_SEED + 1 + i
RANDOM_SEED = 7
ASPECTS = T2I_ASPECTS
SETTINGS = {
    "full": {"n_train": 240, "rank": 4, "steps": 200, "batch_size": 16, "n_eval": 60, "n_learn": 48,
             "sample_steps": 25, "guidance": 3.0, "dim": 2048, "timesteps": 6, "learn_steps": 200, "k": 10,
             "bootstrap": 2000, "split_seed": 0, "threads": 1, "bands": 1, "methods": "all",
             "aspect_objective": "snr", "guard": "none", "reuse": 0},
    "quick": {"n_train": 24, "rank": 2, "steps": 4, "batch_size": 8, "n_eval": 4, "n_learn": 4, "sample_steps": 2,
              "guidance": 2.0, "dim": 32, "timesteps": 1, "learn_steps": 5, "k": 3, "bootstrap": 200,
              "split_seed": 0, "threads": 1, "vae_steps": 5, "unet_steps": 5, "bands": 1, "methods": "all",
              "aspect_objective": "snr", "guard": "none", "reuse": 0},
}
METHODS = [("tracin", "shared", "loss"), ("trak", "shared", "loss"), ("trak", "per-group", "loss"),
           ("dtrak", "shared", "dtrak"), ("dtrak", "per-group", "dtrak"), ("das", "shared", "das"),
           ("das", "per-group", "das")]


def log(msg: str) -> None:
    print(f"[bench-t2i-aspects] {msg}", file=sys.stderr, flush=True)


def run(out: Path, s: dict, pipeline: str | None) -> dict:
    import torch
    from sklearn.linear_model import LogisticRegression

    from gradtrace.adapters import adapter_of
    from gradtrace.attribution import fit_method, read_group_weights, score_queries
    from gradtrace.data import load_dataset
    from gradtrace.data.shapes import ATTRIBUTES
    from gradtrace.features.store import FeatureStore
    from gradtrace.io import versions, write_json_atomic
    from gradtrace.metrics.retrieval import average_precision, recall_at_k, shared_value_relevance
    from gradtrace.pipeline import (
        FeaturizeSpec,
        LearnWeightsSpec,
        SampleSpec,
        TrainSpec,
        featurize_run,
        learn_weights_run,
        sample_run,
        train_run,
    )
    from gradtrace.pipeline.build_pipeline import BuildPipelineSpec, build_pipeline_run

    torch.set_num_threads(int(s["threads"]))
    out.mkdir(parents=True, exist_ok=True)
    clock = Clock("bench-t2i-aspects", digits=1)
    timings, stage = clock.timings, clock.stage
    t_all = time.perf_counter()

    if pipeline is None:
        steps = {k: s[k] for k in ("vae_steps", "unet_steps") if k in s}
        pipeline = str(stage("build-pipeline", build_pipeline_run,
                             BuildPipelineSpec(out=str(out / "pipeline"), **steps), progress=False))
    ds = load_dataset("shapes")
    perm = np.random.default_rng(s["split_seed"]).permutation(len(ds))
    train_ids = np.sort(perm[:s["n_train"]])
    held_ids = np.sort(perm[s["n_train"]:])
    reuse = bool(s["reuse"])  # a finished run's fine-tune, samples and features are read, not made again
    run_dir = str(out / "run") if reuse and (out / "run").exists() else str(stage(
        "fine-tune", train_run, TrainSpec(data="shapes", out=str(out / "run"), ids=train_ids, base=pipeline,
                                          lora_rank=s["rank"], steps=s["steps"], batch_size=s["batch_size"]),
        progress=False))
    adapter = adapter_of(run_dir)
    ckpt = adapter.load(run_dir)
    texts, eval_codes = t2i_eval_prompts(s["n_eval"], EVAL_SEED)
    sets = {"eval": (texts, EVAL_SEED),
            "learn-general": (adapter.query_request(ckpt, s["n_learn"], aspect=None, seed=LEARN_SEED)["texts"],
                              LEARN_SEED)}
    aspect_families = {}  # the value each aspect learning prompt was built with (learn-weights records it alike)
    for i, a in enumerate(ASPECTS):
        seed = LEARN_SEED + 1 + i
        request = adapter.query_request(ckpt, s["n_learn"], aspect=a, seed=seed)
        sets[f"learn-{a}"] = (request["texts"], seed)
        aspect_families[a] = write_labels(out / "labels" / f"learn-{a}.jsonl", [{a: v} for v in request["families"]])
    for name, (prompts, seed) in sets.items():
        if reuse and (out / "samples" / name / "images.npy").exists():
            continue
        stage("sample", sample_run, SampleSpec(checkpoint=run_dir, out=str(out / "samples" / name), texts=prompts,
                                               num=len(prompts), guidance=s["guidance"],
                                               sample_steps=s["sample_steps"], seed=seed), progress=False)
    methods_run = METHODS if s["methods"] == "all" else [m for m in METHODS if f"{m[0]}/{m[1]}" in
                                                          s["methods"].split(",")]
    bands = None if int(s["bands"]) == 1 else int(s["bands"])
    tag = "" if bands is None else f"-b{bands}"
    stores = {}
    for meas in sorted({m for _, _, m in methods_run}):
        spec = dict(checkpoint=run_dir, projection="rademacher", dim=s["dim"], measurement=meas,
                    timesteps=s["timesteps"], timestep_bands=bands, overwrite=True)
        stores[meas] = {}
        for name in ("train", *sets):
            where = out / "features" / f"{meas}{tag}" / name
            if reuse and (where / "manifest.json").exists():
                stores[meas][name] = FeatureStore.open(where)
                continue
            source = {} if name == "train" else {"samples": str(out / "samples" / name)}
            stores[meas][name] = stage("featurize", featurize_run, FeaturizeSpec(out=str(where), **source, **spec),
                                       progress=False)
    family_file = write_family_labels(out, sets["learn-general"][0])

    # ---- relevance: by the prompt's value, and by what a classifier reads off the generated image
    codes = ds.attribute_codes()
    pos = ds.index_of(train_ids)
    train_codes = codes[pos]
    train_x = ds.images[torch.as_tensor(pos)].flatten(1).double().numpy()
    held_pos = ds.index_of(held_ids)
    held_x = ds.images[torch.as_tensor(held_pos)].flatten(1).double().numpy()
    imgs = {name: np.load(out / "samples" / name / "images.npy").reshape(len(p), -1).astype(np.float64)
            for name, (p, _) in sets.items()}
    shown = np.empty_like(eval_codes)
    fidelity = {}
    for i, a in enumerate(ASPECTS):
        clf = LogisticRegression(max_iter=3000, C=0.1).fit(train_x, train_codes[:, i])
        shown[:, i] = clf.predict(imgs["eval"])
        fidelity[a] = {"heldout_accuracy": float((clf.predict(held_x) == codes[held_pos, i]).mean()),
                       "eval_matches_prompt": float((shown[:, i] == eval_codes[:, i]).mean())}
    relevance = {"prompt": {a: shared_value_relevance(eval_codes[:, i], train_codes[:, i])
                            for i, a in enumerate(ASPECTS)},
                 "shown": {a: shared_value_relevance(shown[:, i], train_codes[:, i]) for i, a in enumerate(ASPECTS)}}

    def metrics(scores: np.ndarray) -> dict:
        return {judge: {a: {"recall": recall_at_k(scores, rel[a], s["k"]).values,
                            "map": average_precision(scores, rel[a]).values} for a in ASPECTS}
                for judge, rel in relevance.items()}

    ev = imgs["eval"]
    pixel = -((ev ** 2).sum(1)[:, None] - 2 * ev @ train_x.T + (train_x ** 2).sum(1)[None, :])
    baselines = {"pixel −L2": metrics(pixel),
                 "random": metrics(np.random.default_rng(RANDOM_SEED).normal(size=pixel.shape))}
    methods = {}
    for method, kernel, meas in methods_run:
        key = f"{method}/{kernel}"
        train, ev_store = stores[meas]["train"], stores[meas]["eval"]
        rows, fitted_by_c = {}, {}

        def fitted_at(c):
            if float(c) not in fitted_by_c:
                fitted_by_c[float(c)] = fit_method(train, method, kernel=kernel, c=float(c), progress=False)
            return fitted_by_c[float(c)]

        qf = np.asarray(ev_store.features)
        for wset in ("general", *ASPECTS):
            product = s["aspect_objective"] == "auto"  # learn-weights' own recipe: --aspect, the default paths
            family = wset != "general" and s["aspect_objective"] not in ("snr", "auto")
            name = wset if not family else f"{wset}-{s['aspect_objective']}"
            guarded = "" if s["guard"] == "none" or family else f"-guard-{s['guard']}"
            path = None if product else out / "weights" / f"{method}-{kernel}{tag}-{name}{guarded}.json"
            learn = stores[meas]["learn-general" if family else f"learn-{wset}"]
            extra = dict(objective=s["aspect_objective"], family=wset, family_labels=str(family_file)) if family else {}
            if product and wset != "general":
                extra = dict(aspect=wset, family_labels=str(aspect_families[wset]))
            made = stage("learn-weights", learn_weights_run, LearnWeightsSpec(
                train=str(train.path), out=None if path is None else str(path), queries=str(learn.path),
                method=method, kernel=kernel, lambda_c="auto", k=s["k"], steps=s["learn_steps"],
                guard="none" if family else s["guard"], **extra), progress=False)
            path = made[0]
            w, info = read_group_weights(train, ev_store, path, method=method, kernel=kernel)
            if wset == "general":
                rows["uniform"] = {"c": info["lambda_c"], "n_eff": float(len(w)),
                                   "metrics": metrics(fitted_at(info["lambda_c"]).scores(qf))}
            scored = score_queries(train, ev_store, method=method, kernel=kernel, weights_path=path, progress=False)
            rows[wset] = {"c": info["lambda_c"], "n_eff": effective_groups(w), "weights": w.tolist(),
                          "apply": info["apply"], "objective": made[1]["provenance"].get("objective", "snr"),
                          "metrics": metrics(scored.scores())}
            if wset != "general" and info["lambda_c"] != rows["uniform"]["c"]:  # uniform at the weights' own c
                rows[f"uniform-at-{wset}"] = {"c": info["lambda_c"], "n_eff": float(len(w)),
                                              "metrics": metrics(fitted_at(info["lambda_c"]).scores(qf))}
        methods[key] = {"group_names": train.group_names, "rows": rows}
    timings["total"] = round(time.perf_counter() - t_all, 1)
    doc = {"settings": s, "pipeline": pipeline, "run": run_dir,
           "groups": len(next(iter(stores.values()))["train"].group_names),
           "seeds": {"eval": EVAL_SEED, "learn": LEARN_SEED, "random": RANDOM_SEED},
           "prompts": {name: p for name, (p, _) in sets.items()}, "fidelity": fidelity,
           "chance": {a: 1.0 / len(ATTRIBUTES[a]) for a in ASPECTS},
           "summary": summarize(methods, baselines, s), "timings_s": timings, "versions": versions(),
           "command": " ".join(["python", *sys.argv])}
    doc["markdown"] = markdown(doc)
    name = "results" + tag + ("" if s["aspect_objective"] == "snr" else f"-{s['aspect_objective']}") \
        + ("" if s["guard"] == "none" else f"-guard-{s['guard']}")
    doc["results_file"] = str(out / f"{name}.json")
    write_json_atomic(out / f"{name}.json", doc)
    (out / f"{name}.md").write_text(doc["markdown"] + "\n")
    return doc


def write_family_labels(out: Path, prompts: list[str]) -> Path:
    """JSON lines id -> subject / style / background of each general learning prompt (a training caption): the
    values the family objective groups the learning queries by (the prompts' own words, no training labels)."""
    import itertools

    from gradtrace.data.shapes import ATTRIBUTES, caption

    values = {caption(*combo): dict(zip(ASPECTS, combo))
              for combo in itertools.product(*(ATTRIBUTES[a] for a in ASPECTS))}
    return write_labels(out / "labels" / "learn-general.jsonl", [values[p] for p in prompts])


def write_labels(path: Path, rows: list[dict]) -> Path:
    """JSON lines {"id": i, **row}: a labels file for `learn-weights --family-labels`."""
    import json

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"id": i, **row}) + "\n" for i, row in enumerate(rows)))
    return path


def _mean(v: np.ndarray) -> float | None:
    v = np.asarray(v, dtype=np.float64)
    return None if np.isnan(v).all() else float(np.nanmean(v))


def summarize(methods: dict, baselines: dict, s: dict) -> dict:
    table, verdict = [], []
    for judge in ("prompt", "shown"):
        for key, r in methods.items():
            for wset, row in r["rows"].items():
                m = row["metrics"][judge]
                table.append({"judge": judge, "method": key, "weights": wset, "c": row["c"], "n_eff": row["n_eff"],
                              **{f"{a}_{x}": _mean(m[a][x]) for a in ASPECTS for x in ("recall", "map")}})
            for a in ASPECTS:
                same_c = [(a, f"uniform-at-{a}")] if f"uniform-at-{a}" in r["rows"] else []  # its c differs
                for cmp, base in (("general", "uniform"), (a, "uniform"), (a, "general"), *same_c):
                    u = r["rows"][base]["metrics"][judge][a]["recall"]
                    w = r["rows"][cmp]["metrics"][judge][a]["recall"]
                    ok = ~np.isnan(u) & ~np.isnan(w)
                    ci = paired_ci(w[ok], u[ok], s["bootstrap"])
                    verdict.append({"judge": judge, "method": key, "aspect": a,
                                    "weights": {"uniform": cmp, "general": f"{cmp} vs general"}.get(
                                        base, f"{cmp} vs uniform at its c"),
                                    "uniform": float(np.mean(u[ok])), "learned": float(np.mean(w[ok])),
                                    "delta": float(np.mean(w[ok] - u[ok])), "ci95": ci,
                                    "verdict": "beats" if ci[0] > 0 else (
                                        "worse" if ci[1] < 0 else "no clear difference")})
        for name, m in baselines.items():
            table.append({"judge": judge, "method": name, "weights": "—", "c": None, "n_eff": None,
                          **{f"{a}_{x}": _mean(m[judge][a][x]) for a in ASPECTS for x in ("recall", "map")}})
    return {"table": table, "verdict": verdict}


def markdown(doc: dict) -> str:
    fmt = lambda v: "—" if v is None else f"{v:.3f}"  # noqa: E731
    s = doc["settings"]
    lines = [f"Prompt-defined aspects on a text-to-image LoRA fine-tune ({s['n_train']} captioned shapes, "
             f"{doc['groups']} groups): {s['n_eval']} generated evaluation queries, {s['n_learn']} learning queries "
             "per set.", ""]
    for judge, what in (("prompt", "relevance by the value the prompt asked for"),
                        ("shown", "relevance by the value the classifier reads off the generated image")):
        lines += [f"Recall@{s['k']} and mAP, {what}:", "",
                  "| method | weights | λ c | n_eff | "
                  + " | ".join(f"{a} R@{s['k']} | {a} mAP" for a in ASPECTS) + " |",
                  "|" + "---|" * (4 + 2 * len(ASPECTS))]
        for r in doc["summary"]["table"]:
            if r["judge"] != judge:
                continue
            c = "—" if r["c"] is None else f"{r['c']:g}"
            n_eff = "—" if r["n_eff"] is None else f"{r['n_eff']:.1f}"
            lines.append(f"| {r['method']} | {r['weights']} | {c} | {n_eff} | " +
                         " | ".join(f"{fmt(r[f'{a}_recall'])} | {fmt(r[f'{a}_map'])}" for a in ASPECTS) + " |")
        lines += ["", f"Recall@{s['k']} of learned weights − the baseline (uniform; for 'vs general' rows the general "
                  f"weights) on each aspect ({judge}; paired bootstrap 95% CI "
                  "over evaluation queries):", "",
                  "| method | aspect | weights | baseline | learned | Δ | 95% CI | verdict |",
                  "|---|---|---|---|---|---|---|---|"]
        for v in doc["summary"]["verdict"]:
            if v["judge"] == judge:
                lines.append(f"| {v['method']} | {v['aspect']} | {v['weights']} | {v['uniform']:.3f} | "
                             f"{v['learned']:.3f} | {v['delta']:+.3f} | [{v['ci95'][0]:+.3f}, {v['ci95'][1]:+.3f}] | "
                             f"{v['verdict']} |")
        lines.append("")
    lines += ["Classifier of the 'shown' relevance (pixel logistic regression trained on the training images): "
              "accuracy on held-out real shapes, and how often it reads the prompt's value off the generated "
              "evaluation image:", "", "| aspect | chance | held-out real | generated = prompt |", "|---|---|---|---|"]
    for a, row in doc["fidelity"].items():
        lines.append(f"| {a} | {doc['chance'][a]:.3f} | {row['heldout_accuracy']:.3f} | "
                     f"{row['eval_matches_prompt']:.3f} |")
    lines += ["", "Timings (s): " + ", ".join(f"{k} {v}" for k, v in doc["timings_s"].items())]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny settings")
    p.add_argument("--out", default=None, help="output directory (default bench_out/t2i_aspects[_quick])")
    p.add_argument("--pipeline", default=None, help="an existing base pipeline folder (default: build one in --out)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override one setting")
    args = p.parse_args(argv)
    s = apply_overrides(p, SETTINGS["quick" if args.quick else "full"], args.set)
    out = Path(args.out or ("bench_out/t2i_aspects_quick" if args.quick else "bench_out/t2i_aspects"))
    doc = run(out, s, args.pipeline)
    print(doc["markdown"])
    print(f"\nresults: {doc['results_file']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
