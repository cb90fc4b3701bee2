"""Checkpoints: a directory with `model.safetensors` and `config.json` (the manifest, written last).

A directory without config.json is not a checkpoint, so a crash mid-save never leaves something that
loads. Loading re-computes the model fingerprint and refuses weights that do not match the manifest.
"""
from __future__ import annotations

import dataclasses
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from gradtrace.errors import UserError
from gradtrace.manifest import read_json, versions, write_json_atomic
from gradtrace.models.unet import (DiffusionModel, build_model, count_parameters, make_scheduler,
                                   model_fingerprint)

FORMAT = "gradtrace.checkpoint"
FORMAT_VERSION = 1
WEIGHTS = "model.safetensors"
CONFIG = "config.json"


@dataclasses.dataclass
class Checkpoint:
    """A loaded checkpoint: the model (eval mode), its manifest, its scheduler and fingerprint."""

    model: DiffusionModel
    config: dict
    scheduler: Any
    fingerprint: str
    path: Path

    @property
    def train_ids(self) -> np.ndarray | None:
        ids = self.config.get("train_ids")
        return None if ids is None else np.asarray(ids, dtype=np.int64)


def save_checkpoint(path_dir, model: DiffusionModel, *, train_config, dataset_info: dict | None,
                    train_ids=None, extra: dict | None = None) -> Path:
    """Write `model.safetensors` then `config.json` into `path_dir` (created), both atomically.

    `train_ids` None falls back to `model.train_ids` (set by train()); None there too means "all".
    Returns the directory.
    """
    path = Path(path_dir)
    path.mkdir(parents=True, exist_ok=True)
    if train_ids is None:
        train_ids = getattr(model, "train_ids", None)
    if dataclasses.is_dataclass(train_config):
        train_config = dataclasses.asdict(train_config)
    config_file = path / CONFIG
    if config_file.exists():  # overwriting: invalidate first, so a crash never pairs old config + new weights
        config_file.unlink()
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    fd, tmp = tempfile.mkstemp(dir=path, prefix=f".{WEIGHTS}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file(state, tmp, metadata={"format": FORMAT, "format_version": str(FORMAT_VERSION)})
        os.replace(tmp, path / WEIGHTS)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    log = getattr(model, "train_log", None) or {}
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model_config": model.config,
        "scheduler_config": model.config["scheduler"],
        "train_config": train_config,
        "dataset": dataset_info,
        "train_ids": None if train_ids is None else np.asarray(train_ids, dtype=np.int64).tolist(),
        "n_parameters": count_parameters(model),
        "fingerprint": model_fingerprint(model),
        "versions": versions(),
        "train_wall_s": log.get("wall_s"),
        "train_optimizer": log.get("optimizer"),
        "train_loss_final": _final_loss(log.get("losses")),
        "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "extra": extra or {},
    }
    write_json_atomic(config_file, manifest)
    return path


def _final_loss(losses) -> float | None:
    """Mean training loss over the last 100 steps (None if the model was not trained here)."""
    if losses is None or len(losses) == 0:
        return None
    return float(np.mean(np.asarray(losses)[-100:]))


def load_checkpoint(path_dir) -> Checkpoint:
    """Load a checkpoint directory; a missing, corrupt or mismatched one raises UserError naming it."""
    path = Path(path_dir)
    if not path.is_dir():
        raise UserError(f"checkpoint directory not found: {path}; train a model first or fix the path")
    config_file, weights_file = path / CONFIG, path / WEIGHTS
    if not config_file.exists():
        raise UserError(f"not a checkpoint (no {CONFIG}, the save did not finish): {path}; re-run training")
    config = read_json(config_file, "checkpoint config")
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise UserError(f"{config_file} is not a gradtrace checkpoint config; point at a checkpoint directory")
    if config.get("format_version") != FORMAT_VERSION:
        raise UserError(f"checkpoint {path} has format version {config.get('format_version')}, this gradtrace "
                        f"reads {FORMAT_VERSION}; retrain or use a matching gradtrace")
    if not weights_file.exists():
        raise UserError(f"checkpoint weights missing: {weights_file}; re-run training")
    try:
        state = load_file(str(weights_file))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise UserError(f"checkpoint weights are corrupt: {weights_file} ({exc}); re-run training")
    try:
        model = build_model(config.get("model_config"))
    except UserError as exc:
        raise UserError(f"checkpoint config {config_file} has a bad model config ({exc}); re-run training")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0][:200]
        raise UserError(f"checkpoint weights do not fit the model config: {weights_file} ({first}); "
                        "re-run training")
    fingerprint = model_fingerprint(model)
    if fingerprint != config.get("fingerprint"):
        raise UserError(f"checkpoint weights do not match the fingerprint in {config_file}; the files were "
                        "modified or mixed, re-run training")
    model.eval()
    ids = config.get("train_ids")
    model.train_ids = None if ids is None else np.asarray(ids, dtype=np.int64)
    return Checkpoint(model=model, config=config, scheduler=make_scheduler(model.config),
                      fingerprint=fingerprint, path=path)


def is_checkpoint(path_dir) -> bool:
    """True if `path_dir` holds a finished checkpoint (config.json present)."""
    return (Path(path_dir) / CONFIG).is_file()


