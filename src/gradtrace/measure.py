"""What is differentiated: the per-example output function of a diffusion model.

For an example x0 with id i, T timesteps t_1..t_T spaced uniformly over the schedule and one noise draw
ε_{i,t} per (example, timestep) from a seed derived from (noise seed, i, t):

    x_t = sqrt(ᾱ_t) x0 + sqrt(1 − ᾱ_t) ε_{i,t}
    f(θ; x0) = (1/T) Σ_t m(ε_θ(x_t, t, c), ε_{i,t})

with m one of
- ``loss``:  mean((ε_θ − ε)²), the ε-prediction training loss (TRAK's output function);
- ``dtrak``: mean(ε_θ²), the squared L2 norm of the output (D-TRAK);
- ``mean``:  mean(ε_θ).

An example's noise depends only on (seed, id, t), never on batch size, order or composition.
"""
from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass

import numpy as np
import torch

from gradtrace.errors import UserError

MEASUREMENTS = ("loss", "dtrak", "mean")


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


def timestep_grid(num_timesteps: int, num_train_timesteps: int) -> tuple[int, ...]:
    """T timesteps spaced uniformly over [0, num_train_timesteps): the centres of T equal bins."""
    T = int(num_timesteps)
    if T < 1 or T > num_train_timesteps:
        raise UserError(f"number of timesteps must be in 1..{num_train_timesteps}, got {num_timesteps}")
    return tuple(int((i + 0.5) * num_train_timesteps / T) for i in range(T))


def derive_seed(*parts: int) -> int:
    """A 63-bit seed from integers, stable across platforms and processes."""
    digest = hashlib.sha256(":".join(str(int(p)) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def example_noise(seed: int, ids, timesteps, shape: tuple[int, ...]) -> torch.Tensor:
    ids = np.asarray(ids, dtype=np.int64).reshape(-1)
    out = torch.empty((len(ids), len(timesteps), *shape), dtype=torch.float32)
    gen = torch.Generator()
    for b, i in enumerate(ids):
        for j, t in enumerate(timesteps):
            gen.manual_seed(derive_seed(seed, i, t))
            out[b, j] = torch.randn(shape, generator=gen)
    return out
