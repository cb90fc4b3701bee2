#!/usr/bin/env python
"""The aspect recipe of `learn-weights` on a finished shapes aspects run (bench_aspects.py --out RUN).

    python bench/bench_aspects_recipe.py --run bench_out/aspects --out bench_out/aspects_recipe

Per base method and kernel of the run, as a user runs it: general weights first (`learn-weights` on the run's
general learning queries, λ auto, the store's default weights path), then each aspect's weights (`learn-weights
--queries learn-ASPECT --aspect ASPECT`, every other option at its default: the family objective with families =
the token value each learning query was generated with, the general weights' c; on the shared kernel learned on the
per-group kernel and applied inside it, at the c the family criterion chooses). Every weighting is scored by
`score_queries`, as `attribute` scores it. Recall@10 on the run's evaluation queries (relevance: the query's requested
value) against uniform (at the general weights' c, and at the aspect weights' own c where that differs) and against
the general weights, paired bootstrap 95% CI; the run's own SNR aspect rows beside them. Writes results.json and
results.md.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from aspects_tables import ASPECTS
from common import effective_groups
from gradtrace.metrics.stats import paired_ci


def run(run_dir: Path, out: Path, bootstrap: int) -> dict:
    from gradtrace.attribution import read_group_weights, score_queries
    from gradtrace.features.store import FeatureStore
    from gradtrace.metrics.retrieval import recall_at_k, shared_value_relevance
    from gradtrace.pipeline import LearnWeightsSpec, learn_weights_run

    src = json.loads((run_dir / "results.json").read_text())
    out.mkdir(parents=True, exist_ok=True)
    results = {}
    for key in src["methods_run"]:
        method, kernel = key.split("/")
        meas = {"dtrak": "dtrak", "das": "das"}.get(method, "loss")
        feats = run_dir / "features" / meas
        train, ev = FeatureStore.open(feats / "train"), FeatureStore.open(feats / "eval")
        rel = {a: shared_value_relevance(np.asarray(ev.cond)[:, i], np.asarray(train.cond)[:, i])
               for i, a in enumerate(ASPECTS)}
        common = dict(train=str(train.path), method=method, kernel=kernel)

        def learn(name, **kw):
            path, doc = learn_weights_run(LearnWeightsSpec(queries=str(feats / f"learn-{name}"), **common, **kw),
                                          progress=False)
            w, info = read_group_weights(train, ev, path, method=method, kernel=kernel)
            scored = score_queries(train, ev, method=method, kernel=kernel, weights_path=path, progress=False)
            return scored.scores(), {"c": info["lambda_c"], "apply": info["apply"], "n_eff": effective_groups(w),
                                     "objective": doc["provenance"].get("objective"), "path": str(path)}

        gen_scores, gen = learn("general")
        uni = score_queries(train, ev, method=method, kernel=kernel, c=gen["c"], progress=False).scores()
        rows = {}
        for a in ASPECTS:
            scores, info = learn(a, aspect=a)
            uni_c = uni if info["c"] == gen["c"] else score_queries(train, ev, method=method, kernel=kernel,
                                                                    c=info["c"], progress=False).scores()
            u, g, r, uc = (recall_at_k(x, rel[a], 10).values for x in (uni, gen_scores, scores, uni_c))
            ok = ~np.isnan(u)
            snr = next(v for v in src["summary"]["verdict"] if v["method"] == key and v["aspect"] == a
                       and v["weights"] == a)
            rows[a] = {**info, "uniform": float(np.mean(u[ok])), "general": float(np.mean(g[ok])),
                       "recipe": float(np.mean(r[ok])), "vs_uniform": paired_ci(r[ok], u[ok], bootstrap),
                       "vs_general": paired_ci(r[ok], g[ok], bootstrap), "general_c": gen["c"],
                       "uniform_same_c": float(np.mean(uc[ok])),
                       "vs_uniform_same_c": paired_ci(r[ok], uc[ok], bootstrap),
                       "snr_recipe": {k: snr[k] for k in ("learned", "delta", "ci95", "verdict")}}
            print(f"{key} {a}: uniform {rows[a]['uniform']:.3f} recipe {rows[a]['recipe']:.3f} "
                  f"{rows[a]['vs_uniform']} vs general {rows[a]['vs_general']}", file=sys.stderr, flush=True)
        results[key] = rows
    doc = {"run": str(run_dir), "results": results, "command": " ".join(["python", *sys.argv])}
    (out / "results.json").write_text(json.dumps(doc, indent=1))
    (out / "results.md").write_text(markdown(doc) + "\n")
    return doc


def markdown(doc: dict) -> str:
    def cell(delta, ci):
        text = f"{delta:+.3f} [{ci[0]:+.3f}, {ci[1]:+.3f}]"
        return f"**{text}**" if ci[0] > 0 or ci[1] < 0 else text

    lines = [f"Run {doc['run']}: own-aspect Recall@10 of the aspect recipe against uniform and against the general "
             "weights (paired 95% CI; **bold**: CI excludes zero), and the SNR aspect weights of the run against "
             "uniform.", "",
             "| method | aspect | objective | applied | c (recipe / general) | uniform | general | recipe | "
             "recipe − uniform | recipe − uniform at its c | recipe − general | SNR aspect weights − uniform |",
             "|" + "---|" * 12]
    for key, rows in doc["results"].items():
        for a, r in rows.items():
            snr = r["snr_recipe"]
            same = (cell(r['recipe'] - r['uniform_same_c'], r['vs_uniform_same_c']) if r['c'] != r['general_c']
                    else "(same c)")
            lines.append(f"| {key} | {a} | {r['objective']} | {r['apply']} | {r['c']:g} / {r['general_c']:g} | "
                         f"{r['uniform']:.3f} | {r['general']:.3f} "
                         f"| {r['recipe']:.3f} | {cell(r['recipe'] - r['uniform'], r['vs_uniform'])} | {same} | "
                         f"{cell(r['recipe'] - r['general'], r['vs_general'])} | {cell(snr['delta'], snr['ci95'])} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", required=True, help="a finished bench_aspects.py --out folder")
    p.add_argument("--out", required=True)
    p.add_argument("--bootstrap", type=int, default=2000)
    args = p.parse_args(argv)
    print(markdown(run(Path(args.run), Path(args.out), args.bootstrap)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
