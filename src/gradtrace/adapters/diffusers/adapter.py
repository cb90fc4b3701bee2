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
from diffusers import DDIMPipeline, DDPMPipeline, DDPMScheduler, StableDiffusionPipeline
from safetensors import SafetensorError
from safetensors.torch import load_file, save

from gradtrace.adapters.base import Checkpoint, ModelAdapter, OutputGrid
from gradtrace.adapters.checkpoint import CONFIG, read_manifest, start_checkpoint, write_manifest
from gradtrace.adapters.diffusers.folder import (
    Components,
    PixelComponents,
    files_state,
    is_bare_unet,
    is_pipeline_folder,
    is_text_to_image,
    load_components,
    load_pixel_components,
    text_ids,
)
from gradtrace.adapters.diffusers.latents import encode_latents, fit_resolution
from gradtrace.adapters.diffusers.model import LORA_TARGETS, PixelDiffusion, TextToImage, lora_shape, peft_format
from gradtrace.adapters.diffusers.objective import TextObjective
from gradtrace.adapters.diffusers.train import FineTuneConfig, fine_tune
from gradtrace.adapters.diffusion.ddim import StableDDIMScheduler
from gradtrace.adapters.diffusion.groups import PRESETS, block_key
from gradtrace.adapters.diffusion.measure import MEASUREMENTS, DiffusionObjective, Measurement
from gradtrace.adapters.diffusion.outputs import GridLosses
from gradtrace.adapters.loop import select_rows
from gradtrace.data.registry import family_caption
from gradtrace.data.sources import Examples, load_source, open_dataset
from gradtrace.errors import UserError
from gradtrace.io import write_bytes_atomic

LORA_FILE = "pytorch_lora_weights.safetensors"
KIND = "text-to-image"
PIXEL = "unconditional"


class DiffusersAdapter(ModelAdapter):
    name = "diffusers"
    measurements = MEASUREMENTS
    group_presets = PRESETS
    model_kinds = (KIND, PIXEL)
    output_name = "latent diffusion loss"
    output_is_loss = True
    train_devices = ("cpu", "cuda")
    train_precisions = ("float32", "bfloat16")

    def __init__(self):
        self._components: dict[str, Components] = {}
        self._losses = GridLosses()

    # ------------------------------------------------------------------ checkpoints
    def components(self, base) -> Components:
        """The base pipeline's parts, loaded once per process (again when its files change)."""
        key = files_state(base)
        if key not in self._components:
            self._components[key] = load_components(base) if is_text_to_image(base) else load_pixel_components(base)
        return self._components[key]

    def base_of(self, model_config: dict) -> Components:
        parts = self.components(model_config["base"])
        if parts.fingerprint != model_config["base_fingerprint"]:
            raise UserError(f"the base pipeline {model_config['base']} changed since this model was made "
                            "(fingerprint differs); pass the base it was trained on, or train again")
        return parts

    def build(self, model_config: dict, seed: int = 0):
        if model_config["kind"] == PIXEL:
            return PixelDiffusion(self.base_of(model_config), model_config)
        return TextToImage(self.base_of(model_config), model_config, lora_seed=seed)

    def load(self, path) -> Checkpoint:
        path = Path(path)
        if is_pipeline_folder(path) or is_bare_unet(path):
            parts = self.components(path)
            config = {"format": "gradtrace.checkpoint", "adapter": self.name, "fingerprint": parts.fingerprint,
                      "model_config": self.pipeline_config(parts, lora_rank=None), "dataset": None,
                      "train_ids": None}
            model = self.build(config["model_config"])
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
        write_bytes_atomic(path / LORA_FILE, save(model.lora_state(), metadata={"format": "pt"}))
        fingerprint = checkpoint_fingerprint(model.config, path / LORA_FILE)
        return write_manifest(path, model, fingerprint=fingerprint, train_config=train_config,
                              dataset_info=dataset_info, train_ids=train_ids, extra=extra, adapter=self.name)

    def import_lora(self, base, lora, out, *, alpha: float | None = None, extra: dict | None = None) -> Path:
        """A fine-tune folder gradtrace loads, from UNet LoRA weights saved by diffusers (its training scripts'
        `pytorch_lora_weights.safetensors`, in either key format) and the base pipeline they were trained on."""
        lora = Path(lora)
        file = lora / LORA_FILE if lora.is_dir() else lora
        if not file.is_file():
            raise UserError(f"no LoRA weights at {file}; pass the folder diffusers saved them in (with {LORA_FILE}) "
                            "or the .safetensors file")
        if not is_text_to_image(base):
            raise UserError(f"{base} is not a text-to-image pipeline folder; pass the base the LoRA was trained on")
        parts = self.components(base)
        state = peft_format(_read_lora(file))
        unet_state = {k: v for k, v in state.items() if k.startswith("unet.")}
        rank, targets = lora_shape(unet_state, str(file))
        config = self.pipeline_config(parts, rank)
        config["lora"].update(alpha=float(rank if alpha is None else alpha), targets=targets)
        model = TextToImage(parts, config)
        model.load_lora_state(state, str(file))
        return self.save(out, model, train_config=None, dataset_info=None,
                         extra={"imported_from": str(file.resolve()), **(extra or {})})

    # ------------------------------------------------------------------ groups and measurements
    def group_key(self, preset: str):
        return block_key if preset == "block" else None

    def objective(self, checkpoint: Checkpoint, measurement: str, repeats: int, seed: int) -> TextObjective:
        scheduler = checkpoint.extras["scheduler"]
        m = Measurement.create(measurement, repeats, scheduler.config.num_train_timesteps, seed)
        if checkpoint.model_config["kind"] == PIXEL:
            return DiffusionObjective(m, scheduler.alphas_cumprod)
        return TextObjective(m, scheduler.alphas_cumprod, checkpoint.model.encode_text)

    # ------------------------------------------------------------------ data
    def examples(self, model_config: dict, source: dict, ids=None, cache_dir=None) -> Examples:
        ex = load_source(source, ids=ids)
        if model_config["kind"] == PIXEL:
            images = fit_resolution(ex.images, int(model_config["resolution"]))
            if images.shape[1] != model_config["channels"]:
                raise UserError(f"images have {images.shape[1]} channels but the model takes "
                                f"{model_config['channels']}; pass matching data")
            return Examples(images=images, ids=ex.ids, cond=None, captions=ex.captions, source=ex.source)
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
    def pipeline_config(self, parts: Components | PixelComponents, lora_rank: int | None) -> dict:
        if isinstance(parts, PixelComponents):
            return {"kind": PIXEL, "base": str(parts.path), "base_fingerprint": parts.fingerprint, "lora": None,
                    "resolution": int(parts.unet.config.sample_size), "channels": int(parts.unet.config.in_channels)}
        scale = 2 ** (len(parts.vae.config.block_out_channels) - 1)
        lora = None if lora_rank is None else {"rank": int(lora_rank), "alpha": float(lora_rank),
                                               "targets": list(LORA_TARGETS)}
        return {"kind": KIND, "base": str(parts.path), "base_fingerprint": parts.fingerprint, "lora": lora,
                "resolution": int(parts.unet.config.sample_size) * scale}

    def default_model_config(self, dataset, kind: str = "auto", base=None, lora_rank=None, model_options=None) -> dict:
        if model_options is not None:
            raise UserError("--model-options sets a classifier's architecture; a pipeline fine-tune takes --base and "
                            "--lora-rank (drop --model-options)")
        if base is not None and not Path(base).is_dir():
            raise UserError(f"--base {base}: no such folder; pass a diffusers text-to-image pipeline folder "
                            "(save_pretrained) or a transformers causal-LM folder")
        if base is not None and not is_text_to_image(base):
            raise UserError(f"{base} is not a text-to-image pipeline; gradtrace fine-tunes text-to-image pipelines "
                            "with LoRA (attribute an unconditional one with --checkpoint)")
        if base is None or lora_rank is None:
            raise UserError("fine-tuning a pipeline trains LoRA adapters: pass --base PIPELINE and --lora-rank R")
        if not all(isinstance(m.get("text"), str) for m in dataset.metadata):
            raise UserError(f"dataset '{dataset.name}' has no 'text' caption per image; add a text column to "
                            "metadata.jsonl")
        return self.pipeline_config(self.components(base), lora_rank)

    def train_config(self, values: dict | None) -> FineTuneConfig:
        return FineTuneConfig.from_dict(values)

    def train(self, model_config: dict, dataset, train_config: FineTuneConfig, ids=None, progress: bool = True,
              device: torch.device | None = None, resume=None):
        model = self.build(model_config, seed=train_config.seed)
        parts = model.components
        rows = select_rows(dataset, ids)
        texts = [dataset.metadata[int(r)]["text"] for r in rows]
        latents = encode_latents(parts.vae, parts.vae_fingerprint, dataset.images[rows], model_config["resolution"])
        states = model.encode_text(text_ids(parts, texts))
        empty = model.encode_text(text_ids(parts, [""]))
        fine_tune(model, latents, states, empty, parts.scheduler.alphas_cumprod, train_config, progress=progress,
                  device=device, resume=resume)
        model.train_ids = None if ids is None else np.sort(np.asarray(ids, dtype=np.int64))
        return model

    # ------------------------------------------------------------------ evaluation and queries
    def outputs(self, checkpoint: Checkpoint, examples: Examples, grid: OutputGrid) -> np.ndarray:
        if checkpoint.model_config["kind"] == PIXEL:
            return self._losses(checkpoint.model, checkpoint.extras["scheduler"], examples.images, examples.ids,
                                None, grid)
        states = checkpoint.model.encode_text(torch.as_tensor(examples.cond, dtype=torch.long))
        return self._losses(checkpoint.model, checkpoint.extras["scheduler"], examples.images, examples.ids, states,
                            grid)

    def query_request(self, checkpoint: Checkpoint, num: int, *, aspect: str | None, seed: int,
                      prompts: list[str] | None = None) -> dict:
        """Prompts of `num` generated queries: the user's (cycled), else training captions drawn at random, or with
        `aspect` families of whole captions: each value of the aspect (balanced) with the other factors drawn at
        random ("families": the value of each). Captions naming only the aspect ("a shape on a noise background")
        were rendered poorly: the classifier read the asked background off 25-58% of such images (chance 25%),
        against 90-100% for whole captions (docs/benchmarks.md, "Aspect weights from prompt families")."""
        if checkpoint.model_config["kind"] == PIXEL:
            if prompts or aspect is not None:
                raise UserError("an unconditional model has neither prompts nor aspects; drop --prompts/--aspect")
            return {}
        if prompts:
            return {"texts": [prompts[i % len(prompts)] for i in range(num)]}
        dataset = checkpoint.config.get("dataset") or {}
        if not dataset.get("source"):
            raise UserError(f"{checkpoint.path} records no training captions to draw prompts from; pass "
                            "--prompts FILE with one learning prompt per line")
        ds = open_dataset(dataset["source"], dataset.get("fingerprint"))
        rng = np.random.default_rng([int(seed), 7919])
        if aspect is None:
            rows = np.arange(len(ds)) if checkpoint.train_ids is None else ds.index_of(checkpoint.train_ids)
            return {"texts": [ds.metadata[int(r)]["text"] for r in rng.choice(rows, size=num)]}
        if aspect not in ds.attributes:
            raise UserError(f"unknown aspect '{aspect}': the training data's attributes are "
                            f"{', '.join(ds.attributes) or 'none'}, so no built-in prompts name it; write learning "
                            f"prompts for the {aspect} (several per value, one per line) and pass --prompts FILE "
                            f"with --aspect {aspect}")
        values = ds.attributes[aspect]
        families = [values[int(i)] for i in rng.permutation(np.arange(num) % len(values))]
        texts = [family_caption(dataset["source"]["spec"], aspect, v, rng) for v in families]
        if texts and texts[0] is None:
            raise UserError(f"no built-in prompts for '{aspect}' for {dataset['source']['spec']}; write them in a "
                            "file (several per value, one per line) and pass --prompts FILE")
        return {"texts": texts, "families": families}

    def sample(self, checkpoint: Checkpoint, num: int, *, prompts=None, guidance_scale: float = 1.0,
               steps: int = 50, sampler: str = "ddim", seed: int = 0, eta: float = 1.0, progress: bool = True,
               attributes=None):
        """(images (num, 3, H, W) in [-1, 1], None) for `prompts` (one per image) with the checkpoint's model."""
        if attributes:
            raise UserError("this model is conditioned on prompts, not attribute tokens; drop --attr")
        if checkpoint.model_config["kind"] == PIXEL:
            return self._sample_pixels(checkpoint, num, prompts, steps, sampler, seed, eta, progress), None
        if not prompts or len(prompts) != num:
            raise UserError("a text-to-image model needs one prompt per image; pass --prompt TEXT or --prompts FILE")
        model, parts = checkpoint.model, checkpoint.model.components
        cls = StableDDIMScheduler if sampler == "ddim" else DDPMScheduler
        pipe = StableDiffusionPipeline(vae=parts.vae, text_encoder=parts.text_encoder, tokenizer=parts.tokenizer,
                                       unet=model.unet, scheduler=cls.from_config(parts.scheduler.config),
                                       safety_checker=None, feature_extractor=None, requires_safety_checker=False)
        pipe.set_progress_bar_config(disable=not progress)
        pipe.to(next(model.unet.parameters()).device)
        res = int(model.config["resolution"])
        extra = {"eta": eta} if sampler == "ddim" else {}
        with torch.no_grad():
            out = pipe(list(prompts), height=res, width=res, num_inference_steps=steps, guidance_scale=guidance_scale,
                       generator=torch.Generator().manual_seed(int(seed)), output_type="pt", **extra).images
        return (out.to(torch.float32).cpu() * 2.0 - 1.0).clamp(-1.0, 1.0), None


    def _sample_pixels(self, checkpoint, num, prompts, steps, sampler, seed, eta, progress) -> torch.Tensor:
        if prompts:
            raise UserError("an unconditional model takes no prompts; drop --prompt/--prompts")
        parts = checkpoint.model.components
        if sampler == "ddim":
            scheduler = StableDDIMScheduler.from_config(parts.scheduler.config)
            pipe, extra = DDIMPipeline(unet=checkpoint.model.unet, scheduler=scheduler), {"eta": eta}
            pipe.scheduler = scheduler  # DDIMPipeline converts its scheduler to a plain DDIMScheduler
        else:
            pipe, extra = DDPMPipeline(unet=checkpoint.model.unet, scheduler=DDPMScheduler.from_config(
                parts.scheduler.config)), {}
        pipe.set_progress_bar_config(disable=not progress)
        pipe.to(next(checkpoint.model.unet.parameters()).device)
        with torch.no_grad():
            out = pipe(batch_size=num, generator=torch.Generator().manual_seed(int(seed)), num_inference_steps=steps,
                       output_type="np", **extra).images
        return (torch.from_numpy(np.ascontiguousarray(out)).permute(0, 3, 1, 2) * 2.0 - 1.0).clamp(-1.0, 1.0)


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
