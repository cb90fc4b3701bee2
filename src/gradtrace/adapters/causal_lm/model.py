"""The causal LM as gradtrace differentiates it: `model(input_ids) → logits`, around a transformers model.

    model = CausalLM(lm, tokenizer, config)     # config: the adapter's model config (base, lora, seq_len, ...)
    model(input_ids (B, L)) → logits (B, L, V)  # what the featurizers and the trainer call

Without LoRA every parameter of the LM is trainable (features and groups cover all of them); with a LoRA adapter
(peft) only the LoRA factors are, so features, groups and training cover them alone. Attention runs in
transformers' "eager" implementation (set when the folder is loaded): torch.func has no batching rule for CPU
scaled-dot-product attention. The model computes in eval mode (no dropout), in training too, so a recipe is
deterministic for its seed.
"""
from __future__ import annotations

import copy
from pathlib import Path

import torch
from torch import nn

from gradtrace.errors import UserError

LORA_TARGETS = {"gpt2": ["c_attn", "c_proj", "c_fc"]}  # else peft's "all-linear"


class CausalLM(nn.Module):
    def __init__(self, lm: nn.Module, tokenizer, config: dict):
        super().__init__()
        self.lm = lm
        self.tokenizer = tokenizer
        self.config = copy.deepcopy(config)
        self.train_ids = None
        self.train_log = None

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        mask = torch.ones_like(input_ids)  # right padding, causal: no real token attends to padding
        return self.lm(input_ids=input_ids, attention_mask=mask, use_cache=False, return_dict=True).logits

    def train(self, mode: bool = True):  # no dropout, ever (see the module docstring)
        return super().train(False)

    @property
    def is_lora(self) -> bool:
        return bool(self.config.get("lora"))


def lora_targets(lm: nn.Module, lora: dict):
    targets = lora.get("targets")
    if targets:
        return list(targets) if isinstance(targets, (list, tuple)) else targets
    return LORA_TARGETS.get(getattr(lm.config, "model_type", ""), "all-linear")


def attach_lora(lm: nn.Module, lora: dict, *, seed: int) -> nn.Module:
    """The LM with fresh LoRA adapters (rank, alpha, target modules; peft's default init: B = 0), drawn from
    `seed` without touching the global RNG; only the adapters are trainable."""
    from peft import LoraConfig, get_peft_model

    conv1d = any(type(m).__name__ == "Conv1D" for m in lm.modules())  # GPT-2's layers store (in, out) weights
    config = LoraConfig(r=int(lora["rank"]), lora_alpha=float(lora.get("alpha", lora["rank"])), lora_dropout=0.0,
                        target_modules=lora_targets(lm, lora), fan_in_fan_out=conv1d, task_type="CAUSAL_LM")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        try:
            return get_peft_model(lm, config)
        except ValueError as exc:
            first = str(exc).strip().splitlines()[0][:200]
            raise UserError(f"cannot add LoRA adapters to this model ({first}); name its layers with "
                            "--model-options '{\"lora_targets\": [\"q_proj\", \"v_proj\"]}'") from None


def load_lora(lm: nn.Module, folder) -> nn.Module:
    """The LM with the peft adapter saved in `folder` (adapter_config.json + adapter_model.safetensors), trainable."""
    from peft import PeftModel

    if not (Path(folder) / "adapter_model.safetensors").is_file():  # peft would fall back to a pickle .bin
        raise UserError(f"{folder} has no adapter_model.safetensors (pickled weights are never loaded); save the "
                        "adapter with safe_serialization=True")
    try:
        return PeftModel.from_pretrained(lm, str(folder), is_trainable=True)
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise UserError(f"cannot load the LoRA adapter in {folder} onto its base ({first}); pass the base it was "
                        "trained on") from None


def lora_config_of(folder) -> dict:
    """{"rank", "alpha", "targets"} of a saved peft LoRA adapter."""
    from peft import PeftConfig

    try:
        cfg = PeftConfig.from_pretrained(str(folder))
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot read the peft adapter config in {folder} ({exc}); "
                        "pass a LoRA adapter folder") from None
    if getattr(cfg, "peft_type", None) is None or str(cfg.peft_type).split(".")[-1] != "LORA":
        raise UserError(f"{folder} holds a {cfg.peft_type} adapter; gradtrace attributes LoRA adapters")
    targets = cfg.target_modules
    return {"rank": int(cfg.r), "alpha": float(cfg.lora_alpha),
            "targets": sorted(targets) if isinstance(targets, (set, list, tuple)) else targets}


def prepared_lm(base_lm: nn.Module) -> nn.Module:
    """A trainable copy of the base LM (the cached base stays frozen and untouched)."""
    lm = copy.deepcopy(base_lm)
    lm.requires_grad_(True)
    lm.eval()
    return lm
