"""`gradtrace eval retrieval`: Recall@k and mAP per aspect (label column) of attribution runs over the same queries.

A training example is relevant to a query for a label column when it carries the query's value of that column.
Labels come from where the examples came from:
- a dataset (training images, real queries): its per-image metadata column (e.g. shapes' subject / style /
  background, an image folder's metadata.jsonl columns);
- a samples directory (generated queries): the attribute tokens they were sampled with (a null token = no
  value: that query is left out of that aspect);
- or a file given with `--train-labels` / `--query-labels` (CSV with an `id` column, or JSON lines / a JSON list
  of objects with an "id"), e.g. the values a text-to-image query's prompt was written from.

Writes ``retrieval.json`` (manifest, per run × aspect × metric the mean with a bootstrap 95% CI and the
per-query values; paired differences between every two runs) and ``retrieval.md`` (the same as tables).
"""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np

from gradtrace.data.base import row_index, row_positions
from gradtrace.data.sources import open_dataset, samples_examples
from gradtrace.errors import UserError
from gradtrace.features.store import FeatureStore
from gradtrace.io import check_can_write, command_line, read_json, versions, write_json_atomic
from gradtrace.metrics.retrieval import (
    average_precision,
    bootstrap_mean,
    label_relevance,
    paired_difference,
    recall_at_k,
)

RESULT = "retrieval.json"
TABLE = "retrieval.md"
ATTRIBUTIONS = "attributions.json"


class Run:
    """One attribution run: its (Q, N) scores (or only its top-k ids), training and query ids and sources."""

    def __init__(self, folder: str):
        path = Path(folder)
        if not (path / ATTRIBUTIONS).is_file():
            raise UserError(f"{folder} has no {ATTRIBUTIONS}; pass the output folder of `gradtrace attribute`")
        doc = read_json(path / ATTRIBUTIONS, "attributions file")
        m = doc.get("manifest") if isinstance(doc, dict) else None
        if not isinstance(m, dict) or m.get("format") != "gradtrace-attributions":
            raise UserError(f"{path / ATTRIBUTIONS} is not a gradtrace attributions file; pass an `attribute` "
                            "output folder")
        self.path, self.doc, self.manifest = path, doc, m
        self.query_ids = np.array([int(q["query_id"]) for q in doc["queries"]], dtype=np.int64)
        self.sources, ids = {}, {}
        for side in ("train", "query"):
            if m.get(f"{side}_source"):  # methods that score the model directly record sources and id files
                self.sources[side] = m[f"{side}_source"]
                ids[side] = np.load(path / f"{side}_ids.npy")
            else:
                store_path = Path(m[f"{side}_store"])
                if not store_path.exists():
                    raise UserError(f"the {side} store {store_path} named by {path / ATTRIBUTIONS} is not found; "
                                    "run from the directory the attribution ran in, or attribute again")
                store = FeatureStore.open(store_path)
                self.sources[side], ids[side] = store.settings["source"], store.ids
        self.train_ids = np.asarray(ids["train"], dtype=np.int64)
        if not np.array_equal(np.asarray(ids["query"], dtype=np.int64), self.query_ids):
            raise UserError(f"{path}: the query store's ids differ from the run's queries; attribute again")
        self.top_ids = np.load(path / "topk_ids.npy")
        scores = path / "scores.npy"
        self.scores = np.load(scores).astype(np.float64) if scores.exists() else None
        info = m.get("method") or {}
        weights = m.get("weights") or {}
        self.label = f"{info.get('method', '?')}/{info.get('kernel', 'identity')} " + (
            "uniform" if not weights else (weights.get("aspect") or Path(str(weights.get("path", "?"))).stem))

    def recall_values(self, relevant: np.ndarray, k: int) -> np.ndarray:
        if self.scores is not None:
            return recall_at_k(self.scores, relevant, k).values
        if k > self.top_ids.shape[1]:
            raise UserError(f"{self.path} keeps only its top-{self.top_ids.shape[1]} (no scores.npy); ask for "
                            f"--k up to {self.top_ids.shape[1]} or attribute with a larger --top-k")
        col = row_index(self.train_ids)
        top = row_positions(col, self.top_ids[:, :k].reshape(-1), lambda: "the run's training set").reshape(-1, k)
        hits = np.take_along_axis(relevant, top, axis=1).sum(1).astype(np.float64)
        n_rel = relevant.sum(1)
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(n_rel > 0, hits / np.minimum(k, n_rel), np.nan)


def read_label_file(path: str, columns: list[str]) -> dict[int, dict]:
    """id -> {column: value} from a CSV file with an `id` column, JSON lines, or a JSON list of objects."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"labels file not found: {path}; write a CSV with an id column (or JSON lines with \"id\")")
    try:
        if p.suffix.lower() == ".csv":
            with p.open(newline="", encoding="utf-8") as fh:
                rows = list(csv.DictReader(fh))
        else:
            text = p.read_text(encoding="utf-8").strip()
            rows = json.loads(text) if text.startswith("[") else [json.loads(line) for line in text.splitlines()
                                                                   if line.strip()]
        out = {int(r["id"]): {c: (None if r.get(c) in (None, "") else str(r[c])) for c in columns} for r in rows}
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise UserError(f"cannot read labels from {path} ({exc}); write one row per example with an id and the "
                        f"columns {', '.join(columns)}")
    return out


def labels_of(source: dict, ids: np.ndarray, columns: list[str], file: str | None, side: str) -> dict[str, list]:
    """column -> one value per id (None = no value), from `file` or from the source the examples came from."""
    if file is not None:
        table = read_label_file(file, columns)
        missing = [int(i) for i in ids if int(i) not in table]
        if missing:
            raise UserError(f"{file} has no row for {side} id {missing[0]} ({len(missing)} missing); label every "
                            f"{side} example")
        return {c: [table[int(i)][c] for i in ids] for c in columns}
    if source.get("kind") == "samples":
        ex = samples_examples(source["path"])
        values = read_json(Path(source["path"]) / "manifest.json", "samples manifest").get("attribute_values") or {}
        names = list(values)
        rows = row_positions(row_index(ex.ids), ids, lambda: f"the samples in {source['path']}")
        out = {}
        for c in columns:
            if c not in values or ex.cond is None:
                raise UserError(f"the {side} samples in {source['path']} carry no attribute '{c}' (they have "
                                f"{', '.join(names) or 'none'}); pass --{side}-labels FILE with that column")
            a = names.index(c)
            out[c] = [values[c][int(ex.cond[r, a])] if int(ex.cond[r, a]) >= 0 else None for r in rows]
        return out
    ds = open_dataset(source)
    if not hasattr(ds, "metadata"):
        raise UserError(f"the {side} data {source.get('spec')} has no per-example metadata; pass --{side}-labels")
    rows = row_positions(row_index(ds.ids), ids, lambda: f"dataset {source.get('spec')}")
    out = {}
    for c in columns:
        if not any(c in ds.metadata[r] for r in rows):
            keys = sorted({k for r in rows[:50] for k in ds.metadata[r]})
            raise UserError(f"the {side} data {source.get('spec')} has no metadata column '{c}' (it has "
                            f"{', '.join(keys)}); choose --labels from those or pass --{side}-labels FILE")
        out[c] = [ds.metadata[r].get(c) for r in rows]
    return out


def _examples_of(source: dict) -> dict:
    """What identifies the examples of a source: the same images featurized under another conditioning
    (`featurize --condition-on`) are the same queries."""
    return {k: v for k, v in source.items() if k != "condition_on"}


def eval_retrieval_run(folders: list[str], labels: list[str], out, *, ks=(10,), n_bootstrap: int = 2000,
                       seed: int = 0, train_labels: str | None = None, query_labels: str | None = None) -> dict:
    out = Path(out)
    check_can_write(out)
    runs = [Run(f) for f in folders]
    first = runs[0]
    for run in runs[1:]:
        if not np.array_equal(run.query_ids, first.query_ids) or \
                _examples_of(run.sources["query"]) != _examples_of(first.sources["query"]):
            raise UserError(f"{run.path} attributes other queries than {first.path}; compare runs over the same "
                            "query set")
        if not np.array_equal(np.sort(run.train_ids), np.sort(first.train_ids)):
            raise UserError(f"{run.path} ranks another training set than {first.path}; compare runs over the "
                            "same training set")
    for k in ks:
        if k < 1 or k > len(first.train_ids):
            raise UserError(f"--k {k} must be in 1..{len(first.train_ids)} (the training set size)")
    q_labels = labels_of(first.sources["query"], first.query_ids, labels, query_labels, "query")
    names = [r.label for r in runs]
    seen: dict[str, int] = {}
    for i, n in enumerate(names):  # a label repeated by several runs numbered (#2, #3, ...)
        seen[n] = seen.get(n, 0) + 1
        names[i] = n if seen[n] == 1 else f"{n} #{seen[n]}"
    per_run: dict[str, dict] = {n: {} for n in names}
    per_query: dict[tuple[str, str, str], np.ndarray] = {}
    train_cache: dict[bytes, dict] = {}
    for name, run in zip(names, runs):
        key = run.train_ids.tobytes()
        if key not in train_cache:
            train_cache[key] = labels_of(run.sources["train"], run.train_ids, labels, train_labels, "train")
        t_labels = train_cache[key]
        for c in labels:
            relevant = label_relevance(q_labels[c], t_labels[c])
            metrics = {f"recall@{k}": run.recall_values(relevant, k) for k in ks}
            if run.scores is not None:
                metrics["map"] = average_precision(run.scores, relevant).values
            per_run[name][c] = {}
            for metric, values in metrics.items():
                per_query[(name, c, metric)] = values
                per_run[name][c][metric] = {**bootstrap_mean(values, n_bootstrap=n_bootstrap, seed=seed),
                                            "per_query": [None if not np.isfinite(v) else float(v) for v in values]}
    pairs = []
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            for c in labels:
                for metric in per_run[a][c]:
                    if metric in per_run[b][c]:
                        d = paired_difference(per_query[(a, c, metric)], per_query[(b, c, metric)],
                                              n_bootstrap=n_bootstrap, seed=seed)
                        pairs.append({"a": a, "b": b, "aspect": c, "metric": metric, **d})
    doc = {"manifest": {"format": "gradtrace-retrieval", "format_version": 1, "command": command_line(),
                        "attributions": [str(r.path.resolve()) for r in runs], "labels": list(labels),
                        "k": [int(k) for k in ks], "bootstrap": {"n": int(n_bootstrap), "seed": int(seed),
                                                                 "over": "queries", "kind": "percentile"},
                        "train_labels": train_labels, "query_labels": query_labels,
                        "query_source": first.sources["query"], "versions": versions()},
           "runs": [{"name": n, "path": str(r.path), "method": r.manifest.get("method"),
                     "weights": r.manifest.get("weights"), "metrics": per_run[n]} for n, r in zip(names, runs)],
           "differences": pairs,
           "query_labels_present": {c: int(sum(v is not None for v in q_labels[c])) for c in labels}}
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / RESULT, doc)
    (out / TABLE).write_text(retrieval_table(doc), encoding="utf-8")
    return doc


def _ci(r: dict) -> str:
    if r.get("mean") is None:
        return "undefined"
    lo, hi = r["ci95"]
    return f"{r['mean']:.3f}" + ("" if lo is None else f" [{lo:.3f}, {hi:.3f}]")


def _d(r: dict) -> str:
    if r.get("mean") is None:
        return "undefined"
    lo, hi = r["ci95"]
    return f"{r['mean']:+.3f}" + ("" if lo is None else f" [{lo:+.3f}, {hi:+.3f}]")


def retrieval_table(doc: dict) -> str:
    """The result as markdown: one row per run × aspect, then the paired differences."""
    metrics = [f"recall@{k}" for k in doc["manifest"]["k"]] + ["map"]
    lines = ["| run | aspect | " + " | ".join(f"{m} [95% CI]" for m in metrics) + " | queries |",
             "|---|---|" + "---|" * (len(metrics) + 1)]
    for run in doc["runs"]:
        for c, row in run["metrics"].items():
            n = next(iter(row.values()))["n_defined"]
            lines.append(f"| {run['name']} | {c} | " + " | ".join(_ci(row[m]) if m in row else "—" for m in metrics)
                         + f" | {n} |")
    if doc["differences"]:
        lines += ["", "Paired differences (b − a, bootstrap 95% CI over the queries both define):", "",
                  "| a | b | aspect | metric | b − a [95% CI] | verdict |", "|---|---|---|---|---|---|"]
        for d in doc["differences"]:
            lines.append(f"| {d['a']} | {d['b']} | {d['aspect']} | {d['metric']} | {_d(d)} | {d['verdict']} |")
    return "\n".join(lines) + "\n"
