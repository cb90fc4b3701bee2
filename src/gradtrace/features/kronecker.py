"""Kronecker-projected (LoGra-style) per-example gradient features from one ordinary batched pass.

For a chunk of B examples, the adapter's objective sends all their rows (example-major, the same number
per example: for diffusion the B·T noisy copies) through the model as ONE ordinary batch. Forward hooks on
every Linear (and transposed linear: GPT-2's Conv1D), Conv2d, GroupNorm and LayerNorm record the call's input
and output; ``torch.autograd.grad``
of Σ_b f_b (the sum of the examples' measurements) with respect to those outputs gives every row's output
gradient, because rows do not interact (autograd computes no weight gradients at all: only the paths to the
requested outputs). Then, per example b and layer:

- Linear / Conv2d weight (d_out × d_in):  Σ_{t, positions} (P_outᵀ g_out)(P_inᵀ a_in)ᵀ, flattened
  k_out·k_in — the Kronecker projection of the example's weight gradient, never materialised. For a
  convolution a_in are the im2col rows (d_in = C_in·kh·kw); P_inᵀ a_in is computed as a convolution
  with P_in as its kernel, so the unfolded patches are never built either.
- the other tensors of a group (the ``dense`` member, see kron_projection) get exact per-example
  gradients, projected by a dense seeded matrix: Linear / Conv2d biases Σ g_out, GroupNorm / LayerNorm
  weights Σ g_out·x̂ and biases Σ g_out (x̂ recomputed from the recorded input); parameters the objective
  declares a `ContextStage` (e.g. conditioning tables outside the UNet) by a vmap over examples through
  the stage's encoder, given the gradient of the tensor it feeds to the network;
  anything else by the vmap(grad) path of GradientFeaturizer restricted to those tensors (slow): among them
  tensors that two modules share (tied weights, e.g. GPT-2's token embedding and output layer).

Sums over an example's rows (e.g. its T timesteps) happen in projected space. The first call is checked on
its first two examples: Σ_b of their features must equal the projection of the ordinary batch gradient, or the
featurizer refuses (a model that uses a parameter outside its module's forward would otherwise give
silently wrong features).
"""
from __future__ import annotations

from contextlib import contextmanager

import numpy as np
import torch
from torch import nn
from torch.func import grad, vmap
from torch.nn import functional as F

from gradtrace.adapters.base import Objective
from gradtrace.adapters.layers import is_transposed_linear
from gradtrace.errors import UserError
from gradtrace.features.gradients import GradientFeaturizer
from gradtrace.features.groups import Group
from gradtrace.features.kron_projection import KroneckerProjector, Member, shared_parameters

CHECK_RTOL = 1e-3


def _rule(module: nn.Module) -> str | None:
    if isinstance(module, nn.Linear) or is_transposed_linear(module):  # the same rows: a (.., d_in) → (.., d_out)
        return "linear"
    if isinstance(module, nn.Conv2d) and module.groups == 1:
        return "conv"
    if isinstance(module, nn.GroupNorm):
        return "groupnorm"
    if isinstance(module, nn.LayerNorm):
        return "layernorm"
    return None


def _left(p: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
    """pᵀ x over the second-to-last axis (identity when p is None)."""
    return x if p is None else torch.matmul(p.T, x)


def _right(x: torch.Tensor, p: torch.Tensor | None) -> torch.Tensor:
    return x if p is None else x @ p


def _padded(module: nn.Conv2d, a: torch.Tensor):
    """(input, padding) for conv2d: string paddings and non-zero padding modes applied explicitly."""
    if module.padding_mode == "zeros" and not isinstance(module.padding, str):
        return a, module.padding
    mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
    return F.pad(a, module._reversed_padding_repeated_twice, mode=mode), 0


class KroneckerFeaturizer:
    """Turns (inputs, ids, conditioning) into Kronecker-projected per-example gradient features."""

    def __init__(self, model: nn.Module, objective: Objective, groups: list[Group],
                 projector: KroneckerProjector, *, check_first_chunk: bool = True):
        self.model = model.eval()
        self.groups = groups
        self.projector = projector
        self.objective = objective
        self.named = dict(model.named_parameters())
        missing = [p for g in groups for p in g.params if p not in self.named]
        if missing:
            raise UserError(f"groups name parameters the model lacks (e.g. {missing[0]}); "
                            f"rebuild the groups for this model")
        self.param_names = [p for g in groups for p in g.params]
        self.sizes = [sum(self.named[p].numel() for p in g.params) for g in groups]
        self.check_pending = check_first_chunk
        starts = np.cumsum([0] + projector.dims[:-1]).tolist()
        self.kron: dict[str, tuple[int, Member]] = {}
        self.dense: list[tuple[int, Member]] = []
        for j, layout in enumerate(projector.members):
            for m in layout:
                if m.kind == "kron":
                    self.kron[m.params[0]] = (starts[j], m)
                else:
                    self.dense.append((starts[j], m))
        by_id = {id(self.named[n]): n for n in self.param_names}
        self.hooked: list[tuple[nn.Module, str, dict[str, str]]] = []
        handled: set[str] = set()
        shared = shared_parameters(model)  # tied weights: every use is seen only by the vmap path below
        for module in model.modules():
            kind = _rule(module)
            own = {pn: by_id[id(p)] for pn, p in module.named_parameters(recurse=False)
                   if id(p) in by_id and id(p) not in shared}
            if kind is not None and own:
                self.hooked.append((module, kind, own))
                handled |= set(own.values())
        self.transposed = {own["weight"] for module, _, own in self.hooked
                           if "weight" in own and is_transposed_linear(module)}
        if set(self.kron) - handled:
            raise UserError(f"weight {sorted(set(self.kron) - handled)[0]} has no hooked module; "
                            f"use another projection")
        rest = [n for n in self.param_names if n not in handled]
        self.stage = objective.context_stage(model)
        staged = set(self.stage.params) if self.stage is not None else set()
        self.cond_params = [n for n in rest if n in staged]
        self.vmap_params = [n for n in rest if n not in self.cond_params]
        self._fallback = (GradientFeaturizer(model, objective, [Group("fallback", tuple(self.vmap_params))], None)
                          if self.vmap_params else None)
        self._conv_kernels: dict[str, torch.Tensor] = {}
        self._device_factors: dict[tuple[str, str], torch.Tensor] = {}
        first = next(model.parameters(), None)
        self.device = first.device if first is not None else torch.device("cpu")

    # ---------------------------------------------------------------------------------- main entry
    def features(self, inputs: torch.Tensor, ids, cond=None) -> np.ndarray:
        """(B, k) float32 projected features, group blocks in group order, members in layout order.

        The first call first checks the model on its first two examples (see the module docstring).
        """
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        if self.check_pending:
            self._features(inputs[:2], ids[:2], None if cond is None else cond[:2], check=True)
            self.check_pending = False
        return self._features(inputs, ids, cond, check=False)

    def _features(self, inputs: torch.Tensor, ids: np.ndarray, cond, *, check: bool) -> np.ndarray:
        B = len(ids)
        codes = None if cond is None else torch.as_tensor(np.asarray(cond), dtype=torch.long).to(self.device)
        with torch.enable_grad(), self._recording() as rec:
            total = self.objective.batch_total(self.model, inputs, ids, cond)
            targets = [call[3] for call in rec["calls"]]
            if self.cond_params:
                if rec.get("context") is None:
                    raise UserError(f"the model's {type(self.stage.module).__name__} got no {self.stage.kwarg}; "
                                    "use another projection")
                targets.append(rec["context"])
            grads = torch.autograd.grad(total, targets, allow_unused=True, retain_graph=check)
            batch_grads = (torch.autograd.grad(total, [self.named[n] for n in self.param_names],
                                               allow_unused=True) if check else None)
        out = torch.zeros(B, self.projector.total_dim, device=self.device)
        dense: dict[str, torch.Tensor] = {}
        with torch.no_grad():
            for (module, kind, own, _out, inp), g in zip(rec["calls"], grads):
                if g is not None:
                    self._accumulate(module, kind, own, inp, g, B, out, dense)
            if self.cond_params:
                dense.update(self._cond_grads(grads[-1], codes, B))
        if self._fallback is not None:
            per = self._fallback.per_example_grads(inputs, ids, cond)
            dense.update({n: v.detach().reshape(B, -1) for n, v in per.items()})
        with torch.no_grad():
            for start, m in self.dense:
                flat = torch.cat([dense[p] if p in dense else
                                  torch.zeros(B, self.named[p].numel(), device=self.device) for p in m.params], dim=1)
                mat = self._factor(m, "dense")
                out[:, start + m.start:start + m.stop] = flat if mat is None else flat @ mat
            if check:
                self._check(out, dict(zip(self.param_names, batch_grads)))
        bad = ~torch.isfinite(out).all(dim=1)
        if bool(bad.any()):
            raise UserError(f"gradients contain NaN/Inf for example id {int(ids[int(torch.nonzero(bad)[0])])}; "
                            f"check the checkpoint and the input images (values must be finite, in [-1, 1])")
        return out.cpu().numpy().astype(np.float32, copy=False)

    # ---------------------------------------------------------------------------------- hooks
    @contextmanager
    def _recording(self):
        rec: dict = {"calls": [], "context": None}
        handles = []

        def make_hook(kind, own):
            def hook(module, args, output):
                rec["calls"].append((module, kind, own, output, args[0]))
            return hook

        for module, kind, own in self.hooked:
            handles.append(module.register_forward_hook(make_hook(kind, own)))
        if self.cond_params:
            def pre_hook(module, args, kwargs):
                rec["context"] = kwargs.get(self.stage.kwarg)
            handles.append(self.stage.module.register_forward_pre_hook(pre_hook, with_kwargs=True))
        try:
            yield rec
        finally:
            for h in handles:
                h.remove()

    # ---------------------------------------------------------------------------------- per layer
    def _accumulate(self, module, kind, own, a, g, B, out, dense) -> None:
        """Add one recorded call's per-example contributions (weights into `out`, the rest into `dense`).

        Rows are example-major with the same number per example, so (R, ...) reshapes to (B, R // B, ...)."""
        def add(name, value):
            dense[name] = dense[name] + value if name in dense else value

        if kind == "linear":
            a, g = a.reshape(B, -1, a.shape[-1]), g.reshape(B, -1, g.shape[-1])
            if "weight" in own:
                start, m = self.kron[own["weight"]]
                p_in, p_out = self._factor(m, "in"), self._factor(m, "out")
                k_out, k_in = m.dims
                if k_out <= k_in:  # the cheaper order: contract the thinner projected side first
                    gp = g if p_out is None else g @ p_out
                    block = _right(gp.transpose(1, 2) @ a, p_in)
                else:
                    ap = a if p_in is None else a @ p_in
                    block = _left(p_out, g.transpose(1, 2) @ ap)
                out[:, start + m.start:start + m.stop] += block.reshape(B, -1)
            if "bias" in own:
                add(own["bias"], g.sum(1))
        elif kind == "conv":
            R, C_out = g.shape[0], g.shape[1]
            gl = g.reshape(R, C_out, -1)
            if "weight" in own:
                start, m = self.kron[own["weight"]]
                gp = _left(self._factor(m, "out"), gl)         # (R, k_out, L)
                a, padding = _padded(module, a)
                cols = self._project_patches(module, own["weight"], m, a, padding)   # (R, k_in, L)
                block = torch.bmm(gp, cols.transpose(1, 2)).reshape(B, R // B, *m.dims).sum(1)
                out[:, start + m.start:start + m.stop] += block.reshape(B, -1)
            if "bias" in own:
                add(own["bias"], gl.sum(2).reshape(B, R // B, C_out).sum(1))
        elif kind == "groupnorm":
            xhat = F.group_norm(a, module.num_groups, None, None, module.eps)
            C = g.shape[1]
            per = g.shape[0] // B
            gg = g.reshape(B, per, C, -1)
            if "weight" in own:
                add(own["weight"], (gg * xhat.reshape(B, per, C, -1)).sum((1, 3)))
            if "bias" in own:
                add(own["bias"], gg.sum((1, 3)))
        else:  # layernorm
            shape = tuple(module.normalized_shape)
            n = int(np.prod(shape))
            xhat = F.layer_norm(a, shape, None, None, module.eps)
            if "weight" in own:
                add(own["weight"], (g * xhat).reshape(B, -1, n).sum(1))
            if "bias" in own:
                add(own["bias"], g.reshape(B, -1, n).sum(1))

    def _factor(self, m: Member, side: str) -> torch.Tensor | None:
        """The projector's seeded factor (drawn on the CPU, the same on every device), on the model's device."""
        mat = self.projector.factor(m, side)
        if mat is None or mat.device == self.device:
            return mat
        key = (m.params[0], side)
        if key not in self._device_factors:
            self._device_factors[key] = mat.to(self.device)
        return self._device_factors[key]

    def _project_patches(self, module: nn.Conv2d, name: str, m: Member, a: torch.Tensor, padding) -> torch.Tensor:
        """P_inᵀ applied to every im2col row of the (padded) input: (R, k_in, L), as one convolution."""
        if name not in self._conv_kernels:
            p_in = self._factor(m, "in")
            mat = torch.eye(m.shape[1], device=self.device) if p_in is None else p_in
            self._conv_kernels[name] = mat.T.reshape(mat.shape[1], *module.weight.shape[1:]).contiguous()
        cols = F.conv2d(a, self._conv_kernels[name], None, module.stride, padding, module.dilation)
        return cols.reshape(cols.shape[0], cols.shape[1], -1)

    def _cond_grads(self, g_ctx, codes, B) -> dict[str, torch.Tensor]:
        """Per-example gradients of the context stage's parameters through its encoder (vmap over examples)."""
        if g_ctx is None:
            return {}
        gsum = g_ctx.reshape(B, -1, *g_ctx.shape[1:]).sum(1)
        if codes is None:
            codes = self.stage.default_codes(B).to(self.device)
        params = {n: self.named[n].detach() for n in self.cond_params}

        def f(p, c, gs):
            return (self.stage.encode(p, c.unsqueeze(0))[0] * gs).sum()

        per = vmap(grad(f), in_dims=(None, 0, 0))(params, codes, gsum)
        return {n: per[n].reshape(B, -1) for n in self.cond_params}

    # ---------------------------------------------------------------------------------- self-check
    def _check(self, out: torch.Tensor, batch: dict[str, torch.Tensor | None]) -> None:
        """Σ_b features must equal the projection of the batch gradient (refuse if not)."""
        summed = out.sum(0)
        for start, m in list(self.kron.values()) + self.dense:
            flat = [batch[p] if batch[p] is not None else torch.zeros_like(self.named[p]) for p in m.params]
            if m.kind == "kron":
                G = (flat[0].T if m.params[0] in self.transposed else flat[0]).reshape(m.shape)
                p_in, p_out = self._factor(m, "in"), self._factor(m, "out")
                G = G if p_out is None else p_out.T @ G
                ref = (G if p_in is None else G @ p_in).reshape(-1)
            else:
                v = torch.cat([x.reshape(-1) for x in flat])
                mat = self._factor(m, "dense")
                ref = v if mat is None else v @ mat
            got = summed[start + m.start:start + m.stop]
            err = float((got - ref).norm())
            if err > CHECK_RTOL * float(ref.norm()) + 1e-8:
                raise UserError(f"Kronecker features of {m.params[0]} do not add up to the batch gradient "
                                f"(error {err:.2e}); the model uses it outside its module's forward — "
                                f"use --projection rademacher")
