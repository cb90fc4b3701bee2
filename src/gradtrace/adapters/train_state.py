"""Resumable training: a training loop's whole state saved now and then into one hidden file, so that a run killed
at any point and started again with the same command continues from the last save and ends with weights
bit-identical to an uninterrupted run.

The caller (the `train` stage, subset retraining) says where the file goes and which run it belongs to; the
trainer (every adapter's `train`) names what changes as it runs:

    state = TrainState(out / STATE_FILE, key={...the run's settings...})   # caller
    model = adapter.train(..., resume=state)
    adapter.save(out, model, ...)
    state.clear()                                                          # caller, once the checkpoint is saved

    start = resume.restore(steps=cfg.steps, model=model, optimizer=opt, scheduler=sched,   # trainer
                           generators=gens, batches=batches, losses=losses)
    for step in range(start, cfg.steps):
        ...one step...
        resume.step_done(step + 1)

A part is a module (its trainable parameters and buffers), an optimizer, an LR scheduler or anything else with
`state_dict`/`load_state_dict` (e.g. `BatchStream`), a `torch.Generator`, a tensor (restored in place), or a
dict/list of those. The file records the run's key and the parts' layout: a file of another run, of another
layout or that cannot be read is ignored (training starts at step 0 and overwrites it). It is written atomically
(`gradtrace.io.atomic_write`), every `GRADTRACE_TRAIN_STATE_EVERY` steps ("25") or seconds ("30s"), default
every 60 s of training, never after the last step (the checkpoint follows).
"""
from __future__ import annotations

import io
import json
import os
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from gradtrace.errors import UserError
from gradtrace.io import json_default, remove_stale_temps, write_bytes_atomic

STATE_FILE = ".train-state.pt"
EVERY_ENV = "GRADTRACE_TRAIN_STATE_EVERY"
DEFAULT_EVERY_S = 60.0
FORMAT = "gradtrace-train-state"


def parse_every(text: str | None) -> tuple[int | None, float | None]:
    """(every N steps, every S seconds) from "N" or "Ss" (None: the default, every 60 s)."""
    if text is None or not str(text).strip():
        return None, DEFAULT_EVERY_S
    text = str(text).strip()
    try:
        if text.endswith("s"):
            seconds = float(text[:-1])
            if seconds > 0:
                return None, seconds
        elif int(text) >= 1:
            return int(text), None
    except ValueError:
        pass
    raise UserError(f"{EVERY_ENV}={text!r} must be a number of steps (e.g. 25) or seconds (e.g. 30s); fix or unset it")


class TrainState:
    """Where one training run keeps its resumable state, and when it saves it (see the module docstring)."""

    def __init__(self, path: str | os.PathLike | None, key: dict | None = None, *, every: str | None = None):
        self.path = None if path is None else Path(path)
        self.key = json.dumps(key or {}, sort_keys=True, default=json_default)
        self.every_steps, self.every_s = parse_every(os.environ.get(EVERY_ENV) if every is None else every)
        self.parts: dict[str, Any] = {}
        self.steps = 0
        self.resumed_from = 0
        self._wall_before = 0.0
        self._started = self._saved_at = time.perf_counter()
        self._last_step = 0

    @classmethod
    def off(cls) -> "TrainState":
        """Never saves, always starts at step 0 (training without an output directory, e.g. in tests)."""
        return cls(None)

    # ------------------------------------------------------------------ the trainer's side
    def restore(self, *, steps: int, **parts) -> int:
        """Register the loop's parts; restore them from the file when it holds this run's state. Returns the number
        of steps already done (the first step to run)."""
        self.parts, self.steps = parts, int(steps)
        saved = self._read()
        if saved is not None:
            for name, part in parts.items():
                _unpack(part, saved["parts"][name])
            self.resumed_from = int(saved["step"])
            self._wall_before = float(saved["wall_s"])
        self._started = self._saved_at = time.perf_counter()
        self._last_step = self.resumed_from
        return self.resumed_from

    def step_done(self, step: int) -> None:
        """Call after each step with the number of steps done; saves when one is due."""
        if self.path is None or step >= self.steps:
            return
        due = (self.every_steps is not None and step - self._last_step >= self.every_steps) or \
              (self.every_s is not None and time.perf_counter() - self._saved_at >= self.every_s)
        if due:
            self.save(step)

    def save(self, step: int) -> None:
        doc = {"format": FORMAT, "key": self.key, "layout": _layout(self.parts), "step": int(step),
               "wall_s": self.wall_s(), "parts": {name: _pack(part) for name, part in self.parts.items()}}
        buffer = io.BytesIO()  # torch.save on a full disk raises an opaque RuntimeError; a write of bytes, ENOSPC
        torch.save(doc, buffer)
        write_bytes_atomic(self.path, buffer.getvalue())
        self._saved_at, self._last_step = time.perf_counter(), int(step)

    def wall_s(self) -> float:
        """Seconds of training so far, including the runs before a resume."""
        return self._wall_before + time.perf_counter() - self._started

    # ------------------------------------------------------------------ the caller's side
    def clear(self) -> None:
        """Remove the file, and the temporary file of a save that was killed (the run's checkpoint is saved)."""
        if self.path is not None:
            self.path.unlink(missing_ok=True)
            remove_stale_temps(self.path)

    def _read(self) -> dict | None:
        if self.path is None or not self.path.is_file():
            return None
        try:
            saved = torch.load(self.path, map_location="cpu", weights_only=True)
        except Exception:  # unreadable (e.g. written by another torch): start over, the next save replaces it
            return None
        ok = isinstance(saved, dict) and saved.get("format") == FORMAT and saved.get("key") == self.key and \
            saved.get("layout") == _layout(self.parts) and 0 < int(saved.get("step", 0)) < self.steps
        return saved if ok else None


def _trained(module: nn.Module) -> dict[str, torch.Tensor]:
    """What training changes in a module: its trainable parameters and its buffers (frozen weights are rebuilt)."""
    out = {name: p for name, p in module.named_parameters() if p.requires_grad}
    out.update(dict(module.named_buffers()))
    return out


def _layout(part: Any) -> Any:
    """A JSON-able description of a part's structure (shapes of module tensors), to refuse a mismatched file."""
    if part is None:
        return None
    if isinstance(part, torch.Generator):
        return "generator"
    if isinstance(part, nn.Module):
        return {name: list(t.shape) for name, t in sorted(_trained(part).items())}
    if isinstance(part, torch.Tensor):
        return ["tensor", list(part.shape), str(part.dtype)]
    if isinstance(part, dict):
        return {str(k): _layout(v) for k, v in part.items()}
    if isinstance(part, (list, tuple)):
        return [_layout(v) for v in part]
    if hasattr(part, "state_dict") and hasattr(part, "load_state_dict"):
        return type(part).__name__
    raise TypeError(f"cannot save the training state of a {type(part).__name__}")


def _pack(part: Any) -> Any:
    if part is None:
        return None
    if isinstance(part, torch.Generator):
        return part.get_state()
    if isinstance(part, nn.Module):
        return {name: t.detach() for name, t in _trained(part).items()}
    if isinstance(part, torch.Tensor):
        return part.detach()
    if isinstance(part, dict):
        return {str(k): _pack(v) for k, v in part.items()}
    if isinstance(part, (list, tuple)):
        return [_pack(v) for v in part]
    return part.state_dict()


def _unpack(part: Any, saved: Any) -> None:
    """Restore `part` in place from what `_pack` made of it (the layouts were compared before)."""
    if part is None:
        return
    if isinstance(part, torch.Generator):
        part.set_state(saved)
    elif isinstance(part, nn.Module):
        tensors = _trained(part)
        with torch.no_grad():
            for name, value in saved.items():
                tensors[name].copy_(value)
    elif isinstance(part, torch.Tensor):
        with torch.no_grad():
            part.copy_(saved)
    elif isinstance(part, dict):
        for k, v in part.items():
            _unpack(v, saved[str(k)])
    elif isinstance(part, (list, tuple)):
        for v, s in zip(part, saved):
            _unpack(v, s)
    else:
        part.load_state_dict(saved)
