"""The attribute stage's spec: the stores scored (or the model inputs of a method that needs the model), the method,
the weights, the output."""
from __future__ import annotations

from dataclasses import dataclass

from gradtrace.choices import needs_model
from gradtrace.errors import UserError
from gradtrace.pipeline.scoring_options import kernel_option, lambda_c_option, learning_queries_option, method_option
from gradtrace.pipeline.spec import Spec, option, positive
from gradtrace.pipeline.specs.model_inputs import ModelInputs


@dataclass
class _AttributeOptions(Spec):
    train: str | None = option(None, "feature store of the training set (feature methods)", type=str)
    queries: str | None = option(None, "feature store of the queries (feature methods)", type=str)
    out: str = option(None, "output directory", required=True)
    method: str = method_option()
    kernel: str = kernel_option()
    lambda_c: str | float | None = lambda_c_option()
    learning_queries: str | None = learning_queries_option()
    learning_ids: object = option(None, "with --lambda-c auto, methods that need the model: ids of learning queries "
                                  "(never the --ids)", type=str)
    top_k: int = option(10, "training examples kept per query", check=positive)
    weights: str | None = option(None, "group weights: a learn-weights JSON file, or {\"weights\": {group: w}}",
                                 type=str)
    aspect: str | None = option(None, "use the store's learned weights for this aspect (e.g. style)", type=str)
    report: bool = option(True, "skip report.png", flag="--no-report")
    compare_uniform: bool = option(False, "with --weights/--aspect: also write OUT/uniform, the same queries scored "
                                   "with uniform weights at the weights' λ scale c (the fair baseline; a plain "
                                   "attribute uses the method's default c)")


@dataclass
class AttributeSpec(ModelInputs, _AttributeOptions):
    """The attribute stage's settings: the scoring options, then the model inputs of methods that need the model."""

    def validate(self) -> None:
        if self.weights is not None and self.aspect is not None:
            raise UserError("pass either --weights FILE or --aspect NAME, not both")
        if self.compare_uniform and self.weights is None and self.aspect is None:
            raise UserError("--compare-uniform compares learned weights with uniform ones at their c; pass "
                            "--weights FILE or --aspect NAME")
        if self.compare_uniform and needs_model(self.method):
            raise UserError(f"--compare-uniform scores feature stores; for '{self.method}' run attribute again "
                            "without --weights, with --lambda-c set to the weights' c")
        if needs_model(self.method):
            for flag, value in (("--train", self.train), ("--queries", self.queries), ("--aspect", self.aspect),
                                ("--learning-queries", self.learning_queries)):
                if value is not None:
                    raise UserError(f"method '{self.method}' scores the model directly, not feature stores; drop "
                                    f"{flag} (use --checkpoint, --ids, --learning-ids)")
            self.check_model_inputs(self.method)
        elif self.train is None or self.queries is None:
            raise UserError("--train and --queries are required (feature stores; a method that needs the model, "
                            "e.g. ekfac, takes --checkpoint and --ids)")
