"""The learn-weights stage: learning queries (given or generated), the label-free λ, and the weights file.

Learning queries are generated samples (or held-out images), never the evaluation queries: the weights
file records the learning-query set's identity, and the scoring stages refuse to score that same set.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from gradtrace.adapters import adapter_of
from gradtrace.attribution import default_weights_path, fit_method, query_set_id, resolve_learning_c, store_identity
from gradtrace.data.sources import sampling_of
from gradtrace.errors import UserError
from gradtrace.features.store import FeatureStore
from gradtrace.io import command_line, read_json
from gradtrace.methods import configure
from gradtrace.pipeline.featurize import FeaturizeSpec, featurize_run
from gradtrace.pipeline.sample import SampleSpec, read_prompts, sample_run
from gradtrace.pipeline.specs.learn_weights import LearnWeightsSpec
from gradtrace.weights import learn_weights, save_weights


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
    result = learn_weights(fitted, np.asarray(queries.features), k=spec.k, steps=spec.steps, lr=spec.lr,
                           l2=spec.l2, guard=spec.guard, progress=progress)
    provenance = {
        "command": command_line(), "spec": spec.to_dict(),
        "base_method": fitted.info, "method": spec.method,
        "kernel": configure(spec.method, kernel=spec.kernel).kernel_kind,
        "lambda_c": c_value, "lambda_grid": lambda_table, "aspect": spec.aspect,
        "train_store": str(train.path), "store": store_identity(train),
        "groups_preset": train.settings["groups_spec"], "k": result.info["k"], "l2": result.info["l2"],
        "steps": result.info["steps"], "lr": result.info["lr"], "guard": result.info.get("guard"),
        "learning_queries": {"store": str(queries.path), **query_set_id(queries),
                             "sampling": sampling_of(queries.settings.get("source"))},
        "loss_first": result.loss_curve[0], "loss_last": result.loss_curve[-1],
        "learner": result.info,
    }
    path = save_weights(out, result, provenance)
    return path, read_json(path, "weights file")
