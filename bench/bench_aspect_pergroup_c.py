#!/usr/bin/env python
"""A study, not the recipe: the per-group kernel's c for an aspect's family weights chosen by the family criterion on
held-out halves of the learning queries, on a finished text-to-image aspects run (bench_t2i_aspects.py --out RUN,
after its `--set aspect_objective=auto` pass).

    python bench/bench_aspect_pergroup_c.py --run bench_out/cap/aspects_medium_s0 [--cs 0.0001,0.001,...,100]

Per method (D-TRAK, DAS) and aspect, for each c: family weights learned on one half of the aspect's learning queries
(every family in both halves) and the family criterion read on the other, both ways; the c with the best held-out
criterion is chosen and its weights, learned on all learning queries, are scored. Prints own-aspect Recall@10 −
uniform at the general weights' c for every c, and the choice (paired 95% CI; `*` above zero, `-` below).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from common import T2I_ASPECTS, aspect_families, family_criterion, halves, t2i_eval_prompts, t2i_method_stores


def run(run_dir: Path, cs: list[float], bootstrap: int) -> list[dict]:
    from gradtrace.attribution import fit_method, read_group_weights
    from gradtrace.features.store import FeatureStore
    from gradtrace.metrics.retrieval import recall_at_k, shared_value_relevance
    from gradtrace.metrics.stats import paired_ci
    from gradtrace.weights.family import family_codes, learn_family_weights

    prompts = json.loads((run_dir / "results-auto.json").read_text())["prompts"]
    _, ev_codes = t2i_eval_prompts(len(prompts["eval"]))
    rows = []
    for method in ("dtrak", "das"):
        feats = run_dir / "features" / method
        train, ev, codes = t2i_method_stores(run_dir, method)
        c0 = read_group_weights(train, ev, train.path / "weights" / f"{method}-per-group-general.json",
                                method=method, kernel="per-group")[1]["lambda_c"]
        phi_e = np.asarray(ev.features)
        fits = {c: fit_method(train, method, kernel="per-group", c=c, progress=False) for c in sorted({*cs, c0})}
        for i, a in enumerate(T2I_ASPECTS):
            rel = shared_value_relevance(ev_codes[:, i], codes[:, i])
            phi = np.asarray(FeatureStore.open(feats / f"learn-{a}").features)
            values = np.asarray(aspect_families(run_dir, prompts[f"learn-{a}"], a), dtype=object)
            fam = family_codes(list(values))
            h = halves(fam)
            u0 = recall_at_k(fits[c0].scores(phi_e), rel, 10).values

            def learn(f, rows_):
                return learn_family_weights(f, phi[rows_], list(values[rows_]), k=10, steps=200, lr=0.05, l2=0.0,
                                            progress=False, signal_p=None).weights

            crit, delta = {}, {}
            for c in cs:
                f = fits[c]
                crit[c] = float(np.mean([family_criterion(f.scores(phi[b], weights=learn(f, a_)), None, fam[b], 10)
                                         for a_, b in ((h[0], h[1]), (h[1], h[0]))]))
                r = recall_at_k(f.scores(phi_e, weights=learn(f, np.arange(len(fam)))), rel, 10).values
                delta[c] = {"delta": float(np.mean(r - u0)), "ci95": paired_ci(r, u0, bootstrap)}
            best = max(crit, key=crit.get)
            rows.append({"method": method, "aspect": a, "c0": c0, "criterion": crit, "recall": delta, "chosen": best})
            mark = lambda v: f"{v['delta']:+.3f}" + ("*" if v["ci95"][0] > 0 else "-" if v["ci95"][1] < 0 else "")  # noqa: E731
            print(f"{method} {a} (c0 {c0:g}) " + " ".join(f"c {c:g}: {mark(delta[c])}" for c in cs)
                  + f" | chosen c {best:g}: {mark(delta[best])}", flush=True)
    (run_dir / "pergroup_c.json").write_text(json.dumps({"rows": rows, "command": " ".join(sys.argv)}, indent=1))
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", required=True)
    p.add_argument("--cs", default="0.0001,0.001,0.01,0.1,1,10,100")
    p.add_argument("--bootstrap", type=int, default=2000)
    args = p.parse_args(argv)
    run(Path(args.run), [float(c) for c in args.cs.split(",")], args.bootstrap)
    return 0


if __name__ == "__main__":
    sys.exit(main())
