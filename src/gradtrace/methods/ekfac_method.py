"""EK-FAC as a base method: the configured method object (`Ekfac`, needs_model) and its session on a checkpoint, with
kronfluence's factors fitted once per folder (`gradtrace.methods.ekfac.EkfacEngine`).

    method = Ekfac(c=0.1, groups="block", factors="out/factors")
    s = method.session("runs/digits", default_factors=Path("out/factors")).fit()
    contrib = s.contributions(s.examples(None, ids), 0.1)    # (Q, N, M), Σ_j = kronfluence's total

Damping δ = c · mean(Λ) (default c = 0.1, kronfluence's own heuristic scale); `--lambda-c auto` tries 5 values of c
from 1e-4 to 1 (each one scores the learning queries once).
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

from gradtrace.choices import EKFAC_DEFAULT_C as DEFAULT_C, EKFAC_GRID, FISHERS  # noqa: F401  (the CLI's choices)
from gradtrace.extras import require
from gradtrace.methods.model_method import ModelMethod, ModelSession


@dataclasses.dataclass(frozen=True, repr=False)
class Ekfac(ModelMethod):
    """EK-FAC influence (kronfluence). `factors`: the factors folder (None: the stage's default, beside its output);
    `fisher`: true (targets drawn from the model, where the loss can), empirical, or auto (true where possible)."""

    factors: str | None = None
    fisher: str = "auto"

    name = "ekfac"
    default_c = DEFAULT_C
    lambda_grid_size = EKFAC_GRID

    def session(self, checkpoint, *, default_factors: Path, examples=None, progress: bool = True) -> "EkfacSession":
        return EkfacSession(self, checkpoint, default_factors=default_factors, examples=examples, progress=progress)


class EkfacSession(ModelSession):
    """The EK-FAC engine on one checkpoint (see `ModelSession`); `fit` fits or reuses the factors."""

    def __init__(self, method: Ekfac, checkpoint, *, default_factors: Path, examples=None, progress: bool = True):
        engine = require("gradtrace.methods.ekfac", "EK-FAC").EkfacEngine  # kronfluence: the `ekfac` extra
        super().__init__(method, checkpoint, examples=examples, progress=progress)
        fisher = {"auto": None, "true": False, "empirical": True}[method.fisher]
        self.engine = engine(self.model, self.train_loss, self.query_measurement, self.group_of.__getitem__,
                             self.group_names, factors_dir=Path(method.factors) if method.factors
                             else default_factors, sign=self.sign, batch_size=method.batch_size,
                             seed=method.noise_seed, progress=progress, empirical_fisher=fisher)
        self.factors: dict = {}

    @property
    def group_names(self) -> list[str]:
        """The groups that hold a tracked module (parameters outside them have no EK-FAC score)."""
        engine = getattr(self, "engine", None)
        return list(engine.group_names) if engine is not None else [g.name for g in self.groups]

    def fit(self) -> "EkfacSession":
        self.factors = self.engine.fit(self.train, self.identity)
        return self

    def contributions(self, queries, c: float):
        return self.engine.contributions(queries, self.train, c)

    def self_contributions(self, c: float, *, measurement: bool = False):
        return self.engine.self_contributions(self.train, c, measurement=measurement)

    def facts(self) -> dict:
        e = self.engine
        return {"method": "ekfac", "engine": "kronfluence", "kernel": "ekfac", "fisher": e.fisher, "sign": e.sign,
                "modules": e.module_group}

    def lambda_facts(self, c: float) -> dict:
        return {"damping": self.engine.damping(c)}

    def fitted_record(self) -> dict:
        e = self.engine
        return {"ekfac": {"factors": str(e.factors_dir.resolve()),
                          "factor_arguments": self.factors.get("factor_arguments"),
                          "score_arguments": getattr(e, "last_score_arguments", None),
                          "untracked_parameters": e.untracked}}
