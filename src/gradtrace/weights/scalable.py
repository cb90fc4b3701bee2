"""The SNR objective at scale: exact noise from G_q, signal from candidate pools; never builds Q × N × M.

Precompute: one float64 pass for S = ΨᵀΨ, all G_q (Q·k² flops), and the first pool pass. Per step:
pool scores (Q·C·M), the pool check (Q·M log M), one G matvec (Q·M²) for the noise and its gradient,
streamed passes over Ψ only for queries whose pool may have lost the top-k, and autograd on the
gathered (Q, k, M) rows.
"""
from __future__ import annotations

import time

import numpy as np
import torch

from gradtrace.methods.fitted import FittedMethod
from gradtrace.weights.noise import psi_stats, query_grams, sqrt_quadratic_backward
from gradtrace.weights.objective import ratio_loss
from gradtrace.weights.pool import CandidatePool


class ScalableObjective:
    """Callable w (M,) float64 tensor -> mean_q L(w; q), equal to `snr_loss` on the dense contributions."""

    def __init__(self, fitted: FittedMethod, phi_q: np.ndarray, *, k: int, pool_size: int, trigger: str,
                 chunk_rows: int = 65536, progress: bool = False):
        start = time.perf_counter()
        self.stats = psi_stats(fitted.psi, fitted.group_slices, progress=progress)
        self.seconds = {"psi_gram": time.perf_counter() - start}
        start = time.perf_counter()
        self.grams = query_grams(phi_q, self.stats.gram, fitted.group_slices)
        self.seconds["query_grams"] = time.perf_counter() - start
        self.pool = CandidatePool(fitted, phi_q, self.stats, size=pool_size, k=k, trigger=trigger,
                                  chunk_rows=chunk_rows)
        self.rows = np.arange(phi_q.shape[0])[:, None]

    def __call__(self, w: torch.Tensor, *, last: bool = False, per_query: bool = False) -> torch.Tensor:
        pos = self.pool.select(w.detach().cpu().numpy().astype(np.float64), last=last)
        top = torch.from_numpy(self.pool.contrib[self.rows, pos].astype(np.float64))   # (Q, k, M)
        signal = (top @ w).mean(dim=1)
        return ratio_loss(signal, QuadraticNorm.apply(w, self.grams), per_query=per_query)

    def memory_bytes(self) -> int:
        """Bytes held by the pool contributions, G and S (the dominant terms)."""
        return int(self.pool.contrib.nbytes + self.grams.nbytes + self.stats.gram.nbytes)

    def pool_info(self) -> dict:
        p = self.pool
        return {"size": p.size, "refresh": p.trigger, "passes": p.passes, "queries_refreshed": p.queries_refreshed,
                "entrants_at_refresh": p.entrants}


class QuadraticNorm(torch.autograd.Function):
    """noise_q = √(wᵀ G_q w) for all q with one (Q·M, M) matvec; gradient G_q w / noise_q (0 where noise is 0)."""

    @staticmethod
    def forward(ctx, w: torch.Tensor, grams: np.ndarray) -> torch.Tensor:  # noqa: D102
        n_q, m, _ = grams.shape
        w_np = w.detach().cpu().numpy().astype(np.float64)
        gw = (grams.reshape(n_q * m, m) @ w_np).reshape(n_q, m)
        noise = np.sqrt(np.maximum(gw @ w_np, 0.0))
        gw_t, noise_t = torch.from_numpy(gw), torch.from_numpy(noise)
        ctx.save_for_backward(gw_t, noise_t)
        return noise_t.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # noqa: D102
        return sqrt_quadratic_backward(*ctx.saved_tensors, grad), None
