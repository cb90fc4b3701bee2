"""The DDIM update (`StableDDIMScheduler.step`) against diffusers' `DDIMScheduler.step` on the same inputs and the
same noise, over schedules, spacings, step counts, η and prediction types; and finite where diffusers is not (a
short trailing cosine schedule at η = 1), equal there to the update computed in float64 from its definition."""
import itertools

import pytest
import torch
from diffusers import DDIMScheduler

from fixtures.pipelines import tiny_ddpm
from fixtures.unet import tiny_model
from gradtrace.adapters import adapter_of
from gradtrace.adapters.diffusion import sample
from gradtrace.adapters.diffusion.ddim import StableDDIMScheduler

pytestmark = pytest.mark.usefixtures("one_thread")


def config(schedule, spacing, prediction):
    return dict(num_train_timesteps=1000, beta_schedule=schedule, prediction_type=prediction, clip_sample=True,
                clip_sample_range=1.0, timestep_spacing=spacing)


def steps_of(cfg, steps, eta, clipped):
    """Yield (t, x, out, z, ours, diffusers', scheduler) for random inputs at every step, both given the same noise."""
    ours, theirs = StableDDIMScheduler(**cfg), DDIMScheduler(**cfg)
    ours.set_timesteps(steps)
    theirs.set_timesteps(steps)
    gen = torch.Generator().manual_seed(steps)
    for t in theirs.timesteps:
        x, out, z = (torch.randn(3, 1, 4, 4, generator=gen) for _ in range(3))
        a = ours.step(out, t, x, eta=eta, use_clipped_model_output=clipped, variance_noise=z, return_dict=False)
        b = theirs.step(out, t, x, eta=eta, use_clipped_model_output=clipped, variance_noise=z, return_dict=False)
        yield int(t), x, out, z, a, b, theirs


def definition(sched, t, x, out, z, eta, clipped):
    """One DDIM step from its definition in float64: x̂0 (clipped), ε̂, σ² and c² = 1 − ᾱ_prev − σ² (≥ 0)."""
    a = sched.alphas_cumprod[t].double()
    p_t = t - sched.config.num_train_timesteps // sched.num_inference_steps
    p = sched.alphas_cumprod[p_t].double() if p_t >= 0 else torch.tensor(1.0, dtype=torch.float64)
    x, out, z = x.double(), out.double(), z.double()
    if sched.config.prediction_type == "epsilon":
        x0, eps = (x - (1 - a).sqrt() * out) / a.sqrt(), out
    else:
        x0, eps = a.sqrt() * x - (1 - a).sqrt() * out, a.sqrt() * out + (1 - a).sqrt() * x
    x0 = x0.clamp(-1, 1)
    if clipped:
        eps = (x - a.sqrt() * x0) / (1 - a).sqrt()
    var = eta ** 2 * (1 - p) / (1 - a) * (1 - a / p)
    direction = torch.clamp(1 - p - var, min=0).sqrt()
    well_posed = float(1 - p - var) > 1e-3  # float32's 1 − ᾱ_prev − σ² keeps at least four digits
    return (p.sqrt() * x0 + direction * eps + var.sqrt() * z).float(), well_posed


CASES = list(itertools.product(["squaredcos_cap_v2", "linear"], ["trailing", "leading"], [5, 10, 50],
                               [0.0, 0.5, 1.0], [True, False], ["epsilon", "v_prediction"]))


@pytest.mark.parametrize("schedule,spacing,steps,eta,clipped,prediction", CASES)
def test_the_step_is_the_definition_and_equals_diffusers_where_that_is_well_posed(schedule, spacing, steps, eta,
                                                                                   clipped, prediction):
    compared = 0
    for t, x, out, z, (prev, x0), (ref_prev, ref_x0), sched in steps_of(config(schedule, spacing, prediction),
                                                                          steps, eta, clipped):
        want, well_posed = definition(sched, t, x, out, z, eta, clipped)
        torch.testing.assert_close(prev, want, rtol=1e-5, atol=2e-6)
        torch.testing.assert_close(x0, ref_x0, rtol=0, atol=0)
        if well_posed:
            torch.testing.assert_close(prev, ref_prev, rtol=1e-5, atol=2e-6)
            compared += 1
    assert compared >= steps // 2


def test_where_diffusers_is_nan_the_step_is_finite_and_the_definition():
    """The reported case: cosine, trailing, 5 steps, η = 1 — diffusers' first step is NaN everywhere."""
    cfg = config("squaredcos_cap_v2", "trailing", "epsilon")
    nan_steps = 0
    for t, x, out, z, (prev, _), (ref_prev, _), sched in steps_of(cfg, 5, 1.0, True):
        nan_steps += int(torch.isnan(ref_prev).any())
        assert torch.isfinite(prev).all()
        torch.testing.assert_close(prev, definition(sched, t, x, out, z, 1.0, True)[0], rtol=1e-5, atol=2e-6)
    assert nan_steps >= 1  # the case still breaks diffusers' own step: the comparison above is the point


def test_five_step_samples_are_finite_and_ten_steps_unchanged():
    """Through the sampler: 5 steps at η = 1 finite; at 10 steps (finite in diffusers) the samples equal what
    diffusers' own scheduler gives with the same model and seed."""
    model, scheduler = tiny_model("unconditional")
    images, _ = sample(model, scheduler, 4, steps=5, eta=1.0, progress=False)
    assert torch.isfinite(images).all()
    ours, _ = sample(model, scheduler, 4, steps=10, eta=1.0, progress=False)
    gen = torch.Generator().manual_seed(0)
    ref = DDIMScheduler.from_config(scheduler.config)
    x = torch.randn((4, model.channels, model.size, model.size), generator=gen)
    ref.set_timesteps(10)
    with torch.no_grad():
        for t in ref.timesteps:
            eps = model(x, torch.full((4,), int(t), dtype=torch.long), None)
            x = ref.step(eps, t, x, eta=1.0, use_clipped_model_output=True, generator=gen, return_dict=False)[0]
    torch.testing.assert_close(ours, x.clamp(-1, 1), rtol=1e-4, atol=2e-4)


def test_a_diffusers_ddim_pipeline_samples_five_steps_finitely(tmp_path):
    tiny_ddpm(tmp_path / "pipe")
    adapter = adapter_of(tmp_path / "pipe")
    ckpt = adapter.load(tmp_path / "pipe")
    images, _ = adapter.sample(ckpt, 2, steps=5, sampler="ddim", eta=1.0, progress=False)
    assert torch.isfinite(images).all()
