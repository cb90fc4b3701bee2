"""The diffusion measurement of a text-to-image model: on VAE latents, conditioned on the example's text.

Examples are (latents, ids, token ids); the text-encoder states of each example are computed once per chunk,
outside the differentiated function (the text encoder is frozen), and passed to the UNet for all T noisy
copies of the example. Everything else, the timesteps, the per-(example, timestep) noise and the `loss` /
`dtrak` / `mean` reductions, is the tiny UNets' `DiffusionObjective`.
"""
from __future__ import annotations

import numpy as np
import torch

from gradtrace.adapters.diffusion.measure import DiffusionObjective, Measurement


class TextObjective(DiffusionObjective):
    def __init__(self, measurement: Measurement, alphas_cumprod: torch.Tensor, encode_text):
        super().__init__(measurement, alphas_cumprod)
        self.encode_text = encode_text

    def condition(self, cond) -> torch.Tensor:
        """Token ids (B, L) → encoder hidden states (B, L, D)."""
        return self.encode_text(torch.as_tensor(np.asarray(cond), dtype=torch.long).to(self.device))
