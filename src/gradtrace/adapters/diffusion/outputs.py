"""The LDS model output of a diffusion model: each query's loss averaged over a fixed grid.

    f(θ; q) = (1/(T·D)) Σ_t Σ_d mean((ε_θ(x_{t,d}, t, c_q) − ε_{q,t,d})²)
    x_{t,d} = √ᾱ_t q + √(1−ᾱ_t) ε_{q,t,d}

over T timesteps (the `timestep_grid`, default 10) × D noise draws (default 4). Draw d of query id i at
timestep t comes from seed derive_seed(derive_seed(GT_STREAM, seed, d), i, t) (as `example_noise`), so
every model sees the same noise, and the noise is independent of the featurization noise.
"""
from __future__ import annotations

import numpy as np
import torch

from gradtrace.adapters.base import GT_STREAM, OutputGrid
from gradtrace.adapters.diffusion.measure import example_noise, timestep_grid
from gradtrace.io import derive_seed


def grid_noise(grid: OutputGrid, ids, shape: tuple[int, ...], timesteps) -> torch.Tensor:
    """(Q, D, T, *shape) standard normal noise, one draw per (query id, draw, timestep)."""
    draws = [example_noise(derive_seed(GT_STREAM, grid.seed, d), ids, timesteps, shape)
             for d in range(grid.num_draws)]
    return torch.stack(draws, dim=1)


@torch.no_grad()
def query_losses(model, alphas_cumprod: torch.Tensor, images: torch.Tensor, ids, cond, grid: OutputGrid, *,
                 noise: torch.Tensor | None = None, batch_rows: int = 2048) -> np.ndarray:
    """(Q,) float64: each query's loss averaged over the grid (see the module docstring)."""
    images = torch.as_tensor(images, dtype=torch.float32)
    n_train_t = int(alphas_cumprod.shape[0])
    timesteps = timestep_grid(grid.num_timesteps, n_train_t)
    if noise is None:
        noise = grid_noise(grid, ids, tuple(images.shape[1:]), timesteps)
    t = torch.tensor(timesteps, dtype=torch.long)
    abar = alphas_cumprod.to(torch.float32)[t].view(1, 1, -1, *([1] * (images.dim() - 1)))
    xt = abar.sqrt() * images[:, None, None] + (1.0 - abar).sqrt() * noise  # (Q, D, T, C, H, W)
    q, d, n_t = xt.shape[:3]
    flat_x = xt.reshape(q * d * n_t, *images.shape[1:])
    flat_eps = noise.reshape_as(flat_x)
    flat_t = t.repeat(q * d)
    flat_c = None
    if cond is not None:  # attribute codes (numpy or long tensor), or any conditioning tensor of the model
        cond = torch.as_tensor(np.asarray(cond), dtype=torch.long) if isinstance(cond, np.ndarray) else cond
        flat_c = cond.repeat_interleave(d * n_t, dim=0)
    per_row = torch.empty(q * d * n_t, dtype=torch.float64)
    model.eval()
    for start in range(0, q * d * n_t, batch_rows):
        stop = min(start + batch_rows, q * d * n_t)
        c = None if flat_c is None else flat_c[start:stop]
        eps = model(flat_x[start:stop], flat_t[start:stop], c)
        per_row[start:stop] = ((eps - flat_eps[start:stop]) ** 2).flatten(1).mean(1).double()
    return per_row.view(q, d * n_t).mean(1).numpy()


class GridLosses:
    """`query_losses` of many models on one query set: the grid's noise is drawn once per query set."""

    def __init__(self):
        self._key = None
        self._noise = None

    def __call__(self, model, scheduler, inputs: torch.Tensor, ids, cond, grid: OutputGrid) -> np.ndarray:
        inputs = torch.as_tensor(inputs, dtype=torch.float32)
        timesteps = timestep_grid(grid.num_timesteps, int(scheduler.alphas_cumprod.shape[0]))
        key = (tuple(np.asarray(ids).tolist()), tuple(inputs.shape[1:]), grid, timesteps)
        if key != self._key:
            self._key, self._noise = key, grid_noise(grid, ids, tuple(inputs.shape[1:]), timesteps)
        return query_losses(model, scheduler.alphas_cumprod, inputs, ids, cond, grid, noise=self._noise)
