"""Tiny default model configs as plain JSON-able dicts.

A model config is::

    {"kind": "unconditional" | "conditional",
     "channels": C, "size": S,
     "attributes": {name: [value, ...], ...},   # {} for unconditional
     "unet": {... diffusers UNet2DModel / UNet2DConditionModel kwargs ...},
     "scheduler": {... diffusers DDPMScheduler kwargs ...}}

Sizes were chosen so that the models train in seconds to minutes on 2 CPU cores:
the unconditional 8x8 1-channel model has 176,849 parameters, the conditional 16x16 RGB model with
three attributes ~253k (the exact count depends on the attribute vocabularies).

One named architecture is not tiny: ``ddpm-cifar10`` (`ddpm_cifar10_config`), the UNet2DModel of the standard
CIFAR-10 DDPM (Ho et al. 2020; the diffusers port ``google/ddpm-cifar10-32``) with its linear noise schedule,
35,746,307 parameters at 3x32x32 — the scale the featurization benchmarks run at. It is an unconditional model
config like the others (built from the config with random weights; nothing is downloaded).
"""
from __future__ import annotations

import copy
import re

from gradtrace.errors import UserError

KINDS = ("unconditional", "conditional")
DDPM_CIFAR10 = "ddpm-cifar10"
MODEL_CHOICES = KINDS + (DDPM_CIFAR10,)  # what --model names; ddpm-cifar10 makes an unconditional config

# The cosine ("squaredcos_cap_v2") schedule: the linear one destroys small images within the first few
# hundred timesteps, wasting most of the schedule on near-pure noise (Nichol & Dhariwal 2021). On
# sklearn digits (8x8 model, 2000 steps, lr 2e-3, 256 samples scored by a logistic-regression digit
# classifier) cosine gave mean confidence 0.945 / 0.962 (DDIM-50 / DDPM-100) vs 0.926 / 0.954 for
# linear, and samples closer to the data. "trailing" spacing starts sampling at t=999 (pure noise);
# it scored the same as "leading".
SCHEDULER_CONFIG = {
    "num_train_timesteps": 1000,
    "beta_schedule": "squaredcos_cap_v2",
    "prediction_type": "epsilon",
    "variance_type": "fixed_small",
    "clip_sample": True,
    "clip_sample_range": 1.0,
    "timestep_spacing": "trailing",
}

# One token per attribute is embedded to this width and fed to cross-attention.
CROSS_ATTENTION_DIM = 32

_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def default_scheduler_config() -> dict:
    """The diffusers DDPMScheduler kwargs every default model uses (1000 steps, cosine betas)."""
    return copy.deepcopy(SCHEDULER_CONFIG)


def unconditional_unet_config(channels: int = 1, size: int = 8) -> dict:
    """UNet2DModel kwargs: two levels (16, 32), attention at the lower resolution and in the middle."""
    return {
        "sample_size": size,
        "in_channels": channels,
        "out_channels": channels,
        "block_out_channels": [16, 32],
        "layers_per_block": 1,
        "down_block_types": ["DownBlock2D", "AttnDownBlock2D"],
        "up_block_types": ["AttnUpBlock2D", "UpBlock2D"],
        "norm_num_groups": 8,
        "attention_head_dim": 8,
    }


def conditional_unet_config(channels: int = 3, size: int = 16) -> dict:
    """UNet2DConditionModel kwargs: two levels (16, 32), cross-attention at the lower resolution and mid."""
    return {
        "sample_size": size,
        "in_channels": channels,
        "out_channels": channels,
        "block_out_channels": [16, 32],
        "layers_per_block": 1,
        "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
        "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"],
        "mid_block_type": "UNetMidBlock2DCrossAttn",
        "norm_num_groups": 8,
        "cross_attention_dim": CROSS_ATTENTION_DIM,
        "attention_head_dim": 4,  # diffusers reads this as the number of heads: 4 heads of 8
    }


def ddpm_cifar10_unet_config(channels: int = 3, size: int = 32) -> dict:
    """UNet2DModel kwargs of the CIFAR-10 DDPM (google/ddpm-cifar10-32's config.json): four levels
    (128, 256, 256, 256), two ResNet blocks per level, self-attention at 16x16 and in the middle."""
    return {
        "sample_size": size,
        "in_channels": channels,
        "out_channels": channels,
        "block_out_channels": [128, 256, 256, 256],
        "layers_per_block": 2,
        "down_block_types": ["DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"],
        "up_block_types": ["UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"],
        "attention_head_dim": None,
        "downsample_padding": 0,
        "flip_sin_to_cos": False,
        "freq_shift": 1,
        "mid_block_scale_factor": 1,
        "norm_eps": 1e-6,
        "norm_num_groups": 32,
        "act_fn": "silu",
        "center_input_sample": False,
        "time_embedding_type": "positional",
    }


def ddpm_scheduler_config() -> dict:
    """The DDPM paper's schedule (google/ddpm-cifar10-32's scheduler): 1000 linear betas 1e-4 .. 0.02."""
    return {"num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "linear",
            "prediction_type": "epsilon", "variance_type": "fixed_small", "clip_sample": True,
            "clip_sample_range": 1.0}


def ddpm_cifar10_config(channels: int = 3, size: int = 32) -> dict:
    """The `ddpm-cifar10` model config: the CIFAR-10 DDPM UNet and schedule at `channels` x `size` x `size`
    (three downsamplings: size a multiple of 8)."""
    channels, size = int(channels), int(size)
    if channels < 1:
        raise UserError(f"model channels must be >= 1, got {channels}")
    if size < 8 or size % 8:
        raise UserError(f"the {DDPM_CIFAR10} UNet downsamples three times: image size must be a multiple of 8, "
                        f"got {size}; pass --size 32")
    return {"kind": "unconditional", "channels": channels, "size": size, "attributes": {},
            "unet": ddpm_cifar10_unet_config(channels, size), "scheduler": ddpm_scheduler_config()}


def default_model_config(kind: str, *, channels: int, size: int,
                         attributes: dict[str, list[str]] | None = None) -> dict:
    """The default config for `kind` ("unconditional", "conditional" or "ddpm-cifar10", the latter an unconditional
    config of the CIFAR-10 DDPM's UNet) at `channels` x `size` x `size`.

    `attributes` (name -> ordered vocabulary) is required for "conditional" and ignored for
    "unconditional" (an unconditional model has no tokens).
    """
    if kind == DDPM_CIFAR10:
        return ddpm_cifar10_config(channels, size)
    if kind not in KINDS:
        raise UserError(f"unknown model kind {kind!r}; use one of {', '.join(MODEL_CHOICES)}")
    channels, size = int(channels), int(size)
    if channels < 1:
        raise UserError(f"model channels must be >= 1, got {channels}")
    if size < 2 or size % 2:
        raise UserError(f"image size must be an even number >= 2 for the default UNet, got {size}; "
                        "resize the images")
    if kind == "unconditional":
        unet, attrs = unconditional_unet_config(channels, size), {}
    else:
        attrs = validate_attributes(attributes)
        if not attrs:
            raise UserError("a conditional model needs at least one attribute; use a dataset with "
                            "attributes or kind='unconditional'")
        unet = conditional_unet_config(channels, size)
    return {"kind": kind, "channels": channels, "size": size, "attributes": attrs,
            "unet": unet, "scheduler": default_scheduler_config()}


def validate_attributes(attributes: dict | None) -> dict[str, list[str]]:
    """Check attribute names (identifiers) and vocabularies (non-empty, unique strings); return a copy."""
    if attributes is None:
        return {}
    if not isinstance(attributes, dict):
        raise UserError(f"attributes must be a dict name -> list of values, got {type(attributes).__name__}")
    out: dict[str, list[str]] = {}
    for name, values in attributes.items():
        if not isinstance(name, str) or not _NAME.match(name):
            raise UserError(f"attribute name {name!r} is not a plain identifier; rename it "
                            "(letters, digits, underscore)")
        values = [str(v) for v in values]
        if not values:
            raise UserError(f"attribute {name!r} has no values; give it a non-empty vocabulary")
        if len(set(values)) != len(values):
            raise UserError(f"attribute {name!r} has duplicate values; make its vocabulary unique")
        out[name] = values
    return out


def check_model_config(config: dict) -> None:
    """Refuse a config that build_model cannot use, with a one-line reason."""
    if not isinstance(config, dict):
        raise UserError(f"model config must be a dict, got {type(config).__name__}")
    missing = [k for k in ("kind", "channels", "size", "attributes", "unet", "scheduler") if k not in config]
    if missing:
        raise UserError(f"model config lacks {', '.join(missing)}; build it with default_model_config()")
    if config["kind"] not in KINDS:
        raise UserError(f"unknown model kind {config['kind']!r}; use one of {', '.join(KINDS)}")
    if config["kind"] == "conditional" and not config["attributes"]:
        raise UserError("conditional model config has no attributes; add them or use kind='unconditional'")
