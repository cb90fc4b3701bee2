"""Base methods that work on the model and its examples directly (EK-FAC; LiSSA, DataInf, … would go here), with no
feature store: the same currency as the feature kernels, per-group contributions c_j(q, n), from a session on a
checkpoint.

    method = get_method("ekfac", c=0.1, groups="block")           # a configured ModelMethod (needs_model = True)
    session = method.session("runs/digits", default_factors=Path("out/factors")).fit()
    queries = session.examples(None, ids)                          # None: the checkpoint's own dataset
    contrib = session.contributions(queries, c)                   # (Q, N, M) float64
    idx, top = session.topk(queries, 10, c, weights=w)            # ranks of Σ_j w_j c_j
    self_c = session.self_contributions(c)                        # (N, M)

`ModelSession` does what every such method needs before its own work: it loads the checkpoint through its adapter,
reads the training examples the checkpoint records, checks the measurement, builds the parameter groups (the same
presets as the feature stores) and moves the adapter's influence model to the device. A subclass adds its engine
(`fit`, `contributions`, `self_contributions`) and what it records (`facts`, `lambda_facts`).
"""
from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gradtrace.adapters import adapter_of
from gradtrace.errors import UserError
from gradtrace.features.groups import make_groups
from gradtrace.io import sha256_arrays
from gradtrace.methods.base import BaseMethod
from gradtrace.methods.trak import check_c


@dataclasses.dataclass(frozen=True, repr=False)
class ModelMethod(BaseMethod):
    """A configured base method that needs the model. The settings every such method shares are fields here
    (a subclass adds its own); `c` None = `default_c`."""

    c: float | None = None
    groups: str = "block"
    measurement: str | None = None   # query-side measurement; None = the model's own
    timesteps: int = 10              # repeats averaged per example (diffusion timesteps)
    noise_seed: int = 0
    batch_size: int = 64
    device: str = "auto"             # "auto" = the first GPU when present, else the CPU

    needs_model = True
    uses_lambda = True

    def __post_init__(self) -> None:
        if self.c is not None:
            object.__setattr__(self, "c", check_c(self.c))

    @property
    def kernel_kind(self) -> str:
        return self.name  # its own curvature, no TRAK kernel to choose

    @property
    def scale_c(self) -> float:
        """The λ scale used: `c`, else `default_c`."""
        return self.default_c if self.c is None else self.c

    def with_c(self, c: float) -> "ModelMethod":
        return dataclasses.replace(self, c=c)

    def with_settings(self, **settings: Any) -> "ModelMethod":
        """The same method with other settings (e.g. the groups and measurement of a run's feature stores)."""
        return dataclasses.replace(self, **settings)

    def config(self) -> dict[str, Any]:
        return {"method": self.name, **{f.name: getattr(self, f.name) for f in dataclasses.fields(self)}}

    @abstractmethod
    def session(self, checkpoint, *, default_factors: Path, examples=None, progress: bool = True) -> "ModelSession":
        """A session on `checkpoint` (its recorded training set, or `examples`); `.fit()` fits what is fitted once."""


class ModelSession(ABC):
    """The checkpoint, its training examples and groups for one `ModelMethod` (module docstring)."""

    def __init__(self, method: ModelMethod, checkpoint, *, examples=None, progress: bool = True):
        self.method, self.progress = method, progress
        self.adapter = adapter_of(checkpoint)
        self.checkpoint = self.adapter.load(checkpoint)
        ckpt, adapter = self.checkpoint, self.adapter
        self.measurement = method.measurement or adapter.default_measurement
        if self.measurement not in adapter.measurements:
            raise UserError(f"unknown measurement '{self.measurement}' for {adapter.name} models; use one of "
                            f"{', '.join(adapter.measurements)}")
        source = (ckpt.config.get("dataset") or {}).get("source")
        if not source or not source.get("spec"):
            raise UserError(f"the checkpoint {checkpoint} does not record its training data; "
                            f"{method.name} needs it")
        self.train = adapter.examples(ckpt.model_config, source, ids=ckpt.train_ids)
        self.device = model_device(method.device)
        self.model = adapter.influence_model(ckpt).to(self.device)
        self.groups = make_groups(self.model, method.groups, preset_key=adapter.group_key,
                                  adapter_presets=adapter.group_presets)
        self.group_of = {p: g.name for g in self.groups for p in g.params}
        self.train_loss = adapter.objective(ckpt, adapter.train_loss_measurement, method.timesteps,
                                            method.noise_seed).to(self.device)
        self.query_measurement = adapter.objective(ckpt, self.measurement, method.timesteps,
                                                   method.noise_seed).to(self.device)
        # what fitted state (e.g. factors) must match to be reused; `use_training_examples` updates it
        self.identity = {"model_fingerprint": ckpt.fingerprint, "train_source": source,
                         "train_ids_sha256": sha256_arrays([self.train.ids]), "train_loss": self.train_loss.info(),
                         "groups": method.groups, "timesteps": method.timesteps, "noise_seed": method.noise_seed}
        if examples is not None:
            self.use_training_examples(examples)

    @property
    def sign(self) -> float:
        """+1 when the measurement is a loss (a helpful example lowers it), −1 when higher is better: a positive
        contribution always means "helpful"."""
        return 1.0 if self.adapter.measurement_is_loss(self.measurement) else -1.0

    @property
    def group_names(self) -> list[str]:
        return [g.name for g in self.groups]

    def use_training_examples(self, examples) -> None:
        """Fit and score `examples` (e.g. with flipped labels as `cond`) instead of the checkpoint's recorded set."""
        self.train = examples
        self.identity.update(train_source=examples.source,
                             train_ids_sha256=sha256_arrays([np.asarray(examples.ids)]),
                             train_cond_sha256=sha256_arrays([np.asarray(examples.cond)]))

    def examples(self, source: dict | None, ids):
        """The examples of `ids` (an int array) from `source` (None: the checkpoint's own dataset), in that dataset's
        order; empty ids are refused."""
        ex = self.adapter.examples(self.checkpoint.model_config, self.train.source if source is None else source,
                                   ids=ids)
        if len(ex.ids) == 0:
            raise UserError("no examples to score (empty ids); pass at least one id")
        return ex

    def fit(self) -> "ModelSession":
        """Fit what is fitted once (after every input was read and checked, so bad input writes nothing)."""
        return self

    @abstractmethod
    def contributions(self, queries, c: float) -> np.ndarray:
        """(Q, N, M) float64 c_j(q, n) of the queries to the training examples at λ scale c."""

    @abstractmethod
    def self_contributions(self, c: float, *, measurement: bool = False) -> np.ndarray:
        """(N, M) float64 per-group self-influence of the training examples: the training loss on both sides, or
        (`measurement`) the example scored as its own query, signed like `contributions`."""

    def topk(self, queries, k: int, c: float, weights=None) -> tuple[np.ndarray, np.ndarray]:
        """(rows (Q, k) int64, scores (Q, k) float64) of the k highest Σ_j w_j c_j(q, n) (w None = all ones), ties to
        the lower training row."""
        contrib = self.contributions(queries, c)
        scores = contrib @ (np.ones(contrib.shape[2]) if weights is None else np.asarray(weights, np.float64))
        idx = np.argsort(-scores, axis=1, kind="stable")[:, :int(k)]
        return idx, np.take_along_axis(scores, idx, 1)

    def facts(self) -> dict:
        """What manifests record about the method on this model (the "method" entry)."""
        return {**self.method.info(), "c": None}

    def lambda_facts(self, c: float) -> dict:
        """What the λ record adds for scale c (e.g. the damping it gives)."""
        return {}

    def fitted_record(self) -> dict:
        """What a manifest records about the fitted state (e.g. factors), beside the method."""
        return {}


def model_device(name: str) -> torch.device:
    """torch.device of a method's device setting ("auto": the first GPU when present, else the CPU). The pipeline
    resolves --device before it configures the method (`gradtrace.pipeline.devices`)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)
