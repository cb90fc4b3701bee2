"""Fine-tuning a text-to-image pipeline on captioned images: the diffusers text-to-image (LoRA) recipe.

ε-prediction MSE on VAE latents (the posterior mean, scaled), conditioned on the frozen text encoder's
states of each image's caption; AdamW on the trainable parameters only (the LoRA factors with LoRA, else the
UNet), a constant learning rate after a short warm-up, gradient clipping. Every random draw (batches,
timesteps, noise, caption dropout, the LoRA initialisation) comes from CPU generators derived from the seed, so
the same seed, data and ids give bit-identical weights on one device; with a `TrainState` (`resume`) a killed
fine-tune continues from its last saved state to the same bits. On a GPU (`device`) the model and the
batches move there (the draws stay the same); `precision` bfloat16 runs the forward under autocast (the
LoRA factors and AdamW's state stay float32).
"""
from __future__ import annotations

import dataclasses
from typing import Any

import torch
from tqdm.auto import tqdm

from gradtrace.adapters.loop import batch_stream, optimizer_step, stream_generators
from gradtrace.adapters.train_state import TrainState
from gradtrace.errors import UserError
from gradtrace.precision import autocast, check_precision


@dataclasses.dataclass
class FineTuneConfig:
    """Recipe of one fine-tune (JSON-able via `dataclasses.asdict`)."""

    steps: int = 400
    batch_size: int = 16
    lr: float = 1e-3               # LoRA factors of a small model; the diffusers script uses 1e-4 on SD
    weight_decay: float = 0.0
    warmup_steps: int = 20
    grad_clip: float | None = 1.0
    caption_dropout: float = 0.0   # fraction of captions replaced by "" (classifier-free guidance)
    precision: str = "float32"     # compute precision of the forward: float32 | bfloat16 (autocast)
    seed: int = 0

    @classmethod
    def from_dict(cls, values: dict[str, Any] | None) -> "FineTuneConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values or {}) - known)
        if unknown:
            raise UserError(f"unknown fine-tune settings {unknown}; valid keys are {sorted(known)}")
        cfg = cls(**(values or {}))
        if cfg.steps < 1 or cfg.batch_size < 1 or not cfg.lr > 0:
            raise UserError(f"steps and batch_size must be >= 1 and lr > 0 (got {cfg.steps}, {cfg.batch_size}, "
                            f"{cfg.lr})")
        if not 0.0 <= cfg.caption_dropout <= 1.0:
            raise UserError(f"caption_dropout must be in [0, 1], got {cfg.caption_dropout}")
        check_precision(cfg.precision)
        return cfg


def fine_tune(model, latents: torch.Tensor, states: torch.Tensor, empty_state: torch.Tensor, alphas_cumprod,
              cfg: FineTuneConfig, *, progress: bool = True, device: torch.device | None = None,
              resume: TrainState | None = None):
    """Train `model` (a `TextToImage`) in place on latents (N, c, h, w) with text states (N, L, D), on `device`
    (default: where the model is); the model is left on the CPU."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise UserError("the model has no trainable parameters; pass --lora-rank or a pipeline to fine-tune")
    device = torch.device("cpu") if device is None else torch.device(device)
    model.to(device)
    latents, states, empty_state = latents.to(device), states.to(device), empty_state.to(device)
    abar = torch.as_tensor(alphas_cumprod, dtype=torch.float32).to(device)
    gens = stream_generators(cfg.seed)
    batches = batch_stream(len(latents), cfg.batch_size, gens["batch"])
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    warm = max(1, min(cfg.warmup_steps, cfg.steps))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: min(1.0, (step + 1) / warm))
    losses = torch.zeros(cfg.steps)
    resume = resume or TrainState.off()
    first = resume.restore(steps=cfg.steps, model=model, optimizer=opt, scheduler=sched, generators=gens,
                           batches=batches, losses=losses)
    model.train()
    for step in tqdm(range(first, cfg.steps), desc="fine-tune", disable=not progress, leave=False, initial=first,
                     total=cfg.steps):
        idx = torch.as_tensor(next(batches)).to(device)
        x0, ctx = latents[idx], states[idx]
        b = x0.shape[0]
        t = torch.randint(0, abar.shape[0], (b,), generator=gens["t"]).to(device)
        noise = torch.randn(x0.shape, generator=gens["noise"]).to(device)
        if cfg.caption_dropout > 0:
            drop = (torch.rand(b, generator=gens["drop"]) < cfg.caption_dropout).to(device)
            ctx = torch.where(drop.view(b, 1, 1), empty_state.expand_as(ctx), ctx)
        a = abar[t].view(b, 1, 1, 1)
        xt = a.sqrt() * x0 + (1.0 - a).sqrt() * noise
        with autocast(device, cfg.precision):
            pred = model(xt, t, ctx)
        loss = torch.nn.functional.mse_loss(pred.float(), noise)
        optimizer_step(opt, sched, loss, params, cfg.grad_clip, foreach=None)
        losses[step] = loss.detach().cpu()
        resume.step_done(step + 1)
    model.eval()
    model.to("cpu")
    wall = resume.wall_s()
    model.train_log = {"losses": losses.numpy(), "wall_s": wall, "ms_per_step": 1000.0 * wall / cfg.steps,
                       "train_config": dataclasses.asdict(cfg), "n_train": int(len(latents)),
                       "optimizer": "torch.optim.AdamW"}
    return model
