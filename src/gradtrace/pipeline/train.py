"""The train stage: train a model of the chosen adapter on a dataset (or reuse an identical checkpoint).

Training saves its resumable state into `OUT/.train-state.pt` now and then (`gradtrace.adapters.train_state`):
the same command run again after a kill continues from it, to the same weights; the file is removed once the
checkpoint is saved."""
from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import numpy as np

from gradtrace.adapters import get_adapter
from gradtrace.adapters.train_state import STATE_FILE, TrainState
from gradtrace.data.sources import dataset_source, open_dataset, read_ids
from gradtrace.errors import UserError
from gradtrace.io import check_can_write, command_line, jsonable, read_json, sha256_arrays
from gradtrace.pipeline.devices import resolve_device
from gradtrace.pipeline.specs.train import TrainSpec, is_lm_base  # noqa: F401


def resolve_ids(ids) -> np.ndarray | None:
    """Training ids from a file path or an array (None = all)."""
    if ids is None:
        return None
    if isinstance(ids, (str, Path)):
        return read_ids(ids)
    return np.asarray(ids, dtype=np.int64)


def read_model_options(text: str) -> dict:
    """--model-options: a JSON object, inline or in a .json file."""
    source = str(text).strip()
    if source.startswith("{"):
        try:
            value = json.loads(source)
        except json.JSONDecodeError as exc:
            raise UserError(f"--model-options is not valid JSON ({exc.msg} at character {exc.pos}); pass a JSON "
                            "object such as '{\"widths\": [16, 32]}'") from None
    elif Path(source).is_file():
        value = read_json(source, "--model-options file")
    else:
        raise UserError(f"--model-options {source!r} is neither a JSON object nor a .json file; pass e.g. "
                        "'{\"widths\": [16, 32]}'")
    if not isinstance(value, dict):
        raise UserError(f"--model-options must be a JSON object (settings by name), got {type(value).__name__}")
    return value


def check_adapter_settings(spec: TrainSpec, adapter) -> None:
    """What the kind of model allows: its training precisions and devices, its model kinds."""
    if spec.dtype not in adapter.train_precisions:
        raise UserError(f"--dtype {spec.dtype}: {adapter.name} models train in "
                        f"{' or '.join(adapter.train_precisions)}; drop --dtype")
    if spec.device == "cuda" and "cuda" not in adapter.train_devices:
        raise UserError(f"{adapter.name} models train on the CPU; use --device cpu (or auto)")
    if spec.model != "auto" and spec.model not in adapter.model_kinds:
        raise UserError(f"--model must be auto or one of {', '.join(adapter.model_kinds)}, got {spec.model!r}")


def train_run(spec: TrainSpec, *, progress: bool = True) -> Path:
    """Train (or reuse, when an identical checkpoint exists at `spec.out`) and save a checkpoint."""
    adapter = get_adapter(spec.adapter)
    check_adapter_settings(spec, adapter)
    ids = resolve_ids(spec.ids)
    source = dataset_source(spec.data, n=spec.n, size=spec.size, seed=spec.data_seed)
    ds = open_dataset(source)
    options = {} if spec.model_options is None else {"model_options": read_model_options(spec.model_options)}
    model_config = adapter.default_model_config(ds, spec.model, base=spec.base, lora_rank=spec.lora_rank, **options)
    values = {"seed": spec.seed, **{k: v for k, v in (("steps", spec.steps), ("batch_size", spec.batch_size),
                                                       ("lr", spec.lr)) if v is not None}}
    if spec.dtype != "float32":  # the precision is part of the recipe: subset models are retrained alike
        values["precision"] = spec.dtype
    train_config = adapter.train_config(values)
    out = Path(spec.out)
    if _cached_checkpoint(out, adapter, model_config, train_config, ds, ids):
        TrainState(out / STATE_FILE).clear()  # left by a run killed after its checkpoint was saved
        return out
    if (out / "config.json").exists() and not spec.overwrite:
        raise UserError(f"{out} holds a checkpoint trained with other settings or data; choose a new --out, or "
                        "pass --overwrite to replace it")
    device = resolve_device(spec.device) if "cuda" in adapter.train_devices else None
    on_gpu = {} if device is None or device.type == "cpu" else {"device": device}
    key = {"adapter": adapter.name, "model_config": model_config, "train_config": asdict(train_config),
           "dataset": ds.fingerprint(), "ids": None if ids is None else sha256_arrays([np.sort(ids)]),
           "device": "cpu" if device is None else device.type}
    state = TrainState(out / STATE_FILE, jsonable(key))
    check_can_write(out)  # an --out that cannot be written fails now, not after training
    model = adapter.train(model_config, ds, train_config, ids=ids, progress=progress, resume=state, **on_gpu)
    adapter.save(out, model, train_config=train_config, dataset_info={**ds.info(), "source": source},
                 train_ids=None if ids is None else [int(i) for i in ids],
                 extra={"command": command_line(), "spec": spec.to_dict()})
    state.clear()
    return out


def _cached_checkpoint(out: Path, adapter, model_config, train_config, ds, ids) -> bool:
    """True when `out` already holds a checkpoint trained with exactly these settings and data (its recipe read
    through the adapter, so a setting added later with its default value still matches)."""
    path = out / "config.json"
    if not path.exists():
        return False
    try:
        old = json.loads(path.read_text())
    except json.JSONDecodeError:
        return False
    want_ids = None if ids is None else sorted(int(i) for i in ids)
    old_ids = old.get("train_ids")
    return (old.get("model_config") == json.loads(json.dumps(model_config))
            and _recipe(adapter, old.get("train_config")) == json.loads(json.dumps(asdict(train_config)))
            and (old.get("dataset") or {}).get("fingerprint") == ds.fingerprint()
            and (None if old_ids is None else sorted(old_ids)) == want_ids)


def _recipe(adapter, values) -> dict | None:
    try:
        return json.loads(json.dumps(asdict(adapter.train_config(values))))
    except (UserError, TypeError):
        return None
