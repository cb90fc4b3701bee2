"""An attribution run as a notebook sees it: the output folder of `attribute` (or `attribute_run`), with each query's
top-k as a table (`to_pandas`), as PIL images, and inline in Jupyter (`_repr_html_`: the report's query sections,
every image embedded).

    result = AttributionResult.open("runs/attr")
    result                        # in Jupyter: each query, its top-k images with scores, sources and group bars
    result.to_pandas()            # one row per (query, rank): ids, score, sources, per-group contributions
    query, top = result.images(query_id)
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from gradtrace.attribution.run_check import open_run
from gradtrace.data.registry import is_text_spec
from gradtrace.errors import UserError
from gradtrace.extras import require
from gradtrace.features.store import FeatureStore
from gradtrace.pipeline.report import load_run
from gradtrace.report import html, sections
from gradtrace.report.attributions import is_text_store
from gradtrace.report.figures import to_display

SHOWN = 8  # queries drawn inline (the table has all)


def scoped_css(css: str, scope: str) -> str:
    """The report's style sheet with every selector inside `scope` (`body` becomes the scope itself), so an inline
    result does not restyle the notebook around it."""
    rules = []
    for selectors, body in re.findall(r"([^{}]+)\{([^{}]*)\}", css):
        parts = [s.strip() for s in selectors.split(",") if s.strip()]
        rules.append(",".join(scope if s == "body" else f"{scope} {s}" for s in parts) + "{" + body + "}")
    return "\n".join(rules)


@dataclass
class AttributionResult:
    """The attributions document of an output folder, with the examples its ids refer to (loaded on first use)."""

    path: Path
    doc: dict

    @classmethod
    def open(cls, folder) -> "AttributionResult":
        path, doc = open_run(str(folder))  # checked whole; the examples load on first use (images(), inline view)
        return cls(path=path, doc=doc)

    @property
    def run(self) -> sections.Run:
        if getattr(self, "_run", None) is None:
            self._run = load_run(str(self.path))
        return self._run

    @property
    def query_ids(self) -> list[int]:
        return [int(q["query_id"]) for q in self.doc["queries"]]

    def top(self, query_id: int) -> list[dict]:
        """The top-k entries (rank, train_id, score, source, contributions) of one query."""
        for q in self.doc["queries"]:
            if int(q["query_id"]) == int(query_id):
                return q["top"]
        raise UserError(f"query {query_id} is not in {self.path}; its queries are {self.query_ids[:10]}...")

    def records(self) -> list[dict]:
        """One dict per (query, rank): query_id, rank, train_id, score, the sources' fields (query_file, train_text,
        ...) and one "contribution:GROUP" per parameter group."""
        rows = []
        for q in self.doc["queries"]:
            qsrc = {f"query_{k}": v for k, v in (q.get("source") or {}).items()}
            for t in q["top"]:
                row = {"query_id": int(q["query_id"]), "rank": int(t["rank"]), "train_id": int(t["train_id"]),
                       "score": float(t["score"]), **qsrc,
                       **{f"train_{k}": v for k, v in (t.get("source") or {}).items()}}
                row.update({f"contribution:{g}": float(v) for g, v in t["contributions"].items()})
                rows.append(row)
        return rows

    def to_pandas(self):
        """`records()` as a pandas DataFrame (pandas: the `notebook` extra; records() gives the same rows)."""
        return require("pandas", "to_pandas").DataFrame.from_records(self.records())

    def images(self, query_id: int):
        """(the query's image, [its top-k training images]) as PIL images (image models)."""
        run = self.run
        if not hasattr(run.queries, "images") or run.queries.images is None:
            raise UserError(f"{self.path} attributes texts; read to_pandas() for their sources")
        qpos = {int(i): r for r, i in enumerate(run.queries.ids)}
        tpos = {int(i): r for r, i in enumerate(run.train.ids)}
        top = self.top(query_id)
        return (_pil(run.queries.images[qpos[int(query_id)]]),
                [_pil(run.train.images[tpos[int(t["train_id"])]]) for t in top])

    def _repr_html_(self) -> str:
        if self.holds_texts:
            return self._text_html()
        run = self.run
        shown = self.query_ids[:SHOWN]
        more = len(self.query_ids) - len(shown)
        note = f'<p class="note">{more} more queries in to_pandas() and the report.</p>' if more > 0 else ""
        return (f'<div class="gradtrace"><style>{scoped_css(html.CSS, ".gradtrace")}</style>'
                + sections.query_sections([run], shown, list(self.doc["groups"])) + note + "</div>")

    @property
    def holds_texts(self) -> bool:
        """True when the training examples are text documents (a language model's run): no images to show."""
        train = self.doc["manifest"].get("train_store")
        if train is not None and Path(train).is_dir():
            return is_text_store(FeatureStore.open(train))
        source = self.doc["manifest"].get("train_source") or {}  # methods that score the model record sources
        return source.get("kind") == "dataset" and is_text_spec(str(source.get("spec", "")))

    def _text_html(self) -> str:
        """Documents (language models): each shown query's text and its top-k training texts with scores."""
        from html import escape

        rows = [r for r in self.records() if r["query_id"] in set(self.query_ids[:SHOWN])]
        body = "".join(f"<tr><td>{r['query_id']}</td><td>{escape(str(r.get('query_text', '')))}</td>"
                       f"<td>{r['rank']}</td><td>{r['train_id']}</td><td>{escape(str(r.get('train_text', '')))}</td>"
                       f"<td>{r['score']:.4g}</td></tr>" for r in rows)
        return ('<div class="gradtrace"><table><tr><th>query</th><th>query text</th><th>rank</th><th>training id</th>'
                f"<th>training text</th><th>score</th></tr>{body}</table></div>")


def _pil(image) -> Image.Image:
    """An image (C, H, W) in [-1, 1] as PIL, with the bytes the report embeds."""
    disp = (to_display(image.numpy()) * 255.0 + 0.5).astype(np.uint8)
    return Image.fromarray(disp, mode="L" if disp.ndim == 2 else "RGB")
