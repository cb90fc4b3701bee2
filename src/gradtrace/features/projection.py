"""Per-group random projections of per-example gradients.

Each group j of d_j parameters gets its own seeded matrix P_j (d_j × k_j) with independent entries of
mean 0 and variance 1/k_j (Rademacher ±1/√k_j or Gaussian N(0, 1/k_j)), so E[P_j P_jᵀ] = I and projected
inner products are unbiased estimates of the true per-group gradient inner products. A group whose
share of the dimension budget reaches its size is kept exact (identity). Only the per-group blocks
exist, never a dense d × k matrix for the whole model.
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field

import torch

from gradtrace.errors import UserError
from gradtrace.io import derive_seed

KINDS = ("rademacher", "gaussian", "identity", "kronecker")  # kronecker: see kron_projection.py
DEFAULT_TOTAL_DIM = 2048


def split_dims(sizes: list[int], total: int) -> list[int]:
    """Split a total projection dimension over groups ∝ √d_j, capped at d_j (water-filling).

    Every group gets at least min(d_j, 4) dimensions; a group given k_j ≥ d_j is kept exact.
    """
    if total < 1:
        raise UserError(f"projection dimension must be positive, got {total}")
    sizes = [int(s) for s in sizes]
    dims = [0] * len(sizes)
    free = list(range(len(sizes)))
    budget = float(total)
    while free:
        weight = sum(math.sqrt(sizes[j]) for j in free)
        capped = [j for j in free if budget * math.sqrt(sizes[j]) / weight >= sizes[j]]
        if not capped:
            for j in free:
                dims[j] = max(min(sizes[j], 4), int(round(budget * math.sqrt(sizes[j]) / weight)))
            break
        for j in capped:
            dims[j] = sizes[j]
            budget -= sizes[j]
        free = [j for j in free if j not in capped]
    return dims


def name_seed(seed: int, name: str) -> int:
    return derive_seed(seed, int.from_bytes(hashlib.sha256(name.encode()).digest()[:7], "little"))


@dataclass
class GroupProjector:
    """Projects the flattened gradient of each group with its own matrix."""

    kind: str
    seed: int
    names: list[str]
    sizes: list[int]
    dims: list[int]
    _mats: dict[int, torch.Tensor] = field(default_factory=dict, repr=False)

    @classmethod
    def create(cls, kind: str, names: list[str], sizes: list[int], *, total_dim: int = DEFAULT_TOTAL_DIM,
               dims: list[int] | None = None, seed: int = 0) -> "GroupProjector":
        if kind not in KINDS:
            raise UserError(f"unknown projection '{kind}'; use one of {', '.join(KINDS)}")
        if kind == "kronecker":
            raise UserError("the kronecker projection factors the model's layers; build it with "
                            "build_featurizer (KroneckerProjector.create), not GroupProjector")
        if kind == "identity":
            dims = list(sizes)
        elif dims is None:
            dims = split_dims(sizes, total_dim)
        if len(dims) != len(sizes) or any(k < 1 for k in dims):
            raise UserError("per-group projection dims must be one positive integer per group")
        return cls(kind=kind, seed=int(seed), names=list(names), sizes=list(sizes), dims=[int(k) for k in dims])

    def info(self) -> dict:
        return {"kind": self.kind, "seed": self.seed, "dims": list(self.dims), "total_dim": self.total_dim}

    @property
    def total_dim(self) -> int:
        return int(sum(self.dims))

    def is_exact(self, j: int) -> bool:
        return self.kind == "identity" or self.dims[j] >= self.sizes[j]

    def matrix(self, j: int) -> torch.Tensor:
        """P_j, (d_j, k_j) float32, generated once from (seed, group name) and cached."""
        if j not in self._mats:
            d, k = self.sizes[j], self.dims[j]
            gen = torch.Generator().manual_seed(name_seed(self.seed, self.names[j]))
            if self.kind == "gaussian":
                mat = torch.randn((d, k), generator=gen) / math.sqrt(k)
            else:
                mat = (torch.randint(0, 2, (d, k), generator=gen, dtype=torch.int8) * 2 - 1).float() / math.sqrt(k)
            self._mats[j] = mat
        return self._mats[j]

    def project(self, j: int, grads: torch.Tensor) -> torch.Tensor:
        """(B, d_j) flattened group gradients → (B, k_j) (on the gradients' device)."""
        if self.is_exact(j):
            return grads
        mat = self.matrix(j)
        if mat.device != grads.device:
            mat = self._mats[j] = mat.to(grads.device)
        return grads @ mat
