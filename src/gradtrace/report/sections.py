"""The sections of the HTML report: the runs, each query with its top-k per run, the group weights, LDS and
counterfactual results. Each function takes loaded artefacts and returns an HTML fragment (`report.html`)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from gradtrace.data.sources import Examples
from gradtrace.report.html import bar_styles, contribution_svg, esc, facts, figure_uri, file_uri, legend, png_uri, table
from gradtrace.report.weights import weights_figure


@dataclass
class Run:
    """One attributions folder, with the examples its ids refer to."""

    label: str
    path: Path
    doc: dict
    train: Examples
    queries: Examples

    @property
    def manifest(self) -> dict:
        return self.doc["manifest"]

    def describe(self) -> dict:
        m = self.manifest
        info = m.get("method") or {}
        weights = m.get("weights") or {}
        lam = m.get("lambda") or {}
        return {"label": self.label, "method": info.get("method", "?"), "kernel": info.get("kernel", "identity"),
                "c": info.get("c"), "weights": weights.get("path", "uniform") if weights else "uniform",
                "aspect": weights.get("aspect") if weights else None, "lambda": lam.get("rule"),
                "top_k": m.get("top_k"), "queries": len(self.doc["queries"])}


def _caption(examples: Examples, pos: int) -> str:
    return str(examples.captions[pos]) if examples.captions else ""


def source_line(source: dict | None, fallback: str) -> str:
    """An example's source as one caption line: its file name, then its text (caption, prompt) or labels; the
    examples' own caption when the attributions record no source (written before they did)."""
    if not source:
        return fallback
    parts = [source.get("file"), source.get("text") or source.get("caption")]
    if source.get("sample") is not None and not source.get("text"):
        parts[0] = f"sample {source['sample']}"
    return " · ".join(str(p) for p in parts if p) or fallback


def runs_section(runs: Sequence[Run]) -> str:
    rows = []
    for run in runs:
        d = run.describe()
        c = "—" if d["c"] is None else f"{d['c']:.4g}" + (f" ({d['lambda']})" if d["lambda"] else "")
        rows.append((d["label"], d["method"], d["kernel"], c, d["weights"], d["aspect"] or "—", d["top_k"],
                     d["queries"]))
    blocks = [facts(f"manifest of {run.label} ({run.path})", {
        "model_fingerprint": run.manifest.get("model_fingerprint"), "method": run.manifest.get("method", {}),
        "groups": run.manifest.get("groups_spec"), "measurement": run.manifest.get("measurement"),
        "projection": run.manifest.get("projection"), "lambda": run.manifest.get("lambda"),
        "weights provenance": {k: v for k, v in (run.manifest.get("weights") or {}).items() if k != "weights"}
        or "uniform", "train_store": run.manifest.get("train_store"), "query_store": run.manifest.get("query_store"),
        "command": run.manifest.get("command"), "versions": run.manifest.get("versions")}) for run in runs]
    return ('<section id="runs"><h2>Attribution runs</h2>'
            + table(("run", "method", "kernel", "λ scale c", "weights", "aspect", "top-k", "queries"), rows)
            + "".join(blocks) + "</section>")


def query_sections(runs: Sequence[Run], query_ids: Sequence[int], group_names: Sequence[str]) -> str:
    """Per query: its image and caption, then per run its top-k training images with rank, id, score and the
    per-group contribution chart of each."""
    first = runs[0]
    qpos = {int(i): r for r, i in enumerate(first.queries.ids)}
    by_run = [{int(q["query_id"]): q for q in run.doc["queries"]} for run in runs]
    tpos = [{int(i): r for r, i in enumerate(run.train.ids)} for run in runs]
    out = ['<section id="queries"><h2>Queries and their most influential training examples</h2>'
           '<p class="note">Under each training image: rank, training id, score, and its per-group contributions '
           '(one bar per parameter group, in model order; up = raises the score; hover a bar for its group). '
           'The contributions of an image sum to its score.</p>' + legend(group_names)]
    styles = bar_styles(group_names)
    for qid in query_ids:
        pos = qpos[qid]
        cap = source_line(by_run[0][qid].get("source"), _caption(first.queries, pos))
        out.append(f'<section class="query" id="query-{qid}"><div class="qhead"><figure class="query">'
                   f'<img alt="query {qid}" src="{png_uri(first.queries.images[pos].numpy())}">'
                   f'<figcaption>query {qid}<br>{esc(cap)}</figcaption></figure><div>')
        for run, table_q, tp in zip(runs, by_run, tpos):
            out.append(f'<div class="run"><h3>{esc(run.label)}</h3><div class="topk">')
            for t in table_q[qid]["top"]:
                tid = int(t["train_id"])
                values = [t["contributions"].get(g, 0.0) for g in group_names]
                img = run.train.images[tp[tid]].numpy()
                out.append(f'<figure class="train"><img alt="training example {tid}" src="{png_uri(img)}">'
                           f'<figcaption>#{t["rank"]} · id {tid} · {t["score"]:.4g}<br>'
                           f'{esc(source_line(t.get("source"), _caption(run.train, tp[tid])))}</figcaption>'
                           f'{contribution_svg(values, styles)}</figure>')
            out.append("</div></div>")
        out.append("</div></div></section>")
    out.append("</section>")
    return "".join(out)


def weights_section(weight_docs: Sequence[tuple[Path, dict]]) -> str:
    """Per aspect: the learned weights of every file for it beside uniform, coloured by block; then facts."""
    by_aspect: dict[str, list[tuple[Path, dict]]] = {}
    for path, doc in weight_docs:
        aspect = (doc.get("provenance") or {}).get("aspect") or "general"
        by_aspect.setdefault(aspect, []).append((path, doc))
    out = ['<section id="weights"><h2>Learned group weights</h2><p class="note">Normalised to sum to 1; the '
           'dotted line is the uniform weight 1/M. Learned without labels on generated learning queries.</p>']
    for aspect, items in by_aspect.items():
        names = list(items[0][1]["weights"])
        sets = {"uniform": np.ones(len(names))}
        for path, doc in items:
            prov = doc.get("provenance") or {}
            label = f"{prov.get('method', '?')}/{prov.get('kernel', '?')}"
            sets[label if label not in sets else f"{label} ({path.stem})"] = [doc["weights"][n] for n in names]
        fig = weights_figure(sets, names)
        out.append(f'<h3 id="weights-{esc(aspect)}">Aspect: {esc(aspect)}</h3>'
                   f'<img class="chart" alt="weights for {esc(aspect)}" src="{figure_uri(fig)}">')
        for path, doc in items:
            prov = doc.get("provenance") or {}
            guard = prov.get("guard") or {}
            signal = (prov.get("learner") or {}).get("family_signal") or {}
            out.append(facts(f"provenance of {path}", {
                "method": prov.get("method"), "kernel": prov.get("kernel"), "lambda_c": prov.get("lambda_c"),
                "objective": prov.get("objective", "snr"),
                "holdout guard: shrink towards uniform (0 = uniform, 1 = as learned)": guard.get("shrink"),
                "family signal: p, learned": (f"{signal['p_value']:.3g}, {signal['learned']}" if signal else None),
                "k": prov.get("k"), "steps": prov.get("steps"), "loss first → last":
                f"{prov.get('loss_first')} → {prov.get('loss_last')}",
                "learning queries": prov.get("learning_queries"), "train_store": prov.get("train_store"),
                "command": prov.get("command")}))
    out.append("</section>")
    return "".join(out)


def _ci(r: dict) -> str:
    if r.get("mean") is None:
        return "undefined"
    lo, hi = (r.get("ci95") or [None, None])[:2]
    return f"{r['mean']:.4f}" + ("" if lo is None else f" [{lo:.4f}, {hi:.4f}]")


def lds_section(results: Sequence[tuple[Path, dict]]) -> str:
    rows, plots = [], []
    for path, doc in results:
        m = doc.get("manifest", {})
        info = m.get("method") or {}
        weights = m.get("weights") or {}
        r = doc["lds"]
        rows.append((str(path), info.get("method", "?"), info.get("kernel", "identity"),
                     weights.get("path", "uniform") if weights else "uniform", _ci(r), r.get("n_defined")))
        plot = path / "lds_per_group.png"
        if doc.get("per_group") and plot.exists():
            plots.append(f'<h3>{esc(path)}</h3><img class="chart" alt="per-group LDS" src="{file_uri(plot)}">')
    return ('<section id="lds"><h2>Linear datamodeling score</h2><p class="note">Spearman correlation between '
            'predicted and actual model outputs over retrained subsets; mean over queries with a bootstrap 95% '
            'CI.</p>' + table(("result", "method", "kernel", "weights", "LDS [95% CI]", "queries"), rows)
            + "".join(plots) + "".join(facts(f"manifest of {p}", d.get("manifest", {})) for p, d in results)
            + "</section>")


def counterfactual_section(results: Sequence[tuple[Path, dict]]) -> str:
    rows = []
    for path, doc in results:
        s = doc["summary"]
        rows.append((str(path), s["n_queries"], _ci(s["delta_top"]), _ci(s["delta_random"]),
                     _ci(s["delta_top_minus_random"]), f"{s['fraction_top_above_random']:.2f}"))
    return ('<section id="counterfactual"><h2>Counterfactual retraining</h2><p class="note">How much worse the '
            'model does on the query (its loss up, or a classifier\'s margin down) when retrained without the '
            'query\'s top-k training examples, against without k random ones.</p>'
            + table(("result", "queries", "Δ without top-k", "Δ without random k", "difference",
                     "fraction top > random"), rows)
            + "".join(facts(f"manifest of {p}", d.get("manifest", {})) for p, d in results) + "</section>")


def _d(r: dict) -> str:
    if r.get("mean") is None:
        return "undefined"
    lo, hi = (r.get("ci95") or [None, None])[:2]
    return f"{r['mean']:+.4f}" + ("" if lo is None else f" [{lo:+.4f}, {hi:+.4f}]")


def retrieval_section(results: Sequence[tuple[Path, dict]]) -> str:
    """Recall@k and mAP per run and aspect (mean [95% CI]), and the paired differences between runs."""
    out = ['<section id="retrieval"><h2>Retrieval by aspect</h2><p class="note">A training example is relevant '
           'to a query for an aspect when it carries the query\'s value of that label column. Mean over the queries '
           'that have a value, with a bootstrap 95% CI; differences are paired over the same queries.</p>']
    for path, doc in results:
        metrics = [f"recall@{k}" for k in doc["manifest"]["k"]] + ["map"]
        rows = [(run["name"], aspect, *[_ci(row[m]) if m in row else "—" for m in metrics],
                 next(iter(row.values()))["n_defined"])
                for run in doc["runs"] for aspect, row in run["metrics"].items()]
        out.append(f"<h3>{esc(path)}</h3>" + table(("run", "aspect", *[f"{m} [95% CI]" for m in metrics],
                                                    "queries"), rows))
        if doc.get("differences"):
            out.append(table(("a", "b", "aspect", "metric", "b − a [95% CI]", "verdict"),
                             [(d["a"], d["b"], d["aspect"], d["metric"], _d(d), d["verdict"])
                              for d in doc["differences"]]))
        out.append(facts(f"manifest of {path}", doc.get("manifest", {})))
    return "".join(out) + "</section>"
