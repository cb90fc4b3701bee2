"""The dense passes over Ψ of the lazy scalable learner: ΨᵀΨ, all G_q, the streamed top-C pass.

On CPU the products are float32 BLAS calls through numpy (numpy's `xᵀx` is a symmetric rank-k update,
half the flops of a general product; torch's CPU matmul was slower here), with float64 accumulation
across row chunks; selection uses `torch.topk`. On a CUDA device the same steps run in torch on the
device, with Ψ copied there once when it fits (`device_cache`).

Float32 rounding: a float32 dot product of length d has error ≤ γ_d Σ_a |x_a y_a| ≤ γ_d ‖x‖ ‖y‖ with
γ_d = d·u/(1 − d·u), u = 2⁻²⁴ (Higham, Thm 3.5); `score_error` is that bound with ‖y‖ ≤ max_n ‖ψ(n)‖.
"""
from __future__ import annotations

import numpy as np
import torch

from gradtrace.methods.checks import raise_if_nonfinite
from gradtrace.methods.rows import effective_chunk_rows, row_chunks
from gradtrace.weights.noise import PsiStats, group_starts
from gradtrace.weights.threads import threads

U32 = 2.0 ** -24


def pick_device(device: str | torch.device | None = None) -> torch.device:
    """`device` if given, else CUDA when present, else CPU."""
    if device is not None:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def score_error(q_norm: np.ndarray, row_norm_max: float, dim: int) -> np.ndarray:
    """Bound on |float32 score − exact score| for weighted queries of norm `q_norm` (any row)."""
    gamma = (dim + 2) * U32 / (1 - (dim + 2) * U32)
    return 1.01 * gamma * q_norm * row_norm_max


class PsiSource:
    """Row chunks of Ψ as float32, on `device` (held there whole when it fits `cache_bytes`)."""

    def __init__(self, psi: np.ndarray, device: torch.device, *, chunk_rows: int = 16384,
                 cache_bytes: int | None = None):
        self.psi, self.device = psi, device
        self.n, self.dim = psi.shape
        self.rows = effective_chunk_rows(chunk_rows, 4 * self.dim, budget=128 * 2**20)
        self.cached: torch.Tensor | None = None
        if device.type == "cuda":
            free = torch.cuda.mem_get_info(device)[0] if cache_bytes is None else cache_bytes
            if 4 * self.n * self.dim < 0.5 * free:
                self.cached = torch.empty((self.n, self.dim), dtype=torch.float32, device=device)
                for s, e in row_chunks(self.n, self.rows):
                    self.cached[s:e] = torch.from_numpy(np.array(psi[s:e], dtype=np.float32))

    def chunks(self, progress: bool = False, desc: str = "Ψ"):
        """Yield (start, stop, block): numpy float32 on CPU, a torch tensor on a CUDA device."""
        for s, e in row_chunks(self.n, self.rows, progress=progress, desc=desc):
            if self.cached is not None:
                yield s, e, self.cached[s:e]
            elif self.device.type == "cuda":
                yield s, e, torch.from_numpy(np.array(self.psi[s:e], dtype=np.float32)).to(self.device)
            else:
                yield s, e, np.asarray(self.psi[s:e], dtype=np.float32)


def psi_stats_fast(source: PsiSource, group_slices: list[tuple[str, int, int]], *,
                   progress: bool = False) -> PsiStats:
    """S = ΨᵀΨ (float32 products per chunk, summed in float64), row-norm maxima and column means."""
    n, k = source.n, source.dim
    starts = group_starts(group_slices)
    gram = np.zeros((k, k), dtype=np.float64)
    col_sum = np.zeros(k, dtype=np.float64)
    group_max = np.zeros(len(group_slices), dtype=np.float64)
    row_max = 0.0
    for start, _, x in source.chunks(progress, "weights: ΨᵀΨ"):
        if isinstance(x, torch.Tensor):
            if not bool(torch.isfinite(x).all()):
                raise_if_nonfinite(x.cpu().numpy(), start, "fitted training features (psi)")
            gram += (x.T @ x).double().cpu().numpy()
            col_sum += x.double().sum(0).cpu().numpy()
            sq = (x.double() ** 2).cpu().numpy()
        else:
            raise_if_nonfinite(x, start, "fitted training features (psi)")
            gram += x.T @ x                    # float32 syrk, accumulated in float64
            col_sum += x.sum(axis=0, dtype=np.float64)
            sq = np.square(x, dtype=np.float64)
        sq = np.add.reduceat(sq, starts, axis=1)
        group_max = np.maximum(group_max, sq.max(axis=0))
        row_max = max(row_max, float(sq.sum(axis=1).max()))
    gram = (gram + gram.T) / 2
    # float32 rounding of the chunk products can only shrink the norms' bounds by O(u): pad them
    pad = 1.0 + 4 * k * U32
    return PsiStats(gram=gram, group_norm_max=np.sqrt(group_max) * pad, norm_max=float(np.sqrt(row_max)) * pad,
                    col_mean=col_sum / n, n=n)


def query_grams_fast(phi_q: np.ndarray, gram: np.ndarray, group_slices: list[tuple[str, int, int]], *,
                     block: int = 64) -> np.ndarray:
    """G (Q, M, M) float32, G[q, j, l] = φ_j(q)ᵀ S_{jl} φ_l(q) (Q·k² flops in float64, stored rounded).

    Per block of queries and group j: (B, k_j) · (k_j, k), times φ, summed into groups by `index_add_`,
    so the (B, k) intermediate stays in cache. These products are too small to share between threads:
    one thread (on a loaded 2-core machine two threads took 40 times the CPU time). Stored in float32
    (relative rounding 2⁻²⁴ per entry) to halve what every step reads; `gram_matvec` sums in float64.
    """
    m = len(group_slices)
    col_group = torch.from_numpy(np.repeat(np.arange(m), [stop - start for _, start, stop in group_slices]))
    p_all, s = torch.from_numpy(np.ascontiguousarray(phi_q, dtype=np.float64)), torch.from_numpy(gram)
    out = torch.empty((phi_q.shape[0], m, m), dtype=torch.float32)
    with threads(1):
        for q0 in range(0, phi_q.shape[0], block):
            p = p_all[q0:q0 + block]
            g = torch.zeros((p.shape[0], m, m), dtype=torch.float64)
            for j, (_, start, stop) in enumerate(group_slices):
                u = p[:, start:stop] @ s[start:stop]
                u.mul_(p)
                g[:, j].index_add_(1, col_group, u)
            out[q0:q0 + block] = (g + g.transpose(1, 2)) / 2
    return out.numpy()


def top_pass(source: PsiSource, qw: np.ndarray, take: int, *, progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Float32 scores qw · ψ(n) over all rows; per query the `take` best (indices, scores), descending.

    Once `take` rows are held, a block's scores are compared with each query's current `take`-th best
    and only the few above it are merged (ties keep the row seen first, the lower index).
    """
    dev = source.device
    q = torch.from_numpy(np.ascontiguousarray(qw, dtype=np.float32)).to(dev)
    q_np = q.cpu().numpy() if dev.type == "cpu" else None
    n_q = q.shape[0]
    vals = torch.empty((n_q, 0), dtype=torch.float32, device=dev)
    idx = torch.empty((n_q, 0), dtype=torch.int64, device=dev)
    for start, stop, x in source.chunks(progress, "weights: pool pass"):
        block = torch.from_numpy(q_np @ x.T) if q_np is not None else q @ x.T
        if vals.shape[1] == 0 and block.shape[1] >= take:
            vals, pos = torch.topk(block, take, dim=1, sorted=False)
            idx = pos + start
            continue
        if vals.shape[1] < take:
            cols = torch.arange(start, stop, device=dev).expand(n_q, -1)
            vals, idx = torch.cat([vals, block], dim=1), torch.cat([idx, cols], dim=1)
            if vals.shape[1] > take:
                vals, pos = torch.topk(vals, take, dim=1, sorted=False)
                idx = torch.gather(idx, 1, pos)
            continue
        above = block > vals.min(dim=1, keepdim=True).values
        qi, ci = above.nonzero(as_tuple=True)                   # row-major: grouped by query, ascending row
        if len(qi) == 0:
            continue
        counts = torch.bincount(qi, minlength=n_q)
        width = int(counts.max())
        slot = torch.arange(len(qi), device=dev) - (torch.cumsum(counts, 0) - counts)[qi]
        cand_vals = torch.full((n_q, width), -torch.inf, dtype=torch.float32, device=dev)
        cand_idx = torch.full((n_q, width), -1, dtype=torch.int64, device=dev)
        cand_vals[qi, slot], cand_idx[qi, slot] = block[qi, ci], ci + start
        vals, pos = torch.topk(torch.cat([vals, cand_vals], dim=1), take, dim=1, sorted=False)
        idx = torch.gather(torch.cat([idx, cand_idx], dim=1), 1, pos)
    vals, pos = torch.sort(vals, dim=1, descending=True)
    idx = torch.gather(idx, 1, pos)
    return idx.cpu().numpy(), vals.cpu().numpy()
