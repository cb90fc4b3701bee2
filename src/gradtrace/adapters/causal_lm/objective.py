"""What is differentiated for a causal LM: a sequence's next-token loss, padding masked.

- ``loss`` (the default): the mean token loss, (1/(n−1)) Σ_{t<n−1} −log p(x_{t+1} | x_{≤t}) for a sequence of n
  real tokens (the Hugging Face loss with labels = input ids and −100 at padding); also the LDS output;
- ``loss_sum``: the same sum, not divided by the number of predicted tokens.

Sequences arrive as (B, L) token ids right-padded, with their lengths as the conditioning (`tokens.py`). Nothing
is random: the `repeats` and `seed` of the featurize stage do not apply.
"""
from __future__ import annotations

import numpy as np
import torch

from gradtrace.adapters.base import Objective
from gradtrace.errors import UserError

MEASUREMENTS = ("loss", "loss_sum")
DEFINITIONS = {"loss": "mean next-token cross-entropy over the sequence's real tokens (padding masked)",
               "loss_sum": "sum of next-token cross-entropies over the sequence's real tokens (padding masked)"}


def token_losses(logits: torch.Tensor, input_ids: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor,
                                                                                                  torch.Tensor]:
    """(nll, mask), each (..., L−1): the next-token loss at every position and 1 where the target is a real token
    (torch.func-safe: no data-dependent indexing or control flow)."""
    logp = torch.log_softmax(logits[..., :-1, :].float(), dim=-1)
    nll = -logp.gather(-1, input_ids[..., 1:].unsqueeze(-1)).squeeze(-1)
    positions = torch.arange(input_ids.shape[-1] - 1, device=input_ids.device)
    mask = (positions < (lengths.unsqueeze(-1) - 1)).to(nll.dtype)
    return nll, mask


def measure(name: str, logits: torch.Tensor, input_ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """The measurement of each sequence (...,) from its logits (..., L, V)."""
    nll, mask = token_losses(logits, input_ids, lengths)
    total = (nll * mask).sum(-1)
    return total / mask.sum(-1) if name == "loss" else total


def lengths_of(cond, input_ids: torch.Tensor) -> torch.Tensor:
    if cond is None:
        raise UserError("language-model examples need their sequence lengths (the conditioning); featurize text "
                        "with --data jsonl:PATH, textfolder:PATH or fortunes")
    lengths = torch.as_tensor(np.asarray(cond), dtype=torch.long)
    if lengths.shape != (input_ids.shape[0],):
        raise UserError(f"expected one length per sequence ({input_ids.shape[0]},), got {tuple(lengths.shape)}; "
                        "featurize again with this gradtrace")
    return lengths


class LMObjective(Objective):
    """`measure(name, ...)` of each sequence (see the module docstring)."""

    def __init__(self, name: str):
        if name not in MEASUREMENTS:
            raise UserError(f"unknown measurement '{name}' for language models; use one of {', '.join(MEASUREMENTS)}")
        self.name = name
        self.device = torch.device("cpu")

    def info(self) -> dict:
        return {"name": self.name, "output": DEFINITIONS[self.name]}

    def to(self, device: torch.device) -> "LMObjective":
        self.device = torch.device(device)
        return self

    def _batch(self, inputs, cond):
        x = torch.as_tensor(inputs, dtype=torch.long)
        return x.to(self.device), lengths_of(cond, x).to(self.device)

    def example_inputs(self, inputs, ids, cond):
        return self._batch(inputs, cond), (0, 0)

    def example_output(self, forward, x, n):
        return measure(self.name, forward(x.unsqueeze(0))[0], x, n)

    def batch_total(self, model, inputs, ids, cond):
        x, n = self._batch(inputs, cond)
        return measure(self.name, model(x), x, n).sum()

    def token_mask(self, inputs, ids, cond):
        """(B, L) 1 at each sequence's real tokens, 0 at its padding (influence functions' curvature skips it)."""
        x, n = self._batch(inputs, cond)
        return (torch.arange(x.shape[1], device=x.device) < n.unsqueeze(1)).long()


@torch.no_grad()
def sequence_losses(model: torch.nn.Module, input_ids, lengths, *, name: str = "loss",
                    batch_rows: int = 64) -> np.ndarray:
    """(N,) float64 per-sequence losses under `model` (eval mode), computed in batches."""
    model.eval()
    x = torch.as_tensor(input_ids, dtype=torch.long)
    n = lengths_of(lengths, x)
    device = next(model.parameters()).device
    out = np.empty(x.shape[0], dtype=np.float64)
    for start in range(0, x.shape[0], batch_rows):
        stop = min(start + batch_rows, x.shape[0])
        logits = model(x[start:stop].to(device))
        out[start:stop] = measure(name, logits, x[start:stop].to(device), n[start:stop].to(device)).double().cpu()
    return out
