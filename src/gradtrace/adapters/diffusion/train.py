"""DDPM ε-prediction training, deterministic for a seed.

Every random draw comes from its own explicit torch.Generator derived from `TrainConfig.seed`
(batches, timesteps, noise, token dropout; the initial weights come from build_model(seed)), so the
same seed, data and ids give bit-identical weights (on the same machine and thread count), and the
global RNG is never touched. With a `TrainState` (`resume`), the loop's state (weights, AdamW, schedule,
generators, batch order, losses, EMA) is saved now and then, and a killed run continues from it to the same
bits.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from gradtrace.adapters.diffusion.configs import check_model_config
from gradtrace.adapters.diffusion.unet import DiffusionModel, build_model, make_scheduler
from gradtrace.adapters.loop import batch_stream, optimizer_step, stream_generators, warmup_cosine
from gradtrace.adapters.train_state import TrainState
from gradtrace.errors import UserError


@dataclasses.dataclass
class TrainConfig:
    """Recipe for one training run (JSON-able via `dataclasses.asdict`)."""

    # Defaults tuned on sklearn digits with the default 8x8 model: 3000 steps at lr 3e-3 gives clearly
    # recognisable digits (~3 min on 2 idle cores); steps=600, lr=4e-3 is a <40 s demo (rougher digits).
    steps: int = 3000
    batch_size: int = 64
    lr: float = 3e-3             # peak AdamW learning rate
    weight_decay: float = 0.0
    warmup_steps: int = 100      # linear warm-up, then cosine decay to lr_min_ratio * lr
    lr_min_ratio: float = 0.1
    grad_clip: float | None = 1.0
    seed: int = 0
    p_drop: float = 0.1          # each conditioning token -> null (-1) independently with this probability
    p_drop_all: float = 0.1      # all tokens of an example -> null together (trains ε_null for guidance)
    ema_decay: float | None = None  # e.g. 0.999; None = no EMA (the default)

    @classmethod
    def from_dict(cls, values: dict[str, Any] | "TrainConfig" | None) -> "TrainConfig":
        """Build from a dict (e.g. a checkpoint's), refusing unknown keys."""
        if values is None:
            return cls()
        if isinstance(values, cls):
            return values
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise UserError(f"unknown train config keys {unknown}; valid keys are {sorted(known)}")
        return cls(**values)

    def validate(self) -> None:
        if self.steps < 1 or self.batch_size < 1:
            raise UserError(f"steps and batch_size must be >= 1 (got {self.steps}, {self.batch_size})")
        if not self.lr > 0:
            raise UserError(f"lr must be > 0, got {self.lr}")
        for name in ("p_drop", "p_drop_all"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise UserError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if self.ema_decay is not None and not 0.0 < self.ema_decay < 1.0:
            raise UserError(f"ema_decay must be in (0, 1) or None, got {self.ema_decay}")


def train(model_config: dict, dataset, train_config: TrainConfig | dict | None = None,
          ids=None, progress: bool = True, resume: TrainState | None = None) -> DiffusionModel:
    """Train a fresh model (initialised from `train_config.seed`) on `dataset` (or the rows whose id is
    in `ids`) and return it in eval mode; `resume` saves the loop's state and continues a killed run.

    The returned model carries `train_ids` (sorted ids used, or None = all) and `train_log`
    (per-step losses, wall time, ms/step, the resolved train config).
    """
    cfg = TrainConfig.from_dict(train_config)
    cfg.validate()
    check_model_config(model_config)
    images, codes, used_ids = _select(model_config, dataset, ids)
    model = build_model(model_config, seed=cfg.seed)
    model.train()
    alphas_cumprod = make_scheduler(model_config).alphas_cumprod.to(torch.float32)
    num_t = alphas_cumprod.shape[0]
    n = images.shape[0]
    gens = stream_generators(cfg.seed)
    batches = batch_stream(n, cfg.batch_size, gens["batch"])

    params = list(model.parameters())
    # fused: one kernel for the whole update, the fastest of torch's three AdamW implementations here
    # (bench/bench_train_step.py: 1–10% less time per step than foreach); same algorithm, other rounding.
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(cfg.warmup_steps, cfg.steps, cfg.lr_min_ratio))
    ema = [p.detach().clone() for p in params] if cfg.ema_decay is not None else None

    losses = torch.zeros(cfg.steps)
    resume = resume or TrainState.off()
    first = resume.restore(steps=cfg.steps, model=model, optimizer=opt, scheduler=sched, generators=gens,
                           batches=batches, losses=losses, ema=ema)
    bar = tqdm(range(first, cfg.steps), desc="train", disable=not progress, leave=False, initial=first,
               total=cfg.steps)
    for step in bar:
        idx = next(batches)
        x0 = images[idx]
        b = x0.shape[0]
        t = torch.randint(0, num_t, (b,), generator=gens["t"])
        noise = torch.randn(x0.shape, generator=gens["noise"])
        a = alphas_cumprod[t].view(b, 1, 1, 1)
        xt = a.sqrt() * x0 + (1.0 - a).sqrt() * noise
        cond = None
        if codes is not None:
            cond = codes[idx]
            u = torch.rand((b, cond.shape[1] + 1), generator=gens["drop"])
            drop = (u[:, :-1] < cfg.p_drop) | (u[:, -1:] < cfg.p_drop_all)
            cond = torch.where(drop, torch.full_like(cond, -1), cond)
        loss = torch.nn.functional.mse_loss(model(xt, t, cond), noise)
        optimizer_step(opt, sched, loss, params, cfg.grad_clip)
        if ema is not None:
            with torch.no_grad():
                torch._foreach_lerp_(ema, [p.detach() for p in params], 1.0 - cfg.ema_decay)
        losses[step] = loss.detach()
        if progress and (step % 50 == 0 or step == cfg.steps - 1):
            bar.set_postfix(loss=f"{losses[max(0, step - 49):step + 1].mean():.4f}")
        resume.step_done(step + 1)
    bar.close()
    wall = resume.wall_s()
    if ema is not None:
        with torch.no_grad():
            for p, e in zip(params, ema):
                p.copy_(e)
    model.eval()
    model.train_ids = used_ids
    model.train_log = {"losses": losses.numpy(), "wall_s": wall, "ms_per_step": 1000.0 * wall / cfg.steps,
                       "train_config": dataclasses.asdict(cfg), "n_train": int(n),
                       "optimizer": "torch.optim.AdamW(fused=True)"}
    return model


def _select(model_config: dict, dataset, ids):
    """Images (n,C,H,W) float32, codes (n,A) long or None, and the ids used (None = all) after checks."""
    images = torch.as_tensor(dataset.images).to(torch.float32)
    if images.dim() != 4:
        raise UserError(f"dataset images must be (N, C, H, W), got shape {tuple(images.shape)}")
    c, s = int(model_config["channels"]), int(model_config["size"])
    if tuple(images.shape[1:]) != (c, s, s):
        raise UserError(f"dataset '{getattr(dataset, 'name', '?')}' has images {tuple(images.shape[1:])} "
                        f"but the model expects {(c, s, s)}; build the model config from this dataset")
    all_ids = np.asarray(dataset.ids, dtype=np.int64)
    codes = None
    if model_config["kind"] == "conditional":
        wanted = {k: [str(v) for v in vals] for k, vals in model_config["attributes"].items()}
        have = {k: [str(v) for v in vals] for k, vals in dict(dataset.attributes).items()}
        if list(have.items()) != list(wanted.items()):
            raise UserError(f"dataset attributes {list(have)} differ from the model's {list(wanted)} (names, "
                            "order or vocabularies); build the model config from this dataset")
        codes_np = np.asarray(dataset.attribute_codes(), dtype=np.int64)
        sizes = np.array([len(v) for v in wanted.values()])
        if codes_np.shape != (images.shape[0], len(sizes)) or ((codes_np < -1) | (codes_np >= sizes)).any():
            raise UserError(f"dataset '{getattr(dataset, 'name', '?')}' attribute codes must be (N, "
                            f"{len(sizes)}) with values in -1..len(vocabulary)-1; fix the dataset's codes")
        codes = torch.as_tensor(codes_np)
    used_ids = None
    if ids is not None:
        ids = np.asarray(ids, dtype=np.int64).ravel()
        if len(np.unique(ids)) != len(ids):
            raise UserError("training ids contain duplicates; pass each id once")
        mask = np.isin(all_ids, ids)
        if mask.sum() != len(ids):
            missing = np.setdiff1d(ids, all_ids)[:5].tolist()
            raise UserError(f"training ids not in dataset '{getattr(dataset, 'name', '?')}': {missing}...; "
                            "pass ids from dataset.ids")
        pos = torch.as_tensor(np.nonzero(mask)[0])
        images = images[pos]
        codes = codes[pos] if codes is not None else None
        used_ids = np.sort(all_ids[mask])
    if images.shape[0] == 0:
        raise UserError("no training images (empty dataset or empty ids); pass at least one image")
    return images.contiguous(), codes, used_ids
