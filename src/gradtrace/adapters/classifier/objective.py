"""What is differentiated for a classifier: a function of one example's logits z and its label y.

- ``margin`` (TRAK's output function for classifiers): f = z_y − log Σ_{c≠y} exp z_c, the log-odds of the
  true class, log(p_y / (1 − p_y)); also the LDS target of a query under each retrained model;
- ``loss``: the cross-entropy, log Σ_c exp z_c − z_y = −log p_y.

Labels travel as the examples' conditioning (`cond`, an (N,) int64 array of class indices); examples without
labels are refused. Nothing is random: the `repeats` and `seed` of the featurize stage do not apply.
"""
from __future__ import annotations

import numpy as np
import torch

from gradtrace.adapters.base import Objective
from gradtrace.errors import UserError
from gradtrace.io import derive_seed

MEASUREMENTS = ("margin", "loss")
SAMPLE_STREAM = 0x46495348  # "FISH": labels drawn for the true Fisher, apart from every other seeded draw
DEFINITIONS = {"margin": "z_y - logsumexp_{c != y} z_c (logits z, label y)",
               "loss": "cross-entropy: logsumexp_c z_c - z_y"}


def measure(name: str, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The measurement of each row of logits (..., C) with labels (...) (torch.func-safe: no data-dependent
    indexing or control flow)."""
    is_label = torch.arange(logits.shape[-1], device=logits.device) == labels.unsqueeze(-1)
    z_y = (logits * is_label).sum(-1)
    if name == "margin":
        others = torch.where(is_label, torch.full_like(logits, float("-inf")), logits)
        return z_y - torch.logsumexp(others, dim=-1)
    return torch.logsumexp(logits, dim=-1) - z_y


def labels_of(cond, n: int) -> torch.Tensor:
    """The (n,) long class indices of a chunk's conditioning, refusing examples without labels."""
    if cond is None:
        raise UserError("classifier examples need labels (class indices as their conditioning); featurize labelled "
                        "images with --data (and --ids), not generated samples")
    labels = torch.as_tensor(np.asarray(cond), dtype=torch.long)
    if labels.shape != (n,):
        raise UserError(f"classifier labels must be one class index per example, shape ({n},), got "
                        f"{tuple(labels.shape)}; featurize with this gradtrace's classifier adapter")
    return labels


class ClassifierObjective(Objective):
    """`measure(name, ...)` of each example (see the module docstring)."""

    def __init__(self, name: str):
        if name not in MEASUREMENTS:
            raise UserError(f"unknown measurement '{name}' for classifiers; use one of {', '.join(MEASUREMENTS)}")
        self.name = name
        self.device = torch.device("cpu")

    def info(self) -> dict:
        return {"name": self.name, "output": DEFINITIONS[self.name]}

    def to(self, device: torch.device) -> "ClassifierObjective":
        self.device = torch.device(device)
        return self

    def _batch(self, inputs, cond):
        x = torch.as_tensor(inputs, dtype=torch.float32).to(self.device)
        return x, labels_of(cond, x.shape[0]).to(self.device)

    def example_inputs(self, inputs, ids, cond):
        return self._batch(inputs, cond), (0, 0)

    def example_output(self, forward, x, y):
        return measure(self.name, forward(x.unsqueeze(0))[0], y)

    def batch_total(self, model, inputs, ids, cond):
        x, y = self._batch(inputs, cond)
        return measure(self.name, model(x), y).sum()

    @property
    def samples_targets(self) -> bool:
        return self.name == "loss"

    def sampled_total(self, model, inputs, ids, cond, seed: int):
        """Cross-entropy summed over the batch, each label drawn from softmax(logits) with a generator seeded by
        (seed, example id): the true Fisher of EK-FAC (None for the margin, which has no predictive distribution)."""
        if self.name != "loss":
            return None
        x = torch.as_tensor(inputs, dtype=torch.float32).to(self.device)
        logits = model(x)
        probs = torch.softmax(logits.detach().double(), dim=-1).cpu()
        ids = np.asarray(ids, dtype=np.int64)
        labels = torch.stack([torch.multinomial(probs[b], 1, generator=torch.Generator().manual_seed(
            derive_seed(seed, int(ids[b]), SAMPLE_STREAM)))[0] for b in range(len(ids))])
        return measure("loss", logits, labels.to(self.device)).sum()


@torch.no_grad()
def margins(model: torch.nn.Module, images, labels, *, batch_rows: int = 512) -> np.ndarray:
    """(N,) float64 margins of labelled images under `model` (eval mode), computed in batches."""
    model.eval()
    x = torch.as_tensor(images, dtype=torch.float32)
    y = labels_of(labels, x.shape[0])
    device = next(model.parameters()).device
    out = np.empty(x.shape[0], dtype=np.float64)
    for start in range(0, x.shape[0], batch_rows):
        stop = min(start + batch_rows, x.shape[0])
        logits = model(x[start:stop].to(device)).float()
        out[start:stop] = measure("margin", logits, y[start:stop].to(device)).double().cpu().numpy()
    return out
