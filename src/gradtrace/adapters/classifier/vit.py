"""A small Vision Transformer, laid out and named as torchvision's `vit_b_16` (`VisionTransformer`).

Parameter names follow torchvision (`conv_proj`, `class_token`, `encoder.pos_embedding`,
`encoder.layers.encoder_layer_0.{ln_1, self_attention, ln_2, mlp}`, `encoder.ln`, `heads.head`), and so does the
initialisation (truncated-normal patch embedding, zero class token and head). Patch size, width, depth, heads and
MLP width come from the config, and there is no dropout.

The attention module is an `nn.MultiheadAttention` (batch first: the same `in_proj_weight`, `in_proj_bias` and
`out_proj` as torchvision's) whose forward writes self-attention out: the packed input projection, softmax
attention per head, then `out_proj` called as a module. Two reasons: torch.func has no batching rule for CPU
scaled-dot-product attention (vmap would fall back to a slow per-example loop), and
`F.multi_head_attention_forward` uses `out_proj`'s weight without calling the module, which the Kronecker
featurizer's hooks cannot see. The result equals `nn.MultiheadAttention.forward(x, x, x)` (tested).
"""
from __future__ import annotations

import copy
import math
from collections import OrderedDict

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from gradtrace.adapters.classifier.configs import check_model_config

LN_EPS = 1e-6


class SelfAttention(nn.MultiheadAttention):
    """Multi-head self-attention with `nn.MultiheadAttention`'s parameters, computed as written out (see above)."""

    def __init__(self, dim: int, heads: int):
        super().__init__(dim, heads, dropout=0.0, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        """x (B, S, D) → (B, S, D)."""
        b, s, d = x.shape
        h = self.num_heads
        q, k, v = F.linear(x, self.in_proj_weight, self.in_proj_bias).chunk(3, dim=-1)
        q, k, v = (t.reshape(b, s, h, d // h).transpose(1, 2) for t in (q, k, v))
        attn = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(d // h), dim=-1)
        return self.out_proj((attn @ v).transpose(1, 2).reshape(b, s, d))


class MLPBlock(nn.Sequential):
    """torchvision's MLPBlock without dropout: Linear (`0`), GELU, Linear (`3`); indices kept for the names."""

    def __init__(self, dim: int, mlp_dim: int):
        super().__init__(nn.Linear(dim, mlp_dim), nn.GELU(), nn.Identity(), nn.Linear(mlp_dim, dim), nn.Identity())
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.normal_(m.bias, std=1e-6)


class EncoderBlock(nn.Module):
    """Pre-norm transformer block: x + attention(ln_1(x)), then + mlp(ln_2(x))."""

    def __init__(self, heads: int, dim: int, mlp_dim: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(dim, eps=LN_EPS)
        self.self_attention = SelfAttention(dim, heads)
        self.ln_2 = nn.LayerNorm(dim, eps=LN_EPS)
        self.mlp = MLPBlock(dim, mlp_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attention(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class Encoder(nn.Module):
    def __init__(self, seq_length: int, num_layers: int, heads: int, dim: int, mlp_dim: int):
        super().__init__()
        self.pos_embedding = nn.Parameter(torch.empty(1, seq_length, dim).normal_(std=0.02))
        self.layers = nn.Sequential(OrderedDict(
            (f"encoder_layer_{i}", EncoderBlock(heads, dim, mlp_dim)) for i in range(num_layers)))
        self.ln = nn.LayerNorm(dim, eps=LN_EPS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ln(self.layers(x + self.pos_embedding))


class VisionTransformer(nn.Module):
    """Patch embedding (`conv_proj`), class token, encoder, and the class token's logits from `heads.head`."""

    def __init__(self, config: dict):
        super().__init__()
        check_model_config(config)
        self.config: dict = copy.deepcopy(config)
        patch, dim = config["patch_size"], config["hidden_dim"]
        self.patch_size = patch
        self.conv_proj = nn.Conv2d(config["channels"], dim, kernel_size=patch, stride=patch)
        self.class_token = nn.Parameter(torch.zeros(1, 1, dim))
        seq = (config["size"] // patch) ** 2 + 1
        self.encoder = Encoder(seq, config["num_layers"], config["num_heads"], dim, config["mlp_dim"])
        self.heads = nn.Sequential(OrderedDict(head=nn.Linear(dim, config["num_classes"])))
        fan_in = self.conv_proj.in_channels * patch * patch
        nn.init.trunc_normal_(self.conv_proj.weight, std=math.sqrt(1 / fan_in))
        nn.init.zeros_(self.conv_proj.bias)
        nn.init.zeros_(self.heads.head.weight)
        nn.init.zeros_(self.heads.head.bias)
        self.train_ids: np.ndarray | None = None
        self.train_log: dict | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (B, num_classes) of images (B, C, H, W)."""
        x = self.conv_proj(x)                                    # (B, D, h, w)
        x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)  # (B, h·w, D)
        x = torch.cat([self.class_token.expand(x.shape[0], -1, -1), x], dim=1)
        return self.heads(self.encoder(x)[:, 0])
