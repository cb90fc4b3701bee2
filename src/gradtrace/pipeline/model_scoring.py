"""`attribute` and `learn-weights` for a method that needs the model (`method.needs_model`, e.g. EK-FAC): no feature
store; the method's session scores the checkpoint's training examples directly, its per-group contributions take
the learned weights exactly as the feature kernels' do, τ_w(q, n) = Σ_j w_j c_j(q, n), and the output is the same
`attribute` artefact (with the dense arrays: scores, contributions, the id order).

The training set is the checkpoint's own (its recorded dataset and training ids); queries and learning queries are
examples of `--data` (default: the checkpoint's dataset) chosen by `--ids` (held-out examples, never training ones).
What the method fits once (EK-FAC: the factors) is kept in `--factors` and reused by every later command that passes
the same folder for the same model, training set and settings.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from gradtrace.attribution import (
    check_model_scoring_c,
    query_set_id,
    read_model_weights,
    resolve_model_learning_c,
    resolve_model_scoring_c,
    write_contribution_attributions,
)
from gradtrace.data.sources import dataset_source
from gradtrace.errors import UserError
from gradtrace.io import command_line, read_json
from gradtrace.methods import ModelMethod, configure
from gradtrace.pipeline.devices import resolve_device
from gradtrace.pipeline.specs.model_inputs import ModelInputs
from gradtrace.pipeline.train import resolve_ids
from gradtrace.weights import learn_weights_dense, save_weights


def configure_model_method(spec: ModelInputs, name: str, c=None) -> ModelMethod:
    """The configured method object of a stage's settings (--device resolved here: one line when it cannot be)."""
    settings = {"groups": spec.groups, "measurement": spec.measurement, "timesteps": spec.timesteps,
                "noise_seed": spec.noise_seed, "batch_size": spec.batch_size,
                "device": str(resolve_device(spec.device)), "factors": spec.factors, "fisher": spec.fisher}
    method = configure(name, c=None)
    known = {k: v for k, v in settings.items() if k in method.config()}
    return configure(name, c=c, **known)


def spec_examples(session, spec: ModelInputs, ids):
    """The examples of `ids` (a file or an array) from --data (default: the checkpoint's dataset)."""
    source = None if spec.data is None else dataset_source(spec.data, n=spec.n, size=spec.size, seed=spec.data_seed)
    return session.examples(source, resolve_ids(ids))


def model_manifest(session, spec, queries, extra: dict) -> dict:
    """What the attribute artefact and the weights file record about a method that needs the model."""
    return {"method": session.facts(), "train_source": session.train.source, "query_source": queries.source,
            "model_fingerprint": session.checkpoint.fingerprint, "groups_spec": spec.groups,
            "measurement": {"name": session.measurement, "train_loss": session.identity["train_loss"]},
            **session.fitted_record(), "spec": spec.to_dict(), **extra}


def attribute_model_run(method: ModelMethod, spec, *, progress: bool = True) -> dict:
    """Top-k training examples per query with per-group contributions of a method that needs the model (weighted
    when --weights); `spec` is an `AttributeSpec` (its model inputs)."""
    check_model_scoring_c(spec.lambda_c, spec.learning_ids)
    if spec.weights is not None and not Path(spec.weights).is_file():
        raise UserError(f"weights file not found: {spec.weights}")
    session = method.session(spec.checkpoint, default_factors=Path(spec.out) / "factors", progress=progress)
    queries = spec_examples(session, spec, spec.ids)
    weights, winfo = read_model_weights(session, queries, spec.weights) if spec.weights else (None, None)
    learning = spec_examples(session, spec, spec.learning_ids) if spec.learning_ids is not None else None
    if learning is not None and query_set_id(learning) == query_set_id(queries):
        raise UserError("--learning-ids are the --ids; choose λ on other queries")
    session.fit()
    c, lam = resolve_model_scoring_c(session, queries, spec.lambda_c, winfo, learning)
    contrib = session.contributions(queries, c)
    return write_contribution_attributions(
        contrib, weights, train_ids=session.train.ids, query_ids=queries.ids, group_names=session.group_names,
        out=spec.out, top_k=spec.top_k,
        manifest=model_manifest(session, spec, queries, {"weights": winfo, "lambda": lam}))


def learn_weights_model_run(method: ModelMethod, spec, *, progress: bool = True) -> tuple[Path, dict]:
    """Learn group weights for a method that needs the model on learning queries (`--ids`); `spec` is a
    `LearnWeightsSpec` (its model inputs); returns (weights file, its document)."""
    out = Path(spec.out)
    session = method.session(spec.checkpoint, default_factors=out.with_name(out.stem + "-factors"), progress=progress)
    learning = spec_examples(session, spec, spec.ids)
    session.fit()
    c, table, contrib = resolve_model_learning_c(session, learning, spec.lambda_c, min(spec.k, len(session.train.ids)))
    result = learn_weights_dense(contrib, session.group_names, k=spec.k, steps=spec.steps, lr=spec.lr, l2=spec.l2,
                                 guard=spec.guard, progress=progress)
    provenance = {"command": command_line(), "spec": spec.to_dict(), "method": method.name,
                  "kernel": method.kernel_kind, "base_method": session.facts(), "identity": session.identity,
                  "measurement": session.measurement, **session.fitted_record(),
                  "lambda_c": c, **session.lambda_facts(c), "lambda_grid": table, "aspect": None,
                  "groups_preset": spec.groups, "learning_queries": query_set_id(learning),
                  "loss_first": result.loss_curve[0], "loss_last": result.loss_curve[-1], "learner": result.info}
    path = save_weights(out, result, provenance)
    return path, read_json(path, "weights file")


def model_self_contributions(method: ModelMethod, checkpoint, *, c: float, default_factors: Path, examples=None,
                             progress: bool = True) -> tuple[np.ndarray, object]:
    """(N, M) per-group self-influence of the training loss of every training example of `checkpoint` (or
    `examples`) at λ scale c, and the fitted session."""
    session = method.session(checkpoint, default_factors=default_factors, examples=examples, progress=progress).fit()
    return session.self_contributions(c), session
