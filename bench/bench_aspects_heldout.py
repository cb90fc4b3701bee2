#!/usr/bin/env python
"""Aspect retrieval on shapes with combinations held out of training: which recipe finds, for a new image of an
unseen (subject, style, background) combination, the training images that share one aspect with it?

    python bench/bench_aspects_heldout.py --out bench_out/heldout            # split seed 0 (see docs/benchmarks.md)
    python bench/bench_aspects_heldout.py --out bench_out/heldout_s1 --split-seed 1 --query-seed 2   # confirmation

Protocol (DESIGN.md §2). 24 of the 96 combinations (seeded by --split-seed; every value of every attribute stays
in training) are held out: the conditional UNet trains on the 720 `shapes` images (data seed 0) of the other 72.
Evaluation queries: real images of the held-out combinations drawn with another data seed (--query-seed, 2 per
combination = 48), featurized with their full tokens (`--queries tokens`) or with every token null (`--queries image`,
the measurement); the training images with their tokens or, `--train-condition none`, null as well (the regime of
image-only queries). On combinations seen in training every method is near
1.0; held out, a method must find the aspect, not the combination. Learning queries are generated from the
model (never the evaluation images). Every attribution run is scored by `gradtrace eval retrieval --labels
subject,style,background` (Recall@10 and mAP with bootstrap CIs, paired differences). Recipes beyond the default
list (`EXTRA_RECIPES`): the contrast statistic, the family objective on 144 learning queries, and ORACLE ceilings
that use the training labels (`bench/aspect_levers.py`; diagnostics, not recipes).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ASPECTS = ("subject", "style", "background")
N_HELD = 24


def log(msg: str) -> None:
    print(f"[heldout] {msg}", file=sys.stderr, flush=True)


def split(split_seed: int) -> np.ndarray:
    """The held-out combination indices (0..95): 24 drawn from `split_seed`, every value still in training."""
    from gradtrace.data.shapes import N_COMBOS, combo_of

    rng = np.random.default_rng([int(split_seed), 2929])
    while True:
        held = np.sort(rng.choice(N_COMBOS, N_HELD, replace=False))
        kept = np.setdiff1d(np.arange(N_COMBOS), held)
        if all(len(np.unique(f)) == n for f, n in zip(combo_of(kept), (6, 4, 4))):
            return held


def train_model(out: Path, *, split_seed: int, steps: int) -> Path:
    from gradtrace.pipeline import TrainSpec, train_run

    out.mkdir(parents=True, exist_ok=True)
    held = split(split_seed)
    ids = np.array([i for i in range(960) if i % 96 not in set(held.tolist())], dtype=np.int64)
    np.save(out / "train_ids.npy", ids)
    return train_run(TrainSpec(data="shapes", ids=str(out / "train_ids.npy"), out=str(out / "model"), steps=steps,
                               batch_size=64, lr=3e-3, seed=0), progress=False)


def query_ids(split_seed: int, per_combo: int = 2) -> np.ndarray:
    """Ids (of the 960 shapes drawn with the query data seed) of the first `per_combo` images per held-out combo."""
    held = set(split(split_seed).tolist())
    return np.array([i for i in range(960) if i % 96 in held and i // 96 < per_combo], dtype=np.int64)


def make_samples(ckpt: str, out: Path, codes: np.ndarray, seed: int) -> Path:
    from gradtrace.pipeline import SampleSpec, sample_run

    return sample_run(SampleSpec(checkpoint=ckpt, out=str(out), num=len(codes), codes=codes, sample_steps=50,
                                 seed=seed), progress=False)


class Bench:
    """Stores, weights, attribution runs and their retrieval evaluation under one output folder (reused when
    their inputs are unchanged: every stage below reuses an identical artefact)."""

    def __init__(self, out: Path, args):
        self.out, self.a = out, args
        self.ckpt = str(out / "model")

    def store(self, meas: str, which: str, bands: int | None, cond_on: str | None = None):
        from gradtrace.features.store import FeatureStore
        from gradtrace.pipeline import FeaturizeSpec, featurize_run

        tag = f"{meas}-b{bands or 1}" + (f"-on-{cond_on}" if cond_on else "")
        path = self.out / "features" / tag / which
        if (path / "manifest.json").exists():
            try:
                return FeatureStore.open(path)
            except Exception:  # noqa: BLE001 (unfinished: featurize again)
                pass
        where = {}
        if which == "eval":
            where = dict(data="shapes", n=960, data_seed=self.a.query_seed, ids=str(self.out / "query_ids.npy"))
        elif which != "train":
            where = dict(samples=str(self.out / "samples" / which))
        log(f"featurize {tag}/{which}")
        return featurize_run(FeaturizeSpec(checkpoint=self.ckpt, out=str(path), groups="block",
                                           projection=self.a.projection, dim=self.a.dim, measurement=meas,
                                           timesteps=self.a.timesteps, timestep_bands=bands, condition_on=cond_on,
                                           overwrite=True, **where), progress=False)

    def weights(self, train, learn, method: str, kernel: str, name: str, objective: str = "snr",
                family: str | None = None, l2: float = 0.0, aspect: str | None = None) -> str:
        from gradtrace.pipeline import LearnWeightsSpec, learn_weights_run

        path = Path(train.path) / "weights" / f"{method}-{kernel}-{name}.json"
        if not path.exists():
            log(f"learn {train.path.parent.name} {method}/{kernel} {name}")
            learn_weights_run(LearnWeightsSpec(train=str(train.path), queries=str(learn.path), method=method,
                                               kernel=kernel, lambda_c="auto", steps=self.a.learn_steps,
                                               objective=objective, family=family, l2=l2, aspect=aspect,
                                               out=str(path)),
                              progress=False)
        return str(path)

    def attribute(self, train, queries, method: str, kernel: str, name: str, weights: str | None = None,
                  learning=None) -> str:
        from gradtrace.pipeline import AttributeSpec, attribute_run

        q = queries.settings["source"].get("condition_on")
        out = Path(train.path).parent / "runs" / f"{method}-{kernel}" / (name + ("" if q is None else f"-q-{q}"))
        if not (out / "attributions.json").exists():
            extra = dict(weights=weights) if weights else dict(lambda_c="auto", learning_queries=str(learning.path))
            attribute_run(AttributeSpec(train=str(train.path), queries=str(queries.path), out=str(out),
                                        method=method, kernel=kernel, top_k=10, report=False, **extra),
                          progress=False)
        return str(out)


RECIPES = ("uniform", "general", "aspect-only", "family", "snr+family", "cond", "cond-snr", "cond-family", "recipe")
# beyond the default list (pass them in --recipes): the label-free contrast statistic over the general weights, and
# the ORACLE ceilings that use the training labels (bench/aspect_levers.py; diagnostics, not recipes a user can run)
EXTRA_RECIPES = ("contrast", "oracle-loo", "oracle-learn", "oracle-solo", "family144")
N_FAMILY, FAMILY_L2 = 144, 1.0  # family144: the family objective on 144 general learning queries, l2 toward uniform


def run_config(b: Bench, meas: str, method: str, kernel: str, bands: int | None, recipes) -> dict:
    """Every recipe's attribution runs for one (method, kernel, bands); one `eval retrieval` over all of them."""
    from aspect_levers import contrast_weights_file, oracle_weights
    from gradtrace.evaluate.eval_retrieval import eval_retrieval_run

    image_only = b.a.queries == "image"  # evaluation queries featurized with every token null
    null_train = b.a.train_condition == "none"  # training images featurized with every token null too
    train = b.store(meas, "train", bands, "none" if null_train else None)
    ev = b.store(meas, "eval", bands, "none" if image_only else None)
    lq = "none" if image_only else None  # learning queries featurized as the evaluation queries are
    general = b.store(meas, "learn-general", bands, lq)
    runs = {"uniform": b.attribute(train, ev, method, kernel, "uniform", learning=general)}
    if {"general", *EXTRA_RECIPES} & set(recipes):
        gw = b.weights(train, general, method, kernel, "general")
        runs["general"] = b.attribute(train, ev, method, kernel, "general", gw)
    cache: dict = {}
    for a in ASPECTS:
        if "contrast" in recipes:
            runs[f"contrast:{a}"] = b.attribute(train, ev, method, kernel, f"contrast-{a}",
                                                contrast_weights_file(cache, train, general, gw, method, kernel, a))
        if "family144" in recipes:
            big = b.store(meas, f"learn-general-{N_FAMILY}", bands, lq)
            runs[f"family144:{a}"] = b.attribute(train, ev, method, kernel, f"family144-l2-{a}",
                                                 b.weights(train, big, method, kernel, f"family144-l2-{a}", "family",
                                                           a, FAMILY_L2))
        for mode in ("loo", "learn", "solo"):
            if f"oracle-{mode}" in recipes:
                loo = b.store(meas, "train", bands, "none") if mode != "learn" else None
                w = oracle_weights(cache, train, general, loo, gw, method, kernel, a, mode, b.a.learn_steps)
                runs[f"oracle-{mode}:{a}"] = b.attribute(train, ev, method, kernel, f"oracle-{mode}-{a}", w)
        if "aspect-only" in recipes:
            learn = b.store(meas, f"learn-{a}", bands, lq)
            runs[f"aspect-only:{a}"] = b.attribute(train, ev, method, kernel, f"aspect-only-{a}",
                                                   b.weights(train, learn, method, kernel, f"aspect-only-{a}"))
        if "recipe" in recipes:  # learn-weights --aspect with its defaults (after the general weights: their c)
            learn = b.store(meas, f"learn-{a}", bands, lq)
            runs[f"recipe:{a}"] = b.attribute(train, ev, method, kernel, f"recipe-{a}",
                                              b.weights(train, learn, method, kernel, f"recipe-{a}", "auto",
                                                        aspect=a))
        for obj in ("family", "snr+family"):
            if obj in recipes:
                runs[f"{obj}:{a}"] = b.attribute(train, ev, method, kernel, f"{obj}-{a}",
                                                 b.weights(train, general, method, kernel, f"{obj}-{a}", obj, a))
        if {"cond", "cond-snr", "cond-family"} & set(recipes):
            ctrain = b.store(meas, "train", bands, a)
            cev = ev if image_only else b.store(meas, "eval", bands, a)
            clearn = b.store(meas, f"learn-{a}", bands, a)
            if "cond" in recipes:
                runs[f"cond:{a}"] = b.attribute(ctrain, cev, method, kernel, "uniform", learning=clearn)
            if "cond-snr" in recipes:
                runs[f"cond-snr:{a}"] = b.attribute(ctrain, cev, method, kernel, "snr",
                                                    b.weights(ctrain, clearn, method, kernel, "snr"))
            if "cond-family" in recipes:
                cgen = b.store(meas, "learn-general", bands, a)
                runs[f"cond-family:{a}"] = b.attribute(ctrain, cev, method, kernel, "family",
                                                       b.weights(ctrain, cgen, method, kernel, "family", "family", a))
    tag = f"{method}-{kernel}-b{bands or 1}-{b.a.queries}" + ("-trainnull" if null_train else "")
    doc = eval_retrieval_run(list(runs.values()), list(ASPECTS), b.out / "retrieval" / tag, ks=(10,),
                             n_bootstrap=2000, seed=0)
    names = dict(zip(runs, [r["name"] for r in doc["runs"]]))
    return {"tag": tag, "runs": runs, "names": names, "doc": doc}


def rows_of(result: dict) -> list[dict]:
    """Per recipe × aspect: Recall@10 and mAP on its own aspect (general recipes: on every aspect), and the paired
    difference with uniform and with the general weights."""
    doc, names = result["doc"], result["names"]
    by_name = {r["name"]: r for r in doc["runs"]}
    diffs = {(d["a"], d["b"], d["aspect"], d["metric"]): d for d in doc["differences"]}

    def diff(x, y, aspect, metric="recall@10"):  # y − x
        if (x, y, aspect, metric) in diffs:
            return diffs[(x, y, aspect, metric)]
        d = diffs.get((y, x, aspect, metric))
        if d is None:
            return None
        lo, hi = d["ci95"]
        flip = {"higher": "lower", "lower": "higher"}.get(d["verdict"], d["verdict"])
        return {**d, "mean": -d["mean"], "ci95": [-hi, -lo], "verdict": flip}

    rows = []
    for recipe, name in names.items():
        base, _, own = recipe.partition(":")
        for a in ([own] if own else ASPECTS):
            m = by_name[name]["metrics"][a]
            row = {"config": result["tag"], "recipe": base, "aspect": a, "recall": m["recall@10"]["mean"],
                   "recall_ci": m["recall@10"]["ci95"], "map": m["map"]["mean"]}
            for ref in ("uniform", "general"):
                if ref in names and names[ref] != name:
                    d = diff(names[ref], name, a)
                    row[f"vs_{ref}"] = None if d is None else {"mean": d["mean"], "ci95": d["ci95"],
                                                               "verdict": d["verdict"]}
            rows.append(row)
    return rows


def pixel_baseline(b: Bench) -> dict:
    """Pixel −L2 nearest neighbours, Recall@10 / mAP per aspect with bootstrap CIs and per-query values."""
    from gradtrace.data import load_dataset
    from gradtrace.metrics.retrieval import average_precision, bootstrap_mean, label_relevance, recall_at_k

    train_ids, q_ids = np.load(b.out / "train_ids.npy"), np.load(b.out / "query_ids.npy")
    tr = load_dataset("shapes", n=960)
    qs = load_dataset("shapes", n=960, seed=b.a.query_seed)
    x = tr.images.numpy().reshape(960, -1)[train_ids].astype(np.float64)
    q = qs.images.numpy().reshape(960, -1)[q_ids].astype(np.float64)
    scores = -((q ** 2).sum(1)[:, None] - 2 * q @ x.T + (x ** 2).sum(1)[None, :])
    out = {}
    for a in ASPECTS:
        rel = label_relevance([qs.metadata[i][a] for i in q_ids], [tr.metadata[i][a] for i in train_ids])
        rec = recall_at_k(scores, rel, 10).values
        out[a] = {"recall@10": {**bootstrap_mean(rec, n_bootstrap=2000), "per_query": rec.tolist()},
                  "map": bootstrap_mean(average_precision(scores, rel).values, n_bootstrap=2000)}
    return out


def summary_md(results: dict) -> str:
    """Markdown: per configuration and recipe, Recall@10 / mAP on each aspect and the paired differences."""
    def ci(x):
        return "—" if x is None else f"{x['mean']:+.3f} [{x['ci95'][0]:+.3f}, {x['ci95'][1]:+.3f}]" + (
            " **+**" if x["verdict"] == "higher" else " **−**" if x["verdict"] == "lower" else "")

    lines = ["| config | recipe | aspect | R@10 [95% CI] | mAP | Δ R@10 vs uniform | Δ R@10 vs general |",
             "|---|---|---|---|---|---|---|"]
    for r in results["rows"]:
        lo, hi = r["recall_ci"]
        lines.append(f"| {r['config']} | {r['recipe']} | {r['aspect']} | {r['recall']:.3f} [{lo:.3f}, {hi:.3f}] | "
                     f"{r['map']:.3f} | {ci(r.get('vs_uniform'))} | {ci(r.get('vs_general'))} |")
    for a, m in results["pixel"].items():
        lo, hi = m["recall@10"]["ci95"]
        lines.append(f"| pixel −L2 | — | {a} | {m['recall@10']['mean']:.3f} [{lo:.3f}, {hi:.3f}] | "
                     f"{m['map']['mean']:.3f} | | |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    import json

    import torch

    from gradtrace.adapters import get_adapter
    from gradtrace.adapters.diffusion.aspects import query_codes
    from gradtrace.io import write_json_atomic

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--split-seed", type=int, default=0)
    p.add_argument("--query-seed", type=int, default=1, help="data seed of the evaluation images")
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--timesteps", type=int, default=6)
    p.add_argument("--projection", default="kronecker")
    p.add_argument("--dim", type=int, default=None, help="per band (default: the projection's, 8,192 for kronecker)")
    p.add_argument("--n-learn", type=int, default=48)
    p.add_argument("--learn-steps", type=int, default=200)
    p.add_argument("--configs", default="dtrak:per-group:1,dtrak:per-group:3",
                   help="comma-separated measurement/method:kernel:bands, e.g. dtrak:shared:3,das:per-group:1")
    p.add_argument("--recipes", default=",".join(RECIPES))
    p.add_argument("--queries", default="tokens", choices=("tokens", "image"),
                   help="evaluation queries featurized with their tokens, or with every token null (the image alone: "
                        "relevance cannot be read off the conditioning)")
    p.add_argument("--train-condition", default="tokens", choices=("tokens", "none"),
                   help="training images featurized with their tokens (as before), or with every token null (the "
                        "regime image-only queries are featurized in)")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    out = Path(a.out)
    if not (out / "model" / "config.json").exists():
        train_model(out, split_seed=a.split_seed, steps=a.steps)
    np.save(out / "query_ids.npy", query_ids(a.split_seed))
    b = Bench(out, a)
    model = get_adapter().load(b.ckpt)
    values = model.model.attribute_values
    sets = {"learn-general": (query_codes(values, a.n_learn, seed=2002), 2002)}
    for i, asp in enumerate(ASPECTS):
        sets[f"learn-{asp}"] = (query_codes(values, a.n_learn, aspect=asp, seed=2003 + i), 2003 + i)
    if "family144" in a.recipes.split(","):
        sets[f"learn-general-{N_FAMILY}"] = (query_codes(values, N_FAMILY, seed=2102), 2102)
    for name, (codes, seed) in sets.items():
        if not (out / "samples" / name / "manifest.json").exists():
            log(f"sample {name}")
            make_samples(b.ckpt, out / "samples" / name, codes, seed)
    recipes = a.recipes.split(",")
    results = {"settings": vars(a), "held_out_combos": split(a.split_seed).tolist(), "pixel": pixel_baseline(b),
               "rows": []}
    for cfg in a.configs.split(","):
        meas, kernel, bands = cfg.split(":")
        method = meas
        res = run_config(b, meas, method, kernel, None if bands == "1" else int(bands), recipes)
        results["rows"] += rows_of(res)
        write_json_atomic(out / "summary.json", results)
        (out / "summary.md").write_text(summary_md(results))
        log(f"done {res['tag']}")
    print(json.dumps({"rows": len(results["rows"])}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
