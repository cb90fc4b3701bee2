"""What is differentiated: the per-example output function of a diffusion model.

For an example x0 with id i, T timesteps t_1..t_T spaced uniformly over the schedule and one noise draw
ε_{i,t} per (example, timestep) from a seed derived from (noise seed, i, t):

    x_t = sqrt(ᾱ_t) x0 + sqrt(1 − ᾱ_t) ε_{i,t}
    f(θ; x0) = (1/T) Σ_t m(ε_θ(x_t, t, c), ε_{i,t})

with m one of
- ``loss``:  mean((ε_θ − ε)²), the ε-prediction training loss (TRAK's output function);
- ``dtrak``: mean(ε_θ²), the squared L2 norm of the output (D-TRAK);
- ``mean``:  mean(ε_θ);
- ``das``:   mean(ε_θ), the output function of DAS (Lin et al., ICLR 2025), whose stores also hold each
  example's residual factor (`residual_factor`, the DAS method's per-training-example scale).

An example's noise depends only on (seed, id, t), never on batch size, order or composition.
`DiffusionObjective` is this measurement as the featurizers see it (`gradtrace.adapters.base.Objective`).
"""
from __future__ import annotations

import copy
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import nn
from torch.func import functional_call, vmap

from gradtrace.adapters.base import ContextStage, Objective
from gradtrace.errors import UserError
from gradtrace.io import derive_seed

MEASUREMENTS = ("loss", "dtrak", "mean", "das")
# DAS's residual factor: E timesteps spaced over the schedule (the DAS code uses 1,000; 100 keeps the cost
# at 10x the T = 10 featurization forward passes) and its own noise stream.
RESIDUAL_TIMESTEPS = 100
RESIDUAL_STREAM = 0x444153  # "DAS"


@dataclass(frozen=True)
class Measurement:
    name: str = "loss"
    timesteps: tuple[int, ...] = ()
    noise_seed: int = 0

    def __post_init__(self):
        if self.name not in MEASUREMENTS:
            raise UserError(f"unknown measurement '{self.name}'; use one of {', '.join(MEASUREMENTS)}")
        if not self.timesteps:
            raise UserError("a measurement needs at least one timestep; pass T >= 1")

    @classmethod
    def create(cls, name: str, num_timesteps: int, num_train_timesteps: int, noise_seed: int = 0):
        return cls(name=name, timesteps=timestep_grid(num_timesteps, num_train_timesteps),
                   noise_seed=int(noise_seed))

    def info(self) -> dict:
        d = asdict(self)
        d["timesteps"] = list(self.timesteps)
        return d

    @classmethod
    def from_info(cls, info: dict) -> "Measurement":
        return cls(name=info["name"], timesteps=tuple(info["timesteps"]), noise_seed=int(info["noise_seed"]))

    def noise(self, ids, shape: tuple[int, ...]) -> torch.Tensor:
        """(B, T, *shape) standard normal noise, one draw per (example id, timestep)."""
        return example_noise(self.noise_seed, ids, self.timesteps, shape)

    def noisy_inputs(self, x0: torch.Tensor, noise: torch.Tensor, alphas_cumprod: torch.Tensor):
        """x_t for every (example, timestep): (B, T, C, H, W), and the timesteps as a (T,) long tensor."""
        t = torch.tensor(self.timesteps, dtype=torch.long)
        abar = alphas_cumprod.to(torch.float32)[t].view(1, -1, *([1] * (x0.dim() - 1)))
        xt = abar.sqrt() * x0.unsqueeze(1) + (1.0 - abar).sqrt() * noise
        return xt, t

    def reduce(self, eps_pred: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """The scalar output for one example from its T predictions (any leading shape, averaged)."""
        if self.name == "loss":
            return ((eps_pred - noise) ** 2).mean()
        if self.name == "dtrak":
            return (eps_pred ** 2).mean()
        return eps_pred.mean()


BAND_NAMES = {1: ("all",), 2: ("high", "low"), 3: ("high", "mid", "low")}


def band_names(n: int) -> tuple[str, ...]:
    """Names of n timestep bands, high noise (large t) first: high / mid / low up to 3, else b0 (highest) ..."""
    return BAND_NAMES.get(int(n)) or tuple(f"b{i}" for i in range(int(n)))


def band_timesteps(timesteps, n: int) -> list[tuple[int, ...]]:
    """The grid split into n contiguous bands of (nearly) equal count, high noise first, each ascending."""
    ts = sorted(int(t) for t in timesteps)
    if isinstance(n, bool) or int(n) != n or n < 1 or n > len(ts):
        raise UserError(f"--timestep-bands must be in 1..{len(ts)} (the number of timesteps T); got {n}: raise "
                        "--timesteps or lower --timestep-bands")
    parts = np.array_split(np.array(ts[::-1], dtype=np.int64), int(n))
    return [tuple(sorted(int(t) for t in p)) for p in parts]


def timestep_grid(num_timesteps: int, num_train_timesteps: int) -> tuple[int, ...]:
    """T timesteps spaced uniformly over [0, num_train_timesteps): the centres of T equal bins."""
    T = int(num_timesteps)
    if T < 1 or T > num_train_timesteps:
        raise UserError(f"number of timesteps must be in 1..{num_train_timesteps}, got {num_timesteps}")
    return tuple(int((i + 0.5) * num_train_timesteps / T) for i in range(T))


def example_noise(seed: int, ids, timesteps, shape: tuple[int, ...]) -> torch.Tensor:
    ids = np.asarray(ids, dtype=np.int64).reshape(-1)
    out = torch.empty((len(ids), len(timesteps), *shape), dtype=torch.float32)
    gen = torch.Generator()
    for b, i in enumerate(ids):
        for j, t in enumerate(timesteps):
            gen.manual_seed(derive_seed(seed, i, t))
            out[b, j] = torch.randn(shape, generator=gen)
    return out


class DiffusionObjective(Objective):
    """A `Measurement` on a noise schedule: examples are (images, ids, attribute codes or None)."""

    def __init__(self, measurement: Measurement, alphas_cumprod: torch.Tensor):
        self.measurement = measurement
        self.alphas_cumprod = alphas_cumprod.detach().to(torch.float32)

    @classmethod
    def create(cls, scheduler, name: str, num_timesteps: int, noise_seed: int = 0) -> "DiffusionObjective":
        measurement = Measurement.create(name, num_timesteps, scheduler.config.num_train_timesteps, noise_seed)
        return cls(measurement, scheduler.alphas_cumprod)

    def info(self) -> dict:
        return self.measurement.info()

    def to(self, device: torch.device) -> "DiffusionObjective":
        self.alphas_cumprod = self.alphas_cumprod.to(device)
        return self

    @property
    def device(self) -> torch.device:
        return self.alphas_cumprod.device

    def _noisy(self, inputs, ids):
        images = torch.as_tensor(inputs, dtype=torch.float32).to(self.device)
        noise = self.measurement.noise(ids, tuple(images.shape[1:])).to(self.device)
        xt, t = self.measurement.noisy_inputs(images, noise, self.alphas_cumprod)
        return images, noise, xt, t.to(self.device)

    def condition(self, cond) -> torch.Tensor:
        """The model's conditioning input for a chunk's `cond` (here: attribute codes as a long tensor)."""
        return torch.as_tensor(np.asarray(cond), dtype=torch.long).to(self.device)

    def example_inputs(self, inputs, ids, cond):
        _, noise, xt, t = self._noisy(inputs, ids)
        if cond is None:
            return (xt, noise, None, t), (0, 0, None, None)
        return (xt, noise, self.condition(cond), t), (0, 0, 0, None)

    def example_output(self, forward, xt, noise, cond, t):
        if cond is not None:
            cond = cond.unsqueeze(0).expand(t.shape[0], *cond.shape)
        return self.measurement.reduce(forward(xt, t, cond), noise)

    def row_scale_info(self) -> dict | None:
        if self.measurement.name != "das":
            return None
        grid = timestep_grid(RESIDUAL_TIMESTEPS, int(self.alphas_cumprod.shape[0]))
        return {"kind": "das-residual", "timesteps": list(grid),
                "noise_seed": derive_seed(RESIDUAL_STREAM, self.measurement.noise_seed),
                "definition": "mean_t r_t / ||r||_2, r_t = RMS(eps_theta(x_t, t) - eps)"}

    @torch.no_grad()
    def row_scale(self, model, inputs, ids, cond) -> np.ndarray | None:
        """DAS's residual factor of each example (None for other measurements): with r_t the RMS of
        ε_θ(x_t, t) − ε on each timestep t of an E-point grid (one noise draw per (example, t)),
        e = mean_t r_t / ‖r‖₂, as the DAS code computes its training error (scale-free: in [1/E, 1/√E],
        the flatness of the residual over the schedule)."""
        info = self.row_scale_info()
        if info is None:
            return None
        grid = tuple(info["timesteps"])
        images = torch.as_tensor(inputs, dtype=torch.float32)
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        states = None if cond is None else self.condition(cond)
        t_all = torch.tensor(grid, dtype=torch.long, device=self.device)
        abar = self.alphas_cumprod[t_all].view(-1, *([1] * (images.dim() - 1)))
        out = np.empty(len(ids), dtype=np.float64)
        for b in range(len(ids)):
            noise = example_noise(info["noise_seed"], ids[b:b + 1], grid, tuple(images.shape[1:]))[0]
            noise = noise.to(self.device)
            x0 = images[b:b + 1].to(self.device)
            xt = abar.sqrt() * x0 + (1.0 - abar).sqrt() * noise
            c = None if states is None else states[b:b + 1].expand(len(grid), *states.shape[1:])
            eps = model(xt, t_all, c)
            r = ((eps.float() - noise) ** 2).flatten(1).mean(1).sqrt().double()
            out[b] = float(r.mean() / r.norm())
        return out

    def batch_total(self, model, inputs, ids, cond):
        """All B·T noisy copies (example-major) through the model as one batch; Σ_b of the measurements."""
        images, noise, xt, t = self._noisy(inputs, ids)
        B, T = images.shape[0], int(t.shape[0])
        codes = None if cond is None else self.condition(cond)
        rows_c = None if codes is None else codes.repeat_interleave(T, dim=0)
        eps = model(xt.reshape(B * T, *images.shape[1:]), t.repeat(B), rows_c)
        return vmap(self.measurement.reduce)(eps.reshape(B, T, *eps.shape[1:]), noise).sum()

    def timestep_bands(self, n: int) -> list[tuple[str, "DiffusionObjective"]]:
        """[(name, this objective on that band's timesteps only)], high noise first; the noise of each (example,
        t) is the same as on the whole grid."""
        out = []
        for name, ts in zip(band_names(n), band_timesteps(self.measurement.timesteps, n)):
            band = copy.copy(self)
            band.measurement = Measurement(name=self.measurement.name, timesteps=ts,
                                           noise_seed=self.measurement.noise_seed)
            out.append((name, band))
        return out

    def context_stage(self, model: nn.Module) -> ContextStage | None:
        """The attribute-token tables (outside the UNet) reach it only as encoder_hidden_states."""
        if not (hasattr(model, "encode_cond") and isinstance(getattr(model, "unet", None), nn.Module)):
            return None
        encoder = _CondEncoder(model)

        def encode(params: dict, codes: torch.Tensor) -> torch.Tensor:
            return functional_call(encoder, {f"model.{n}": v for n, v in params.items()}, (codes,))

        params = [n for n, _ in model.named_parameters() if not n.startswith("unet.")]
        return ContextStage(params=params, module=model.unet, kwarg="encoder_hidden_states", encode=encode,
                            default_codes=model.null_cond)


class _CondEncoder(nn.Module):
    """Calls DiffusionModel.encode_cond so that torch.func.functional_call can swap its tables."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, cond: torch.Tensor) -> torch.Tensor:
        return self.model.encode_cond(cond, cond.shape[0])
