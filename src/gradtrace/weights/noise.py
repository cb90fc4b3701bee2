"""The noise term without touching N per step: ‖τ_w(q, ·)‖² = wᵀ G_q w.

    G_q[j, l] = Σ_n c_j(q, n) c_l(q, n) = φ_j(q)ᵀ S_{jl} φ_l(q),    S = ΨᵀΨ   (k × k)

S is accumulated in float64 over row chunks of Ψ (one pass, N·k² flops); all G_q then cost Q·k² flops,
not Q·N·M². The same pass records the per-group maximum row norm max_n ‖ψ_j(n)‖, the overall maximum
row norm and the column means, which the candidate pool uses for its refresh checks. Per step the
noise of every query and its gradient are one (Q·M, M) product with w (`GramNorm`; `gram_matvec`
reads a float32 G and sums in float64).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from gradtrace.methods.checks import raise_if_nonfinite
from gradtrace.methods.rows import effective_chunk_rows, row_chunks


@dataclass
class PsiStats:
    """One pass over Ψ: S = ΨᵀΨ (k, k) float64, per-group max row norm (M,), max row norm, column means (k,)."""

    gram: np.ndarray
    group_norm_max: np.ndarray
    norm_max: float
    col_mean: np.ndarray
    n: int


def group_starts(group_slices: list[tuple[str, int, int]]) -> np.ndarray:
    """Start column of every group (for np.add.reduceat over the feature axis)."""
    return np.array([start for _, start, _ in group_slices], dtype=np.int64)


def psi_stats(psi: np.ndarray, group_slices: list[tuple[str, int, int]], *, chunk_rows: int = 4096,
              progress: bool = False) -> PsiStats:
    """S = ΨᵀΨ in float64 plus row-norm maxima and column means, reading Ψ in row chunks."""
    n, k = psi.shape
    starts = group_starts(group_slices)
    gram = np.zeros((k, k), dtype=np.float64)
    col_sum = np.zeros(k, dtype=np.float64)
    group_max = np.zeros(len(group_slices), dtype=np.float64)
    row_max = 0.0
    rows = effective_chunk_rows(chunk_rows, 8 * k, budget=64 * 2**20)
    for start, stop in row_chunks(n, rows, progress=progress, desc="weights: ΨᵀΨ"):
        x = np.asarray(psi[start:stop], dtype=np.float64)
        raise_if_nonfinite(x, start, "fitted training features (psi)")
        gram += x.T @ x                      # numpy uses a symmetric rank-k update for xᵀx
        col_sum += x.sum(axis=0)
        sq = np.add.reduceat(x * x, starts, axis=1)
        group_max = np.maximum(group_max, sq.max(axis=0))
        row_max = max(row_max, float(sq.sum(axis=1).max()))
    gram = (gram + gram.T) / 2
    return PsiStats(gram=gram, group_norm_max=np.sqrt(group_max), norm_max=float(np.sqrt(row_max)),
                    col_mean=col_sum / n, n=n)


def query_grams(phi_q: np.ndarray, gram: np.ndarray, group_slices: list[tuple[str, int, int]]) -> np.ndarray:
    """G (Q, M, M) float64 with G[q, j, l] = φ_j(q)ᵀ S_{jl} φ_l(q); `phi_q` (Q, k) float64.

    Q·k² flops; queries go in small blocks so the (block, k) intermediates stay in cache.
    """
    starts = group_starts(group_slices)
    n_q, k, m = phi_q.shape[0], phi_q.shape[1], len(group_slices)
    out = np.empty((n_q, m, m), dtype=np.float64)
    block = max(1, 32768 // k)
    for q0 in range(0, n_q, block):
        p = phi_q[q0:q0 + block]
        for j, (_, start, stop) in enumerate(group_slices):
            u = p[:, start:stop] @ gram[start:stop, :]          # (block, k): Σ_{a∈j} φ_a S_ab
            u *= p
            out[q0:q0 + block, j, :] = np.add.reduceat(u, starts, axis=1)
    return (out + out.transpose(0, 2, 1)) / 2


def gram_matvec(grams: torch.Tensor, w: torch.Tensor, *, block: int = 16) -> torch.Tensor:
    """(Q, M) float64 G_q w for float32 G (Q, M, M) and float64 w: blocks of queries widened to float64
    in cache, so the sums are float64 while each step reads only the float32 G."""
    n_q, m, _ = grams.shape
    out = torch.empty((n_q, m), dtype=torch.float64)
    for q0 in range(0, n_q, block):
        g = grams[q0:q0 + block].to(torch.float64)
        out[q0:q0 + block] = (g.view(-1, m) @ w).view(-1, m)
    return out


def sqrt_quadratic_backward(gw: torch.Tensor, noise: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """The gradient with respect to w of noise_q = sqrt(wᵀ G_q w) (gw = G_q w): grad_q · gw_q / noise_q, summed
    over queries, and 0 where the noise is 0 (the square root's subgradient there)."""
    coef = torch.where(noise > 0, grad / torch.where(noise > 0, noise, torch.ones_like(noise)), torch.zeros_like(noise))
    return coef @ gw


class GramNorm(torch.autograd.Function):
    """noise_q = √(wᵀ G_q w) from float32 G (Q, M, M) summed in float64; gradient G_q w / noise_q (0 where 0)."""

    @staticmethod
    def forward(ctx, w: torch.Tensor, grams: torch.Tensor) -> torch.Tensor:  # noqa: D102
        gw = gram_matvec(grams, w.detach())
        noise = torch.sqrt(torch.clamp(gw @ w.detach(), min=0.0))
        ctx.save_for_backward(gw, noise)
        return noise

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # noqa: D102
        return sqrt_quadratic_backward(*ctx.saved_tensors, grad), None
