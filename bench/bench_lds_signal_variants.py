#!/usr/bin/env python
"""Other signals for the SNR objective, scored by the LDS of a finished text-to-image LDS run.

    python bench/bench_lds_signal_variants.py --lds bench_out/t2i_lds      # after bench/bench_t2i_lds.py

The objective's signal is the mean of each learning query's k largest weighted scores; the LDS also rewards the
most negative scores (training examples whose removal helps the query). For each method and kernel of the run,
weights are learned on the run's learning queries (AdamW on θ from uniform, lr 0.05, 200 steps, k = 10: the
library's defaults, on the dense contributions) with three signals over the same L2 norm:
- `topk`: the mean of the k largest τ (the library's objective);
- `abs`: the mean of the k largest |τ|;
- `two-sided`: half of (mean of the k largest τ − mean of the k smallest τ).
No guard; λ at the run's c. Results: LDS/signal_variants.json. Evaluation queries are used only for the LDS.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

from common import T2I_LDS_MEASUREMENT, T2I_LDS_METHODS, mean_lds, open_t2i_lds

SIGNALS = ("topk", "abs", "two-sided")


def signal_loss(contrib: torch.Tensor, w: torch.Tensor, signal: str, k: int = 10) -> torch.Tensor:
    tau = contrib @ w
    def top(x):
        return torch.gather(x, 1, torch.topk(x.detach(), k, 1).indices).mean(1)
    s = {"topk": lambda: top(tau), "abs": lambda: top(tau.abs()),
         "two-sided": lambda: (top(tau) + top(-tau)) / 2}[signal]()
    return (-s / tau.norm(dim=1)).mean()


def learn(contrib: torch.Tensor, signal: str, steps: int = 200, lr: float = 0.05) -> np.ndarray:
    theta = torch.zeros(contrib.shape[2], dtype=torch.float64, requires_grad=True)
    opt = torch.optim.AdamW([theta], lr=lr, weight_decay=0.0)
    for _ in range(steps):
        opt.zero_grad()
        signal_loss(contrib, torch.softmax(theta, 0), signal).backward()
        opt.step()
    return torch.softmax(theta, 0).detach().numpy()


def main(argv=None) -> int:
    from gradtrace.attribution import fit_method
    from gradtrace.features.store import FeatureStore
    from gradtrace.weights import dense_contributions

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lds", required=True, help="a finished bench_t2i_lds.py --out folder")
    lds_dir = Path(p.parse_args(argv).lds)
    res, problems = open_t2i_lds(lds_dir)
    report = {}
    for method, kernel in T2I_LDS_METHODS:
        base = lds_dir / "features" / T2I_LDS_MEASUREMENT.get(method, "loss")
        st = {n: FeatureStore.open(base / n) for n in ("train", "learn", "heldout", "samples")}
        karg = "shared" if kernel == "identity" else kernel
        fitted = fit_method(st["train"], method, kernel=karg, c=res["lambda"][f"{method}/{kernel}"]["c"],
                            progress=False)
        contrib = torch.from_numpy(dense_contributions(fitted, np.asarray(st["learn"].features, np.float64)))
        evals = {q: np.asarray(st[q].features) for q in ("heldout", "samples")}
        row = {"uniform": mean_lds(problems, fitted, evals)}
        row.update({s: mean_lds(problems, fitted, evals, learn(contrib, s)) for s in SIGNALS})
        report[f"{method}/{kernel}"] = row
        print(f"{method}/{kernel}: " + ", ".join(f"{n} {v:.4f}" for n, v in row.items()), flush=True)
    (lds_dir / "signal_variants.json").write_text(json.dumps({"command": " ".join(sys.argv), "lds": report},
                                                             indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
