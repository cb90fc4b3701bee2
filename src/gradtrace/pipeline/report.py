"""The report stage: one self-contained HTML page from attribution runs, weights files and evaluation results.

    report_run(ReportSpec(attributions=["out/uniform", "out/learned"], weights=["w.json"], out="report.html"))

Several attribution runs over the same queries are shown side by side per query (e.g. uniform and learned
weights). The page embeds every image and chart and its own manifest (what made it, from which inputs).
"""
from __future__ import annotations

import json
from pathlib import Path

from gradtrace import __version__
from gradtrace.attribution.run_check import open_run
from gradtrace.attribution.weights_file import store_identity, weights_for
from gradtrace.data.sources import load_source
from gradtrace.errors import UserError
from gradtrace.evaluate.counterfactual import RESULT as COUNTERFACTUAL_RESULT
from gradtrace.evaluate.eval_lds import RESULT as LDS_RESULT
from gradtrace.evaluate.eval_retrieval import RESULT as RETRIEVAL_RESULT
from gradtrace.features.store import FeatureStore
from gradtrace.io import atomic_write, command_line, read_json
from gradtrace.methods import get_method, known_methods
from gradtrace.pipeline.specs.report import ReportSpec
from gradtrace.report import html, sections

ATTRIBUTIONS = "attributions.json"


def _store(recorded: str, doc_path: Path, what: str) -> FeatureStore:
    path = Path(recorded)
    if not path.exists():
        raise UserError(f"the {what} store {recorded} named by {doc_path} is not found; run the report from the "
                        "directory the attribution ran in, or attribute again")
    return FeatureStore.open(path)


def _json(folder: str, name: str, what: str, key: str) -> tuple[Path, dict]:
    path = Path(folder)
    file = path / name if path.is_dir() else path
    if not file.is_file():
        raise UserError(f"{folder} has no {name}; pass the output folder of {what}")
    doc = read_json(file, what)
    if not isinstance(doc, dict) or key not in doc:
        raise UserError(f"{file} is not a {what} result (no '{key}'); pass the output folder of {what}")
    return file.parent, doc


def load_run(folder: str) -> sections.Run:
    """An attribute output folder with the examples its ids refer to, labelled by its weights."""
    path, doc = open_run(folder)  # the document and its arrays, checked whole
    manifest = doc["manifest"]
    sources = {}
    for side, what in (("train", "training"), ("query", "query")):
        # methods that score the model directly (EK-FAC) record their sources, not feature stores
        sources[side] = manifest.get(f"{side}_source") if recorded_needs_model(manifest) else \
            _store(manifest[f"{side}_store"], path / ATTRIBUTIONS, what).settings["source"]
    return sections.Run(label=run_label(doc), path=path, doc=doc, train=load_source(sources["train"]),
                        queries=load_source(sources["query"]))


def recorded_needs_model(manifest: dict) -> bool:
    """Whether the run's method scored the model directly (its examples' sources are recorded, no feature stores):
    the method's own `needs_model`, or, for a method not registered here, whether it recorded no stores."""
    name = (manifest.get("method") or {}).get("method")
    if name in known_methods():
        return get_method(name).needs_model
    return manifest.get("train_store") is None


def run_label(doc: dict) -> str:
    weights = doc["manifest"].get("weights")
    if not weights:
        return "uniform weights"
    return f"learned weights ({weights.get('aspect') or 'general'})" if weights.get("format") != "plain" \
        else f"weights {Path(weights.get('path', '?')).name}"


def _labelled(folders: list[str]) -> list[sections.Run]:
    """The runs, a label repeated by several of them numbered (#2, #3, ...)."""
    runs, seen = [load_run(folder) for folder in folders], {}
    for run in runs:
        seen[run.label] = seen.get(run.label, 0) + 1
        if seen[run.label] > 1:
            run.label = f"{run.label} #{seen[run.label]}"
    return runs


def _weights(path: str, run: sections.Run) -> tuple[Path, dict]:
    """A weights file charted beside `run`: the weights-file rule of `attribute` (its groups are the run's, a
    learned file was learned for the run's training store)."""
    p = Path(path)
    if p.is_dir():
        raise UserError(f"{path} is a directory; pass a weights file written by `gradtrace learn-weights`")
    m = run.doc["manifest"]
    if not recorded_needs_model(m):
        train = FeatureStore.open(m["train_store"])
        identity, what = store_identity(train), str(train.path)
    else:  # a method that scored the model directly (EK-FAC): its model is what the run records
        identity, what = {"model_fingerprint": m.get("model_fingerprint")}, f"the model of {run.path}"
    _, doc = weights_for(p, list(run.doc["groups"]), identity, what)
    return p, doc


def report_run(spec: ReportSpec, *, progress: bool = True) -> Path:
    """Write the HTML page; returns its path."""
    runs = _labelled(spec.attributions)
    ids = [int(q["query_id"]) for q in runs[0].doc["queries"]]
    for run in runs[1:]:
        if [int(q["query_id"]) for q in run.doc["queries"]] != ids or \
                run.queries.source != runs[0].queries.source:
            raise UserError(f"{run.path} attributes other queries than {runs[0].path}; runs shown side by side "
                            "must score the same query store")
    weights = [_weights(w, runs[0]) for w in spec.weights]
    lds = [_json(d, LDS_RESULT, "`gradtrace eval lds`", "lds") for d in spec.lds]
    counterfactual = [_json(d, COUNTERFACTUAL_RESULT, "`gradtrace eval counterfactual`", "summary")
                      for d in spec.counterfactual]
    retrieval = [_json(d, RETRIEVAL_RESULT, "`gradtrace eval retrieval`", "runs") for d in spec.retrieval]
    unfinished = [str(p) for p, d in counterfactual if not d.get("finished")]
    if unfinished:
        raise UserError(f"counterfactual retraining in {unfinished[0]} is not finished; rerun its command first")
    shown = ids[:spec.max_queries]
    group_names = list(runs[0].doc["groups"])
    body = [sections.runs_section(runs)]
    nav = [("runs", "runs"), ("queries", f"queries ({len(shown)} of {len(ids)})")]
    if weights:
        body.append(sections.weights_section(weights))
        nav.append(("weights", "weights"))
    body.append(sections.query_sections(runs, shown, group_names))
    if lds:
        body.append(sections.lds_section(lds))
        nav.append(("lds", "LDS"))
    if counterfactual:
        body.append(sections.counterfactual_section(counterfactual))
        nav.append(("counterfactual", "counterfactual"))
    if retrieval:
        body.append(sections.retrieval_section(retrieval))
        nav.append(("retrieval", "retrieval"))
    manifest = {"format": "gradtrace-report", "format_version": 1, "gradtrace": __version__,
                "command": command_line(), "spec": spec.to_dict(),
                "inputs": {"attributions": [str(r.path.resolve()) for r in runs],
                           "weights": [str(p.resolve()) for p, _ in weights],
                           "lds": [str(p.resolve()) for p, _ in lds],
                           "counterfactual": [str(p.resolve()) for p, _ in counterfactual],
                           "retrieval": [str(p.resolve()) for p, _ in retrieval]}}
    body.append('<section id="made-by"><h2>How this page was made</h2>' + html.facts("manifest", manifest)
                + '<script type="application/json" id="gradtrace-manifest">'
                + json.dumps(manifest).replace("</", "<\\/") + "</script></section>")
    page = html.page(spec.title, body, nav)
    out = Path(spec.out)
    with atomic_write(out, suffix=".tmp.html") as tmp:
        Path(tmp).write_text(page, encoding="utf-8")
    return out
