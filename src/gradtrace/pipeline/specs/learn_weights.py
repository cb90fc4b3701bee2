"""The learn-weights stage's spec: the training store, the learning queries (given or generated), the objective."""
from __future__ import annotations

from dataclasses import dataclass

from gradtrace.choices import (AUTO, DEFAULT_GUARD, DEFAULT_GUIDANCE, DEFAULT_K, DEFAULT_L2, DEFAULT_LR, DEFAULT_STEPS,
                               GUARDS)
from gradtrace.errors import UserError
from gradtrace.pipeline.scoring_options import kernel_option, lambda_c_option, method_option
from gradtrace.pipeline.spec import Spec, option, positive


@dataclass
class LearnWeightsSpec(Spec):
    train: str = option(None, "feature store of the training set", required=True)
    queries: str | None = option(None, "feature store of learning queries (never evaluation queries), e.g. the "
                                 "features/ of a generated learning-query set (its aspect is then taken and checked)",
                                 type=str)
    generate: int | None = option(None, "generate N learning queries from the store's checkpoint instead of "
                                  "--queries", type=int, metavar="N", check=positive)
    aspect: str | None = option(None, "with --generate: set only this attribute (e.g. style); text-to-image "
                                "models: prompts that name only it (built in for shapes, else --prompts); with "
                                "--queries: the aspect those learning queries show (checked against a generated "
                                "set's record)", type=str)
    prompts: str | None = option(None, "with --generate, text-to-image models: a file of learning prompts, one per "
                                 "line (e.g. naming only --aspect), cycled over the N queries", type=str)
    sample_seed: int = option(1, "seed of the generated learning queries")
    guidance: float = option(DEFAULT_GUIDANCE, "classifier-free guidance of the generated learning queries (pass "
                             "the --guidance the evaluation queries were sampled with; attribute warns on a mismatch)")
    sample_steps: int = option(50, "sampling steps of the generated learning queries", check=positive)
    method: str = method_option()
    kernel: str = kernel_option()
    lambda_c: str | float | None = lambda_c_option(default=AUTO)
    k: int = option(DEFAULT_K, "top-k of the objective", check=positive)
    steps: int = option(DEFAULT_STEPS, "optimiser steps", check=positive)
    lr: float = option(DEFAULT_LR, "AdamW learning rate on θ")
    l2: float = option(DEFAULT_L2, "λ‖w‖² penalty")
    guard: str = option(DEFAULT_GUARD, "holdout: learn on each half of the learning queries, score on the other, "
                        "and shrink the weights towards uniform as far as the gain does not carry over",
                        choices=GUARDS)
    out: str | None = option(None, "weights JSON (default: STORE/weights/METHOD-KERNEL-ASPECT.json)", type=str)

    def validate(self) -> None:
        if (self.queries is None) == (self.generate is None):
            raise UserError("pass exactly one of --queries STORE or --generate N")
        if self.prompts is not None and self.generate is None:
            raise UserError("--prompts generates learning queries; use it with --generate N")
