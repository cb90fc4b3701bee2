"""The EK-FAC-only commands, kept as deprecated aliases: `attribute-ekfac ARGS` is `attribute --method ekfac ARGS` and
`learn-weights-ekfac ARGS` is `learn-weights --method ekfac ARGS` (same options, same outputs; CHANGELOG 0.2.0). And
`self_influence`, EK-FAC's per-group self-influence of a checkpoint's training examples (Python API).

EK-FAC itself is a base method like the others (`gradtrace.methods.ekfac_method.Ekfac`, needs_model); its stages are
`gradtrace.pipeline.model_scoring`.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np

from gradtrace.attribution import AUTO, parse_c
from gradtrace.choices import EKFAC_DEFAULT_C as DEFAULT_C
from gradtrace.errors import UserError
from gradtrace.methods.ekfac_method import EkfacSession
from gradtrace.pipeline.attribute import AttributeSpec, attribute_run
from gradtrace.pipeline.learn_weights import LearnWeightsSpec, learn_weights_run
from gradtrace.pipeline.model_scoring import configure_model_method, model_self_contributions
from gradtrace.pipeline.specs.ekfac import GRID, AttributeEkfacSpec, EkfacInputs, LearnWeightsEkfacSpec  # noqa: F401


def _as(spec_cls, spec):
    """The general stage's spec with `--method ekfac` and the alias's settings."""
    return spec_cls(method="ekfac", **{f.name: getattr(spec, f.name) for f in fields(spec)})


def attribute_ekfac_run(spec: AttributeEkfacSpec, *, progress: bool = True) -> dict:
    """Deprecated: `attribute --method ekfac` (`gradtrace.pipeline.attribute.attribute_run`)."""
    return attribute_run(_as(AttributeSpec, spec), progress=progress)


def learn_weights_ekfac_run(spec: LearnWeightsEkfacSpec, *, progress: bool = True) -> tuple[Path, dict]:
    """Deprecated: `learn-weights --method ekfac` (`gradtrace.pipeline.learn_weights.learn_weights_run`)."""
    return learn_weights_run(_as(LearnWeightsSpec, spec), progress=progress)


def setup(spec: EkfacInputs, default_factors: Path, *, progress: bool = True) -> EkfacSession:
    """The EK-FAC session of the spec's checkpoint and settings (`.fit()` fits the factors)."""
    return configure_model_method(spec, "ekfac").session(spec.checkpoint, default_factors=default_factors,
                                                          progress=progress)


@dataclass
class SelfInfluence:
    """Per-group EK-FAC self-influence of training examples: `contributions[n, j]` for example `ids[n]` and group
    `group_names[j]`; the total (uniform weights) is `contributions.sum(1)`, with weights `contributions @ w`."""

    ids: np.ndarray
    group_names: list[str]
    contributions: np.ndarray
    info: dict


def self_influence(checkpoint, *, examples=None, groups: str = "block", lambda_c: float = DEFAULT_C, factors=None,
                   fisher: str = "auto", batch_size: int = 64, timesteps: int = 10, noise_seed: int = 0,
                   device: str = "auto", progress: bool = True) -> SelfInfluence:
    """Per-group EK-FAC self-influence ∇L(n)ᵀ (G + δI)⁻¹ ∇L(n) of every training example of `checkpoint` (the
    training loss on both sides), δ = lambda_c · mean(Λ). The training set is the checkpoint's recorded one, or
    `examples` (a `gradtrace.data.sources.Examples`, e.g. with flipped labels as `cond`): the factors are fitted on
    it and it is scored. `factors`: the factors folder (default: CHECKPOINT-ekfac-factors beside the checkpoint),
    fitted once and reused for the same model, examples (ids and labels) and settings."""
    spec = EkfacInputs(checkpoint=str(checkpoint), ids=np.zeros(0, np.int64), groups=groups, factors=factors,
                       fisher=fisher, timesteps=timesteps, noise_seed=noise_seed, batch_size=batch_size,
                       device=device)
    c = parse_c(lambda_c)
    if c is None or c == AUTO:
        raise UserError("self_influence takes a number lambda_c >= 0")
    path = Path(checkpoint)
    contrib, s = model_self_contributions(configure_model_method(spec, "ekfac"), checkpoint, c=c, examples=examples,
                                          default_factors=path.with_name(path.name + "-ekfac-factors"),
                                          progress=progress)
    return SelfInfluence(ids=np.asarray(s.train.ids, np.int64), group_names=list(s.group_names),
                         contributions=contrib, info={"lambda_c": c, "damping": s.engine.damping(c),
                                                      "factors": str(s.engine.factors_dir.resolve()),
                                                      "fisher": s.engine.fisher, "identity": s.identity})


__all__ = ["AttributeEkfacSpec", "EkfacInputs", "LearnWeightsEkfacSpec", "SelfInfluence", "attribute_ekfac_run",
           "learn_weights_ekfac_run", "self_influence", "setup"]
