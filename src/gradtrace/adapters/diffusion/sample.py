"""Sampling (DDIM or DDPM) with optional attribute tokens and classifier-free guidance."""
from __future__ import annotations

import numpy as np
import torch
from diffusers import DDPMScheduler
from tqdm.auto import tqdm

from gradtrace.adapters.diffusion.ddim import StableDDIMScheduler
from gradtrace.errors import UserError

SAMPLERS = ("ddim", "ddpm")


def request_codes(model, attributes, n: int) -> np.ndarray | None:
    """Attribute request -> codes (n, A) int64 with -1 = null; None for an unconditional model.

    `attributes` is None (all null), a dict name -> value string (names not given are null), or an
    array of codes, shape (A,) (repeated n times) or (n, A).
    """
    if not model.conditional:
        if attributes is not None:
            raise UserError("this model is unconditional; sample without attributes")
        return None
    names, vocab = model.attribute_names, model.attribute_values
    if attributes is None:
        return np.full((n, len(names)), -1, dtype=np.int64)
    if isinstance(attributes, dict):
        row = np.full(len(names), -1, dtype=np.int64)
        for name, value in attributes.items():
            if name not in vocab:
                raise UserError(f"unknown attribute {name!r}; this model has {names}")
            if value is None:
                continue
            if str(value) not in vocab[name]:
                raise UserError(f"unknown value {value!r} for attribute {name!r}; valid values are "
                                f"{vocab[name]}")
            row[names.index(name)] = vocab[name].index(str(value))
        return np.tile(row, (n, 1))
    codes = np.asarray(attributes)
    if codes.dtype.kind not in "iu":
        raise UserError(f"attribute codes must be integers, got dtype {codes.dtype}; or pass a dict "
                        "name -> value")
    codes = codes.astype(np.int64)
    if codes.ndim == 1:
        codes = np.tile(codes, (n, 1))
    if codes.shape != (n, len(names)):
        raise UserError(f"attribute codes must have shape ({len(names)},) or ({n}, {len(names)}) for "
                        f"attributes {names}, got {codes.shape}")
    sizes = np.array([len(vocab[a]) for a in names])
    bad = (codes < -1) | (codes >= sizes)
    if bad.any():
        r, a = np.argwhere(bad)[0]
        raise UserError(f"attribute code {codes[r, a]} out of range for {names[a]!r} (valid -1..{sizes[a] - 1})")
    return codes


def make_sampler(scheduler, sampler: str):
    """A fresh DDIM (its update finite for every schedule: `gradtrace.adapters.diffusion.ddim`) or DDPM scheduler
    built from the training scheduler's config."""
    if sampler not in SAMPLERS:
        raise UserError(f"unknown sampler {sampler!r}; use one of {', '.join(SAMPLERS)}")
    cls = StableDDIMScheduler if sampler == "ddim" else DDPMScheduler
    return cls.from_config(scheduler.config)


@torch.no_grad()
def sample(model, scheduler, n: int, *, attributes=None, guidance_scale: float = 1.0, steps: int = 50,
           sampler: str = "ddim", seed: int = 0, batch_size: int = 256, progress: bool = True,
           eta: float = 1.0) -> tuple[torch.Tensor, np.ndarray | None]:
    """Generate `n` images; returns (images (n,C,H,W) in [-1,1], codes (n,A) or None).

    Classifier-free guidance: ε = ε_null + g (ε_cond − ε_null), ε_null from all-null tokens; g = 1
    needs no extra pass.

    DDIM details: `eta` is its noise level and ε is re-derived from the clipped x0 prediction
    (`use_clipped_model_output`), so that x0 and ε stay consistent (with eta=1 this is DDPM's
    posterior on a 50-step grid). Why: under the cosine schedule the first step (t=999, ᾱ≈2e-9)
    amplifies ε errors ~2e4x into x0, so the unclipped ε and the clipped x0 disagree; on the 16x16
    conditional model that gave colour-shifted backgrounds and broke guidance. The default eta=1.0
    also beat eta=0 on digits (digit-classifier confidence 0.977 vs 0.962 at 50 steps, = DDPM-100).
    Deterministic for a seed; with eta=0 also independent of batch_size (all initial noise is drawn
    up front, per-step noise is drawn batch by batch).
    """
    n, steps, batch_size = int(n), int(steps), int(batch_size)
    if n < 1 or steps < 1 or batch_size < 1:
        raise UserError(f"n, steps and batch_size must be >= 1 (got {n}, {steps}, {batch_size})")
    codes = request_codes(model, attributes, n)
    sched = make_sampler(scheduler, sampler)
    if steps > sched.config.num_train_timesteps:
        raise UserError(f"steps={steps} exceeds the {sched.config.num_train_timesteps} training timesteps")
    if not 0.0 <= float(eta) <= 1.0:
        raise UserError(f"eta must be in [0, 1], got {eta}")
    g = float(guidance_scale)
    guided = model.conditional and g != 1.0
    gen = torch.Generator().manual_seed(int(seed))
    shape = (model.channels, model.size, model.size)
    noise = torch.randn((n, *shape), generator=gen)
    was_training = model.training
    model.eval()
    out = []
    try:
        batches = range(0, n, batch_size)
        bar = tqdm(total=len(batches) * steps, desc=f"sample ({sampler})", disable=not progress, leave=False)
        for lo in batches:
            x = noise[lo:lo + batch_size]
            b = x.shape[0]
            cond = torch.as_tensor(codes[lo:lo + b]) if codes is not None else None
            if guided:
                cond = torch.cat([cond, model.null_cond(b)])
            sched.set_timesteps(steps)
            for t in sched.timesteps:
                tt = torch.full((b,), int(t), dtype=torch.long)
                if guided:
                    e = model(torch.cat([x, x]), torch.cat([tt, tt]), cond)
                    e_cond, e_null = e[:b], e[b:]
                    eps = e_null + g * (e_cond - e_null)
                else:
                    eps = model(x, tt, cond)
                if sampler == "ddim":
                    x = sched.step(eps, t, x, eta=eta, use_clipped_model_output=True, generator=gen,
                                   return_dict=False)[0]
                else:
                    x = sched.step(eps, t, x, generator=gen, return_dict=False)[0]
                bar.update(1)
            out.append(x.clamp(-1.0, 1.0))
        bar.close()
    finally:
        model.train(was_training)
    return torch.cat(out), codes
