"""The learn-weights stage: learning queries (given or generated), the label-free λ, and the weights file.

Learning queries are generated samples (or held-out images), never the evaluation queries: the weights
file records the learning-query set's identity, and the scoring stages refuse to score that same set.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from gradtrace.adapters import adapter_of
from gradtrace.attribution import (AUTO, default_weights_path, fit_method, query_set_id, resolve_learning_c,
                                   store_identity)
from gradtrace.errors import UserError
from gradtrace.evaluate.eval_retrieval import labels_of
from gradtrace.features.store import FeatureStore
from gradtrace.io import command_line, read_json
from gradtrace.methods import configure
from gradtrace.pipeline.featurize import FeaturizeSpec, featurize_run
from gradtrace.pipeline.sample import SampleSpec, read_prompts, sample_run
from gradtrace.pipeline.scoring_options import kernel_option, lambda_c_option, method_option
from gradtrace.pipeline.spec import Spec, option, positive
from gradtrace.weights import (DEFAULT_GUARD, DEFAULT_K, DEFAULT_L2, DEFAULT_LR, DEFAULT_STEPS, GUARDS, learn_weights,
                               save_weights)
from gradtrace.weights.family import OBJECTIVES, learn_family_weights


@dataclass
class LearnWeightsSpec(Spec):
    train: str = option(None, "feature store of the training set", required=True)
    queries: str | None = option(None, "feature store of learning queries (never evaluation queries)", type=str)
    generate: int | None = option(None, "generate N learning queries from the store's checkpoint instead of "
                                  "--queries", type=int, metavar="N", check=positive)
    aspect: str | None = option(None, "with --generate: set only this attribute (e.g. style); text-to-image "
                                "models: prompts that name only it (built in for shapes, else --prompts)", type=str)
    prompts: str | None = option(None, "with --generate, text-to-image models: a file of learning prompts, one per "
                                 "line (e.g. naming only --aspect), cycled over the N queries", type=str)
    sample_seed: int = option(1, "seed of the generated learning queries")
    guidance: float = option(1.0, "classifier-free guidance of the generated learning queries")
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
    objective: str = option("snr", "snr: the top-k signal-to-noise ratio; family: learning queries that share "
                            "--family's value should rank the same training examples first (and others not); "
                            "snr+family: both", choices=OBJECTIVES)
    family: str | None = option(None, "with --objective family: the learning queries' label column whose value "
                                "makes a family (generated queries: an attribute they were sampled with)", type=str)
    family_labels: str | None = option(None, "the --family column of the learning queries from a file (CSV with an "
                                       "id column, or JSON lines with \"id\")", type=str)

    def validate(self) -> None:
        if (self.objective == "snr") != (self.family is None):
            raise UserError("--objective family / snr+family needs --family COLUMN (and --family is only for them)")
        if self.objective != "snr" and self.guard != "none":
            raise UserError("--guard holdout works with --objective snr only; drop --guard")
        if (self.queries is None) == (self.generate is None):
            raise UserError("pass exactly one of --queries STORE or --generate N")
        if self.prompts is not None and self.generate is None:
            raise UserError("--prompts generates learning queries; use it with --generate N")
        if self.aspect is not None and self.queries is not None:
            raise UserError("--aspect generates its own learning queries; use it with --generate N, not --queries")


def generate_learning_queries(train: FeatureStore, out: Path, *, num: int, aspect: str | None, seed: int,
                              guidance: float, sample_steps: int, progress: bool,
                              prompts: list[str] | None = None) -> FeatureStore:
    """Sample `num` learning queries from the training store's checkpoint (only `aspect` set, if given; or
    the user's `prompts`) and featurize them with the training store's exact settings."""
    checkpoint = train.manifest.get("provenance", {}).get("checkpoint")
    if not checkpoint:
        raise UserError(f"{train.path} does not record its checkpoint; pass --queries with featurized learning queries")
    adapter = adapter_of(checkpoint)
    request = adapter.query_request(adapter.load(checkpoint), num, aspect=aspect, seed=seed, prompts=prompts)
    sample_run(SampleSpec(checkpoint=checkpoint, out=str(out / "samples"), num=num, guidance=guidance,
                          sample_steps=sample_steps, seed=seed, **request), progress=progress)
    spec = FeaturizeSpec.like(train.settings, checkpoint=checkpoint, out=str(out / "features"),
                              samples=str(out / "samples"), overwrite=True)
    return featurize_run(spec, progress=progress)


def learn_weights_run(spec: LearnWeightsSpec, *, progress: bool = True) -> tuple[Path, dict]:
    """Learn group weights for a training store; returns (weights file, its document)."""
    train = FeatureStore.open(spec.train)
    out = Path(spec.out) if spec.out else default_weights_path(train, spec.method, spec.kernel, spec.aspect)
    if spec.generate is not None:
        queries = generate_learning_queries(train, out.with_suffix(""), num=spec.generate, aspect=spec.aspect,
                                            seed=spec.sample_seed, guidance=spec.guidance,
                                            sample_steps=spec.sample_steps, progress=progress,
                                            prompts=read_prompts(spec.prompts) if spec.prompts else None)
    else:
        queries = FeatureStore.open(spec.queries)
    train.check_compatible(queries)
    c_value, lambda_table = resolve_learning_c(train, queries, spec.method, spec.kernel, spec.lambda_c, spec.k)
    fitted = fit_method(train, spec.method, kernel=spec.kernel, c=c_value, progress=progress)
    if spec.objective == "snr":
        result = learn_weights(fitted, np.asarray(queries.features), k=spec.k, steps=spec.steps, lr=spec.lr,
                               l2=spec.l2, guard=spec.guard, progress=progress)
    else:
        families = labels_of(queries.settings["source"], queries.ids, [spec.family], spec.family_labels,
                             "family")[spec.family]
        result = learn_family_weights(fitted, np.asarray(queries.features), families, objective=spec.objective,
                                      k=spec.k, steps=spec.steps, lr=spec.lr, l2=spec.l2, progress=progress)
    provenance = {
        "command": command_line(), "spec": spec.to_dict(),
        "base_method": fitted.info, "method": spec.method,
        "kernel": configure(spec.method, kernel=spec.kernel).kernel_kind,
        "lambda_c": c_value, "lambda_grid": lambda_table, "aspect": spec.aspect,
        "train_store": str(train.path), "store": store_identity(train),
        "groups_preset": train.settings["groups_spec"], "k": result.info["k"], "l2": result.info["l2"],
        "steps": result.info["steps"], "lr": result.info["lr"], "guard": result.info.get("guard"),
        "learning_queries": {"store": str(queries.path), **query_set_id(queries)},
        "loss_first": result.loss_curve[0], "loss_last": result.loss_curve[-1],
        "learner": result.info,
    }
    path = save_weights(out, result, provenance)
    return path, read_json(path, "weights file")
