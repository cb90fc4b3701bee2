"""The tables of `bench_aspects.py`: its weight sets, the summary (aspect weights against uniform, paired bootstrap CI)
and the markdown of results.md."""
from __future__ import annotations

import numpy as np

from common import effective_groups
from gradtrace.data.shapes import ATTRIBUTES
from gradtrace.metrics.stats import paired_ci

ASPECTS = tuple(ATTRIBUTES)  # subject, style, background
WEIGHT_SETS = [(w, g) for g in ("none", "holdout") for w in ("general", *ASPECTS)]  # learning set × guard


def weights_label(wset: str, guard: str) -> str:
    return wset if guard == "none" else f"{wset} (guarded)"


def summarize(results: dict, baselines: dict, s: dict) -> dict:
    """Table rows, and per method × aspect: aspect weights vs uniform on Recall@10 (paired bootstrap CI)."""
    table, verdict = [], []
    for key, r in results.items():
        for wset, row in r["rows"].items():
            table.append({"method": key, "weights": wset, "c": row["c"], "n_eff": effective_groups(row["weights"]),
                          **{f"{a}_{m}": row["metrics"][a][m] for a in ASPECTS for m in ("recall", "map")}})
        for a in ASPECTS:
            u = r["rows"]["uniform"]["metrics"][a]["recall_per_query"]
            for cmp in ("general", a, weights_label("general", "holdout"), weights_label(a, "holdout")):
                w = r["rows"][cmp]["metrics"][a]["recall_per_query"]
                ok = ~np.isnan(u) & ~np.isnan(w)
                ci = paired_ci(w[ok], u[ok], s["bootstrap"])
                verdict.append({"method": key, "aspect": a, "weights": cmp, "uniform": float(np.mean(u[ok])),
                                "learned": float(np.mean(w[ok])), "delta": float(np.mean(w[ok] - u[ok])), "ci95": ci,
                                "verdict": "beats" if ci[0] > 0 else ("worse" if ci[1] < 0 else "no clear difference")})
    for name, row in baselines.items():
        table.append({"method": name, "weights": "—", "c": None, "n_eff": None,
                      **{f"{a}_{m}": row["metrics"][a][m] for a in ASPECTS for m in ("recall", "map")}})
    return {"table": table, "verdict": verdict}


def markdown(doc: dict) -> str:
    fmt = lambda v: "—" if v is None else f"{v:.3f}"  # noqa: E731
    head = "| method | weights | λ c | n_eff | " + " | ".join(f"{a} R@10 | {a} mAP" for a in ASPECTS) + " |"
    lines = [head, "|" + "---|" * (4 + 2 * len(ASPECTS))]
    for r in doc["summary"]["table"]:
        c = "—" if r["c"] is None else f"{r['c']:g}"
        n_eff = "—" if r["n_eff"] is None else f"{r['n_eff']:.1f}"
        lines.append(f"| {r['method']} | {r['weights']} | {c} | {n_eff} | " +
                     " | ".join(f"{fmt(r[f'{a}_recall'])} | {fmt(r[f'{a}_map'])}" for a in ASPECTS) + " |")
    lines += ["", "Recall@10 of learned weights vs uniform (paired bootstrap 95% CI over evaluation queries):", "",
              "| method | aspect | weights | uniform | learned | Δ | 95% CI | verdict |",
              "|---|---|---|---|---|---|---|---|"]
    for v in doc["summary"]["verdict"]:
        lines.append(f"| {v['method']} | {v['aspect']} | {v['weights']} | {v['uniform']:.3f} | {v['learned']:.3f} | "
                     f"{v['delta']:+.3f} | [{v['ci95'][0]:+.3f}, {v['ci95'][1]:+.3f}] | {v['verdict']} |")
    lines += ["", "Per-group diagnostics (general λ): best single group on the evaluation queries (diagnostic only), "
              "the group with the best label-free solo quality on the aspect's learning queries, and the Spearman "
              "correlation between solo quality and single-group Recall@10:", "",
              "| method | aspect | best group (R@10) | solo-best group (R@10) | ρ(solo, R@10) |",
              "|---|---|---|---|---|"]
    for key, r in doc["methods"].items():
        for a, d in r["diagnostics"].items():
            lines.append(f"| {key} | {a} | {d['best_group']} ({d['best_group_recall']:.3f}) | {d['solo_best_group']} "
                         f"({d['solo_best_group_recall']:.3f}) | {d['spearman_solo_vs_group_recall']:.2f} |")
    lines += ["", "Do the generated queries show the requested values? Pixel logistic-regression accuracy on the "
              "requested attribute (held-out = real shapes not in training; chance = 1/6, 1/4, 1/4):", "",
              "| attribute | held-out real | eval queries | general learning | own-aspect learning |",
              "|---|---|---|---|---|"]
    for a, row in doc["fidelity"].items():
        lines.append(f"| {a} | {row['heldout_accuracy']:.3f} | {fmt(row.get('eval'))} | "
                     f"{fmt(row.get('learn-general'))} | {fmt(row.get(f'learn-{a}'))} |")
    t = doc["timings_s"]
    lines += ["", f"Date {doc['date']}; total {t['total'] / 60:.1f} min; load average at end "
              f"{', '.join(f'{x:.1f}' for x in doc['load_average_end'])}."]
    return "\n".join(lines) + "\n"
