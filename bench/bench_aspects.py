#!/usr/bin/env python
"""Aspect retrieval on shapes: do per-aspect group weights retrieve training images that share an aspect?

    python bench/bench_aspects.py --out bench_out/aspects            # full (see docs/benchmarks.md for time)
    python bench/bench_aspects.py --quick --out bench_out/aspects_q  # tiny smoke run, a few minutes

Protocol. The conditional UNet is trained on `shapes` (960 images; subject 6 / style 4 / background 4). The
training set is featurized with measurement `loss` (TracIn, TRAK) and `dtrak` (D-TRAK), block groups,
rademacher projection. Evaluation queries: EVAL_SEED samples with all three attributes set. Learning
queries (never the evaluation ones, other seeds): "general" (all attributes set) and, per aspect a, samples
with only a's token set (`query_codes(aspect=a)`). Per base method, general and per-aspect weights are
learned with λ chosen label-free on that learning set (`--lambda-c auto`). For aspect a a training image is
relevant to a query when it has the query's (requested) value of a. Recall@10 and mAP per aspect for:
uniform weights (λ of the general set), general weights, each aspect's weights, and pixel −L2 / random
baselines. Also: per-group solo quality, per-group Recall@10 (diagnostic only, never used to choose
anything), weight concentration, cosines, a check that the generated queries show the requested values
(a pixel logistic-regression classifier trained on the training images, validated on held-out shapes), and
a paired bootstrap CI of Recall@10(aspect weights) − Recall@10(uniform). Writes results.json, results.md.
"""
from __future__ import annotations

import argparse
import datetime
import os
import sys
import time
from pathlib import Path

import numpy as np

from aspects_tables import ASPECTS, WEIGHT_SETS, markdown, summarize, weights_label
from common import Clock

EVAL_SEED = 1001
LEARN_SEED = 2002  # general learning queries; aspect i uses LEARN_SEED + 1 + i
RANDOM_SEED = 3003
METHODS = [("tracin", "identity", "loss"), ("trak", "shared", "loss"), ("trak", "per-group", "loss"),
           ("dtrak", "shared", "dtrak"), ("dtrak", "per-group", "dtrak"), ("das", "shared", "das"),
           ("das", "per-group", "das")]
PICTURE_METHOD = "trak/per-group"  # fixed in advance for the attribution grids (not chosen on results)
SETTINGS = {
    "full": {"n_train": None, "steps": 1500, "batch_size": 64, "lr": 3e-3, "n_eval": 96, "n_learn": 64,
             "sample_steps": 50, "guidance": 1.0, "dim": 2048, "timesteps": 10, "learn_steps": 200, "k": 10,
             "threads": 1,
             "show_queries": 3, "show_k": 6, "bootstrap": 2000, "groups": "block", "projection": "rademacher"},
    "quick": {"n_train": 96, "steps": 10, "batch_size": 16, "lr": 3e-3, "n_eval": 8, "n_learn": 6, "sample_steps": 3,
              "guidance": 1.0, "dim": 64, "timesteps": 1, "learn_steps": 5, "k": 10, "threads": 1,
              "show_queries": 2, "show_k": 4, "bootstrap": 200, "groups": "block", "projection": "rademacher"},
}


# the configuration of the first runs keeps its paths (features/, weights/, results.json); any other
# (groups, projection, dim) shares the model and samples and gets configs/<tag>/ of its own
LEGACY_CONFIG = "block-rademacher-2048"


def config_tag(s: dict) -> str:
    if s["projection"] == "identity":  # exact gradients: no dimension
        return f"{s['groups']}-exact"
    return f"{s['groups']}-{s['projection']}-{s['dim']}"


def config_dir(out: Path, s: dict) -> Path:
    return out if config_tag(s) == LEGACY_CONFIG else out / "configs" / config_tag(s)


def log(msg: str) -> None:
    print(f"[bench-aspects] {msg}", file=sys.stderr, flush=True)

def query_sets(values: dict, s: dict) -> dict[str, np.ndarray]:
    """name -> (n, A) conditioning codes: the evaluation set, the general and the per-aspect learning sets."""
    from gradtrace.adapters.diffusion.aspects import query_codes

    sets = {"eval": (query_codes(values, s["n_eval"], aspect=None, seed=EVAL_SEED), EVAL_SEED),
            "learn-general": (query_codes(values, s["n_learn"], aspect=None, seed=LEARN_SEED), LEARN_SEED)}
    for i, a in enumerate(ASPECTS):
        seed = LEARN_SEED + 1 + i
        sets[f"learn-{a}"] = (query_codes(values, s["n_learn"], aspect=a, seed=seed), seed)
    return sets


def make_samples(ckpt, fingerprint: str, path: Path, codes: np.ndarray, seed: int, s: dict) -> None:
    """Sample (or reuse samples made by this very model with the same codes, seed and sampler settings)."""
    from gradtrace.io import read_json
    from gradtrace.pipeline import SampleSpec, sample_run

    if (path / "cond.npy").exists() and np.array_equal(np.load(path / "cond.npy"), codes):
        m = read_json(path / "manifest.json", "samples manifest")
        if (m.get("model_fingerprint"), m.get("seed"), m.get("sample_steps"), m.get("guidance"), m.get("eta")) == \
                (fingerprint, seed, s["sample_steps"], s["guidance"], 1.0):
            return
    sample_run(SampleSpec(checkpoint=str(ckpt), out=str(path), num=len(codes), codes=codes, guidance=s["guidance"],
                          sample_steps=s["sample_steps"], seed=seed), progress=False)


def fidelity(train_x, train_codes, held_x, held_codes, sets: dict, images: dict) -> dict:
    """Does a generated query show its requested values? Pixel logistic regression per attribute."""
    from sklearn.linear_model import LogisticRegression

    out = {}
    for a, name in enumerate(ASPECTS):
        clf = LogisticRegression(max_iter=3000, C=0.1).fit(train_x, train_codes[:, a])
        row = {"heldout_accuracy": float((clf.predict(held_x) == held_codes[:, a]).mean())}
        for set_name, (codes, _) in sets.items():
            mask = codes[:, a] >= 0
            if mask.any():
                pred = clf.predict(images[set_name][mask])
                row[set_name] = float((pred == codes[mask, a]).mean())
        out[name] = row
    return out


def weights_current(path: Path, train, queries, s: dict, guard: str = "none") -> bool:
    """True when `path` holds weights learned for exactly this training store, learning-query set and guard."""
    from gradtrace.attribution import query_set_id, store_identity
    from gradtrace.io import read_json

    if not path.exists():
        return False
    doc = read_json(path, "weights file")
    prov, ids = doc.get("provenance", {}), query_set_id(queries)
    return (prov.get("store") == store_identity(train) and doc.get("learning", {}).get("steps") == s["learn_steps"]
            and (prov.get("spec") or {}).get("guard", "none") == guard
            and prov.get("learning_queries", {}).get("ids_sha256") == ids["ids_sha256"]
            and prov.get("learning_queries", {}).get("source") == ids["source"])


def run(out: Path, s: dict, img_dir: Path | None, methods=METHODS) -> dict:
    import torch
    from scipy.stats import spearmanr

    from gradtrace.adapters import get_adapter
    from gradtrace.attribution import fit_method, read_group_weights
    from gradtrace.data import load_dataset
    from gradtrace.features.store import FeatureStore
    from gradtrace.io import read_json, versions, write_json_atomic
    from gradtrace.metrics.retrieval import average_precision, recall_at_k, shared_value_relevance
    from gradtrace.pipeline import (
        FeaturizeSpec,
        LearnWeightsSpec,
        TrainSpec,
        featurize_run,
        learn_weights_run,
        train_run,
    )
    from gradtrace.weights import solo_quality

    torch.set_num_threads(int(s["threads"]))  # 1: OpenMP spin-waits make 2 threads far slower on shared cores
    out.mkdir(parents=True, exist_ok=True)
    clock = Clock("bench-aspects", digits=1, say_done=True)
    timings, stage = clock.timings, clock.stage
    t_all = time.perf_counter()

    ckpt = str(stage("train", train_run, TrainSpec(data="shapes", out=str(out / "model"), n=s["n_train"],
                                                   steps=s["steps"], batch_size=s["batch_size"], lr=s["lr"], seed=0),
                     progress=False))
    model = get_adapter().load(ckpt)
    values = model.model.attribute_values
    train_log = read_json(Path(ckpt) / "config.json", "checkpoint config")
    sets = query_sets(values, s)
    for name, (codes, seed) in sets.items():
        stage(f"sample {name}", make_samples, ckpt, model.fingerprint, out / "samples" / name, codes, seed, s)

    cfg = config_dir(out, s)
    stores: dict[str, dict[str, FeatureStore]] = {}
    for meas in sorted({m for _, _, m in methods}, key=("loss", "dtrak", "das").index):
        spec = dict(checkpoint=ckpt, groups=s["groups"], projection=s["projection"], dim=s["dim"], measurement=meas,
                    timesteps=s["timesteps"], overwrite=True)
        stores[meas] = {"train": stage(f"featurize train ({meas})", featurize_run,
                                       FeaturizeSpec(out=str(cfg / "features" / meas / "train"), **spec),
                                       progress=True)}
        for name in sets:
            stores[meas][name] = stage(f"featurize {name} ({meas})", featurize_run,
                                       FeaturizeSpec(out=str(cfg / "features" / meas / name),
                                                     samples=str(out / "samples" / name), **spec), progress=False)

    first = next(iter(stores.values()))
    train_store = first["train"]
    train_codes = np.asarray(train_store.cond)
    eval_codes = np.asarray(first["eval"].cond)
    np.testing.assert_array_equal(eval_codes, sets["eval"][0])
    relevant = {a: shared_value_relevance(eval_codes[:, i], train_codes[:, i]) for i, a in enumerate(ASPECTS)}

    def metrics(scores: np.ndarray) -> dict:
        row = {}
        for a in ASPECTS:
            rec, ap = recall_at_k(scores, relevant[a], s["k"]), average_precision(scores, relevant[a])
            row[a] = {"recall": rec.mean, "map": ap.mean, "n_undefined": rec.n_undefined,
                      "recall_per_query": rec.values}
        return row

    # ---- baselines: pixel −L2 nearest neighbours and a seeded random ranking
    n_tr = len(train_store.ids)
    ds = load_dataset("shapes", n=2 * n_tr)  # image i does not depend on n: the first n_tr are the training set
    np.testing.assert_array_equal(ds.ids[:n_tr], train_store.ids)
    train_x = ds.images[:n_tr].reshape(n_tr, -1).numpy().astype(np.float64)
    imgs = {name: np.load(out / "samples" / name / "images.npy").reshape(len(c), -1) for name, (c, _) in sets.items()}
    ev = imgs["eval"].astype(np.float64)
    pixel = -((ev ** 2).sum(1)[:, None] - 2 * ev @ train_x.T + (train_x ** 2).sum(1)[None, :])
    rows = {"pixel −L2": {"weights": None, "c": None, "metrics": metrics(pixel)},
            "random": {"weights": None, "c": None,
                       "metrics": metrics(np.random.default_rng(RANDOM_SEED).normal(size=pixel.shape))}}
    held_x = ds.images[n_tr:].reshape(len(ds) - n_tr, -1).numpy()
    fid = stage("fidelity check", fidelity, train_x, train_codes, held_x, ds.attribute_codes()[n_tr:], sets, imgs)

    # ---- per base method: learn general + aspect weights, evaluate every weighting on every aspect
    results: dict[str, dict] = {}
    for method, kernel, meas in methods:
        key = f"{method}/{kernel}"
        train, ev_store = stores[meas]["train"], stores[meas]["eval"]
        names = train.group_names
        docs, fitted_by_c = {}, {}
        for wset, guard in WEIGHT_SETS:
            label = weights_label(wset, guard)
            path = cfg / "weights" / f"{method}-{kernel}-{label.replace(' (', '-').rstrip(')')}.json"
            if not weights_current(path, train, stores[meas][f"learn-{wset}"], s, guard):
                stage(f"learn {key} {label}", learn_weights_run,
                      LearnWeightsSpec(train=str(train.path), out=str(path),
                                       queries=str(stores[meas][f"learn-{wset}"].path), method=method,
                                       kernel="shared" if kernel == "identity" else kernel,  # TracIn: no kernel
                                       lambda_c="auto", k=s["k"], steps=s["learn_steps"], guard=guard),
                      progress=False)
            docs[label] = (path, read_json(path, "weights file"))

        def fitted_at(c):
            c = float(c)
            if c not in fitted_by_c:
                fitted_by_c[c] = fit_method(train, method, kernel=kernel, c=c, progress=False)
            return fitted_by_c[c]

        qf = np.asarray(ev_store.features)
        c_general = docs["general"][1]["provenance"]["lambda_c"]
        entry = {"uniform": {"weights": np.ones(len(names)), "c": c_general,
                             "metrics": metrics(fitted_at(c_general).scores(qf))}}
        for label, (path, wdoc) in docs.items():
            w, info = read_group_weights(train, ev_store, path, method=method, kernel=kernel)
            entry[label] = {"weights": w, "c": info["lambda_c"],
                            "metrics": metrics(fitted_at(info["lambda_c"]).scores(qf, weights=w)),
                            "loss_first": wdoc["learning"].get("first_loss"),
                            "loss_last": wdoc["learning"].get("last_loss"),
                            "shrink": (wdoc["provenance"].get("guard") or {}).get("shrink")}
        # label-free solo quality per learning set, and (diagnostic only) per-group Recall@10 on eval queries
        fg = fitted_at(c_general)
        solo = {wset: solo_quality(fg, np.asarray(stores[meas][f"learn-{wset}"].features), k=s["k"])
                for wset in ("general", *ASPECTS)}
        per_group = {a: [] for a in ASPECTS}
        for j in range(len(names)):
            onehot = np.zeros(len(names))
            onehot[j] = 1.0
            m = metrics(fg.scores(qf, weights=onehot))
            for a in ASPECTS:
                per_group[a].append(m[a]["recall"])
        diag = {}
        for a in ASPECTS:
            pg = np.asarray(per_group[a])
            rho = spearmanr(-solo[a], pg).statistic if np.ptp(pg) > 0 and np.ptp(solo[a]) > 0 else float("nan")
            best_solo = int(np.argmin(solo[a]))
            diag[a] = {"best_group": names[int(np.nanargmax(pg))], "best_group_recall": float(np.nanmax(pg)),
                       "solo_best_group": names[best_solo], "solo_best_group_recall": float(pg[best_solo]),
                       "spearman_solo_vs_group_recall": float(rho)}
        results[key] = {"group_names": names, "rows": entry, "solo_quality": {k: v.tolist() for k, v in solo.items()},
                        "per_group_recall": per_group, "diagnostics": diag}
    summary = summarize(results, rows, s)
    if img_dir is not None and PICTURE_METHOD in results:
        stage("pictures", pictures, results, stores, sets, out, img_dir, s, train_codes, values, relevant)
    timings["total"] = round(time.perf_counter() - t_all, 1)
    doc = {"settings": s, "config": config_tag(s), "methods_run": [f"{m}/{k}" for m, k, _ in methods],
           "seeds": {"eval": EVAL_SEED, "learn": LEARN_SEED, "random": RANDOM_SEED},
           "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
           "load_average_end": list(os.getloadavg()), "timings_s": timings, "cpu_count": os.cpu_count(),
           "train_loss_last100": train_log.get("train_loss_final"), "train_wall_s": train_log.get("train_wall_s"),
           "train_config": train_log.get("train_config"), "model_fingerprint": model.fingerprint,
           "fidelity": fid, "summary": summary, "versions": versions(),
           "methods": {k: _jsonable(v) for k, v in results.items()}, "baselines": _jsonable(rows)}
    write_json_atomic(cfg / "results.json", doc)
    md = markdown(doc)
    (cfg / "results.md").write_text(md)
    return doc


def pictures(results, stores, sets, out, img_dir, s, train_codes, values, relevant) -> None:
    from gradtrace.attribution import fit_method
    from gradtrace.report.weights import attribution_comparison, cosine_heatmap, weights_bars

    img_dir.mkdir(parents=True, exist_ok=True)
    vectors = {}
    for key, r in results.items():
        sets_w = {k: row["weights"] for k, row in r["rows"].items()}
        weights_bars(sets_w, r["group_names"], img_dir / f"aspects_weights_{key.replace('/', '_')}.png",
                     title=f"{key}: group weights (normalised; dotted = uniform)")
        vectors.update({f"{key} {k}": w for k, w in sets_w.items() if k != "uniform"})
    first = next(iter(results.values()))
    vectors["uniform"] = np.ones(len(first["group_names"]))
    cosine_heatmap(vectors, img_dir / "aspects_cosine.png", title="cosine between learned weight vectors")
    method, kernel = PICTURE_METHOD.split("/")
    meas = "dtrak" if method == "dtrak" else "loss"
    train, ev = stores[meas]["train"], stores[meas]["eval"]
    ds_images = np.asarray(_train_images(train))
    q_img = np.load(out / "samples" / "eval" / "images.npy")[:s["show_queries"]]
    codes = sets["eval"][0][:s["show_queries"]]
    names = list(values)
    short = lambda c: " ".join(values[names[i]][v][:4] if v >= 0 else "·" for i, v in enumerate(c))  # noqa: E731
    rows_all = results[PICTURE_METHOD]["rows"]
    qf = np.asarray(ev.features)[:s["show_queries"]]
    for a in ASPECTS:
        rows, hl, titles = {}, {}, {}
        for wset in ("uniform", "general", a):
            row = rows_all[wset]
            fitted = fit_method(train, method, kernel=kernel, c=row["c"], progress=False)
            idx, sc = fitted.topk(qf, s["show_k"], None if wset == "uniform" else row["weights"])
            rows[wset] = (ds_images[idx], sc)
            hl[wset] = np.take_along_axis(relevant[a][:s["show_queries"]], idx, axis=1)
            titles[wset] = [[short(train_codes[i]) for i in r] for r in idx]
        attribution_comparison(q_img, rows, img_dir / f"aspects_attr_{a}.png", query_titles=[short(c) for c in codes],
                               train_titles=titles, highlight=hl,
                               title=f"{PICTURE_METHOD}: top-{s['show_k']}; green = same {a} as the query")


def _train_images(train):
    from gradtrace.data.sources import load_source

    return load_source(train.settings["source"]).images.numpy()


def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.ndarray):
        return [None if (isinstance(v, float) and np.isnan(v)) else v for v in x.tolist()]
    if isinstance(x, (np.floating, float)):
        return None if np.isnan(x) else float(x)
    if isinstance(x, np.integer):
        return int(x)
    return x


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=None)
    p.add_argument("--quick", action="store_true", help="tiny settings for a smoke run")
    p.add_argument("--img-dir", default=None, help="where the PNGs go (default docs/img; --quick: OUT/img)")
    for flag in ("steps", "timesteps", "threads", "n_eval", "n_learn", "dim"):
        p.add_argument(f"--{flag.replace('_', '-')}", type=int, default=None)
    p.add_argument("--groups", default=None, help="group preset of the features (default block)")
    p.add_argument("--projection", default=None, help="rademacher | kronecker | identity | ... (default rademacher)")
    p.add_argument("--methods", default=None,
                   help="comma-separated subset of " + ",".join(f"{m}/{k}" for m, k, _ in METHODS) + " (default all)")
    p.add_argument("--no-pictures", action="store_true", help="skip the PNGs (other configurations than the first)")
    args = p.parse_args(argv)
    s = dict(SETTINGS["quick" if args.quick else "full"])
    for flag in ("steps", "timesteps", "threads", "n_eval", "n_learn", "dim", "groups", "projection"):
        if getattr(args, flag) is not None:
            s[flag] = getattr(args, flag)
    methods = METHODS
    if args.methods:
        wanted = args.methods.split(",")
        methods = [row for row in METHODS if f"{row[0]}/{row[1]}" in wanted]
        unknown = set(wanted) - {f"{m}/{k}" for m, k, _ in methods}
        if unknown:
            p.error(f"unknown --methods {sorted(unknown)}; choose from {[f'{m}/{k}' for m, k, _ in METHODS]}")
    out = Path(args.out or ("bench_out/aspects_quick" if args.quick else "bench_out/aspects"))
    img_dir = Path(args.img_dir) if args.img_dir else (out / "img" if args.quick else Path("docs/img"))
    doc = run(out, s, None if args.no_pictures else img_dir, methods)
    print(markdown(doc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
