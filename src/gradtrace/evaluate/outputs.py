"""Ground-truth model outputs for the LDS: each query's diffusion loss under each retrained model.

    f(θ; q) = (1/(T·D)) Σ_t Σ_d mean((ε_θ(x_{t,d}, t, c_q) − ε_{q,t,d})²)
    x_{t,d} = √ᾱ_t q + √(1−ᾱ_t) ε_{q,t,d}

over T timesteps (the `timestep_grid`, default 10) × D noise draws (default 4). Draw d of query id i at
timestep t comes from seed derive_seed(derive_seed(GT_STREAM, seed, d), i, t) (as `example_noise`), so
every model sees the same noise, and the noise is independent of the featurization noise.

Cache: ``<cache>/<key>/manifest.json`` (the query set and grid; key = hash of both) and one
``<model name>-<fingerprint[:16]>.npy`` (Q,) float64 per model, written atomically; a model whose
weights change gets a new file, so only missing models are ever computed.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from gradtrace.errors import UserError
from gradtrace.manifest import read_json, sha256_arrays, versions, write_json_atomic
from gradtrace.measure import derive_seed, example_noise, timestep_grid

GT_STREAM = 0x4C4453  # "LDS": keeps ground-truth noise apart from featurization noise (same seed, same ids)


@dataclass(frozen=True)
class OutputGrid:
    num_timesteps: int = 10
    num_draws: int = 4
    seed: int = 0

    def __post_init__(self):
        if self.num_timesteps < 1 or self.num_draws < 1:
            raise UserError(f"the output grid needs >= 1 timestep and >= 1 noise draw, got "
                            f"{self.num_timesteps} x {self.num_draws}")

    def info(self) -> dict:
        return {**asdict(self), "stream": GT_STREAM}

    def noise(self, ids, shape: tuple[int, ...], timesteps) -> torch.Tensor:
        """(Q, D, T, *shape) standard normal noise, one draw per (query id, draw, timestep)."""
        draws = [example_noise(derive_seed(GT_STREAM, self.seed, d), ids, timesteps, shape)
                 for d in range(self.num_draws)]
        return torch.stack(draws, dim=1)


@torch.no_grad()
def query_losses(model, alphas_cumprod: torch.Tensor, images: torch.Tensor, ids, cond, grid: OutputGrid, *,
                 noise: torch.Tensor | None = None, batch_rows: int = 2048) -> np.ndarray:
    """(Q,) float64: each query's loss averaged over the grid (see the module docstring)."""
    images = torch.as_tensor(images, dtype=torch.float32)
    n_train_t = int(alphas_cumprod.shape[0])
    timesteps = timestep_grid(grid.num_timesteps, n_train_t)
    if noise is None:
        noise = grid.noise(ids, tuple(images.shape[1:]), timesteps)
    t = torch.tensor(timesteps, dtype=torch.long)
    abar = alphas_cumprod.to(torch.float32)[t].view(1, 1, -1, *([1] * (images.dim() - 1)))
    xt = abar.sqrt() * images[:, None, None] + (1.0 - abar).sqrt() * noise  # (Q, D, T, C, H, W)
    q, d, n_t = xt.shape[:3]
    flat_x = xt.reshape(q * d * n_t, *images.shape[1:])
    flat_eps = noise.reshape_as(flat_x)
    flat_t = t.repeat(q * d)
    flat_c = None
    if cond is not None:
        flat_c = torch.as_tensor(np.asarray(cond), dtype=torch.long).repeat_interleave(d * n_t, dim=0)
    per_row = torch.empty(q * d * n_t, dtype=torch.float64)
    model.eval()
    for start in range(0, q * d * n_t, batch_rows):
        stop = min(start + batch_rows, q * d * n_t)
        c = None if flat_c is None else flat_c[start:stop]
        eps = model(flat_x[start:stop], flat_t[start:stop], c)
        per_row[start:stop] = ((eps - flat_eps[start:stop]) ** 2).flatten(1).mean(1).double()
    return per_row.view(q, d * n_t).mean(1).numpy()


def cache_key(images: torch.Tensor, ids, cond, source: dict, grid: OutputGrid) -> str:
    doc = {"source": source, "ids": sha256_arrays([np.asarray(ids, dtype=np.int64)]),
           "images": sha256_arrays([images]), "cond": None if cond is None else sha256_arrays([np.asarray(cond)]),
           "grid": grid.info()}
    return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()[:16]


def model_outputs(models: list[tuple[str, Path]], images: torch.Tensor, ids, cond, source: dict, cache_dir,
                  grid: OutputGrid = OutputGrid(), *, progress: bool = True) -> tuple[np.ndarray, dict]:
    """(n_models, Q) float64 losses of every query under every model (cached); and the cache manifest."""
    from gradtrace.models import load_checkpoint, make_scheduler

    ids = np.asarray(ids, dtype=np.int64)
    images = torch.as_tensor(images, dtype=torch.float32)
    key = cache_key(images, ids, cond, source, grid)
    cache = Path(cache_dir) / key
    manifest_path = cache / "manifest.json"
    if manifest_path.exists():
        manifest = read_json(manifest_path, "model-output cache manifest")
    else:
        manifest = {"format": "gradtrace-model-outputs", "format_version": 1, "grid": grid.info(),
                    "query_source": source, "query_ids": ids.tolist(), "output": "diffusion loss, mean over grid",
                    "versions": versions()}
        write_json_atomic(manifest_path, manifest)
    out = np.empty((len(models), len(ids)), dtype=np.float64)
    noise = None
    computed = 0
    for m, (name, path) in enumerate(tqdm(models, desc="model outputs", unit="model", disable=not progress)):
        fp = read_json(Path(path) / "config.json", "checkpoint config").get("fingerprint", "")
        file = cache / f"{name}-{fp[:16]}.npy"
        if file.exists():
            out[m] = np.load(file)
            continue
        ckpt = load_checkpoint(path)
        if noise is None:
            n_train_t = int(make_scheduler(ckpt.model.config).alphas_cumprod.shape[0])
            timesteps = timestep_grid(grid.num_timesteps, n_train_t)
            noise = grid.noise(ids, tuple(images.shape[1:]), timesteps)
        out[m] = query_losses(ckpt.model, ckpt.scheduler.alphas_cumprod, images, ids, cond, grid, noise=noise)
        tmp = cache / f".{file.name}.{os.getpid()}.tmp.npy"
        np.save(tmp, out[m])
        tmp.replace(file)
        computed += 1
    return out, {**manifest, "path": str(cache), "computed_now": computed}


def store_examples(store, attribute_values: dict | None = None):
    """(images, ids, cond, source) of the examples a feature store was made from, in the store's row order."""
    from gradtrace.sources import load_source

    ex = load_source(store.settings["source"], attribute_values=attribute_values)
    pos = {int(i): r for r, i in enumerate(ex.ids)}
    missing = [int(i) for i in store.ids if int(i) not in pos]
    if missing:
        raise UserError(f"feature store {store.path} has ids not in its source (e.g. {missing[0]}); featurize again")
    rows = torch.as_tensor([pos[int(i)] for i in store.ids], dtype=torch.long)
    cond = store.cond if store.cond is not None else (None if ex.cond is None else ex.cond[rows.numpy()])
    return ex.images[rows], np.asarray(store.ids, dtype=np.int64), cond, store.settings["source"]
