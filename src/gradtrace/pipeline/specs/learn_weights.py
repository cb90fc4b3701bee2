"""The learn-weights stage's spec: the training store, the learning queries (given or generated), the objective;
or the model inputs of a method that needs the model."""
from __future__ import annotations

from dataclasses import dataclass

from gradtrace.choices import (
    AUTO,
    DEFAULT_GUARD,
    DEFAULT_GUIDANCE,
    DEFAULT_K,
    DEFAULT_L2,
    DEFAULT_LR,
    DEFAULT_STEPS,
    GUARDS,
    needs_model,
)
from gradtrace.errors import UserError
from gradtrace.pipeline.scoring_options import kernel_option, lambda_c_option, method_option
from gradtrace.pipeline.spec import Spec, option, positive
from gradtrace.pipeline.specs.model_inputs import ModelInputs

OBJECTIVES = ("snr", "family", "snr+family")  # gradtrace.weights.family (the objectives' definitions)
OBJECTIVE_CHOICES = (AUTO, *OBJECTIVES)  # auto: family for an aspect's weights, snr for general ones


@dataclass
class _LearnWeightsOptions(Spec):
    train: str | None = option(None, "feature store of the training set (feature methods)", type=str)
    queries: str | None = option(None, "feature store of learning queries (never evaluation queries), e.g. the "
                                 "features/ of a generated learning-query set (its aspect is then taken and checked)",
                                 type=str)
    generate: int | None = option(None, "generate N learning queries from the store's checkpoint instead of "
                                  "--queries", type=int, metavar="N", check=positive)
    aspect: str | None = option(None, "with --generate: learning queries in families of this attribute's values "
                                "(token-conditioned models: only its token set; text-to-image models: whole captions "
                                "built per value, built in for shapes, else --prompts); with --queries: the aspect "
                                "those learning queries show (checked against a generated set's record)", type=str)
    prompts: str | None = option(None, "with --generate, text-to-image models: a file of learning prompts, one per "
                                 "line, cycled over the N queries (for --aspect: identical prompts form a family)",
                                 type=str)
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
                        "and shrink the weights towards uniform as far as the gain does not carry over (the "
                        "one-standard-error rule); auto: holdout for SNR weights from 4 learning queries up, none "
                        "below and for family weights (they have their own signal test); none: as learned",
                        choices=GUARDS)
    out: str | None = option(None, "weights JSON (default: STORE/weights/METHOD-KERNEL-ASPECT.json)", type=str)
    objective: str = option(AUTO, "snr: the top-k signal-to-noise ratio; family: learning queries that share "
                            "--family's value should rank the same training examples first (and others not); "
                            "snr+family: both; auto: family for --aspect weights (families: the aspect's value each "
                            "learning query was generated with), snr otherwise", choices=OBJECTIVE_CHOICES)
    family: str | None = option(None, "with --objective family: the learning queries' label column whose value "
                                "makes a family (generated queries: an attribute they were sampled with, or "
                                "'prompt', the text they were generated from; default: --aspect)", type=str)
    family_labels: str | None = option(None, "the --family column of the learning queries from a file (CSV with an "
                                       "id column, or JSON lines with \"id\")", type=str)


@dataclass
class LearnWeightsSpec(ModelInputs, _LearnWeightsOptions):
    """The learn-weights stage's settings: the learning options, then the model inputs of methods that need the
    model."""

    def validate(self) -> None:
        if needs_model(self.method):
            for flag, value in (("--train", self.train), ("--queries", self.queries), ("--generate", self.generate),
                                ("--aspect", self.aspect), ("--prompts", self.prompts)):
                if value is not None:
                    raise UserError(f"method '{self.method}' learns on the model directly, on the --ids examples; "
                                    f"drop {flag}")
            self.check_model_inputs(self.method)
            if self.out is None:
                raise UserError(f"method '{self.method}' has no feature store to keep its weights in; pass --out FILE")
            return
        if self.objective in ("family", "snr+family") and self.family is None and self.aspect is None:
            raise UserError(f"--objective {self.objective} needs --family COLUMN (or --aspect NAME: families by the "
                            f"aspect's value)")
        if self.family is not None and self.objective == "snr":
            raise UserError("--family is for --objective family / snr+family; drop it or pass --objective family")
        if self.objective in ("family", "snr+family") and self.guard == "holdout":
            raise UserError("--guard holdout works with --objective snr only; drop --guard (family weights have "
                            "their own family signal test)")
        if self.train is None:
            raise UserError("--train is required (a feature store; a method that needs the model, e.g. ekfac, takes "
                            "--checkpoint and --ids)")
        if (self.queries is None) == (self.generate is None):
            raise UserError("pass exactly one of --queries STORE or --generate N")
        if self.prompts is not None and self.generate is None:
            raise UserError("--prompts generates learning queries; use it with --generate N")
