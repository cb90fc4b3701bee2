#!/usr/bin/env python
"""The weight learner's k (the top-k of the SNR objective's signal), or its l2 pull toward uniform, against the LDS of a
finished text-to-image LDS run.

    python bench/bench_lds_learner_k.py --lds bench_out/t2i_lds [--ks 2,5,10,32,80]     # after bench/bench_t2i_lds.py
    python bench/bench_lds_learner_k.py --lds bench_out/t2i_lds --l2s 0,0.03,0.3,3      # l2 at k = 10

For each method and kernel of the run, at the run's λ: weights learned on the run's learning queries
(`learn-weights --k K --l2 L --steps 200`, no guard; written under LDS/learner_k/ or LDS/learner_l2/), and the LDS
over both evaluation query sets with uniform and with each setting's weights. Results: `LDS/learner_k.json` or
`LDS/learner_l2.json`.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from common import T2I_LDS_MEASUREMENT, T2I_LDS_METHODS, mean_lds, open_t2i_lds


def main(argv=None) -> int:
    from gradtrace.attribution import fit_method
    from gradtrace.attribution.weights_file import read_group_weights
    from gradtrace.features.store import FeatureStore
    from gradtrace.pipeline import LearnWeightsSpec, learn_weights_run

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lds", required=True, help="a finished bench_t2i_lds.py --out folder")
    p.add_argument("--ks", default="2,5,10,32,80", help="values of the learner's k")
    p.add_argument("--l2s", default=None, help="values of the learner's l2 (at k = 10) instead of k")
    args = p.parse_args(argv)
    out = Path(args.lds)
    sweep = "l2" if args.l2s else "k"
    values = [float(v) for v in args.l2s.split(",")] if args.l2s else [int(k) for k in args.ks.split(",")]
    res, problems = open_t2i_lds(out)
    report = {}
    for method, kernel in T2I_LDS_METHODS:
        base = out / "features" / T2I_LDS_MEASUREMENT.get(method, "loss")
        karg = "shared" if kernel == "identity" else kernel
        train, heldout = FeatureStore.open(base / "train"), FeatureStore.open(base / "heldout")
        c = res["lambda"][f"{method}/{kernel}"]["c"]
        fitted = fit_method(train, method, kernel=karg, c=c, progress=False)
        evals = {q: np.asarray(FeatureStore.open(base / q).features) for q in problems}

        row = {"uniform": mean_lds(problems, fitted, evals)}
        for v in values:
            opts = {"k": 10, "l2": v} if sweep == "l2" else {"k": v}
            path = out / f"learner_{sweep}" / f"{method}-{kernel}-{sweep}{v}.json"
            learn_weights_run(LearnWeightsSpec(train=str(train.path), out=str(path), queries=str(base / "learn"),
                                               method=method, kernel=karg, lambda_c=str(c), steps=200, guard="none",
                                               **opts),
                              progress=False)
            row[f"{sweep}={v}"] = mean_lds(problems, fitted, evals,
                                           read_group_weights(train, heldout, path, method=method, kernel=karg)[0])
        report[f"{method}/{kernel}"] = row
        print(f"{method}/{kernel}: " + ", ".join(f"{name} {v:.4f}" for name, v in row.items()), flush=True)
    (out / f"learner_{sweep}.json").write_text(json.dumps({"command": " ".join(sys.argv), "lds": report}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
