"""A user's diffusers pipeline folder (saved with `save_pretrained`): what it holds, its fingerprint, its parts.

A Stable-Diffusion-layout folder has `model_index.json` and the subfolders unet, vae, text_encoder,
tokenizer and scheduler (any pipeline class whose model_index names those components is read the same way,
so SD 1.x/2.x folders and the small pipelines of `gradtrace build-pipeline` load alike). An unconditional
pipeline (`DDPMPipeline`, `DDIMPipeline`: unet and scheduler) or a bare `UNet2DModel` folder with its
`scheduler_config.json` beside its `config.json` is read as a pixel-space diffusion model. The fingerprint is
a sha256 over the bytes of every weights file (and the configs), so it names exactly these weights.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel, UNet2DModel
from transformers import AutoTokenizer, CLIPTextModel

from gradtrace.adapters.checkpoint import json_without_keys
from gradtrace.errors import UserError
from gradtrace.io import read_json

TEXT_TO_IMAGE = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
WEIGHT_SUFFIXES = (".safetensors", ".bin")
CONFIG_NAMES = ("config.json", "scheduler_config.json", "model_index.json")


@dataclass
class Components:
    """The loaded parts of a text-to-image pipeline (all in eval mode, frozen)."""

    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text_encoder: CLIPTextModel
    tokenizer: object
    scheduler: DDPMScheduler
    fingerprint: str
    vae_fingerprint: str
    path: Path


@dataclass
class PixelComponents:
    """The loaded parts of an unconditional diffusion pipeline (or a bare UNet2DModel with its scheduler)."""

    unet: UNet2DModel
    scheduler: DDPMScheduler
    fingerprint: str
    path: Path


def is_pipeline_folder(path) -> bool:
    return (Path(path) / "model_index.json").is_file()


def is_bare_unet(path) -> bool:
    """A UNet2DModel folder with the scheduler config beside it."""
    root = Path(path)
    if not ((root / "config.json").is_file() and (root / "scheduler_config.json").is_file()):
        return False
    config = read_json(root / "config.json", "model config")
    return isinstance(config, dict) and config.get("_class_name") == "UNet2DModel"


def is_text_to_image(path) -> bool:
    return is_pipeline_folder(path) and "text_encoder" in read_json(Path(path) / "model_index.json",
                                                                    "pipeline index")


def load_pixel_components(path) -> PixelComponents:
    """An unconditional pipeline folder (unet + scheduler) or a bare UNet2DModel folder, frozen, eval mode."""
    root = Path(path).resolve()
    if is_bare_unet(root):
        unet_dir, scheduler_dir, parts = root, root, (".",)
    elif is_pipeline_folder(root):
        index = read_json(root / "model_index.json", "pipeline index")
        missing = [c for c in ("unet", "scheduler") if c not in index or not (root / c).is_dir()]
        if missing:
            raise UserError(f"pipeline {root} ({index.get('_class_name', '?')}) lacks {', '.join(missing)}; an "
                            "unconditional pipeline needs unet and scheduler")
        unet_dir, scheduler_dir, parts = root / "unet", root / "scheduler", ("unet", "scheduler")
    else:
        raise UserError(f"{root} is neither a diffusers pipeline (model_index.json) nor a UNet2DModel folder with "
                        "scheduler_config.json; pass a folder saved with save_pretrained")
    if not safe_weights(unet_dir):
        raise UserError(f"{unet_dir} has no *.safetensors weights{PICKLE_NOTE}; save the model with save_pretrained "
                        "(safe_serialization=True)")
    try:
        unet = UNet2DModel.from_pretrained(unet_dir, use_safetensors=True)  # never a pickle
        scheduler = DDPMScheduler.from_pretrained(scheduler_dir)
    except (OSError, ValueError, TypeError, KeyError) as exc:
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise UserError(f"cannot load the diffusion model in {root} ({first}); pass a folder saved with "
                        "save_pretrained")
    unet.eval()
    unet.requires_grad_(False)
    return PixelComponents(unet=unet, scheduler=scheduler, fingerprint=files_fingerprint(root, parts), path=root)


def check_text_to_image(path) -> Path:
    """The folder as a Path, refusing anything that is not a text-to-image pipeline with one line."""
    root = Path(path)
    if not root.is_dir():
        raise UserError(f"pipeline folder not found: {root}; pass a folder saved with save_pretrained")
    if not is_pipeline_folder(root):
        raise UserError(f"{root} has no model_index.json; pass a diffusers pipeline folder (save_pretrained)")
    index = read_json(root / "model_index.json", "pipeline index")
    missing = [c for c in TEXT_TO_IMAGE if c not in index or not (root / c).is_dir()]
    if missing:
        raise UserError(f"pipeline {root} ({index.get('_class_name', '?')}) lacks {', '.join(missing)}; a "
                        f"text-to-image pipeline needs {', '.join(TEXT_TO_IMAGE)}")
    for part in ("unet", "vae", "text_encoder"):
        if not safe_weights(root / part):
            raise UserError(f"pipeline {root} has no *.safetensors weights in {part}/{PICKLE_NOTE}; save it again "
                            "with save_pretrained (safe_serialization=True)")
    return root


def weight_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES))

LOAD_KEYS = ("_name_or_path",)  # config keys that say where a model was loaded from


PICKLE_NOTE = " (pickled *.bin/*.pt weights are never loaded: unpickling can run code)"


def safe_weights(folder: Path) -> list[Path]:
    """The *.safetensors weights of `folder`: the only weights gradtrace loads (`use_safetensors=True`)."""
    return [p for p in weight_files(folder) if p.name.endswith(".safetensors")]


def files_fingerprint(root: Path, parts) -> str:
    """sha256 over (relative name, bytes) of the weights and config files of `parts` (sub-folder names)."""
    h = hashlib.sha256(b"gradtrace.diffusers-files.v1\n")
    for part in parts:
        folder = root / part
        files = weight_files(folder) + sorted(p for p in folder.iterdir() if p.name in CONFIG_NAMES)
        for f in files:
            h.update(f"{part}/{f.name}\n".encode())
            if f.name in CONFIG_NAMES:
                h.update(_config_bytes(f))
                continue
            with open(f, "rb") as fh:
                for block in iter(lambda: fh.read(1 << 20), b""):
                    h.update(block)
    return h.hexdigest()


def _config_bytes(file: Path) -> bytes:
    """A config file's bytes, without `_name_or_path` (where it was loaded from, which diffusers adds when a loaded
    pipeline is saved again), written as diffusers and transformers write it, so a pipeline saved from memory has
    the fingerprint of the folder it was loaded from."""
    return json_without_keys(file.read_bytes(), LOAD_KEYS)


def files_state(path) -> str:
    """The folder's path and the size and modification time of every file in it (a cheap change check)."""
    root = Path(path).resolve()
    files = sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else []
    return f"{root}|" + "|".join(f"{p.relative_to(root)}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in files)


def load_components(path) -> Components:
    """Load unet, vae, text encoder, tokenizer and the training noise scheduler of a pipeline folder."""
    root = check_text_to_image(path).resolve()
    try:
        unet = UNet2DConditionModel.from_pretrained(root, subfolder="unet", use_safetensors=True)  # never a pickle
        vae = AutoencoderKL.from_pretrained(root, subfolder="vae", use_safetensors=True)
        text_encoder = CLIPTextModel.from_pretrained(root, subfolder="text_encoder", use_safetensors=True)
        tokenizer = AutoTokenizer.from_pretrained(root / "tokenizer")
        scheduler = DDPMScheduler.from_pretrained(root, subfolder="scheduler")
    except (OSError, ValueError, TypeError, KeyError) as exc:
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise UserError(f"cannot load the pipeline in {root} ({first}); pass a folder saved with save_pretrained")
    for module in (unet, vae, text_encoder):
        module.eval()
        module.requires_grad_(False)
    return Components(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler,
                      fingerprint=files_fingerprint(root, TEXT_TO_IMAGE[:3] + ("scheduler",)),
                      vae_fingerprint=files_fingerprint(root, ("vae",)), path=root)


def text_ids(components: Components, texts: list[str]) -> torch.Tensor:
    """(B, L) long token ids, padded to the text encoder's length (77 for CLIP)."""
    length = min(int(components.tokenizer.model_max_length),
                 int(components.text_encoder.config.max_position_embeddings))
    return components.tokenizer(list(texts), padding="max_length", truncation=True, max_length=length,
                                return_tensors="pt").input_ids
