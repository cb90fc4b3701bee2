#!/usr/bin/env python
"""The λ scale of an aspect's family weights inside the shared kernel, on a finished text-to-image aspects run
(bench_t2i_aspects.py --out RUN, after its `--set aspect_objective=auto` pass).

    python bench/bench_inside_c.py --run bench_out/cap/aspects_medium_s0 [--mults 1,10,100] [--alphas 1,2]

Per method (D-TRAK, DAS), shared kernel and aspect, with the run's family weights w (learned on the per-group kernel):
own-aspect Recall@10 − uniform at the general weights' c (c0), paired 95% CI, for
- uniform weights at c0 · m and the family weights w^α / Σ w^α inside the kernel at c0 · m, for each m and α;
- the family weights at the c the family criterion chooses on the learning queries (`gradtrace.weights.inside_lambda`,
  the grid 1e-4..1e6), against uniform at c0 and against uniform at that c.
Writes RUN/inside_c.json and prints a table (`*`: CI above zero, `-`: below).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from common import T2I_ASPECTS, aspect_families, t2i_eval_prompts, t2i_method_stores


def run(run_dir: Path, mults: list[float], alphas: list[float], bootstrap: int) -> dict:
    from gradtrace.attribution import read_group_weights
    from gradtrace.features.store import FeatureStore
    from gradtrace.methods import configure
    from gradtrace.metrics.retrieval import recall_at_k, shared_value_relevance
    from gradtrace.metrics.stats import paired_ci
    from gradtrace.weights.inside_lambda import choose_inside_c

    prompts = json.loads((run_dir / "results-auto.json").read_text())["prompts"]
    texts, ev_codes = t2i_eval_prompts(len(prompts["eval"]))
    assert texts == prompts["eval"], "the run's evaluation prompts are not the benchmark's draw"
    rows = []
    for method in ("dtrak", "das"):
        feats = run_dir / "features" / method
        train, ev, codes = t2i_method_stores(run_dir, method)
        weights = train.path / "weights"
        c0 = read_group_weights(train, ev, weights / f"{method}-shared-general.json", method=method,
                                kernel="shared")[1]["lambda_c"]
        phi_e = np.asarray(ev.features)
        row_scale = train.row_scale if method == "das" else None

        def scores(c, w=None):
            base = configure(method, kernel="shared", c=c)
            if w is not None:
                base = base.with_feature_weights(dict(zip(train.group_names, np.asarray(w).tolist())))
            kw = {"row_scale": row_scale} if base.needs_row_scale else {}
            return base.fit(train.features, train.group_slices, **kw).scores(phi_e)

        for i, a in enumerate(T2I_ASPECTS):
            rel = shared_value_relevance(ev_codes[:, i], codes[:, i])
            recall = lambda s: recall_at_k(s, rel, 10).values  # noqa: E731
            u0 = recall(scores(c0))

            def vs(r, base):
                return {"delta": float(np.mean(r - base)), "ci95": paired_ci(r, base, bootstrap)}

            w = read_group_weights(train, ev, weights / f"{method}-shared-{a}.json", method=method,
                                   kernel="shared")[0]
            row = {"method": method, "aspect": a, "c0": c0, "grid": {}}
            for m in mults:
                row["grid"][f"uniform x{m:g}"] = vs(recall(scores(c0 * m)), u0)
                for al in alphas:
                    wa = w ** al / np.sum(w ** al)
                    row["grid"][f"family^{al:g} x{m:g}"] = vs(recall(scores(c0 * m, wa)), u0)
            learn = FeatureStore.open(feats / f"learn-{a}")
            fam = aspect_families(run_dir, prompts[f"learn-{a}"], a)
            c, _ = choose_inside_c(train.features, train.group_slices, w, np.asarray(learn.features), fam, k=10,
                                   row_scale=row_scale)
            r = recall(scores(c, w))
            row.update(chosen_c=c, chosen=vs(r, u0), chosen_vs_uniform_at_c=vs(r, recall(scores(c))))
            rows.append(row)
            print(line(row), flush=True)
    doc = {"run": str(run_dir), "rows": rows, "command": " ".join(["python", *sys.argv])}
    (run_dir / "inside_c.json").write_text(json.dumps(doc, indent=1))
    return doc


def mark(v: dict) -> str:
    return f"{v['delta']:+.3f}" + ("*" if v["ci95"][0] > 0 else "-" if v["ci95"][1] < 0 else "")


def line(row: dict) -> str:
    grid = " ".join(f"{k}: {mark(v)}" for k, v in row["grid"].items())
    return (f"{row['method']} {row['aspect']} (c0 {row['c0']:g}) {grid} | chosen c {row['chosen_c']:g}: "
            f"{mark(row['chosen'])}, vs uniform at it {mark(row['chosen_vs_uniform_at_c'])}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", required=True)
    p.add_argument("--mults", default="1,10,100")
    p.add_argument("--alphas", default="1")
    p.add_argument("--bootstrap", type=int, default=2000)
    args = p.parse_args(argv)
    run(Path(args.run), [float(m) for m in args.mults.split(",")], [float(a) for a in args.alphas.split(",")],
        args.bootstrap)
    return 0


if __name__ == "__main__":
    sys.exit(main())
