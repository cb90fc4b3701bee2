"""Per-group random projections of per-example gradients.

Each group j of d_j parameters gets its own seeded matrix P_j (d_j × k_j) with independent entries of
mean 0 and variance 1/k_j (Rademacher ±1/√k_j or Gaussian N(0, 1/k_j)), so E[P_j P_jᵀ] = I and projected
inner products are unbiased estimates of the true per-group gradient inner products. A group whose
share of the dimension budget reaches its size is kept exact (identity). Only the per-group blocks
exist, never a dense d × k matrix for the whole model.

Blockwise generation (so a 35.7M-parameter model never holds a d_j × k_j matrix): P_j is cut into row
blocks of `block_rows` rows; block b comes from its own torch generator, seeded from (seed, group name) for
b = 0 and from (seed, group name, b) for b ≥ 1. A block is produced in steps of `step_rows` rows drawn one
after the other from that generator (the CPU generator's stream does not depend on how a draw is split; the
tests check it), and `project` applies each step as soon as it is drawn: memory is one step, whatever d_j.
So the matrix depends on the seed, the names, the dims and `block_rows` only, never on `step_rows`, the
chunk of examples or the device. Block 0 is seeded as the whole matrix was before blocks existed: a group of at
most `block_rows` parameters has exactly its former matrix, and `info()` names `block_rows` only when some
projected group is larger (then the matrix differs from the former one, and a store made before is refused
as a store with other settings). Matrices of at most `CACHE_ENTRIES` entries are kept once drawn.
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field

import torch

from gradtrace.choices import DEFAULT_PROJECTION, PROJECTIONS as KINDS  # noqa: F401  (the CLI's choices)
from gradtrace.errors import UserError
from gradtrace.io import derive_seed

# The default features: the Kronecker projection to 8,192 dimensions. On the digits LDS sweep it beat the dense
# Rademacher projection to 2,048 (the former default) for every per-group kernel, at less featurization cost
# (README, "Defaults and why"; docs/benchmarks.md). A dense projection chosen without --dim keeps 2,048: its
# cost grows with k, the Kronecker one's hardly does.
DEFAULT_TOTAL_DIM = 2048
DEFAULT_KRONECKER_DIM = 8192

BLOCK_ROWS = 131072       # rows of one seeded block (2^17: every group of the tiny models is one block)
STEP_ENTRIES = 1 << 22    # entries drawn and applied at once (16 MiB of float32)
CACHE_ENTRIES = 1 << 25   # a group's matrix up to this size (128 MiB of float32) is kept once drawn


def default_dim(projection: str) -> int:
    """The total dimension used when none is given: 8,192 for the Kronecker projection, 2,048 otherwise."""
    return DEFAULT_KRONECKER_DIM if projection == "kronecker" else DEFAULT_TOTAL_DIM


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
    """Projects the flattened gradient of each group with its own matrix (drawn blockwise, see the module doc)."""

    kind: str
    seed: int
    names: list[str]
    sizes: list[int]
    dims: list[int]
    block_rows: int = BLOCK_ROWS
    step_entries: int = STEP_ENTRIES
    cache_entries: int = CACHE_ENTRIES
    _mats: dict[int, torch.Tensor] = field(default_factory=dict, repr=False)

    @classmethod
    def create(cls, kind: str, names: list[str], sizes: list[int], *, total_dim: int = DEFAULT_TOTAL_DIM,
               dims: list[int] | None = None, seed: int = 0, block_rows: int = BLOCK_ROWS) -> "GroupProjector":
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
        if int(block_rows) < 1:
            raise UserError(f"projection block rows must be positive, got {block_rows}")
        return cls(kind=kind, seed=int(seed), names=list(names), sizes=list(sizes), dims=[int(k) for k in dims],
                   block_rows=int(block_rows))

    def info(self) -> dict:
        info = {"kind": self.kind, "seed": self.seed, "dims": list(self.dims), "total_dim": self.total_dim}
        if any(not self.is_exact(j) and self.sizes[j] > self.block_rows for j in range(len(self.sizes))):
            info["block_rows"] = self.block_rows  # the matrix of such a group depends on it
        return info

    @property
    def total_dim(self) -> int:
        return int(sum(self.dims))

    def is_exact(self, j: int) -> bool:
        return self.kind == "identity" or self.dims[j] >= self.sizes[j]

    # ---- generation ------------------------------------------------------------------------------
    def block_seed(self, j: int, b: int) -> int:
        """The seed of block b of group j: (seed, name) for the first block, (seed, name, b) for the others."""
        return name_seed(self.seed, self.names[j] if b == 0 else f"{self.names[j]}#block{b}")

    def steps(self, j: int):
        """(row start, row stop, rows of P_j as float32) in order, each step drawn from its block's generator."""
        d, k = self.sizes[j], self.dims[j]
        step = max(16, (max(1, self.step_entries // k) // 16) * 16)  # rows; a multiple of 16 (whole normal pairs)
        for b0 in range(0, d, self.block_rows):
            gen = torch.Generator().manual_seed(self.block_seed(j, b0 // self.block_rows))
            b1 = min(d, b0 + self.block_rows)
            r0 = b0
            while r0 < b1:
                r1 = min(b1, r0 + step)
                if (b1 - r1) * k < 16:  # no last step under 16 entries: torch draws those normals otherwise
                    r1 = b1
                yield r0, r1, self._draw(r1 - r0, k, gen)
                r0 = r1

    def _draw(self, rows: int, k: int, gen: torch.Generator) -> torch.Tensor:
        if self.kind == "gaussian":
            return torch.randn((rows, k), generator=gen) / math.sqrt(k)
        return (torch.randint(0, 2, (rows, k), generator=gen, dtype=torch.int8) * 2 - 1).float() / math.sqrt(k)

    def matrix(self, j: int) -> torch.Tensor:
        """P_j, (d_j, k_j) float32, assembled from its blocks (kept when it has at most `cache_entries` entries).

        For tests and small groups: `project` never builds it for a larger group."""
        if j in self._mats:
            return self._mats[j].cpu()
        mat = torch.empty(self.sizes[j], self.dims[j])
        for r0, r1, rows in self.steps(j):
            mat[r0:r1] = rows
        if self.sizes[j] * self.dims[j] <= self.cache_entries:
            self._mats[j] = mat
        return mat

    def project(self, j: int, grads: torch.Tensor) -> torch.Tensor:
        """(B, d_j) flattened group gradients → (B, k_j) (on the gradients' device)."""
        if self.is_exact(j):
            return grads
        if self.sizes[j] * self.dims[j] <= self.cache_entries:
            mat = self._mats.get(j)
            if mat is None:
                mat = self.matrix(j)
            if mat.device != grads.device:
                mat = self._mats[j] = mat.to(grads.device)
            return grads @ mat
        out = torch.zeros(grads.shape[0], self.dims[j], dtype=grads.dtype, device=grads.device)
        for r0, r1, rows in self.steps(j):
            out.addmm_(grads[:, r0:r1], rows.to(device=grads.device, dtype=grads.dtype))
        return out
