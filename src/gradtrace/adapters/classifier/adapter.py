"""Image classifiers as a model adapter (`classifier`).

Models: a small ResNet and a small ViT named as torchvision's (`resnet.py`, `vit.py`), or any `nn.Module` a user's
function returns (`{"arch": "factory", ...}`, `models.py`), trained with cross-entropy (`train.py`). Examples are
labelled images in [-1, 1]; their conditioning is the class index of each (the model config names the label
attribute and its classes: digits → label, shapes → subject, an image folder → its label column or class
sub-folders). Measurements: `margin` (the default, TRAK's) and `loss` (cross-entropy) (`objective.py`); the
`block` preset groups residual blocks and attention / MLP blocks (`groups.py`); the LDS output is the query's
margin under each retrained model (higher is better, so it is not negated). Classifiers do not generate
queries: queries are held-out labelled images, featurized with `--data ... --ids`.
"""
from __future__ import annotations

import numpy as np

from gradtrace.adapters.base import Checkpoint, ModelAdapter, OutputGrid
from gradtrace.adapters.checkpoint import load_checkpoint
from gradtrace.adapters.classifier.configs import KINDS, default_model_config, label_of
from gradtrace.adapters.classifier.groups import PRESETS, block_key
from gradtrace.adapters.classifier.models import build_model, check_logits
from gradtrace.adapters.classifier.objective import MEASUREMENTS, ClassifierObjective, margins
from gradtrace.adapters.classifier.train import TrainConfig, train
from gradtrace.data.base import ImageDataset
from gradtrace.data.sources import Examples, load_source, require_images
from gradtrace.errors import UserError

AUTO_KIND = "resnet"


class ClassifierAdapter(ModelAdapter):
    name = "classifier"
    measurements = MEASUREMENTS
    default_measurement = "margin"
    group_presets = PRESETS
    model_kinds = KINDS
    output_name = "margin"
    output_is_loss = False

    # ------------------------------------------------------------------ checkpoints
    def build(self, model_config: dict, seed: int = 0):
        return build_model(model_config, seed=seed)

    def load(self, path) -> Checkpoint:
        return load_checkpoint(path, build_model)

    # ------------------------------------------------------------------ groups and measurements
    def group_key(self, preset: str):
        return block_key if preset == "block" else None

    def objective(self, checkpoint: Checkpoint, measurement: str, repeats: int, seed: int) -> ClassifierObjective:
        return ClassifierObjective(measurement)

    # ------------------------------------------------------------------ data
    def examples(self, model_config: dict, source: dict, ids=None, cache_dir=None) -> Examples:
        """Labelled images of a dataset source; the conditioning is each image's class index (N,)."""
        ex = load_source(source, ids=ids, labels=(model_config["label"], model_config["classes"]))
        want = (int(model_config["channels"]), int(model_config["size"]), int(model_config["size"]))
        if tuple(ex.images.shape[1:]) != want:
            raise UserError(f"images have shape {tuple(ex.images.shape[1:])} but the classifier takes {want}; "
                            "pass matching data or --size")
        return ex

    # ------------------------------------------------------------------ training
    def default_model_config(self, dataset, kind: str = "auto", base=None, lora_rank=None,
                             model_options: dict | None = None) -> dict:
        """A `kind` classifier (auto: factory when the options name one, else resnet) for the dataset's images and
        label; `model_options` override the architecture's defaults (and may name the label attribute)."""
        if base is not None or lora_rank is not None:
            raise UserError("classifiers are trained from scratch here; --base and --lora-rank fine-tune a diffusers "
                            "pipeline (drop them)")
        require_images(dataset, "classifiers")
        options = dict(model_options or {})
        if kind == "auto":
            kind = "factory" if "factory" in options else AUTO_KIND
        if kind == "factory" and "factory" not in options:
            raise UserError("--model factory needs the function that builds the model: --model-options "
                            "'{\"factory\": \"package.module:function\", \"kwargs\": {...}}'")
        label, classes = label_of(dataset, options.get("label"))
        config = default_model_config(kind, channels=dataset.channels, size=dataset.size, label=label,
                                      classes=classes, options=options)
        check_logits(build_model(config), config)
        return config

    def train_config(self, values: dict | None) -> TrainConfig:
        return TrainConfig.from_dict(values)

    def train(self, model_config: dict, dataset, train_config, ids=None, progress: bool = True, resume=None):
        return train(model_config, dataset, train_config, ids=ids, progress=progress, resume=resume)

    # ------------------------------------------------------------------ labels
    def classes(self, model_config: dict) -> list[str]:
        return [str(c) for c in model_config["classes"]]

    def relabelled(self, model_config: dict, dataset, ids, labels) -> ImageDataset:
        """A copy of `dataset` (images shared) whose examples `ids` carry the classes of `labels` (class indices) as
        their label attribute; the other examples keep theirs."""
        classes = self.classes(model_config)
        labels = np.asarray(labels, dtype=np.int64)
        rows = dataset.index_of(ids)
        if labels.shape != rows.shape or (len(labels) and (labels.min() < 0 or labels.max() >= len(classes))):
            raise UserError(f"need one class index in 0..{len(classes) - 1} per id, got {labels.shape[0]} labels "
                            f"for {len(rows)} ids")
        metadata = [dict(m) for m in dataset.metadata]
        for r, y in zip(rows.tolist(), labels.tolist()):
            metadata[r][model_config["label"]] = classes[y]
        return ImageDataset(name=dataset.name, images=dataset.images, ids=dataset.ids.copy(), metadata=metadata,
                            attributes={k: list(v) for k, v in dataset.attributes.items()})

    # ------------------------------------------------------------------ evaluation
    def outputs(self, checkpoint: Checkpoint, examples: Examples, grid: OutputGrid) -> np.ndarray:
        """Each query's margin z_y − logsumexp_{c≠y} z_c under the checkpoint's model (the grid has no draws to
        average over: the output is deterministic)."""
        return margins(checkpoint.model, examples.images, examples.cond)
