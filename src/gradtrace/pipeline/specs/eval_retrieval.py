"""The `eval retrieval` stage's spec: attribution runs over the same queries and the label columns that define
relevance."""
from __future__ import annotations

from dataclasses import dataclass

from gradtrace.errors import UserError
from gradtrace.pipeline.spec import Spec, option, positive


def columns(text: str) -> list[str]:
    return [c.strip() for c in str(text).split(",") if c.strip()]


@dataclass
class EvalRetrievalSpec(Spec):
    attributions: list = option([], "an attribute output folder (repeat: runs over the same queries are compared "
                                "pairwise)", append=True, metavar="DIR")
    labels: str = option(None, "label column(s), comma-separated: a training example is relevant to a query for a "
                         "column when it has the query's value (metadata column; generated queries: the attribute "
                         "tokens they were sampled with)", required=True)
    out: str = option(None, "output directory (retrieval.json, retrieval.md)", required=True)
    k: str = option("10", "the k of Recall@k, comma-separated (e.g. 1,10)")
    train_labels: str | None = option(None, "labels of the training examples from a file (CSV with an id column, "
                                      "or JSON lines with \"id\") instead of their metadata", type=str)
    query_labels: str | None = option(None, "labels of the queries from a file (CSV with an id column, or JSON "
                                      "lines with \"id\"), e.g. the values each prompt was written from", type=str)
    bootstrap: int = option(2000, "bootstrap resamples of the queries", check=positive)
    seed: int = option(0, "bootstrap seed")

    def validate(self) -> None:
        if not self.attributions:
            raise UserError("pass at least one --attributions DIR (an `attribute` output folder)")
        if not columns(self.labels):
            raise UserError("--labels names no column; write e.g. --labels subject,style")
        if len(set(columns(self.labels))) != len(columns(self.labels)):
            raise UserError("--labels names a column twice; name each once")
        try:
            ks = [int(k) for k in columns(self.k)]
        except ValueError:
            raise UserError(f"--k must be positive integers separated by commas, got {self.k!r}")
        if not ks or min(ks) < 1:
            raise UserError(f"--k must be positive integers separated by commas, got {self.k!r}")

    def ks(self) -> list[int]:
        return sorted(set(int(k) for k in columns(self.k)))
