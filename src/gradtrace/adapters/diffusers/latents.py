"""VAE latents of a set of images, computed once and cached by the VAE's fingerprint.

Images (N, C, H, W) in [-1, 1] are first brought to the model's resolution (shorter side resized, then
centre-cropped), then encoded deterministically: the mean of the VAE posterior times its scaling factor.
The cache file is ``CACHE/latents/<vae fingerprint>/<hash of the images>.npy``, so a changed VAE (or changed
images) never reads stale latents: it computes and writes a new file.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F

from gradtrace.io import sha256_arrays, write_npy_atomic

BATCH = 64


def fit_resolution(images: torch.Tensor, resolution: int) -> torch.Tensor:
    """Resize the shorter side to `resolution` (bilinear, antialiased) and centre-crop to a square."""
    images = torch.as_tensor(images, dtype=torch.float32)
    h, w = images.shape[-2:]
    if (h, w) == (resolution, resolution):
        return images
    scale = resolution / min(h, w)
    size = (max(resolution, round(h * scale)), max(resolution, round(w * scale)))
    out = F.interpolate(images, size=size, mode="bilinear", antialias=True, align_corners=False)
    top, left = (size[0] - resolution) // 2, (size[1] - resolution) // 2
    return out[..., top:top + resolution, left:left + resolution].clamp(-1.0, 1.0).contiguous()


def cache_file(cache_dir: Path, vae_fingerprint: str, images: torch.Tensor) -> Path:
    return Path(cache_dir) / "latents" / vae_fingerprint[:16] / f"{sha256_arrays([images])[:16]}.npy"


@torch.no_grad()
def encode_latents(vae, vae_fingerprint: str, images: torch.Tensor, resolution: int,
                   cache_dir: Path | None = None) -> torch.Tensor:
    """(N, c, h, w) float32 latents of `images` (see the module docstring); read from / written to the cache."""
    images = fit_resolution(images, resolution)
    if images.shape[1] != vae.config.in_channels:
        images = images.expand(-1, vae.config.in_channels, -1, -1) if images.shape[1] == 1 else images
    path = None if cache_dir is None else cache_file(cache_dir, vae_fingerprint, images)
    if path is not None and path.exists():
        return torch.from_numpy(np.load(path))
    vae.eval()
    parts = [vae.encode(images[s:s + BATCH]).latent_dist.mean * vae.config.scaling_factor
             for s in range(0, len(images), BATCH)]
    latents = torch.cat(parts).to(torch.float32).contiguous()
    if path is not None:
        write_npy_atomic(path, latents.numpy(), stage="VAE latents",
                         cause="the VAE overflowed (its dtype, or images outside [-1, 1])")
    return latents
