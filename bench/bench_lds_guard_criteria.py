#!/usr/bin/env python
"""Label-free criteria against the LDS of a finished text-to-image LDS run, as the learned weights are shrunk toward
uniform: which statistic of the learning queries moves with the LDS?

    python bench/bench_lds_guard_criteria.py --lds bench_out/t2i_lds      # after bench/bench_t2i_lds.py

For each method and kernel of the run, the learned (unguarded) weights w are shrunk as w^α / Σ w^α for α in
ALPHAS (α = 0 is uniform, 1 the learned weights; softmax(α θ) is the guard's family) and the row reports
- the LDS over both evaluation query sets (the run's cached model outputs; evaluation queries are used only here);
- `rel`: split-noise reliability, the mean over learning queries of the Pearson correlation over training rows of
  the scores of two featurizations of the same query with independent noise draws (`--noise-seed 0` and 1; the
  second is written beside each store as `<name>_n1`). Diffusion features are Monte-Carlo estimates; weights
  that amplify that noise should lower it;
- `snr@k`: the SNR objective (mean top-k score / L2 norm) on the learning queries for k = 10 (the learner's) and
  larger k, which reward more of the ranking than the top 10.
No statistic reads the evaluation queries. Results: `LDS/guard_criteria.{json,md}`.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from common import T2I_LDS_MEASUREMENT, T2I_LDS_METHODS, mean_lds, open_t2i_lds, snr_of_scores

ALPHAS = (0.0, 0.25, 0.5, 0.75, 1.0)
KS = (10, 32, 80)
def reliability(a: np.ndarray, b: np.ndarray) -> float:
    a = a - a.mean(1, keepdims=True)
    b = b - b.mean(1, keepdims=True)
    return float(np.mean((a * b).sum(1) / np.sqrt((a * a).sum(1) * (b * b).sum(1))))


def main(argv=None) -> int:
    from gradtrace.attribution import fit_method
    from gradtrace.attribution.weights_file import read_group_weights
    from gradtrace.features.store import FeatureStore
    from gradtrace.pipeline import FeaturizeSpec, featurize_run

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lds", required=True, help="a finished bench_t2i_lds.py --out folder")
    lds_dir = Path(p.parse_args(argv).lds)
    res, problems = open_t2i_lds(lds_dir)
    s, run = res["settings"], res["run"]
    sources = {"heldout": {"data": "shapes", "ids": np.asarray(res["splits"]["heldout_ids"])},
               "samples": {"samples": str(lds_dir / "samples_eval")},
               "learn": {"samples": str(lds_dir / "samples_learn")}}
    stores = {}
    for meas in ("loss", "dtrak", "das"):
        base = lds_dir / "features" / meas
        st = {n: FeatureStore.open(base / n) for n in ("train", *sources)}
        for name, src in sources.items():  # the second noise draw, same projection and timesteps
            st[f"{name}_n1"] = featurize_run(FeaturizeSpec(
                checkpoint=run, out=str(base / f"{name}_n1"), projection="rademacher", dim=s["dim"],
                timesteps=s["timesteps"], measurement=meas, noise_seed=1, **src), progress=False)
        stores[meas] = st
    rows = []
    for method, kernel in T2I_LDS_METHODS:
        st = stores[T2I_LDS_MEASUREMENT.get(method, "loss")]
        karg = "shared" if kernel == "identity" else kernel
        fitted = fit_method(st["train"], method, kernel=karg, c=res["lambda"][f"{method}/{kernel}"]["c"],
                            progress=False)
        learned, _ = read_group_weights(st["train"], st["heldout"], lds_dir / "weights" / f"{method}-{kernel}.json",
                                        method=method, kernel=karg)
        learned = np.asarray(learned, dtype=np.float64)
        feats = {name: np.asarray(store.features) for name, store in st.items() if name != "train"}
        for alpha in ALPHAS:
            w = learned ** alpha / np.sum(learned ** alpha)
            learn0, learn1 = (fitted.scores(feats[n], weights=w) for n in ("learn", "learn_n1"))
            rows.append({"method": method, "kernel": kernel, "alpha": alpha,
                         "lds": mean_lds(problems, fitted, feats, w), "rel": reliability(learn0, learn1),
                         **{f"snr@{k}": snr_of_scores(learn0, k) for k in KS}})
            print(json.dumps(rows[-1]), flush=True)
    lines = ["| method | kernel | α | LDS | rel | " + " | ".join(f"snr@{k}" for k in KS) + " |",
             "|---|---|---|---|---|" + "---|" * len(KS)]
    lines += [f"| {r['method']} | {r['kernel']} | {r['alpha']:g} | {r['lds']:.4f} | {r['rel']:.4f} | "
              + " | ".join(f"{r[f'snr@{k}']:.4f}" for k in KS) + " |" for r in rows]
    (lds_dir / "guard_criteria.json").write_text(json.dumps({"rows": rows, "command": " ".join(sys.argv)}, indent=1))
    (lds_dir / "guard_criteria.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
