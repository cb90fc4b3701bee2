"""Pretraining of a built SD-layout pipeline on captioned images, in two phases, on CPU.

    log = pretrain(components, images, captions, vae_steps=400, unet_steps=800, batch_size=32, lr=1e-3, seed=0)

1. The VAE learns to reconstruct the images (MSE, plus a KL term of weight 1e-6 as in Stable Diffusion); its
   `scaling_factor` is then set to 1 / std of the training latents, so scaled latents have unit variance.
2. With the VAE frozen, the UNet and the text encoder learn together to predict the noise (epsilon MSE) added to
   the scaled latent means, conditioned on the caption's hidden states; 10% of captions are replaced by ""
   so the pipeline can use classifier-free guidance.

Both phases use AdamW at `lr` after a linear warm-up over their first 5% of steps.

Every random draw (batches, posterior samples, timesteps, noise, caption dropout) comes from `torch.Generator`s
derived from `seed`: the same inputs and seed give bit-identical weights.
"""
from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from gradtrace.adapters.diffusers.build import MAX_LENGTH
from gradtrace.adapters.loop import optimizer_step
from gradtrace.errors import UserError
from gradtrace.io import derive_seed

KL_WEIGHT = 1e-6
CAPTION_DROPOUT = 0.1
LATENT_BATCH = 256  # images per VAE forward when encoding the training set


def caption_ids(tokenizer, captions: list[str]) -> torch.Tensor:
    """(N, 77) token ids, padded with the tokenizer's padding token as the Stable Diffusion pipeline does."""
    return tokenizer(list(captions), padding="max_length", max_length=MAX_LENGTH, truncation=True,
                     return_tensors="pt").input_ids


def _generator(seed: int, part: int) -> torch.Generator:
    return torch.Generator().manual_seed(derive_seed(seed, part))


def _schedule(opt, steps: int):
    """Linear warm-up over the first 5% of the steps, then the constant learning rate (these short runs
    underfit: a decaying rate ends with blurrier reconstructions and samples)."""
    warmup = max(1, steps // 20)
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup))


def _summary(losses: list[float], steps: int) -> dict:
    """The first step's loss and the mean loss of the last 10% of steps."""
    tail = losses[-max(1, len(losses) // 10):]
    return {"steps": steps, "loss_first": losses[0] if losses else None,
            "loss_last": sum(tail) / len(tail) if tail else None}


def vae_loss(vae, x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Reconstruction MSE of a posterior sample (its mean when `generator` is None) plus the weighted KL."""
    posterior = vae.encode(x).latent_dist
    z = posterior.mean if generator is None else posterior.sample(generator=generator)
    return F.mse_loss(vae.decode(z).sample, x) + KL_WEIGHT * posterior.kl().mean()


@torch.no_grad()
def encode_latents(vae, images: torch.Tensor) -> torch.Tensor:
    """Unscaled latent means of `images`, in chunks."""
    return torch.cat([vae.encode(images[i:i + LATENT_BATCH]).latent_dist.mean
                      for i in range(0, len(images), LATENT_BATCH)])


def denoise_loss(unet, text_encoder, scheduler, latents: torch.Tensor, ids: torch.Tensor, timesteps: torch.Tensor,
                 noise: torch.Tensor) -> torch.Tensor:
    """Epsilon-prediction MSE on scaled latents noised to `timesteps`, conditioned on the token ids."""
    noisy = scheduler.add_noise(latents, noise, timesteps)
    hidden = text_encoder(ids)[0]
    return F.mse_loss(unet(noisy, timesteps, encoder_hidden_states=hidden).sample, noise)


def _train_vae(vae, images, *, steps, batch_size, lr, seed, progress) -> list[float]:
    vae.train()
    opt = torch.optim.AdamW(vae.parameters(), lr=lr)
    schedule = _schedule(opt, steps)
    pick, draw = _generator(seed, 11), _generator(seed, 12)
    losses = []
    for _ in tqdm(range(steps), desc="vae", disable=not progress, leave=False):
        idx = torch.randint(len(images), (batch_size,), generator=pick)
        losses.append(_step(opt, schedule, vae_loss(vae, images[idx], draw)))
    vae.eval()
    return losses


def _step(opt, schedule, loss: torch.Tensor) -> float:
    """One optimizer and schedule step on `loss`; returns its value."""
    optimizer_step(opt, schedule, loss)
    return float(loss.detach())


def _train_denoiser(unet, text_encoder, scheduler, latents, ids, empty, *, steps, batch_size, lr, seed,
                    progress, after_step=None) -> list[float]:
    unet.train()
    text_encoder.train()
    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=lr)
    schedule = _schedule(opt, steps)
    pick, noise_g, drop = _generator(seed, 21), _generator(seed, 22), _generator(seed, 23)
    n_t = scheduler.config.num_train_timesteps
    losses = []
    for _ in tqdm(range(steps), desc="unet", disable=not progress, leave=False):
        idx = torch.randint(len(latents), (batch_size,), generator=pick)
        t = torch.randint(n_t, (batch_size,), generator=noise_g)
        noise = torch.randn(latents[idx].shape, generator=noise_g)
        batch_ids = torch.where((torch.rand(batch_size, generator=drop) < CAPTION_DROPOUT)[:, None], empty, ids[idx])
        losses.append(_step(opt, schedule, denoise_loss(unet, text_encoder, scheduler, latents[idx], batch_ids, t,
                                                        noise)))
        if after_step is not None:
            after_step(len(losses))
    unet.eval()
    text_encoder.eval()
    return losses


def pretrain(components: dict, images: torch.Tensor, captions: list[str], *, vae_steps: int, unet_steps: int,
             batch_size: int, lr: float, seed: int = 0, progress: bool = True, after_unet_step=None) -> dict:
    """Train the components in place (VAE, then UNet + text encoder); returns the log of losses and times.

    images: float (N, C, H, W) in [-1, 1]; captions: one string per image. `after_unet_step(step)`, if given, is
    called after each UNet step (1-based), e.g. to save snapshots; it must not change the models' weights.
    """
    if images.ndim != 4 or len(images) != len(captions) or len(images) == 0:
        raise UserError(f"pretraining needs one caption per image, got {len(captions)} captions for images of "
                        f"shape {tuple(images.shape)}; pass (N, C, H, W) images with N captions")
    images = images.detach().to(torch.float32)
    vae, unet, text_encoder = components["vae"], components["unet"], components["text_encoder"]
    tokenizer, scheduler = components["tokenizer"], components["scheduler"]
    start = time.perf_counter()
    vae_losses = _train_vae(vae, images, steps=vae_steps, batch_size=batch_size, lr=lr, seed=seed,
                            progress=progress)
    vae_seconds = time.perf_counter() - start
    vae.requires_grad_(False)
    raw = encode_latents(vae, images)
    vae.register_to_config(scaling_factor=float(1.0 / raw.std().clamp_min(1e-6)))
    latents = raw * vae.config.scaling_factor
    ids = caption_ids(tokenizer, captions)
    empty = caption_ids(tokenizer, [""])
    unet_losses = _train_denoiser(unet, text_encoder, scheduler, latents, ids, empty, steps=unet_steps,
                                  batch_size=batch_size, lr=lr, seed=seed, progress=progress,
                                  after_step=after_unet_step)
    return {"vae": {**_summary(vae_losses, vae_steps), "seconds": round(vae_seconds, 2)},
            "unet": {**_summary(unet_losses, unet_steps),
                     "seconds": round(time.perf_counter() - start - vae_seconds, 2)},
            "scaling_factor": vae.config.scaling_factor, "seconds": round(time.perf_counter() - start, 2)}
