"""The `block` group preset of causal LMs: a parameter's group from its transformers name.

- per transformer block i: ``block{i}.attn`` (the attention and the norm before it: GPT-2's ``ln_1`` + ``attn``
  with ``c_attn`` / ``c_proj``; Llama-style ``input_layernorm`` + ``self_attn`` with q/k/v/o) and ``block{i}.mlp``
  (the rest of the block: ``ln_2`` + ``mlp``; ``post_attention_layernorm`` + ``mlp``);
- ``embed.tokens`` (``wte``, ``embed_tokens``), ``embed.positions`` (``wpe``, ``embed_positions``),
  ``final_norm`` (``ln_f``, ``model.norm``), ``head`` (an untied ``lm_head``);
- any other name: its module (the name without its last component).

With a LoRA adapter, only the LoRA factors are trainable, so the same rule groups them by block × attention /
MLP (peft's ``base_model.model.`` prefix and ``lora_A.default`` suffix do not change the match).
"""
from __future__ import annotations

import re

PRESETS = ("block",)
_BLOCK = re.compile(r"(?:^|\.)(?:h|layers|layer|blocks)\.(\d+)\.(.*)$")
_ATTN = re.compile(r"(^|\.)(ln_1|input_layernorm|attn|self_attn|attention|self_attention)(\.|$)")
_RULES = (
    (re.compile(r"(^|\.)(wte|embed_tokens|word_embeddings)\."), "embed.tokens"),
    (re.compile(r"(^|\.)(wpe|embed_positions|position_embeddings)\."), "embed.positions"),
    (re.compile(r"(^|\.)(ln_f|norm|final_layernorm|final_layer_norm)\.[^.]+$"), "final_norm"),
    (re.compile(r"(^|\.)lm_head\."), "head"),
)


def block_key(name: str) -> str:
    m = _BLOCK.search(name)
    if m:
        return f"block{m.group(1)}.{'attn' if _ATTN.search(m.group(2)) else 'mlp'}"
    for pattern, group in _RULES:
        if pattern.search(name):
            return group
    return name.rsplit(".", 1)[0] if "." in name else name
