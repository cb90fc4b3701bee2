"""What every deterministic training loop of the adapters shares: seeded generators per random stream, the
batch order, the warm-up + cosine learning-rate schedule, and the rows of a dataset to train on.

    gens = stream_generators(seed)                        # {"batch", "t", "noise", "drop"} generators
    batches = batch_stream(n, batch_size, gens["batch"])  # endless shuffled epochs (its state resumes)
    sched = LambdaLR(opt, warmup_cosine(warmup, steps, min_ratio))
    optimizer_step(opt, sched, loss, params, grad_clip)   # backward, clip, step, schedule

A `BatchStream`, the generators and the schedule are parts a `TrainState` saves and restores, so a killed run
continues with the same draws.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Iterator

import numpy as np
import torch

from gradtrace.errors import UserError

STREAMS = ("batch", "t", "noise", "drop")


def stream_generators(seed: int, names: tuple[str, ...] = STREAMS) -> dict[str, torch.Generator]:
    """Independent generators for the random streams `names` (of `STREAMS`), derived from one seed; stream k of
    `STREAMS` gets the same generator whichever of the names a loop asks for."""
    out = {}
    for k, name in enumerate(STREAMS):
        if name not in names:
            continue
        state = np.random.SeedSequence([int(seed), k]).generate_state(2, dtype=np.uint32)
        out[name] = torch.Generator().manual_seed(int(state[0]) << 31 | int(state[1]) >> 1)
    return out


class BatchStream:
    """Endless batches of row indices: shuffled epochs, each row once per epoch (batches may span two). Its state
    (the rows drawn but not yet used) is saved with the training state; the generator is saved on its own."""

    def __init__(self, n: int, batch_size: int, gen: torch.Generator):
        self.n, self.batch_size, self.gen = int(n), int(batch_size), gen
        self.buf = torch.empty(0, dtype=torch.long)

    def __iter__(self) -> Iterator[torch.Tensor]:
        return self

    def __next__(self) -> torch.Tensor:
        while self.buf.shape[0] < self.batch_size:
            self.buf = torch.cat([self.buf, torch.randperm(self.n, generator=self.gen)])
        out, self.buf = self.buf[:self.batch_size], self.buf[self.batch_size:]
        return out

    def state_dict(self) -> dict:
        return {"buf": self.buf.clone()}

    def load_state_dict(self, state: dict) -> None:
        self.buf = state["buf"].clone()


def batch_stream(n: int, batch_size: int, gen: torch.Generator) -> BatchStream:
    """The batches of `n` rows drawn with `gen` (see `BatchStream`)."""
    return BatchStream(n, batch_size, gen)


def warmup_cosine(warmup_steps: int, steps: int, min_ratio: float) -> Callable[[int], float]:
    """The LR factor of step s: linear warm-up over `warmup_steps` (capped at steps − 1), then cosine decay from 1
    to `min_ratio` at the last step (for `torch.optim.lr_scheduler.LambdaLR`)."""
    warm = max(0, min(int(warmup_steps), int(steps) - 1))

    def f(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        progress = (step - warm) / max(1, steps - warm)
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return f


def optimizer_step(opt, sched, loss: torch.Tensor, params=None, grad_clip: float | None = None, *,
                   foreach: bool | None = True) -> None:
    """One update on `loss`: zero the gradients, backward, clip `params` to `grad_clip` (when given; `foreach` as
    torch.nn.utils.clip_grad_norm_ takes it), optimizer step, schedule step."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if grad_clip is not None:
        torch.nn.utils.clip_grad_norm_(params, grad_clip, foreach=foreach)
    opt.step()
    sched.step()


def select_rows(dataset, ids) -> np.ndarray:
    """Row positions of `ids` in the dataset (all rows when None), refusing unknown or repeated ids."""
    if ids is None:
        return np.arange(len(dataset))
    ids = np.asarray(ids, dtype=np.int64).ravel()
    if len(np.unique(ids)) != len(ids):
        raise UserError("training ids contain duplicates; pass each id once")
    return dataset.index_of(ids)


def config_from_dict(cls, values: dict[str, Any] | Any | None, what: str):
    """An instance of the recipe dataclass `cls` from a dict (e.g. a checkpoint's) or an instance, refusing
    unknown keys in one line naming `what` ("classifier", "language-model"), and running its `validate()`."""
    if isinstance(values, cls):
        return values
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values or {}) - known)
    if unknown:
        raise UserError(f"unknown {what} train settings {unknown}; valid keys are {sorted(known)}")
    cfg = cls(**(values or {}))
    cfg.validate()
    return cfg
