"""Checkpoints: a directory with `model.safetensors` and `config.json` (the manifest, written last).

A directory without config.json is not a checkpoint, so a crash mid-save never leaves something that
loads. Loading re-computes the model fingerprint and refuses weights that do not match the manifest.
The manifest names the adapter that built the model (absent in older checkpoints: the tiny diffusion
UNets), so every later stage finds the code that knows this kind of model.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
from safetensors import SafetensorError
from safetensors.torch import load_file, save
from torch import nn

from gradtrace.choices import DEFAULT_ADAPTER  # noqa: F401  (the CLI's choices)
from gradtrace.errors import UserError
from gradtrace.io import check_finite, read_json, versions, write_bytes_atomic, write_json_atomic

FORMAT = "gradtrace.checkpoint"
FORMAT_VERSION = 1
WEIGHTS = "model.safetensors"
CONFIG = "config.json"


@dataclass
class Checkpoint:
    """A loaded checkpoint: the model (eval mode), its manifest (config.json), fingerprint and path.

    `extras` holds what an adapter derives from the manifest once (e.g. a diffusion noise scheduler).
    """

    model: nn.Module
    config: dict
    fingerprint: str
    path: Path
    extras: dict = field(default_factory=dict)

    @property
    def train_ids(self) -> np.ndarray | None:
        ids = self.config.get("train_ids")
        return None if ids is None else np.asarray(ids, dtype=np.int64)

    @property
    def model_config(self) -> dict:
        return self.config["model_config"]


def model_fingerprint(model: nn.Module) -> str:
    """sha256 over (name, dtype, shape, bytes) of every parameter, names sorted."""
    h = hashlib.sha256()
    for name, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
        a = p.detach().cpu().contiguous().numpy()
        h.update(name.encode())
        h.update(str(a.dtype).encode())
        h.update(str(a.shape).encode())
        h.update(a.tobytes())
    return h.hexdigest()


def json_without_keys(data: bytes, keys, *, ensure_ascii: bool = True) -> bytes:
    """A JSON object's bytes without `keys` (those that record how a model or tokenizer was loaded, which a library
    adds when a loaded object is saved again), re-written as diffusers and transformers write JSON (indent 2, sorted
    keys), so an object saved from memory has the fingerprint of the folder it was loaded from. Bytes that are no
    JSON object, or hold none of the keys, are returned as they are."""
    try:
        config = json.loads(data)
    except ValueError:
        return data
    if not isinstance(config, dict) or not any(key in config for key in keys):
        return data
    kept = {k: v for k, v in config.items() if k not in keys}
    return (json.dumps(kept, indent=2, sort_keys=True, ensure_ascii=ensure_ascii) + "\n").encode()


def count_parameters(model: nn.Module) -> int:
    """Number of scalar parameters."""
    return sum(p.numel() for p in model.parameters())


def save_checkpoint(path_dir, model: nn.Module, *, train_config, dataset_info: dict | None,
                    train_ids=None, extra: dict | None = None, adapter: str = DEFAULT_ADAPTER) -> Path:
    """Write `model.safetensors` then `config.json` into `path_dir` (created), both atomically.

    `model.config` is the model config; `train_ids` None falls back to `model.train_ids` (set by training);
    None there too means "all". Returns the directory.
    """
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    for name, tensor in state.items():  # before the folder is touched: a diverged model is never saved
        check_finite(tensor, f"train (parameter {name})", "training diverged; lower --lr (or train fewer --steps)")
    path = start_checkpoint(path_dir)
    # one metadata key: safetensors writes its metadata in hash order, so two would order differently run to run
    write_bytes_atomic(path / WEIGHTS, save(state, metadata={"format": FORMAT}))
    return write_manifest(path, model, fingerprint=model_fingerprint(model), train_config=train_config,
                          dataset_info=dataset_info, train_ids=train_ids, extra=extra, adapter=adapter)


def start_checkpoint(path_dir) -> Path:
    """Create the directory and remove an old manifest first, so a crash never pairs it with new weights."""
    path = Path(path_dir)
    path.mkdir(parents=True, exist_ok=True)
    if (path / CONFIG).exists():
        (path / CONFIG).unlink()
    return path


def write_manifest(path: Path, model: nn.Module, *, fingerprint: str, train_config, dataset_info: dict | None,
                   train_ids=None, extra: dict | None = None, adapter: str = DEFAULT_ADAPTER) -> Path:
    """Write config.json (last: its presence marks a finished checkpoint); returns the directory."""
    if train_ids is None:
        train_ids = getattr(model, "train_ids", None)
    if dataclasses.is_dataclass(train_config):
        train_config = dataclasses.asdict(train_config)
    log = getattr(model, "train_log", None) or {}
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model_config": model.config,
        "train_config": train_config,
        "dataset": dataset_info,
        "train_ids": None if train_ids is None else np.asarray(train_ids, dtype=np.int64).tolist(),
        "n_parameters": count_parameters(model),
        "fingerprint": fingerprint,
        "versions": versions(),
        "train_wall_s": log.get("wall_s"),
        "train_optimizer": log.get("optimizer"),
        "train_loss_final": _final_loss(log.get("losses")),
        "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "extra": extra or {},
        "adapter": adapter,
    }
    write_json_atomic(path / CONFIG, manifest)
    return path


def _final_loss(losses) -> float | None:
    """Mean training loss over the last 100 steps (None if the model was not trained here)."""
    if losses is None or len(losses) == 0:
        return None
    return float(np.mean(np.asarray(losses)[-100:]))


def load_checkpoint(path_dir, build: Callable[[dict], nn.Module]) -> Checkpoint:
    """Load a checkpoint directory with `build(model_config)`; a missing, corrupt or mismatched one raises
    UserError naming it. The model is returned in eval mode with `train_ids` set from the manifest."""
    path = Path(path_dir)
    config = read_manifest(path)
    config_file, weights_file = path / CONFIG, path / WEIGHTS
    if not weights_file.exists():
        raise UserError(f"checkpoint weights missing: {weights_file}; re-run training")
    try:
        state = load_file(str(weights_file))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise UserError(f"checkpoint weights are corrupt: {weights_file} ({exc}); re-run training")
    try:
        model = build(config.get("model_config"))
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
    return Checkpoint(model=model, config=config, fingerprint=fingerprint, path=path)


def read_manifest(path: Path) -> dict:
    """The checkpoint manifest of a directory, refusing a missing, unfinished or foreign one in one line."""
    if not path.is_dir():
        raise UserError(f"checkpoint directory not found: {path}; train a model first or fix the path")
    config_file = path / CONFIG
    if not config_file.exists():
        raise UserError(f"not a checkpoint (no {CONFIG}, the save did not finish): {path}; re-run training")
    config = read_json(config_file, "checkpoint config")
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise UserError(f"{config_file} is not a gradtrace checkpoint config; point at a checkpoint directory")
    if config.get("format_version") != FORMAT_VERSION:
        raise UserError(f"checkpoint {path} has format version {config.get('format_version')}, this gradtrace "
                        f"reads {FORMAT_VERSION}; retrain or use a matching gradtrace")
    return config


def is_checkpoint(path_dir) -> bool:
    """True if `path_dir` holds a finished checkpoint (config.json present)."""
    return (Path(path_dir) / CONFIG).is_file()
