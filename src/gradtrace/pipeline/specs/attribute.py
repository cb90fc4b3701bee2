"""The attribute stage's spec: the stores scored, the method, the weights, the output."""
from __future__ import annotations

from dataclasses import dataclass

from gradtrace.errors import UserError
from gradtrace.pipeline.scoring_options import kernel_option, lambda_c_option, learning_queries_option, method_option
from gradtrace.pipeline.spec import Spec, option, positive


@dataclass
class AttributeSpec(Spec):
    train: str = option(None, "feature store of the training set", required=True)
    queries: str = option(None, "feature store of the queries", required=True)
    out: str = option(None, "output directory", required=True)
    method: str = method_option()
    kernel: str = kernel_option()
    lambda_c: str | float | None = lambda_c_option()
    learning_queries: str | None = learning_queries_option()
    top_k: int = option(10, "training examples kept per query", check=positive)
    weights: str | None = option(None, "group weights: a learn-weights JSON file, or {\"weights\": {group: w}}",
                                 type=str)
    aspect: str | None = option(None, "use the store's learned weights for this aspect (e.g. style)", type=str)
    report: bool = option(True, "skip report.png", flag="--no-report")
    compare_uniform: bool = option(False, "with --weights/--aspect: also write OUT/uniform, the same queries scored "
                                   "with uniform weights at the weights' λ scale c (the fair baseline; a plain "
                                   "attribute uses c = 0.01)")

    def validate(self) -> None:
        if self.weights is not None and self.aspect is not None:
            raise UserError("pass either --weights FILE or --aspect NAME, not both")
        if self.compare_uniform and self.weights is None and self.aspect is None:
            raise UserError("--compare-uniform compares learned weights with uniform ones at their c; pass "
                            "--weights FILE or --aspect NAME")
