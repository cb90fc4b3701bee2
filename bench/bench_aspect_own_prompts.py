#!/usr/bin/env python
"""The aspect recipe with a user's own one-aspect prompts, on a finished text-to-image aspects run that kept its
aspect-only learning queries (RUN/aspectonly/: samples of prompts that name only the aspect, "a striped shape", and
their D-TRAK and DAS features; bench_t2i_aspects.py made them before its built-in learning prompts became whole
captions).

    python bench/bench_aspect_own_prompts.py --run bench_out/cap/aspects_medium_s0

As a user with a prompt file of one line per value runs it: `learn-weights --queries SET --aspect ASPECT` with every
other option at its default (the family objective, families = identical prompts, given here as `--family-labels`
since the set's samples were moved; the family signal test; on the shared kernel inside it at the family
criterion's c), after the run's general weights. Own-aspect Recall@10 against uniform at the general weights' c and
against the general weights, paired 95% CI. Writes RUN/own_prompts.json and prints a table.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from common import T2I_ASPECTS, t2i_eval_prompts, t2i_method_stores


def run(run_dir: Path, bootstrap: int) -> list[dict]:
    from gradtrace.attribution import fit_method, read_group_weights, score_queries
    from gradtrace.data.sources import samples_examples
    from gradtrace.metrics.retrieval import recall_at_k, shared_value_relevance
    from gradtrace.metrics.stats import paired_ci
    from gradtrace.pipeline import LearnWeightsSpec, learn_weights_run

    prompts = json.loads((run_dir / "results-auto.json").read_text())["prompts"]
    _, ev_codes = t2i_eval_prompts(len(prompts["eval"]))
    own = run_dir / "aspectonly"
    out = own / "weights"
    out.mkdir(exist_ok=True)
    rows = []
    for method in ("dtrak", "das"):
        train, ev, codes = t2i_method_stores(run_dir, method)
        for kernel in ("per-group", "shared"):
            gen_path = train.path / "weights" / f"{method}-{kernel}-general.json"
            gen_w, gen = read_group_weights(train, ev, gen_path, method=method, kernel=kernel)
            fitted = fit_method(train, method, kernel=kernel, c=gen["lambda_c"], progress=False)
            phi_e = np.asarray(ev.features)
            for i, a in enumerate(T2I_ASPECTS):
                samples = samples_examples(str(own / f"samples-learn-{a}"))
                labels = out / f"families-{a}.jsonl"
                labels.write_text("".join(json.dumps({"id": int(q), a: t}) + "\n"
                                          for q, t in zip(samples.ids, samples.texts)))
                path, doc = learn_weights_run(LearnWeightsSpec(
                    train=str(train.path), queries=str(own / f"features-{method}-learn-{a}"), aspect=a,
                    family_labels=str(labels), method=method, kernel=kernel,
                    out=str(out / f"{method}-{kernel}-{a}.json")), progress=False)
                scores = score_queries(train, ev, method=method, kernel=kernel, weights_path=path,
                                       progress=False).scores()
                rel = shared_value_relevance(ev_codes[:, i], codes[:, i])
                r, u, g = (recall_at_k(x, rel, 10).values for x in (scores, fitted.scores(phi_e),
                                                                     fitted.scores(phi_e, weights=gen_w)))
                prov = doc["provenance"]
                row = {"method": method, "kernel": kernel, "aspect": a, "c": prov["lambda_c"],
                       "apply": prov.get("apply", "query"), "signal": prov["learner"].get("family_signal"),
                       "families": sorted(set(samples.texts)),
                       "vs_uniform": {"delta": float(np.mean(r - u)), "ci95": paired_ci(r, u, bootstrap)},
                       "vs_general": {"delta": float(np.mean(r - g)), "ci95": paired_ci(r, g, bootstrap)}}
                rows.append(row)
                print(line(row), flush=True)
    (run_dir / "own_prompts.json").write_text(json.dumps({"rows": rows, "command": " ".join(sys.argv)}, indent=1))
    return rows


def line(row: dict) -> str:
    def mark(v):
        return f"{v['delta']:+.3f}" + ("*" if v["ci95"][0] > 0 else "-" if v["ci95"][1] < 0 else "")
    sig = row["signal"] or {}
    return (f"{row['method']}/{row['kernel']} {row['aspect']}: c {row['c']:g} ({row['apply']}), signal p "
            f"{sig.get('p_value', float('nan')):.4f}, vs uniform {mark(row['vs_uniform'])}, vs general "
            f"{mark(row['vs_general'])}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", required=True)
    p.add_argument("--bootstrap", type=int, default=2000)
    args = p.parse_args(argv)
    run(Path(args.run), args.bootstrap)
    return 0


if __name__ == "__main__":
    sys.exit(main())
