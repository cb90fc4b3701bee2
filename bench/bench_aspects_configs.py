#!/usr/bin/env python
"""Compare feature configurations of the aspects benchmark on shapes (the same model, samples and queries).

    python bench/bench_aspects.py --out OUT --groups block --projection rademacher --dim 2048 ...   # each config
    python bench/bench_aspects_configs.py --out OUT [--base block-rademacher-2048]

Reads OUT/results.json (the first configuration, block / Rademacher 2,048) and OUT/configs/*/results.json, and
writes OUT/configs.md: Recall@10 per configuration × method × weights × aspect, and paired bootstrap 95% CIs over
the evaluation queries of (a) learned − uniform within a configuration (each aspect's own weights, and the
general ones, each unguarded and guarded) and (b) a configuration's uniform and own-aspect learned rows against
the base configuration's uniform row. Every configuration scores the same evaluation samples (OUT/samples, made
once by the one model; the script refuses results from different models), so differences are paired per query.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from gradtrace.data.shapes import ATTRIBUTES
from gradtrace.metrics.stats import paired_ci

ASPECTS = tuple(ATTRIBUTES)  # subject, style, background, as bench_aspects

N_BOOT = 2000


def paired_delta(a: np.ndarray, b: np.ndarray) -> tuple[float, float, float]:
    """mean(a − b) and its 95% paired bootstrap CI (as bench_aspects') over queries where both are defined."""
    ok = ~np.isnan(a) & ~np.isnan(b)
    lo, hi = paired_ci(a[ok], b[ok], N_BOOT)
    return float(np.mean(a[ok] - b[ok])), lo, hi


def load(out: Path) -> dict[str, dict]:
    docs = {}
    for path in [out / "results.json", *sorted((out / "configs").glob("*/results.json"))]:
        if path.exists():
            doc = json.loads(path.read_text())
            docs[doc.get("config", "block-rademacher-2048")] = doc
    if not docs:
        raise SystemExit(f"no results.json under {out}: run bench/bench_aspects.py --out {out} first")
    fingerprints = {d["model_fingerprint"] for d in docs.values()}
    if len(fingerprints) != 1:
        raise SystemExit(f"the configurations under {out} were run on different models: {sorted(fingerprints)}")
    return docs


def recall(doc: dict, method: str, weights: str, aspect: str) -> np.ndarray | None:
    row = doc["methods"].get(method, {}).get("rows", {}).get(weights)
    if row is None:
        return None
    return np.array([np.nan if v is None else v for v in row["metrics"][aspect]["recall_per_query"]], dtype=float)


def fmt(t: tuple[float, float, float]) -> str:
    mark = " **+**" if t[1] > 0 else (" **−**" if t[2] < 0 else "")
    return f"{t[0]:+.3f} [{t[1]:+.3f}, {t[2]:+.3f}]{mark}"


def compare(docs: dict[str, dict], base: str) -> str:
    if base not in docs:
        raise SystemExit(f"base configuration {base} not found; have {sorted(docs)}")
    lines = ["Recall@10 per configuration (uniform → each aspect's own learned weights; guarded in brackets), and "
             "paired 95% CIs over the evaluation queries (**+** / **−**: the CI excludes zero):", "",
             "| configuration | method | aspect | uniform | learned (guarded) | learned − uniform "
             "| guarded − uniform "
             f"| uniform − {base} uniform | learned − {base} uniform |", "|---|---|---|---|---|---|---|---|---|"]
    verdicts = {}  # (configuration, learned | guarded) -> [beats, no clear difference, worse]
    for cfg, doc in docs.items():
        for key in ("learned", "guarded"):
            verdicts[cfg, key] = [0, 0, 0]
        for method in doc["methods"]:
            for a in ASPECTS:
                u, w, g = (recall(doc, method, x, a) for x in ("uniform", a, f"{a} (guarded)"))
                bu = recall(docs[base], method, "uniform", a)
                d_w, d_g = paired_delta(w, u), paired_delta(g, u)
                for key, t in (("learned", d_w), ("guarded", d_g)):
                    verdicts[cfg, key][0 if t[1] > 0 else (2 if t[2] < 0 else 1)] += 1
                vs_base = (fmt(paired_delta(u, bu)), fmt(paired_delta(w, bu))) if bu is not None else ("—", "—")
                lines.append(f"| {cfg} | {method} | {a} | {np.nanmean(u):.3f} | {np.nanmean(w):.3f} "
                             f"({np.nanmean(g):.3f}) | {fmt(d_w)} | {fmt(d_g)} | {vs_base[0]} | {vs_base[1]} |")
    lines += ["", "Own-aspect weights against uniform (rows above; beats / no clear difference / worse): " + "; ".join(
        f"{cfg}: learned {verdicts[cfg, 'learned']}, guarded {verdicts[cfg, 'guarded']}" for cfg in docs) + ".", ""]
    lines += ["General weights (learned on general queries) against uniform on each aspect:", "",
              "| configuration | method | aspect | learned − uniform | guarded − uniform |",
              "|---|---|---|---|---|"]
    for cfg, doc in docs.items():
        for method in doc["methods"]:
            for a in ASPECTS:
                u, w, g = (recall(doc, method, x, a) for x in ("uniform", "general", "general (guarded)"))
                lines.append(f"| {cfg} | {method} | {a} | {fmt(paired_delta(w, u))} | {fmt(paired_delta(g, u))} |")
    lines += ["", "Times (s): " + "; ".join(
        f"{cfg}: featurize {sum(v for k, v in d['timings_s'].items() if k.startswith('featurize')):.0f}, learn "
        f"{sum(v for k, v in d['timings_s'].items() if k.startswith('learn')):.0f}" for cfg, d in docs.items())]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="bench_out/aspects_cfg")
    p.add_argument("--base", default="block-rademacher-2048", help="the configuration the others are paired with")
    args = p.parse_args(argv)
    out = Path(args.out)
    md = compare(load(out), args.base)
    (out / "configs.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
