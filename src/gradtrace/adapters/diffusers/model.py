"""The text-to-image model as gradtrace differentiates it: the UNet (optionally with LoRA adapters) on VAE
latents, conditioned on text-encoder states; the VAE and the text encoder are frozen parts of it.

    model(latents_t, t, encoder_hidden_states) → ε prediction       (what the featurizers call)
    model.encode_text(token_ids) → encoder_hidden_states           (outside the differentiated function)

With LoRA, only the LoRA factors are trainable (so groups, features and training cover them alone, without
any full-UNet per-example gradient); without LoRA, the whole UNet is.
"""
from __future__ import annotations

import copy

import torch
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from torch import nn

from gradtrace.adapters.diffusers.folder import Components, PixelComponents
from gradtrace.adapters.diffusion.unet import use_vmap_friendly_attention
from gradtrace.errors import UserError

LORA_TARGETS = ("to_k", "to_q", "to_v", "to_out.0")  # the diffusers text-to-image LoRA recipe: UNet attention


class TextToImage(nn.Module):
    def __init__(self, components: Components, config: dict, *, lora_seed: int = 0):
        super().__init__()
        self.config = copy.deepcopy(config)
        self.unet = copy.deepcopy(components.unet)  # adapters are added to this model's own copy
        self.text_encoder = components.text_encoder
        self.vae = components.vae
        self.components = components
        use_vmap_friendly_attention(self.unet)
        lora = config.get("lora")
        if lora:
            attach_lora(self.unet, lora, seed=lora_seed)
        else:
            self.unet.requires_grad_(True)
        self.train_ids = None
        self.train_log = None

    def forward(self, x: torch.Tensor, t: torch.Tensor, encoder_hidden_states: torch.Tensor) -> torch.Tensor:
        return self.unet(x, t, encoder_hidden_states=encoder_hidden_states, return_dict=False)[0]

    @torch.no_grad()
    def encode_text(self, token_ids: torch.Tensor) -> torch.Tensor:
        ids = torch.as_tensor(token_ids, dtype=torch.long).to(next(self.text_encoder.parameters()).device)
        return self.text_encoder(ids)[0]

    def lora_state(self) -> dict[str, torch.Tensor]:
        """The LoRA factors in diffusers' standard LoRA format (keys prefixed "unet.")."""
        return {f"unet.{k}": v.detach().cpu().contiguous()
                for k, v in get_peft_model_state_dict(self.unet).items()}

    def load_lora_state(self, state: dict[str, torch.Tensor], where: str) -> None:
        state = peft_format(state)
        if any(k.startswith("text_encoder") for k in state):
            raise UserError(f"{where} also holds LoRA weights of the text encoder; gradtrace attributes UNet LoRA "
                            "fine-tunes: save the UNet's LoRA layers only")
        unet_state = {k[len("unet."):]: v for k, v in state.items() if k.startswith("unet.")}
        if not unet_state or len(unet_state) != len(state):
            raise UserError(f"{where} holds no UNet LoRA weights in diffusers' format (keys 'unet.…lora_A…' or "
                            "'unet.…lora.down…'); save them with gradtrace train --base or diffusers' "
                            "save_lora_weights")
        want = {k for k in get_peft_model_state_dict(self.unet)}
        try:
            result = set_peft_model_state_dict(self.unet, unet_state)
        except RuntimeError:  # shapes differ: another rank or other modules
            result = None
        unexpected = getattr(result, "unexpected_keys", None) or []
        if result is None or unexpected or set(unet_state) != want:
            raise UserError(f"LoRA weights in {where} do not fit this base pipeline's UNet (other modules or "
                            "rank); pass the base they were trained on")


class PixelDiffusion(nn.Module):
    """An unconditional diffusers UNet2DModel on images; every UNet parameter is trainable."""

    def __init__(self, components: PixelComponents, config: dict):
        super().__init__()
        self.config = copy.deepcopy(config)
        self.unet = copy.deepcopy(components.unet)
        self.components = components
        use_vmap_friendly_attention(self.unet)
        self.unet.requires_grad_(True)
        self.train_ids = None
        self.train_log = None

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond=None) -> torch.Tensor:
        return self.unet(x, t, return_dict=False)[0]


def peft_format(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """LoRA keys as peft names them (lora_A / lora_B); diffusers' training scripts save lora.down / lora.up."""
    if not any(".lora.down." in k or ".lora.up." in k for k in state):
        return state
    from diffusers.utils import convert_unet_state_dict_to_peft

    return convert_unet_state_dict_to_peft(dict(state))


def lora_shape(state: dict[str, torch.Tensor], where: str) -> tuple[int, list[str]]:
    """(rank, target module names) of UNet LoRA weights in peft format, refusing mixed ranks."""
    ranks = {int(v.shape[0]) for k, v in state.items() if ".lora_A." in k}
    if len(ranks) != 1:
        found = "no LoRA factors" if not ranks else f"LoRA factors of ranks {sorted(ranks)}"
        raise UserError(f"{where} holds {found}; pass UNet LoRA weights of one rank")
    modules = {k.split(".lora_A.")[0] for k in state if ".lora_A." in k}
    targets = sorted({"to_out.0" if m.endswith("to_out.0") else m.rsplit(".", 1)[-1] for m in modules})
    return ranks.pop(), targets


def attach_lora(unet: nn.Module, lora: dict, *, seed: int) -> None:
    """Add LoRA adapters (rank, alpha, target modules) to the UNet's attention; only they are trainable.
    Their initial values come from `seed` (the global RNG is left as it was)."""
    unet.requires_grad_(False)
    config = LoraConfig(r=int(lora["rank"]), lora_alpha=float(lora.get("alpha", lora["rank"])),
                        init_lora_weights="gaussian", target_modules=list(lora.get("targets", LORA_TARGETS)))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        unet.add_adapter(config)
