"""The DDIM update of diffusers' `DDIMScheduler`, with the noise split computed so that it is finite for every step.

DDIM moves x_t to x_prev = √ᾱ_prev · x̂0 + c · ε̂ + σ · z, where σ² = η² (1 − ᾱ_prev)/(1 − ᾱ_t) · (1 − ᾱ_t/ᾱ_prev)
and c² = 1 − ᾱ_prev − σ². diffusers computes c² as that difference in float32; at η = 1 it is (1 − ᾱ_prev) times
ᾱ_t (1 − ᾱ_prev) / (ᾱ_prev (1 − ᾱ_t)), which is about 1e-8 on the first step of a short trailing schedule
(t = 999 of the cosine schedule, ᾱ_t ≈ 2e-9), so the float32 difference rounds below zero and its square root is
NaN: every pixel of `sample --sample-steps 5` was NaN. Here c² and σ² are computed in float64 from those
non-negative factors, c² = (1 − ᾱ_prev) · ((1 − η²) + η² ᾱ_t (1 − ᾱ_prev) / (ᾱ_prev (1 − ᾱ_t))); everything else
(x̂0 and its clipping or thresholding, ε̂ re-derived from the clipped x̂0, the noise draw from the generator) is
diffusers' own step, so where diffusers is finite the result agrees with it to float32 rounding (a test compares
the two on the same inputs).
"""
from __future__ import annotations

import math

import torch
from diffusers import DDIMScheduler
from diffusers.schedulers.scheduling_ddim import DDIMSchedulerOutput
from diffusers.utils.torch_utils import randn_tensor


def ddim_coefficients(alpha_t: float, alpha_prev: float, eta: float) -> tuple[float, float]:
    """(c, σ) of one DDIM step from ᾱ_t to ᾱ_prev at noise level η, both finite and ≥ 0 (see the module doc)."""
    a, p, eta = float(alpha_t), float(alpha_prev), float(eta)
    ratio = a * (1.0 - p) / (p * (1.0 - a)) if p > 0.0 and a < 1.0 else 0.0  # = 1 − (1 − ᾱ_t/ᾱ_prev)/(1 − ᾱ_t)
    direction = max(0.0, (1.0 - p) * ((1.0 - eta * eta) + eta * eta * ratio))
    variance = max(0.0, eta * eta * (1.0 - p) * (p - a) / (p * (1.0 - a))) if p > 0.0 and a < 1.0 else 0.0
    return math.sqrt(direction), math.sqrt(variance)


class StableDDIMScheduler(DDIMScheduler):
    """`DDIMScheduler` whose `step` is finite for every schedule (see the module doc); a drop-in replacement,
    built with `StableDDIMScheduler.from_config(config)` and passed to diffusers' pipelines as their scheduler."""

    def step(self, model_output: torch.Tensor, timestep: int, sample: torch.Tensor, eta: float = 0.0,
             use_clipped_model_output: bool = False, generator: torch.Generator | None = None,
             variance_noise: torch.Tensor | None = None, return_dict: bool = True):
        if self.num_inference_steps is None:
            raise ValueError("Number of inference steps is 'None', you need to run 'set_timesteps' after creating "
                             "the scheduler")
        prev_timestep = timestep - self.config.num_train_timesteps // self.num_inference_steps
        alpha_prod_t = self.alphas_cumprod[timestep]
        alpha_prod_t_prev = self.alphas_cumprod[prev_timestep] if prev_timestep >= 0 else self.final_alpha_cumprod
        beta_prod_t = 1 - alpha_prod_t
        kind = self.config.prediction_type
        if kind == "epsilon":
            pred_original_sample = (sample - beta_prod_t ** 0.5 * model_output) / alpha_prod_t ** 0.5
            pred_epsilon = model_output
        elif kind == "sample":
            pred_original_sample = model_output
            pred_epsilon = (sample - alpha_prod_t ** 0.5 * pred_original_sample) / beta_prod_t ** 0.5
        elif kind == "v_prediction":
            pred_original_sample = (alpha_prod_t ** 0.5) * sample - (beta_prod_t ** 0.5) * model_output
            pred_epsilon = (alpha_prod_t ** 0.5) * model_output + (beta_prod_t ** 0.5) * sample
        else:
            raise ValueError(f"prediction_type given as {kind} must be one of `epsilon`, `sample`, or `v_prediction`")
        if self.config.thresholding:
            pred_original_sample = self._threshold_sample(pred_original_sample)
        elif self.config.clip_sample:
            pred_original_sample = pred_original_sample.clamp(-self.config.clip_sample_range,
                                                              self.config.clip_sample_range)
        if use_clipped_model_output:
            pred_epsilon = (sample - alpha_prod_t ** 0.5 * pred_original_sample) / beta_prod_t ** 0.5
        direction, std_dev_t = ddim_coefficients(alpha_prod_t, alpha_prod_t_prev, eta)
        prev_sample = alpha_prod_t_prev ** 0.5 * pred_original_sample + direction * pred_epsilon
        if eta > 0:
            if variance_noise is not None and generator is not None:
                raise ValueError("Cannot pass both generator and variance_noise.")
            if variance_noise is None:
                variance_noise = randn_tensor(model_output.shape, generator=generator, device=model_output.device,
                                              dtype=model_output.dtype)
            prev_sample = prev_sample + std_dev_t * variance_noise
        if not return_dict:
            return prev_sample, pred_original_sample
        return DDIMSchedulerOutput(prev_sample=prev_sample, pred_original_sample=pred_original_sample)
