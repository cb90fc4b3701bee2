"""The training recipe of a run: everything needed to retrain its model on other training ids.

A run is a checkpoint directory of the full model; its config.json records the adapter (the kind of model),
the model config, the train config, the dataset (with its source record, `gradtrace.data.sources`, and
fingerprint) and the train ids. Retrained models use the same recipe except the training ids and the seed;
the adapter trains them.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from gradtrace.adapters import DEFAULT_ADAPTER, ModelAdapter, get_adapter
from gradtrace.data.sources import open_dataset
from gradtrace.errors import UserError
from gradtrace.io import read_json, sha256_arrays


@dataclass
class Recipe:
    """A run's recipe (JSON-able via `to_dict`, so it can be sent to worker processes)."""

    run: str
    fingerprint: str
    model_config: dict
    train_config: dict
    dataset: dict          # the run's dataset info, with "source" and "fingerprint"
    train_ids: np.ndarray  # sorted int64
    adapter_name: str = DEFAULT_ADAPTER

    @property
    def adapter(self) -> ModelAdapter:
        return get_adapter(self.adapter_name)

    @property
    def source(self) -> dict:
        return self.dataset["source"]

    @property
    def base_seed(self) -> int:
        return int(self.train_config.get("seed", 0))

    def replicate_seeds(self, n_seeds: int) -> list[int]:
        """The training seeds of replicates r = 0..R-1: the run's seed + r (shared by every subset)."""
        if int(n_seeds) != n_seeds or n_seeds < 1:
            raise UserError(f"--seeds must be a positive integer, got {n_seeds}")
        return [self.base_seed + r for r in range(int(n_seeds))]

    def train_config_with_seed(self, seed: int) -> dict:
        cfg = copy.deepcopy(self.train_config)
        cfg["seed"] = int(seed)
        return cfg

    def to_dict(self) -> dict:
        return {"run": self.run, "fingerprint": self.fingerprint, "model_config": self.model_config,
                "train_config": self.train_config, "dataset": self.dataset, "train_ids": self.train_ids.tolist(),
                "adapter": self.adapter_name}

    @classmethod
    def from_dict(cls, d: dict) -> "Recipe":
        return cls(run=d["run"], fingerprint=d["fingerprint"], model_config=d["model_config"],
                   train_config=d["train_config"], dataset=d["dataset"],
                   train_ids=np.asarray(d["train_ids"], dtype=np.int64), adapter_name=d["adapter"])

    def summary(self) -> dict:
        """What a retraining must agree on (compared on resume; the run's path is not: runs may move)."""
        cfg = {k: v for k, v in self.train_config.items() if k != "seed"}
        return {"run_fingerprint": self.fingerprint, "model_config": self.model_config,
                "train_config_except_seed": cfg, "dataset_source": self.source,
                "dataset_fingerprint": self.dataset.get("fingerprint"),
                "train_ids_sha256": sha256_arrays([self.train_ids]), "n_train": int(len(self.train_ids))}


def load_recipe(run) -> Recipe:
    """Read a run's recipe from its checkpoint config.json (the weights are not loaded)."""
    path = Path(run)
    if not path.is_dir():
        raise UserError(f"run directory not found: {path}; pass the checkpoint directory of the full model")
    config_file = path / "config.json"
    if not config_file.exists():
        raise UserError(f"{path} is not a finished checkpoint (no config.json); train the full model first")
    config = read_json(config_file, "checkpoint config")
    if not isinstance(config, dict) or config.get("format") != "gradtrace.checkpoint":
        raise UserError(f"{config_file} is not a gradtrace checkpoint config; pass a checkpoint directory")
    dataset = config.get("dataset") or {}
    source = dataset.get("source") if isinstance(dataset, dict) else None
    if not isinstance(source, dict) or not source.get("spec"):
        raise UserError(f"{config_file} does not record its dataset source; retrain the full model with "
                        "`gradtrace train` so the recipe can be replayed")
    for key in ("model_config", "train_config", "fingerprint"):
        if not config.get(key):
            raise UserError(f"{config_file} lacks '{key}'; retrain the full model with this gradtrace")
    ids = config.get("train_ids")
    if ids is None:
        ids = open_dataset(source, dataset.get("fingerprint")).ids
    return Recipe(run=str(path.resolve()), fingerprint=config["fingerprint"], model_config=config["model_config"],
                  train_config=dict(config["train_config"]), dataset=dataset,
                  train_ids=np.sort(np.asarray(ids, dtype=np.int64)),
                  adapter_name=config.get("adapter", DEFAULT_ADAPTER))


def load_run_dataset(recipe: Recipe):
    """Reload the run's dataset from its source and refuse it if its fingerprint changed."""
    return open_dataset(recipe.source, recipe.dataset.get("fingerprint"))
