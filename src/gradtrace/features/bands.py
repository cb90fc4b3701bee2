"""Timestep bands as a second group axis: one feature block per (parameter group × band of timesteps).

A diffusion model settles layout and subject at high noise and finer detail later, so which training images
shaped one aspect of an output can live in one part of the schedule. With bands, the T timesteps of the
measurement are split into N contiguous bands (high noise first) and each example gets one gradient per band,
the measurement averaged over that band's timesteps only:

    f_b(θ; x) = (1/T_b) Σ_{t ∈ band b} m(ε_θ(x_t, t, c), ε_{x,t})        and   f = Σ_b (T_b / T) f_b

with the same noise draw per (example, t) as without bands. Every band of a group is projected with the group's
own projection (the same matrix), so the whole-schedule feature is Σ_b (T_b/T) φ_{g@b}(x) exactly. The store's
groups are named `<group>@<band>` (e.g. `down.0@high`); each is a group of its own to every method, kernel and
weight learner: the per-group kernel is per (group, band), and learned weights can choose bands.

    featurizer = banded(featurizers, names, objective)   # featurizers: one per band, sharing groups and projector
"""
from __future__ import annotations

import numpy as np

from gradtrace.features.groups import Group


class BandedProjector:
    """The projector of a banded store: each group's projection repeated for every band."""

    def __init__(self, inner, n_bands: int):
        self.inner, self.n_bands = inner, int(n_bands)

    @property
    def dims(self) -> list[int]:
        return [int(d) for d in self.inner.dims for _ in range(self.n_bands)]

    @property
    def total_dim(self) -> int:
        return int(sum(self.dims))

    def is_exact(self, j: int) -> bool:
        return self.inner.is_exact(j // self.n_bands)

    def info(self) -> dict:
        return {**self.inner.info(), "timestep_bands": self.n_bands}


class BandedObjective:
    """The whole-schedule objective as the store records it, plus the bands; DAS's row scale is the whole
    objective's (it does not depend on the measurement's timesteps)."""

    def __init__(self, whole, bands: list[tuple[str, object]]):
        self.whole = whole
        self.bands = [{"name": name, "timesteps": list(obj.info()["timesteps"])} for name, obj in bands]

    def info(self) -> dict:
        return {**self.whole.info(), "bands": self.bands}

    def row_scale_info(self):
        return self.whole.row_scale_info()

    def row_scale(self, model, inputs, ids, cond):
        return self.whole.row_scale(model, inputs, ids, cond)


class BandedFeaturizer:
    """Features of every band side by side, group-major: [g0@b0, g0@b1, ..., g1@b0, ...]."""

    def __init__(self, featurizers: list, names: list[str], objective: BandedObjective):
        first = featurizers[0]
        self.featurizers, self.names = featurizers, list(names)
        self.model = first.model
        self.groups = [Group(f"{g.name}@{b}", g.params) for g in first.groups for b in self.names]
        self.sizes = [s for s in first.sizes for _ in self.names]
        self.projector = BandedProjector(first.projector, len(self.names))
        self.objective = objective
        self.param_names = first.param_names

    def features(self, inputs, ids, cond=None) -> np.ndarray:
        blocks = [f.features(inputs, ids, cond) for f in self.featurizers]
        bounds = np.concatenate([[0], np.cumsum(self.projector.inner.dims)]).astype(int)
        return np.concatenate([blk[:, bounds[j]:bounds[j + 1]] for j in range(len(bounds) - 1) for blk in blocks],
                              axis=1)
