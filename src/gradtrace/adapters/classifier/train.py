"""Training a classifier: cross-entropy on labelled images, deterministic for a seed and resumable.

AdamW (default) or SGD with momentum, a linear warm-up then cosine decay of the learning rate, optional gradient
clipping. The initial weights come from `build_model(seed)` and the batch order from a generator derived from the
seed (`gradtrace.adapters.loop`, shared with the diffusion trainers), so the same seed, data and ids give
bit-identical weights (same machine and thread count) and the global RNG is never touched. With a `TrainState`
(`resume`) the loop's state (weights and buffers, optimizer, schedule, generator, batch order, losses) is saved
now and then, and a killed run continues from it to the same bits.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import torch
from torch.nn import functional as F
from tqdm.auto import tqdm

from gradtrace.adapters.classifier.configs import check_model_config
from gradtrace.adapters.classifier.models import build_model
from gradtrace.adapters.loop import (
    batch_stream,
    config_from_dict,
    optimizer_step,
    select_rows,
    stream_generators,
    warmup_cosine,
)
from gradtrace.adapters.train_state import TrainState
from gradtrace.errors import UserError

OPTIMIZERS = ("adamw", "sgd")


@dataclasses.dataclass
class TrainConfig:
    """Recipe for one classifier training run (JSON-able via `dataclasses.asdict`)."""

    steps: int = 500
    batch_size: int = 64
    optimizer: str = "adamw"     # adamw | sgd (with momentum)
    lr: float = 2e-3             # peak learning rate
    momentum: float = 0.9        # sgd only
    weight_decay: float = 1e-4
    warmup_steps: int = 25       # linear warm-up, then cosine decay to lr_min_ratio * lr
    lr_min_ratio: float = 0.0
    grad_clip: float | None = None
    seed: int = 0

    @classmethod
    def from_dict(cls, values: dict[str, Any] | "TrainConfig" | None) -> "TrainConfig":
        """Build from a dict (e.g. a checkpoint's), refusing unknown keys and bad values."""
        return config_from_dict(cls, values, "classifier")

    def validate(self) -> None:
        if self.steps < 1 or self.batch_size < 1:
            raise UserError(f"steps and batch_size must be >= 1 (got {self.steps}, {self.batch_size})")
        if not self.lr > 0 or self.weight_decay < 0 or not 0 <= self.momentum < 1:
            raise UserError(f"lr must be > 0, weight_decay >= 0 and momentum in [0, 1) (got {self.lr}, "
                            f"{self.weight_decay}, {self.momentum})")
        if self.optimizer not in OPTIMIZERS:
            raise UserError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {self.optimizer!r}")
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise UserError(f"grad_clip must be > 0 or None, got {self.grad_clip}")


def make_optimizer(cfg: TrainConfig, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)


def training_data(model_config: dict, dataset, ids) -> tuple[torch.Tensor, torch.Tensor]:
    """Images (n, C, H, W) float32 and labels (n,) long of the rows `ids` (None = all), checked against the model."""
    rows = select_rows(dataset, ids)
    if len(rows) == 0:
        raise UserError("no training images (empty dataset or empty ids); pass at least one image")
    images = torch.as_tensor(dataset.images[torch.as_tensor(rows)], dtype=torch.float32)
    want = (model_config["channels"], model_config["size"], model_config["size"])
    if tuple(images.shape[1:]) != want:
        raise UserError(f"dataset '{getattr(dataset, 'name', '?')}' has images {tuple(images.shape[1:])} but the "
                        f"model takes {want}; build the model config from this dataset")
    labels = dataset.class_indices(model_config["label"], model_config["classes"], rows)
    return images.contiguous(), torch.as_tensor(labels)


def train(model_config: dict, dataset, train_config: TrainConfig | dict | None = None, ids=None,
          progress: bool = True, resume: TrainState | None = None) -> torch.nn.Module:
    """Train a fresh classifier (initialised from `train_config.seed`) on `dataset` rows `ids` (None = all) and
    return it in eval mode, with `train_ids` (sorted ids, None = all) and `train_log`."""
    cfg = TrainConfig.from_dict(train_config)
    check_model_config(model_config)
    images, labels = training_data(model_config, dataset, ids)
    model = build_model(model_config, seed=cfg.seed)
    model.train()
    gens = stream_generators(cfg.seed, ("batch",))
    batches = batch_stream(images.shape[0], cfg.batch_size, gens["batch"])
    params = [p for p in model.parameters() if p.requires_grad]
    opt = make_optimizer(cfg, params)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(cfg.warmup_steps, cfg.steps, cfg.lr_min_ratio))
    losses = torch.zeros(cfg.steps)
    resume = resume or TrainState.off()
    first = resume.restore(steps=cfg.steps, model=model, optimizer=opt, scheduler=sched, generators=gens,
                           batches=batches, losses=losses)
    bar = tqdm(range(first, cfg.steps), desc="train", disable=not progress, leave=False, initial=first,
               total=cfg.steps)
    for step in bar:
        idx = next(batches)
        loss = F.cross_entropy(model(images[idx]), labels[idx])
        optimizer_step(opt, sched, loss, params, cfg.grad_clip)
        losses[step] = loss.detach()
        if progress and (step % 50 == 0 or step == cfg.steps - 1):
            bar.set_postfix(loss=f"{losses[max(0, step - 49):step + 1].mean():.4f}")
        resume.step_done(step + 1)
    bar.close()
    wall = resume.wall_s()
    model.eval()
    model.train_ids = None if ids is None else np.sort(np.asarray(ids, dtype=np.int64))
    model.train_log = {"losses": losses.numpy(), "wall_s": wall, "ms_per_step": 1000.0 * wall / cfg.steps,
                       "train_config": dataclasses.asdict(cfg), "n_train": int(images.shape[0]),
                       "optimizer": type(opt).__name__ + ("(fused=True)" if cfg.optimizer == "adamw" else "")}
    return model
