"""Per-example gradient features with torch.func (functional_call + vmap(grad)).

For a chunk of examples, the adapter's objective gives each example's inputs and reduces its forward
pass to one scalar (for diffusion: its T noisy copies as one batch, averaged), and ``vmap(grad(...))``
gives every example's gradient at once. The gradient of each parameter group is flattened and projected
on its own.
"""
from __future__ import annotations

import numpy as np
import torch
from torch.func import functional_call, grad, vmap

from gradtrace.adapters.base import Objective
from gradtrace.errors import UserError
from gradtrace.features.groups import Group
from gradtrace.features.projection import GroupProjector
from gradtrace.precision import cast_floating, check_precision


class GradientFeaturizer:
    """Turns (inputs, ids, conditioning) into per-example projected gradient features."""

    def __init__(self, model: torch.nn.Module, objective: Objective, groups: list[Group],
                 projector: GroupProjector | None, precision: str = "float32"):
        self.model = model.eval()
        self.precision = precision
        self.compute_dtype = check_precision(precision)
        self.groups = groups
        self.projector = projector
        self.objective = objective
        named = dict(model.named_parameters())
        missing = [p for g in groups for p in g.params if p not in named]
        if missing:
            raise UserError(f"groups name parameters the model lacks (e.g. {missing[0]}); "
                            f"rebuild the groups for this model")
        self.param_names = [p for g in groups for p in g.params]
        self.params = {n: named[n].detach() for n in self.param_names}
        self.frozen = {n: p.detach() for n, p in named.items() if n not in self.params}
        self.buffers = {n: b.detach() for n, b in model.named_buffers()}
        self.sizes = [sum(self.params[p].numel() for p in g.params) for g in groups]

    def _output(self, params, *args):
        tensors = {**params, **self.frozen, **self.buffers}
        if self.compute_dtype == torch.float32:
            return self.objective.example_output(
                lambda *model_args: functional_call(self.model, tensors, model_args), *args)
        # reduced precision: the forward (and so the backward) runs on cast copies; the gradient reaching the
        # float32 parameters through the cast is float32, and the measurement reduces a float32 prediction
        low = cast_floating(tensors, self.compute_dtype)
        return self.objective.example_output(
            lambda *model_args: functional_call(self.model, low, cast_floating(model_args, self.compute_dtype)).float(),
            *args)

    def per_example_grads(self, inputs: torch.Tensor, ids, cond=None) -> dict[str, torch.Tensor]:
        """{param name: (B, *param shape)} gradients of each example's output."""
        args, in_dims = self.objective.example_inputs(inputs, ids, cond)
        return vmap(grad(self._output), in_dims=(None, *in_dims))(self.params, *args)

    def features(self, inputs: torch.Tensor, ids, cond=None) -> np.ndarray:
        """(B, k) float32 projected features, group blocks in group order."""
        grads = self.per_example_grads(inputs, ids, cond)
        blocks = []
        for j, group in enumerate(self.groups):
            flat = torch.cat([grads[p].reshape(grads[p].shape[0], -1) for p in group.params], dim=1)
            blocks.append(self.projector.project(j, flat))
        out = torch.cat(blocks, dim=1)
        bad = ~torch.isfinite(out).all(dim=1)
        if bool(bad.any()):
            first = int(np.asarray(ids).reshape(-1)[int(torch.nonzero(bad)[0])])
            raise UserError(f"gradients contain NaN/Inf for example id {first}; check the checkpoint "
                            f"and the input images (values must be finite, in [-1, 1])")
        return out.detach().cpu().numpy().astype(np.float32, copy=False)
