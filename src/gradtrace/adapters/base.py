"""The model-adapter seam: the one interface behind which everything that depends on the kind of model lives.

gradtrace's stages below the pipeline (`features/`, `methods/`, `weights/`, `attribution/`, `evaluate/`)
never know what kind of model they work on. They ask an adapter (found by name in
`gradtrace.adapters.get_adapter`) for exactly these things:

- **checkpoints**: `load(path)` → `Checkpoint` (module in eval mode, manifest, fingerprint), `build(model_config,
  seed)`; checkpoints are written by `gradtrace.adapters.checkpoint.save_checkpoint` with the adapter's name;
- **groups**: `group_key(preset)`, the adapter's own presets (e.g. `block`) beside the generic `tensor` and
  `module`;
- **measurements**: `objective(checkpoint, name, repeats, seed)` → `Objective`, what is differentiated per
  example (the featurizers call it, see below); `default_measurement` is the one `featurize` uses by default;
- **examples**: `examples(model_config, source, ids)` → `Examples` (inputs, ids, conditioning) of a data
  source record (`gradtrace.data.sources`), checked against the model;
- **training**: `default_model_config(dataset, kind)`, `train(model_config, dataset, train_config, ids, resume)`,
  the recipe `train` and subset retraining replay (`resume`: the resumable state, `adapters.train_state`);
- **evaluation**: `outputs(checkpoint, examples, grid)`, the model output per query used as the LDS target;
  `classes(model_config)` and `relabelled(...)` for models with class labels (mislabel detection);
- **queries**: `sample(...)` / `query_request(...)`, generated learning and evaluation queries (generative
  models only; the default refuses): the conditioning of each query, all of it or only one aspect.

An `Objective` turns one chunk of examples (inputs, ids, cond) into what the featurizers differentiate:
`example_inputs` gives the per-example tensors (and their vmap in_dims) for the exact `torch.func` path,
`example_output(forward, *args)` the scalar output of ONE example given `forward(*model_args)` (the model
with swapped parameters), and `batch_total(model, ...)` the sum of every example's output from one ordinary
batched forward pass (rows example-major, the same number per example) for the Kronecker path.

Influence functions (EK-FAC, `gradtrace.methods.ekfac`, kronfluence as the engine) use the same objects on the
model and data directly: the adapter's `train_loss_measurement` objective's `batch_total` is the training loss
(the curvature's), its `sampled_total` the same loss with targets drawn from the model's own predictive
distribution (the true Fisher; objectives without one return None and the empirical Fisher is used), its
`token_mask` the padding of sequence models, and the measurement's `batch_total` the query side.
`measurement_is_loss(name)` says whether lower is better, which fixes the sign that makes a positive score mean
"helpful".
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from gradtrace.adapters.checkpoint import DEFAULT_ADAPTER, Checkpoint, save_checkpoint
from gradtrace.adapters.train_state import TrainState
from gradtrace.errors import UserError

__all__ = ["Checkpoint", "ContextStage", "DEFAULT_ADAPTER", "GT_STREAM", "ModelAdapter", "Objective", "OutputGrid"]


@dataclass
class ContextStage:
    """Parameters that reach the network only through one tensor, e.g. a conditioning embedding.

    The Kronecker featurizer captures that tensor where `module` receives it as keyword `kwarg`, and gets the
    per-example gradients of `params` by a vmap of `encode(params, codes_of_one_example)` against it.
    `default_codes(B)` gives the encoder's input for a batch without conditioning.
    """

    params: list[str]
    module: nn.Module
    kwarg: str
    encode: Callable[[dict, torch.Tensor], torch.Tensor]
    default_codes: Callable[[int], torch.Tensor]


class Objective(ABC):
    """What is differentiated for each example (see the module docstring)."""

    @abstractmethod
    def info(self) -> dict:
        """JSON-able description, recorded as the feature store's `measurement` (must include "name")."""

    @abstractmethod
    def example_inputs(self, inputs: torch.Tensor, ids: np.ndarray, cond) -> tuple[tuple, tuple]:
        """(args, in_dims): per-example tensors (leading dim B; in_dim 0) and shared ones (in_dim None)."""

    @abstractmethod
    def example_output(self, forward: Callable[..., torch.Tensor], *args) -> torch.Tensor:
        """The scalar output of one example from its slice of `args`; `forward(*model_args)` runs the model."""

    def batch_total(self, model: nn.Module, inputs: torch.Tensor, ids: np.ndarray, cond) -> torch.Tensor:
        """Σ_b f_b from one ordinary batched forward (rows example-major, equal per example)."""
        raise UserError(f"measurement '{self.info().get('name')}' has no batched form; use --projection rademacher")

    def context_stage(self, model: nn.Module) -> ContextStage | None:
        return None

    def timestep_bands(self, n: int) -> list[tuple[str, "Objective"]]:
        """[(band name, this objective restricted to that band)] for `n` bands of the schedule (diffusion only)."""
        raise UserError(f"--timestep-bands applies to diffusion models; measurement '{self.info().get('name')}' "
                        "has no timesteps: drop --timestep-bands")

    samples_targets: bool = False  # True when `sampled_total` draws targets (the true Fisher of influence functions)

    def sampled_total(self, model: nn.Module, inputs: torch.Tensor, ids: np.ndarray, cond,
                      seed: int) -> torch.Tensor | None:
        """Σ_b of this (training-loss) objective with each example's target drawn from the model's own predictive
        distribution, seeded by (`seed`, example id); None when the objective has no such distribution."""
        return None

    def token_mask(self, inputs, ids: np.ndarray, cond) -> torch.Tensor | None:
        """(B, T) 0/1 mask of the sequence positions that count (padding = 0), so that influence functions'
        curvature skips padded tokens; None (the default) = every position of every row counts."""
        return None

    def row_scale_info(self) -> dict | None:
        """What `row_scale` computes (recorded in the feature store), or None when this objective has none."""
        return None

    def row_scale(self, model: nn.Module, inputs, ids, cond) -> np.ndarray | None:
        """(B,) float64 per-example factor a method multiplies each training example's scores by (e.g. DAS's
        residual factor), from forward passes only; None when the measurement has none."""
        return None

    def to(self, device: torch.device) -> "Objective":
        """Compute on `device` (the model's); inputs arrive on the CPU and are moved by the objective."""
        return self


GT_STREAM = 0x4C4453  # "LDS": keeps ground-truth draws apart from featurization draws (same seed, same ids)


@dataclass(frozen=True)
class OutputGrid:
    """The fixed grid of draws on which every retrained model's output is measured (the LDS targets):
    `num_timesteps` repeats (diffusion: timesteps spaced over the schedule) × `num_draws` seeded draws."""

    num_timesteps: int = 10
    num_draws: int = 4
    seed: int = 0

    def __post_init__(self):
        if self.num_timesteps < 1 or self.num_draws < 1:
            raise UserError(f"the output grid needs >= 1 timestep and >= 1 noise draw, got "
                            f"{self.num_timesteps} x {self.num_draws}")

    def info(self) -> dict:
        return {**asdict(self), "stream": GT_STREAM}


class ModelAdapter(ABC):
    """One kind of model. Subclasses set `name`, `measurements` and `group_presets` (see the module docstring)."""

    name: str = "adapter"
    measurements: tuple[str, ...] = ("loss",)
    default_measurement: str = "loss"  # what `featurize` differentiates when --measurement is not given
    group_presets: tuple[str, ...] = ()
    model_kinds: tuple[str, ...] = ()
    output_name: str = "loss"          # what `outputs` returns, as recorded in evaluation manifests
    output_is_loss: bool = True        # LDS targets are −output when True (a helpful example lowers the loss)
    train_loss_measurement: str = "loss"  # the measurement that is the training loss (influence functions' curvature)
    train_devices: tuple[str, ...] = ("cpu",)          # device types `train` runs on
    train_precisions: tuple[str, ...] = ("float32",)   # compute precisions `train` runs at

    # ------------------------------------------------------------------ checkpoints
    @abstractmethod
    def build(self, model_config: dict, seed: int = 0) -> nn.Module:
        """A fresh model for `model_config`, parameters initialised deterministically from `seed`.
        The module must carry its config as `.config` (saved in the checkpoint manifest)."""

    @abstractmethod
    def load(self, path) -> Checkpoint:
        """Load a checkpoint directory; a missing, corrupt or mismatched one raises UserError naming it."""

    def save(self, path, model: nn.Module, *, train_config, dataset_info: dict | None, train_ids=None,
             extra: dict | None = None) -> Path:
        """Write a trained model as a checkpoint `load` reads (default: safetensors + manifest)."""
        return save_checkpoint(path, model, train_config=train_config, dataset_info=dataset_info,
                               train_ids=train_ids, extra=extra, adapter=self.name)

    # ------------------------------------------------------------------ groups and measurements
    def group_key(self, preset: str) -> Callable[[str], str] | None:
        """The parameter-name → group-name rule of one of this adapter's presets (None: not one of them)."""
        return None

    @abstractmethod
    def objective(self, checkpoint: Checkpoint, measurement: str, repeats: int, seed: int) -> Objective:
        """The per-example output function `measurement`, averaged over `repeats` draws seeded by `seed`."""

    def influence_model(self, checkpoint: Checkpoint) -> nn.Module:
        """The module EK-FAC (kronfluence) runs: it scores `nn.Linear` and `nn.Conv2d` layers only, so an adapter
        whose layers are other modules doing the same (e.g. transformers' GPT-2 `Conv1D`) returns an equivalent
        module with those layers as `nn.Linear`, keeping the parameter names; default: the checkpoint's model."""
        return checkpoint.model

    def measurement_is_loss(self, measurement: str) -> bool:
        """True when lower `measurement` is better (a training example that lowers it helps); default: only the
        training loss. Influence scores of a higher-is-better measurement (a margin) are negated."""
        return measurement == self.train_loss_measurement

    # ------------------------------------------------------------------ data
    @abstractmethod
    def examples(self, model_config: dict, source: dict, ids=None, cache_dir: Path | None = None):
        """`gradtrace.data.sources.Examples` of a source record, in the form the model takes; `cache_dir` is
        where derived inputs may be cached (e.g. VAE latents), beside the feature stores."""

    # ------------------------------------------------------------------ training
    @abstractmethod
    def default_model_config(self, dataset, kind: str, **options) -> dict:
        """The model config of `kind` (one of `model_kinds`, or "auto") for `dataset`; `options` are the train
        stage's adapter-specific settings (e.g. base and lora_rank), None when not given."""

    @abstractmethod
    def train_config(self, values: dict | None) -> Any:
        """The adapter's training recipe object from a dict (refusing unknown keys); `asdict`-able."""

    @abstractmethod
    def train(self, model_config: dict, dataset, train_config: Any, ids=None, progress: bool = True,
              resume: TrainState | None = None) -> nn.Module:
        """Train a fresh model (seed in `train_config`) on `dataset` rows `ids` (None = all); deterministic.
        `resume` (a `gradtrace.adapters.train_state.TrainState`, given by the train stage and subset retraining):
        register the loop's state with `resume.restore(...)`, start at the step it returns and call
        `resume.step_done(step)` after each step, so a killed run continues to the same weights.
        An adapter listing more than the CPU in `train_devices` also takes `device=torch.device`, and one
        listing bfloat16 in `train_precisions` reads the precision from its `train_config` ("precision")."""

    # ------------------------------------------------------------------ evaluation and queries
    @abstractmethod
    def outputs(self, checkpoint: Checkpoint, examples, grid) -> np.ndarray:
        """(Q,) float64 model output per query (the LDS ground truth), on the shared `grid` of draws."""

    def classes(self, model_config: dict) -> list[str] | None:
        """The class names the model predicts, in class-index order (its examples' conditioning is the class index);
        None for a model without class labels (the default)."""
        return None

    def relabelled(self, model_config: dict, dataset, ids, labels):
        """`dataset` with the examples `ids` given the class indices `labels` instead of their own (for training on
        corrupted labels: `gradtrace eval mislabel`); only models with `classes`."""
        raise UserError(f"{self.name} models have no class labels to change")

    def attributes(self, checkpoint: Checkpoint) -> dict[str, list[str]]:
        """The conditioning vocabulary a generated query can set (attribute name → values); {} = none."""
        return {}

    def sample(self, checkpoint: Checkpoint, num: int, **options):
        raise UserError(f"{self.name} models do not generate queries; pass featurized queries instead")

    def query_request(self, checkpoint: Checkpoint, num: int, *, aspect: str | None, seed: int,
                      prompts: list[str] | None = None) -> dict:
        """How to generate `num` queries (keyword arguments of `SampleSpec`: "codes" or "texts"): with every
        aspect specified, or only `aspect`; `prompts` are the user's own (text-conditioned models)."""
        raise UserError(f"{self.name} models do not generate queries; pass --queries with featurized ones")

