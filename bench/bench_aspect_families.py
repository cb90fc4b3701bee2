#!/usr/bin/env python
"""Aspect weights from prompt families, on a finished text-to-image aspects run (bench_t2i_aspects.py --out RUN).

    python bench/bench_aspect_families.py --run bench_out/cap/aspects_medium_s0 --out bench_out/fam_s0

The aspect-only learning queries of that run are generated from prompts that name one value of one aspect ("a
striped shape"), several images per prompt: each prompt is a *family* (same value of the aspect, the other aspects
left to the model), with no labels beyond the prompt text itself. Per method and kernel of the run, and per aspect,
recipes on that aspect's learning queries (λ as the run chose for the SNR weights):

- ``snr``: the run's own SNR weights (the recipe so far; recomputed, as a check that the run is reproduced);
- ``family``: the family objective with families = prompts (`weights.family`, β = 0);
- ``snr+family``: the same plus the SNR term (β = 1);
- ``snr-shrunk``: the SNR weights mixed with uniform, w = (1 − α)/M + α·w_snr, α ∈ {0, ¼, ½, ¾, 1} chosen by the
  family criterion (within-family minus across-family agreement of the weighted top-k) on the same queries: a
  label-free guard that returns toward uniform when the weights make the families less distinct.

Recall@10 on the run's 60 evaluation queries (relevance: the prompt's value, as the run judges it) against uniform
on the own aspect, paired bootstrap 95% CI. Writes results.json and results.md.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from common import T2I_ASPECTS, aspect_families, effective_groups, family_criterion, t2i_eval_prompts
from gradtrace.metrics.stats import paired_ci

ASPECTS = T2I_ASPECTS
ALPHAS = (0.0, 0.25, 0.5, 0.75, 1.0)


def inside_scores(train, qf: np.ndarray, method: str, c: float, w: np.ndarray) -> np.ndarray:
    """Scores with the weights inside the shared kernel: the base method fitted on features whose block j is
    scaled by √w_j, the queries scaled the same way (TRAK on reweighted gradients; λ relative to the new Gram)."""
    from gradtrace.attribution.scoring import at_c

    scale = np.ones(qf.shape[1])
    for j, (_, a, b) in enumerate(train.group_slices):
        scale[a:b] = np.sqrt(w[j])
    base = at_c(method, "shared", float(c))
    feats = np.asarray(train.features, dtype=np.float64) * scale
    kw = {"row_scale": train.row_scale} if base.needs_row_scale else {}
    return base.fit(feats, train.group_slices, progress=False, **kw).scores(qf * scale)


def family_c(train, method: str, kernel: str, learn_phi: np.ndarray, fam: np.ndarray, k: int, fitted_at) -> float:
    """The c of the grid whose uniform-weight scores make the learning families most distinct (family criterion)."""
    import torch

    from gradtrace.methods.base import lambda_grid
    from gradtrace.weights.learn import dense_contributions

    crit = {}
    for c in lambda_grid():
        contrib = torch.from_numpy(dense_contributions(fitted_at(kernel, c), learn_phi))
        crit[float(c)] = family_criterion(contrib, np.full(contrib.shape[2], 1.0 / contrib.shape[2]), fam, k)
    return max(crit, key=crit.get)


def run(run_dir: Path, out: Path, k: int, steps: int, bootstrap: int) -> dict:
    import torch

    from gradtrace.attribution import fit_method, read_group_weights
    from gradtrace.data import load_dataset
    from gradtrace.features.store import FeatureStore
    from gradtrace.metrics.retrieval import recall_at_k, shared_value_relevance
    from gradtrace.pipeline import LearnWeightsSpec, learn_weights_run
    from gradtrace.weights.family import family_codes
    from gradtrace.weights.learn import dense_contributions

    src = json.loads((run_dir / "results.json").read_text())
    prompts = src["prompts"]
    keys = sorted({r["method"] for r in src["summary"]["table"] if "/" in r["method"]})
    ds = load_dataset("shapes")
    codes_all = ds.attribute_codes()
    out.mkdir(parents=True, exist_ok=True)
    labels = {}
    for a in ASPECTS:
        path = out / "labels" / f"learn-{a}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps({"id": i, "prompt": p}) + "\n" for i, p in enumerate(prompts[f"learn-{a}"])))
        labels[a] = path
    texts, ev_codes = t2i_eval_prompts(len(prompts["eval"]))
    assert texts == prompts["eval"], "the run's evaluation prompts are not the benchmark's draw"
    results = {}
    for method in sorted({key.split("/")[0] for key in keys}):
        meas = {"dtrak": "dtrak", "das": "das"}.get(method, "loss")
        feats = run_dir / "features" / meas
        train = FeatureStore.open(feats / "train")
        ev = FeatureStore.open(feats / "eval")
        train_codes = codes_all[ds.index_of(np.asarray(train.ids))]
        rel = {a: shared_value_relevance(ev_codes[:, i], train_codes[:, i]) for i, a in enumerate(ASPECTS)}
        qf = np.asarray(ev.features)
        fits = {}

        def fitted_at(kernel, c):
            if (kernel, float(c)) not in fits:
                fits[(kernel, float(c))] = fit_method(train, method, kernel=kernel, c=float(c), progress=False)
            return fits[(kernel, float(c))]

        def recall(scores, a):
            return recall_at_k(scores, rel[a], 10).values

        def versus(r, base):
            ok = ~np.isnan(base) & ~np.isnan(r)
            return {"recall": float(np.nanmean(r)), "delta": float(np.mean(r[ok] - base[ok])),
                    "ci95": paired_ci(r[ok], base[ok], bootstrap)}

        pg_family = {}  # (aspect, c rule) -> per-group family weights
        for kernel in ("per-group", "shared"):
            key = f"{method}/{kernel}"
            if key not in keys:
                continue
            gen_w, gen_info = read_group_weights(train, ev, run_dir / "weights" / f"{method}-{kernel}-general.json",
                                                 method=method, kernel=kernel)
            c_gen = gen_info["lambda_c"]
            uni_scores = fitted_at(kernel, c_gen).scores(qf)
            gen_scores = fitted_at(kernel, c_gen).scores(qf, weights=gen_w)
            rows = {}
            for a in ASPECTS:
                learn = FeatureStore.open(feats / f"learn-{a}")
                phi = np.asarray(learn.features)
                fam = family_codes(aspect_families(run_dir, prompts[f"learn-{a}"], a))
                w_snr, info = read_group_weights(train, ev, run_dir / "weights" / f"{method}-{kernel}-{a}.json",
                                                 method=method, kernel=kernel)
                c_rule = {"aspect": info["lambda_c"], "general": c_gen,
                          "family": family_c(train, method, kernel, phi, fam, k, fitted_at)}
                u, g = recall(uni_scores, a), recall(gen_scores, a)
                row = {"uniform": float(np.nanmean(u)), "general": float(np.nanmean(g)), "c": c_rule, "recipes": {}}

                def add(name, scores, w=None):
                    r = recall(scores, a)
                    row["recipes"][name] = {**versus(r, u), "vs_general": versus(r, g)}
                    if w is not None:
                        row["recipes"][name].update(n_eff=effective_groups(w), weights=np.asarray(w).tolist())

                fitted = fitted_at(kernel, c_rule["aspect"])
                add("snr", fitted.scores(qf, weights=w_snr), w_snr)
                m = len(w_snr)
                contrib = torch.from_numpy(dense_contributions(fitted, phi))
                crit = {al: family_criterion(contrib, (1 - al) / m + al * w_snr, fam, k) for al in ALPHAS}
                alpha = max(ALPHAS, key=lambda al: (crit[al], -al))
                add("snr-shrunk", fitted.scores(qf, weights=(1 - alpha) / m + alpha * w_snr))
                row["alpha"] = alpha
                for rule, c in c_rule.items():
                    for objective in ("family", "snr+family") if rule == "aspect" else ("family",):
                        path = out / "weights" / f"{method}-{kernel}-{a}-{objective}-c{rule}.json"
                        learn_weights_run(LearnWeightsSpec(
                            train=str(train.path), out=str(path), queries=str(learn.path), method=method,
                            kernel=kernel, lambda_c=float(c), k=k, steps=steps, objective=objective,
                            family="prompt", family_labels=str(labels[a])), progress=False)
                        w, _ = read_group_weights(train, ev, path, method=method, kernel=kernel)
                        add(f"{objective}@{rule}", fitted_at(kernel, c).scores(qf, weights=w), w)
                        if kernel == "per-group" and objective == "family":
                            pg_family[(a, rule)] = w
                    if kernel == "shared" and (a, rule) in pg_family:  # per-group family weights, inside K
                        add(f"inside@{rule}", inside_scores(train, qf, method, c, pg_family[(a, rule)]))
                if kernel == "shared":
                    check = inside_scores(train, qf, method, c_gen, np.full(m, 1.0 / m))
                    row["inside_uniform_max_rel_diff"] = float(np.abs(
                        check / np.abs(check).max() - uni_scores / np.abs(uni_scores).max()).max())
                rows[a] = row
                print(f"{key} {a}: c {c_rule} uniform {row['uniform']:.3f} " + " ".join(
                    f"{n} {v['delta']:+.3f}" for n, v in row["recipes"].items()), file=sys.stderr, flush=True)
            results[key] = rows
    doc = {"run": str(run_dir), "k": k, "steps": steps, "results": results, "command": " ".join(["python", *sys.argv])}
    (out / "results.json").write_text(json.dumps(doc, indent=1))
    (out / "results.md").write_text(markdown(doc) + "\n")
    return doc


def markdown(doc: dict) -> str:
    def cell(v):
        text = f"{v['delta']:+.3f} [{v['ci95'][0]:+.3f}, {v['ci95'][1]:+.3f}]"
        return f"**{text}**" if v["ci95"][0] > 0 or v["ci95"][1] < 0 else text

    lines = [f"Run {doc['run']}. Own-aspect Recall@10 minus uniform at the general set's c (paired 95% CI over the "
             "evaluation queries; **bold**: CI excludes zero); c rules: aspect = the SNR rule on the aspect's learning "
             "queries (the run's), general = the general learning queries' c, family = the family criterion at "
             "uniform weights on the aspect's learning queries.", ""]
    for kernel in ("per-group", "shared"):
        keys = [key for key in doc["results"] if key.endswith(kernel)]
        if not keys:
            continue
        names = list(next(iter(doc["results"][keys[0]].values()))["recipes"])
        lines += [f"**{kernel} kernel**", "", "| method | aspect | uniform | general | c (aspect/general/family) | "
                  + " | ".join(names) + " |", "|" + "---|" * (5 + len(names))]
        for key in keys:
            for a, row in doc["results"][key].items():
                c = "/".join(f"{row['c'][r]:g}" for r in ("aspect", "general", "family"))
                lines.append(f"| {key} | {a} | {row['uniform']:.3f} | {row['general']:.3f} | {c} | "
                             + " | ".join(cell(row["recipes"][n]) for n in names) + " |")
        lines += ["", f"Against the general weights on their own aspect ({kernel}):", "",
                  "| method | aspect | " + " | ".join(names) + " |", "|" + "---|" * (2 + len(names))]
        for key in keys:
            for a, row in doc["results"][key].items():
                lines.append(f"| {key} | {a} | " + " | ".join(cell(row["recipes"][n]["vs_general"]) for n in names)
                             + " |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", required=True, help="a finished bench_t2i_aspects.py --out folder")
    p.add_argument("--out", required=True)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--bootstrap", type=int, default=2000)
    args = p.parse_args(argv)
    doc = run(Path(args.run), Path(args.out), args.k, args.steps, args.bootstrap)
    print(markdown(doc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
