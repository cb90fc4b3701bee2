"""Per-example gradient features with torch.func (functional_call + vmap(grad)).

For a chunk of examples, each example's T noisy copies go through the model as one batch, the
measurement reduces them to one scalar, and ``vmap(grad(...))`` gives every example's gradient at
once. The gradient of each parameter group is flattened and projected on its own.
"""
from __future__ import annotations

import numpy as np
import torch
from torch.func import functional_call, grad, vmap

from gradtrace.errors import UserError
from gradtrace.features.projection import GroupProjector
from gradtrace.groups import Group
from gradtrace.measure import Measurement


class GradientFeaturizer:
    """Turns (images, ids, conditioning codes) into per-example projected gradient features."""

    def __init__(self, model: torch.nn.Module, alphas_cumprod: torch.Tensor, groups: list[Group],
                 projector: GroupProjector, measurement: Measurement):
        self.model = model.eval()
        self.groups = groups
        self.projector = projector
        self.measurement = measurement
        self.alphas_cumprod = alphas_cumprod.detach().to(torch.float32)
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

    def _output(self, params, xt, t, noise, cond):
        tensors = {**params, **self.frozen, **self.buffers}
        if cond is not None:
            cond = cond.unsqueeze(0).expand(t.shape[0], cond.shape[-1])
        eps = functional_call(self.model, tensors, (xt, t, cond))
        return self.measurement.reduce(eps, noise)

    def per_example_grads(self, images: torch.Tensor, ids, cond=None) -> dict[str, torch.Tensor]:
        """{param name: (B, *param shape)} gradients of each example's measurement."""
        images = torch.as_tensor(images, dtype=torch.float32)
        noise = self.measurement.noise(ids, tuple(images.shape[1:]))
        xt, t = self.measurement.noisy_inputs(images, noise, self.alphas_cumprod)
        g = grad(self._output)
        if cond is None:
            fn = vmap(lambda p, x, n: g(p, x, t, n, None), in_dims=(None, 0, 0))
            return fn(self.params, xt, noise)
        cond = torch.as_tensor(np.asarray(cond), dtype=torch.long)
        fn = vmap(lambda p, x, n, c: g(p, x, t, n, c), in_dims=(None, 0, 0, 0))
        return fn(self.params, xt, noise, cond)

    def features(self, images: torch.Tensor, ids, cond=None) -> np.ndarray:
        """(B, k) float32 projected features, group blocks in group order."""
        grads = self.per_example_grads(images, ids, cond)
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
        return out.detach().numpy().astype(np.float32, copy=False)
