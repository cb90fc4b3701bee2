"""The per-group LDS picture: each parameter group's LDS alone, with its 95% CI, against all groups together."""
from __future__ import annotations

import numpy as np

from gradtrace.report.figures import pyplot, save_figure


def plot_per_group(per_group: dict, overall: dict, path, title: str) -> None:
    names = list(per_group)
    means = np.array([np.nan if per_group[n]["mean"] is None else per_group[n]["mean"] for n in names])
    lo = np.array([np.nan if per_group[n]["ci95"][0] is None else per_group[n]["ci95"][0] for n in names])
    hi = np.array([np.nan if per_group[n]["ci95"][1] is None else per_group[n]["ci95"][1] for n in names])
    err = np.nan_to_num(np.stack([means - lo, hi - means]), nan=0.0)
    fig, ax = pyplot().subplots(figsize=(max(4.0, 0.6 * len(names) + 2), 3.6))
    ax.bar(range(len(names)), np.nan_to_num(means), yerr=err, capsize=3, color="#4C72B0")
    if overall.get("mean") is not None:
        ax.axhline(overall["mean"], color="#C44E52", ls="--", lw=1.2, label=f"all groups: {overall['mean']:.3f}")
        ax.legend(loc="best", fontsize=8)
    ax.axhline(0, color="black", lw=0.6)
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(names, rotation=45, ha="right", fontsize=8)
    ax.set_ylabel("LDS (mean, 95% CI)")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    save_figure(fig, path, dpi=120, tight=False)
