#!/usr/bin/env python
"""A label-free choice between uniform, the general weights and an aspect's family weights, on a finished
text-to-image aspects run (bench_t2i_aspects.py --out RUN, after its `--set aspect_objective=auto` pass).

    python bench/bench_aspect_select.py --run bench_out/cap/aspects_medium_s0 --out bench_out/select_s0

Per method, kernel and aspect: the aspect's learning queries are split in two halves, each family (prompt) in
both; family weights (per-group kernel, the general weights' c; inside the shared kernel) are learned on one half
and the family criterion (within-family minus across-family agreement of the weighted top-k,
`gradtrace.weights.family`) is read on the other, both ways; uniform and the general weights are read on the
same halves. The candidate with the highest held-out criterion is chosen (the full family weights when it is
theirs). Recall@10 of the choice against uniform on the own aspect, paired 95% CI, beside the family recipe and
the general weights. Writes results.json and results.md.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from common import T2I_ASPECTS, aspect_families, family_criterion, halves, t2i_eval_prompts
from gradtrace.metrics.stats import paired_ci

ASPECTS = T2I_ASPECTS


def run(run_dir: Path, out: Path, k: int, steps: int, bootstrap: int) -> dict:
    from gradtrace.attribution import fit_method, read_group_weights, score_queries
    from gradtrace.data import load_dataset
    from gradtrace.features.store import FeatureStore
    from gradtrace.metrics.retrieval import recall_at_k, shared_value_relevance
    from gradtrace.weights.family import family_codes, learn_family_weights

    src = json.loads((run_dir / "results-auto.json").read_text())
    prompts = src["prompts"]
    texts, ev_codes = t2i_eval_prompts(len(prompts["eval"]))
    assert texts == prompts["eval"], "the run's evaluation prompts are not the benchmark's draw"
    ds = load_dataset("shapes")
    results = {}
    for key in sorted({r["method"] for r in src["summary"]["table"] if "/" in r["method"]}):
        method, kernel = key.split("/")
        feats = run_dir / "features" / method
        train, ev = FeatureStore.open(feats / "train"), FeatureStore.open(feats / "eval")
        codes = ds.attribute_codes()[ds.index_of(np.asarray(train.ids))]
        weights = train.path / "weights"
        gen_w, gen = read_group_weights(train, ev, weights / f"{method}-{kernel}-general.json", method=method,
                                        kernel=kernel)
        c = gen["lambda_c"]
        pg_c = read_group_weights(train, ev, weights / f"{method}-per-group-general.json", method=method,
                                  kernel="per-group")[1]["lambda_c"] if kernel == "shared" else c
        fitted = fit_method(train, method, kernel=kernel, c=c, progress=False)
        pg = fitted if kernel == "per-group" else fit_method(train, method, kernel="per-group", c=pg_c,
                                                             progress=False)

        def applied(w, phi):
            if kernel == "per-group":
                return fitted.scores(phi, weights=w)
            base = fitted_base(method, c, train, w)
            return base.scores(phi)

        rows = {}
        for i, a in enumerate(ASPECTS):
            rel = shared_value_relevance(ev_codes[:, i], codes[:, i])
            learn = FeatureStore.open(feats / f"learn-{a}")
            phi = np.asarray(learn.features)
            fam = family_codes(aspect_families(run_dir, prompts[f"learn-{a}"], a))
            h = halves(fam)
            crit = {"uniform": [], "general": [], "family": []}
            for fit_on, read_on in ((h[0], h[1]), (h[1], h[0])):
                w = learn_family_weights(pg, phi[fit_on], list(fam[fit_on]), k=k, steps=steps, lr=0.05, l2=0.0,
                                         progress=False).weights
                for name, scores in (("uniform", fitted.scores(phi[read_on])),
                                     ("general", fitted.scores(phi[read_on], weights=gen_w)),
                                     ("family", applied(w, phi[read_on]))):
                    crit[name].append(family_criterion(scores, None, fam[read_on], k))
            mean = {n: float(np.mean(v)) for n, v in crit.items()}
            choice = max(mean, key=mean.get)
            recipe = score_queries(train, ev, method=method, kernel=kernel,
                                   weights_path=weights / f"{method}-{kernel}-{a}.json", progress=False).scores()
            scores = {"uniform": fitted.scores(np.asarray(ev.features)),
                      "general": fitted.scores(np.asarray(ev.features), weights=gen_w), "family": recipe}
            u = recall_at_k(scores["uniform"], rel, 10).values
            row = {"criterion": mean, "chosen": choice}
            for name in ("family", "general", "choice"):
                r = recall_at_k(scores[choice if name == "choice" else name], rel, 10).values
                row[name] = {"delta": float(np.mean(r - u)), "ci95": paired_ci(r, u, bootstrap)}
            rows[a] = row
            print(f"{key} {a}: {mean} -> {choice}; {row['choice']}", file=sys.stderr, flush=True)
        results[key] = rows
    doc = {"run": str(run_dir), "results": results, "command": " ".join(["python", *sys.argv])}
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(doc, indent=1))
    (out / "results.md").write_text(markdown(doc) + "\n")
    return doc


def fitted_base(method: str, c: float, train, w: np.ndarray):
    from gradtrace.methods import configure

    base = configure(method, kernel="shared", c=c).with_feature_weights(dict(zip(train.group_names, w.tolist())))
    kw = {"row_scale": train.row_scale} if base.needs_row_scale else {}
    return base.fit(train.features, train.group_slices, **kw)


def markdown(doc: dict) -> str:
    def cell(v):
        text = f"{v['delta']:+.3f} [{v['ci95'][0]:+.3f}, {v['ci95'][1]:+.3f}]"
        return f"**{text}**" if v["ci95"][0] > 0 or v["ci95"][1] < 0 else text

    lines = [f"Run {doc['run']}: own-aspect Recall@10 − uniform (paired 95% CI; **bold**: CI excludes zero).", "",
             "| method | aspect | held-out criterion (uniform / general / family) | choice | family recipe | general "
             "| choice |", "|" + "---|" * 7]
    for key, rows in doc["results"].items():
        for a, r in rows.items():
            crit = " / ".join(f"{r['criterion'][n]:.3f}" for n in ("uniform", "general", "family"))
            lines.append(f"| {key} | {a} | {crit} | {r['chosen']} | {cell(r['family'])} | {cell(r['general'])} | "
                         f"{cell(r['choice'])} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--bootstrap", type=int, default=2000)
    args = p.parse_args(argv)
    print(markdown(run(Path(args.run), Path(args.out), args.k, args.steps, args.bootstrap)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
