"""A user's diffusers text-to-image pipeline, optionally fine-tuned with LoRA, as a model adapter (`diffusers`).

Checkpoints are either a pipeline folder (Stable-Diffusion layout, `save_pretrained`: features cover the whole
UNet) or a gradtrace fine-tune folder: diffusers' standard `pytorch_lora_weights.safetensors` beside a
manifest naming its base pipeline and that base's fingerprint (features cover the LoRA factors only). Examples
are VAE latents of captioned images (the Hugging Face "text" column; cached by the VAE's fingerprint) with the
tokens of their caption as conditioning; generated queries keep their prompt. The measurement, the `block`
preset and the LDS output are the diffusion ones, on latents.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch
from diffusers import DDIMScheduler, DDPMScheduler, StableDiffusionPipeline
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from gradtrace.adapters.base import Checkpoint, ModelAdapter, OutputGrid
from gradtrace.adapters.checkpoint import CONFIG, read_manifest, start_checkpoint, write_manifest
from gradtrace.adapters.diffusers.folder import (Components, files_state, is_pipeline_folder, load_components,
                                                text_ids)
from gradtrace.adapters.diffusers.latents import encode_latents
from gradtrace.adapters.diffusers.model import LORA_TARGETS, TextToImage
from gradtrace.adapters.diffusers.objective import TextObjective
from gradtrace.adapters.diffusers.train import FineTuneConfig, fine_tune, select_rows
from gradtrace.adapters.diffusion.groups import PRESETS, block_key
from gradtrace.adapters.diffusion.measure import MEASUREMENTS, Measurement
from gradtrace.adapters.diffusion.outputs import GridLosses
from gradtrace.data.sources import Examples, load_source
from gradtrace.errors import UserError
from gradtrace.io import atomic_write

LORA_FILE = "pytorch_lora_weights.safetensors"
KIND = "text-to-image"


class DiffusersAdapter(ModelAdapter):
    name = "diffusers"
    measurements = MEASUREMENTS
    group_presets = PRESETS
    model_kinds = (KIND,)
    output_name = "latent diffusion loss"
    output_is_loss = True

    def __init__(self):
        self._components: dict[str, Components] = {}
        self._losses = GridLosses()

    # ------------------------------------------------------------------ checkpoints
    def components(self, base) -> Components:
        """The base pipeline's parts, loaded once per process (again when its files change)."""
        key = files_state(base)
        if key not in self._components:
            self._components[key] = load_components(base)
        return self._components[key]

    def base_of(self, model_config: dict) -> Components:
        parts = self.components(model_config["base"])
        if parts.fingerprint != model_config["base_fingerprint"]:
            raise UserError(f"the base pipeline {model_config['base']} changed since this model was made "
                            "(fingerprint differs); pass the base it was trained on, or train again")
        return parts

    def build(self, model_config: dict, seed: int = 0) -> TextToImage:
        return TextToImage(self.base_of(model_config), model_config, lora_seed=seed)

    def load(self, path) -> Checkpoint:
        path = Path(path)
        if is_pipeline_folder(path):
            parts = self.components(path)
            config = {"format": "gradtrace.checkpoint", "adapter": self.name, "fingerprint": parts.fingerprint,
                      "model_config": self.pipeline_config(parts, lora_rank=None), "dataset": None,
                      "train_ids": None}
            model = TextToImage(parts, config["model_config"])
        else:
            config = read_manifest(path)
            model = self.build(config["model_config"])
            if model.config.get("lora"):
                model.load_lora_state(_read_lora(path / LORA_FILE), str(path / LORA_FILE))
            fingerprint = checkpoint_fingerprint(config["model_config"], path / LORA_FILE)
            if fingerprint != config.get("fingerprint"):
                raise UserError(f"LoRA weights in {path} do not match the fingerprint in its {CONFIG}; the files "
                                "were modified or mixed, train again")
        model.eval()
        model.train_ids = None if config.get("train_ids") is None else np.asarray(config["train_ids"], np.int64)
        return Checkpoint(model=model, config=config, fingerprint=config["fingerprint"], path=path,
                          extras={"scheduler": model.components.scheduler})

    def save(self, path, model: TextToImage, *, train_config, dataset_info, train_ids=None, extra=None) -> Path:
        path = start_checkpoint(path)
        with atomic_write(path / LORA_FILE, suffix=".tmp") as tmp:
            save_file(model.lora_state(), str(tmp), metadata={"format": "pt"})
        fingerprint = checkpoint_fingerprint(model.config, path / LORA_FILE)
        return write_manifest(path, model, fingerprint=fingerprint, train_config=train_config,
                              dataset_info=dataset_info, train_ids=train_ids, extra=extra, adapter=self.name)

    # ------------------------------------------------------------------ groups and measurements
    def group_key(self, preset: str):
        return block_key if preset == "block" else None

    def objective(self, checkpoint: Checkpoint, measurement: str, repeats: int, seed: int) -> TextObjective:
        scheduler = checkpoint.extras["scheduler"]
        m = Measurement.create(measurement, repeats, scheduler.config.num_train_timesteps, seed)
        return TextObjective(m, scheduler.alphas_cumprod, checkpoint.model.encode_text)

    # ------------------------------------------------------------------ data
    def examples(self, model_config: dict, source: dict, ids=None, cache_dir=None) -> Examples:
        ex = load_source(source, ids=ids)
        if ex.texts is None:
            where = "the samples have no prompts; sample with --prompt" if source.get("kind") == "samples" else \
                "its metadata.jsonl has no 'text' column; add one caption per image"
            raise UserError(f"a text-to-image model needs a caption per example, but {where}")
        parts = self.base_of(model_config)
        latents = encode_latents(parts.vae, parts.vae_fingerprint, ex.images, int(model_config["resolution"]),
                                 cache_dir)
        return Examples(images=latents, ids=ex.ids, cond=text_ids(parts, ex.texts).numpy(), captions=ex.captions,
                        source=ex.source, texts=ex.texts)

    # ------------------------------------------------------------------ training
    def pipeline_config(self, parts: Components, lora_rank: int | None) -> dict:
        scale = 2 ** (len(parts.vae.config.block_out_channels) - 1)
        lora = None if lora_rank is None else {"rank": int(lora_rank), "alpha": float(lora_rank),
                                               "targets": list(LORA_TARGETS)}
        return {"kind": KIND, "base": str(parts.path), "base_fingerprint": parts.fingerprint, "lora": lora,
                "resolution": int(parts.unet.config.sample_size) * scale}

    def default_model_config(self, dataset, kind: str = "auto", base=None, lora_rank=None) -> dict:
        if base is None or lora_rank is None:
            raise UserError("fine-tuning a pipeline trains LoRA adapters: pass --base PIPELINE and --lora-rank R")
        if not all(isinstance(m.get("text"), str) for m in dataset.metadata):
            raise UserError(f"dataset '{dataset.name}' has no 'text' caption per image; add a text column to "
                            "metadata.jsonl")
        return self.pipeline_config(self.components(base), lora_rank)

    def train_config(self, values: dict | None) -> FineTuneConfig:
        return FineTuneConfig.from_dict(values)

    def train(self, model_config: dict, dataset, train_config: FineTuneConfig, ids=None, progress: bool = True):
        model = self.build(model_config, seed=train_config.seed)
        parts = model.components
        rows = select_rows(dataset, ids)
        texts = [dataset.metadata[int(r)]["text"] for r in rows]
        latents = encode_latents(parts.vae, parts.vae_fingerprint, dataset.images[rows], model_config["resolution"])
        states = model.encode_text(text_ids(parts, texts))
        empty = model.encode_text(text_ids(parts, [""]))
        fine_tune(model, latents, states, empty, parts.scheduler.alphas_cumprod, train_config, progress=progress)
        model.train_ids = None if ids is None else np.sort(np.asarray(ids, dtype=np.int64))
        return model

    # ------------------------------------------------------------------ evaluation and queries
    def outputs(self, checkpoint: Checkpoint, examples: Examples, grid: OutputGrid) -> np.ndarray:
        states = checkpoint.model.encode_text(torch.as_tensor(examples.cond, dtype=torch.long))
        return self._losses(checkpoint.model, checkpoint.extras["scheduler"], examples.images, examples.ids, states,
                            grid)

    def sample(self, checkpoint: Checkpoint, num: int, *, prompts=None, guidance_scale: float = 1.0,
               steps: int = 50, sampler: str = "ddim", seed: int = 0, eta: float = 1.0, progress: bool = True,
               attributes=None):
        """(images (num, 3, H, W) in [-1, 1], None) for `prompts` (one per image) with the checkpoint's model."""
        if attributes:
            raise UserError("a text-to-image model is conditioned on prompts; pass --prompt or --prompts, not --attr")
        if not prompts or len(prompts) != num:
            raise UserError("a text-to-image model needs one prompt per image; pass --prompt TEXT or --prompts FILE")
        model, parts = checkpoint.model, checkpoint.model.components
        cls = DDIMScheduler if sampler == "ddim" else DDPMScheduler
        pipe = StableDiffusionPipeline(vae=parts.vae, text_encoder=parts.text_encoder, tokenizer=parts.tokenizer,
                                       unet=model.unet, scheduler=cls.from_config(parts.scheduler.config),
                                       safety_checker=None, feature_extractor=None, requires_safety_checker=False)
        pipe.set_progress_bar_config(disable=not progress)
        res = int(model.config["resolution"])
        extra = {"eta": eta} if sampler == "ddim" else {}
        with torch.no_grad():
            out = pipe(list(prompts), height=res, width=res, num_inference_steps=steps, guidance_scale=guidance_scale,
                       generator=torch.Generator().manual_seed(int(seed)), output_type="pt", **extra).images
        return (out.to(torch.float32) * 2.0 - 1.0).clamp(-1.0, 1.0), None


def checkpoint_fingerprint(model_config: dict, lora_file: Path) -> str:
    """A fine-tune's fingerprint: its base pipeline's and the LoRA weights file's bytes."""
    h = hashlib.sha256(model_config["base_fingerprint"].encode())
    if model_config.get("lora"):
        if not lora_file.exists():
            raise UserError(f"LoRA weights missing: {lora_file}; train again")
        h.update(lora_file.read_bytes())
    return h.hexdigest()


def _read_lora(path: Path) -> dict:
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise UserError(f"LoRA weights are corrupt: {path} ({exc}); train again")
