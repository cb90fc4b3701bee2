"""Training a causal LM: next-token loss on fixed-length sequences, deterministic for a seed and resumable.

The model starts from its base folder's weights (a fresh LoRA adapter drawn from the seed when the config has
one; only the adapter then trains) and is trained with AdamW, a linear warm-up then cosine decay and gradient
clipping, on the token-weighted mean loss of each batch (the Hugging Face loss: labels = input ids, −100 at
padding). The batch order comes from a generator derived from the seed (`gradtrace.adapters.loop`) and there is
no dropout, so the same seed, data and ids give the same weights; with a `TrainState` (`resume`) a killed run
continues to the same bits. Training a from-scratch model is training from a base folder holding fresh weights
(`gradtrace build-lm`).
"""
from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from gradtrace.adapters.causal_lm.objective import token_losses
from gradtrace.adapters.loop import batch_stream, config_from_dict, optimizer_step, stream_generators, warmup_cosine
from gradtrace.adapters.train_state import TrainState
from gradtrace.errors import UserError


@dataclasses.dataclass
class TrainConfig:
    """Recipe for one LM training run (JSON-able via `dataclasses.asdict`)."""

    steps: int = 300
    batch_size: int = 16
    lr: float = 1e-3             # peak learning rate
    weight_decay: float = 0.0
    warmup_steps: int = 20       # linear warm-up, then cosine decay to lr_min_ratio * lr
    lr_min_ratio: float = 0.1
    grad_clip: float | None = 1.0
    seed: int = 0

    @classmethod
    def from_dict(cls, values: dict[str, Any] | "TrainConfig" | None) -> "TrainConfig":
        return config_from_dict(cls, values, "language-model")

    def validate(self) -> None:
        if self.steps < 1 or self.batch_size < 1:
            raise UserError(f"steps and batch_size must be >= 1 (got {self.steps}, {self.batch_size})")
        if not self.lr > 0 or self.weight_decay < 0:
            raise UserError(f"lr must be > 0 and weight_decay >= 0 (got {self.lr}, {self.weight_decay})")
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise UserError(f"grad_clip must be > 0 or None, got {self.grad_clip}")


def batch_loss(model: torch.nn.Module, input_ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """The token-weighted mean next-token loss of a batch (padding masked)."""
    nll, mask = token_losses(model(input_ids), input_ids, lengths)
    return (nll * mask).sum() / mask.sum()


def train_lm(model: torch.nn.Module, input_ids: torch.Tensor, lengths: np.ndarray, cfg: TrainConfig, *,
             progress: bool = True, resume: TrainState | None = None, device: torch.device | None = None) -> dict:
    """Train `model` in place on the sequences; returns the training log."""
    if input_ids.shape[0] == 0:
        raise UserError("no training documents (empty dataset or empty ids); pass at least one")
    device = device or torch.device("cpu")
    model.to(device)
    x = input_ids.to(device)
    n = torch.as_tensor(lengths, dtype=torch.long).to(device)
    gens = stream_generators(cfg.seed, ("batch",))
    batches = batch_stream(x.shape[0], cfg.batch_size, gens["batch"])
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(cfg.warmup_steps, cfg.steps, cfg.lr_min_ratio))
    losses = torch.zeros(cfg.steps)
    resume = resume or TrainState.off()
    first = resume.restore(steps=cfg.steps, model=model, optimizer=opt, scheduler=sched, generators=gens,
                           batches=batches, losses=losses)
    bar = tqdm(range(first, cfg.steps), desc="train", disable=not progress, leave=False, initial=first,
               total=cfg.steps)
    for step in bar:
        idx = next(batches).to(device)
        loss = batch_loss(model, x[idx], n[idx])
        optimizer_step(opt, sched, loss, params, cfg.grad_clip)
        losses[step] = loss.detach().cpu()
        if progress and (step % 20 == 0 or step == cfg.steps - 1):
            bar.set_postfix(loss=f"{losses[max(0, step - 19):step + 1].mean():.4f}")
        resume.step_done(step + 1)
    bar.close()
    model.to("cpu")
    model.eval()
    wall = resume.wall_s()
    return {"losses": losses.numpy(), "wall_s": wall, "ms_per_step": 1000.0 * wall / cfg.steps,
            "train_config": dataclasses.asdict(cfg), "n_train": int(x.shape[0]), "optimizer": "AdamW"}
