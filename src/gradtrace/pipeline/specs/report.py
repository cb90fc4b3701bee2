"""The report stage's spec: the runs, weights and evaluations one HTML page shows."""
from __future__ import annotations

from dataclasses import dataclass

from gradtrace.errors import UserError
from gradtrace.pipeline.spec import Spec, option, positive


@dataclass
class ReportSpec(Spec):
    attributions: list = option([], "an attribute output folder (repeat: runs over the same queries are shown "
                                "side by side)", append=True, metavar="DIR")
    weights: list = option([], "a learn-weights JSON file to chart beside uniform (repeatable)", append=True,
                           metavar="FILE")
    lds: list = option([], "an `eval lds` output folder (repeatable)", append=True, metavar="DIR")
    counterfactual: list = option([], "an `eval counterfactual` output folder (repeatable)", append=True,
                                  metavar="DIR")
    retrieval: list = option([], "an `eval retrieval` output folder (repeatable)", append=True, metavar="DIR")
    out: str = option(None, "the HTML file to write", required=True)
    max_queries: int = option(24, "queries shown (the first ones of the runs)", check=positive)
    title: str = option("gradtrace report", "the page's title")

    def validate(self) -> None:
        if not self.attributions:
            raise UserError("pass at least one --attributions DIR (an `attribute` output folder)")
