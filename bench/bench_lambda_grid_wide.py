#!/usr/bin/env python
"""The label-free λ rule on a wider grid than `--lambda-c auto` searches, against the LDS of a finished text-to-image
LDS run: where the rule stops at the grid's edge, would a wider grid have chosen better?

    python bench/bench_lambda_grid_wide.py --lds bench_out/t2i_lds      # after bench/bench_t2i_lds.py

For each TRAK-family method and kernel of the run, uniform weights, c on a log grid 1e-7..1e3 (21 values): the
SNR objective (mean top-10 score / L2 norm; higher is better) on the run's learning queries, and the LDS over both
evaluation query sets (cached model outputs; evaluation queries only for the LDS). Prints the rule's choice on the
default grid (1e-4..1), on the wide grid, and the LDS-best c.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from common import T2I_LDS_MEASUREMENT, T2I_LDS_METHODS, mean_lds, open_t2i_lds, snr_of_scores

GRID = np.logspace(-7, 3, 21)
METHODS = [mk for mk in T2I_LDS_METHODS if mk[1] != "identity"]  # the kernels with a λ


def main(argv=None) -> int:
    from gradtrace.attribution import fit_method
    from gradtrace.features.store import FeatureStore

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lds", required=True, help="a finished bench_t2i_lds.py --out folder")
    out = Path(p.parse_args(argv).lds)
    _, problems = open_t2i_lds(out)
    report = {}
    for method, kernel in METHODS:
        base = out / "features" / T2I_LDS_MEASUREMENT.get(method, "loss")
        train = FeatureStore.open(base / "train")
        learn = np.asarray(FeatureStore.open(base / "learn").features)
        evals = {q: np.asarray(FeatureStore.open(base / q).features) for q in problems}
        rows = []
        for c in GRID:
            fitted = fit_method(train, method, kernel=kernel, c=float(c), progress=False)
            rows.append({"c": float(c), "snr": snr_of_scores(fitted.scores(learn), 10),
                         "lds": mean_lds(problems, fitted, evals)})
        default = [r for r in rows if 1e-4 * 0.999 <= r["c"] <= 1.001]
        pick = {"default grid": max(default, key=lambda r: r["snr"]), "wide grid": max(rows, key=lambda r: r["snr"]),
                "LDS-best": max(rows, key=lambda r: r["lds"])}
        report[f"{method}/{kernel}"] = {"rows": rows, "picks": pick}
        print(f"{method}/{kernel}: "
              + " | ".join(f"{name} c={r['c']:.0e} LDS {r['lds']:.4f}" for name, r in pick.items()))
        print("   c:snr/LDS " + " ".join(f"{r['c']:.0e}:{r['snr']:.4f}/{r['lds']:.3f}" for r in rows), flush=True)
    (out / "lambda_grid_wide.json").write_text(json.dumps({"command": " ".join(sys.argv), "methods": report}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
