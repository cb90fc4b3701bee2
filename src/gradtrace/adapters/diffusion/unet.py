"""One wrapper around the diffusers UNets so the rest of gradtrace never cares which one it is.

`DiffusionModel.forward(x, t, cond)` predicts the noise ε. It is written to run under
`torch.func.functional_call` + `torch.func.vmap(torch.func.grad(...))`: no in-place ops on inputs, no
`.item()`, no control flow that depends on tensor values.

Conditioning: `cond[b, a]` is the index of the value of attribute `a`, or -1 for that attribute's
learned null token. Each attribute has a table of len(values)+1 vectors (the last one is the null
token, parameter `cond_embed.<attr>`) and a learned position vector (`cond_pos.<attr>`); their sums,
one token per attribute, are the cross-attention context (B, A, cross_attention_dim).
"""
from __future__ import annotations

import copy

import numpy as np
import torch
from diffusers import DDPMScheduler, UNet2DConditionModel, UNet2DModel
from diffusers.models.attention_processor import Attention, AttnProcessor
from torch import nn
from torch.nn import functional as F

from gradtrace.adapters.diffusion.configs import check_model_config, validate_attributes
from gradtrace.errors import UserError


class DiffusionModel(nn.Module):
    """ε-prediction UNet (diffusers) with optional attribute-token conditioning."""

    def __init__(self, model_config: dict):
        super().__init__()
        check_model_config(model_config)
        self.config: dict = copy.deepcopy(model_config)
        self.conditional: bool = model_config["kind"] == "conditional"
        self.attribute_values: dict[str, list[str]] = validate_attributes(model_config["attributes"])
        self.attribute_names: list[str] = list(self.attribute_values)
        unet_kwargs = copy.deepcopy(model_config["unet"])
        try:
            if self.conditional:
                self.unet = UNet2DConditionModel(**unet_kwargs)
            else:
                self.unet = UNet2DModel(**unet_kwargs)
        except (TypeError, ValueError) as exc:
            raise UserError(f"model config 'unet' is not valid for diffusers: {exc}")
        use_vmap_friendly_attention(self.unet)
        if self.conditional:
            dim = int(unet_kwargs["cross_attention_dim"])
            self.cond_embed = nn.ParameterDict({
                name: nn.Parameter(torch.randn(len(values) + 1, dim))
                for name, values in self.attribute_values.items()})
            self.cond_pos = nn.ParameterDict({
                name: nn.Parameter(torch.randn(dim)) for name in self.attribute_names})
        # Set by train(): the ids trained on (None = all; also restored by load_checkpoint) and a log
        # (per-step losses, wall time, ms/step, resolved train config).
        self.train_ids: np.ndarray | None = None
        self.train_log: dict | None = None

    @property
    def channels(self) -> int:
        return int(self.config["channels"])

    @property
    def size(self) -> int:
        return int(self.config["size"])

    @property
    def num_attributes(self) -> int:
        return len(self.attribute_names)

    def null_cond(self, batch: int, device: torch.device | None = None) -> torch.Tensor | None:
        """All-null conditioning codes (batch, A), or None for an unconditional model."""
        if not self.conditional:
            return None
        return torch.full((batch, self.num_attributes), -1, dtype=torch.long, device=device)

    def encode_cond(self, cond: torch.Tensor | None, batch: int) -> torch.Tensor:
        """Attribute codes (B, A) with -1 = null -> cross-attention context (B, A, D)."""
        tokens = []
        for a, name in enumerate(self.attribute_names):
            table = self.cond_embed[name]
            null_index = table.shape[0] - 1
            if cond is None:
                idx = torch.full((batch,), null_index, dtype=torch.long, device=table.device)
            else:
                col = cond[:, a]
                idx = torch.where(col < 0, torch.full_like(col, null_index), col)
            tokens.append(F.embedding(idx, table) + self.cond_pos[name])
        return torch.stack(tokens, dim=1)

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        """Predict ε for noisy images x (B, C, H, W) at timesteps t (B,); cond (B, A) long or None."""
        if not self.conditional:
            return self.unet(x, t, return_dict=False)[0]
        if cond is not None and (cond.dim() != 2 or cond.shape[1] != self.num_attributes):
            raise UserError(f"cond must have shape (batch, {self.num_attributes}) for attributes "
                            f"{self.attribute_names}, got {tuple(cond.shape)}")
        context = self.encode_cond(cond, x.shape[0])
        return self.unet(x, t, encoder_hidden_states=context, return_dict=False)[0]


def use_vmap_friendly_attention(unet: nn.Module) -> None:
    """Replace the attention processors by the plain (bmm + softmax) one with a contiguous output.

    Why: torch.func has no batching rule for CPU scaled_dot_product_attention (it falls back to a slow
    per-example loop, ~10x slower per-example gradients), and the 2.0 processor returns a
    channels-last view that group_norm cannot query under vmap. Training speed is the same.
    """
    for module in unet.modules():
        if isinstance(module, Attention):
            module.set_processor(ContiguousAttnProcessor())


class ContiguousAttnProcessor(AttnProcessor):
    """diffusers' plain attention processor, returning a contiguous tensor (safe under torch.func.vmap)."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                 temb=None, *args, **kwargs):
        out = super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, temb,
                               *args, **kwargs)
        return out.contiguous()


def build_model(model_config: dict, seed: int = 0) -> DiffusionModel:
    """Build a DiffusionModel with parameters initialised deterministically from `seed`.

    The global torch RNG is used only inside a forked state, so callers' RNG streams are untouched.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        model = DiffusionModel(model_config)
    return model


def make_scheduler(model_config: dict):
    """The diffusers DDPMScheduler of a model config (the training noise schedule)."""
    sched = model_config.get("scheduler") if isinstance(model_config, dict) else None
    if not isinstance(sched, dict):
        raise UserError("model config lacks a 'scheduler' dict; build it with default_model_config()")
    try:
        return DDPMScheduler(**sched)
    except (TypeError, ValueError, NotImplementedError) as exc:
        raise UserError(f"model config 'scheduler' is not valid for diffusers DDPMScheduler: {exc}")
