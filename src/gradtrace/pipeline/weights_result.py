"""A learned weights file as a notebook sees it: the group weights (`weights`, `to_pandas`), inline in Jupyter
(`_repr_html_`: the report's weights chart beside uniform, with the file's provenance), and a path wherever one is
taken (`os.PathLike`: `tracer.attribute(queries, weights=w)`, `AttributeSpec(weights=os.fspath(w))`).

    w = tracer.learn_weights(learning_queries)     # or WeightsResult.open("runs/feat/weights/trak-shared-general.json")
    w                                              # in Jupyter: the chart
    w.weights                                      # {group: weight}, summing to 1
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from gradtrace.errors import UserError
from gradtrace.extras import require
from gradtrace.io import read_json
from gradtrace.pipeline.result import scoped_css
from gradtrace.report import html, sections


@dataclass
class WeightsResult(os.PathLike):
    """A group-weights file (written by `learn-weights`, or a plain {"weights": {...}} file) and its document."""

    path: Path
    doc: dict

    @classmethod
    def open(cls, path) -> "WeightsResult":
        path = Path(path)
        if not path.is_file():
            raise UserError(f"weights file not found: {path}; pass a file written by learn-weights")
        doc = read_json(path, "weights file")
        if not isinstance(doc, dict) or not isinstance(doc.get("weights"), dict):
            raise UserError(f"{path} is not a weights file (no 'weights' mapping); pass a file written by "
                            "learn-weights")
        return cls(path=path, doc=doc)

    def __fspath__(self) -> str:
        return str(self.path)

    def __str__(self) -> str:
        return str(self.path)

    @property
    def weights(self) -> dict[str, float]:
        """{group: weight} in the file's group order."""
        return {g: float(w) for g, w in self.doc["weights"].items()}

    @property
    def provenance(self) -> dict:
        return self.doc.get("provenance") or {}

    def to_pandas(self):
        """One row per group: group, weight (pandas: the `notebook` extra; `weights` gives the same values)."""
        return require("pandas", "to_pandas").DataFrame({"group": list(self.weights),
                                                          "weight": list(self.weights.values())})

    def _repr_html_(self) -> str:
        return (f'<div class="gradtrace"><style>{scoped_css(html.CSS, ".gradtrace")}</style>'
                + sections.weights_section([(self.path, self.doc)]) + "</div>")
