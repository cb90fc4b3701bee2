"""The diffusion adapter's models: configs, the UNet wrapper (incl. torch.func), checkpoints and sampling."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler
from torch.func import functional_call, grad, vmap

from gradtrace.adapters import get_adapter
from gradtrace.adapters.checkpoint import count_parameters, model_fingerprint, save_checkpoint
from gradtrace.adapters.diffusion import build_model, default_model_config, make_scheduler, sample
from gradtrace.adapters.diffusion.train import TrainConfig
from gradtrace.errors import UserError

load_checkpoint = get_adapter("diffusion-unet").load

ATTRS = {"subject": ["cat", "dog", "car", "tree"], "style": ["flat", "stripes", "dots"],
         "background": ["dark", "light"]}


def uncond_config():
    return default_model_config("unconditional", channels=1, size=8)


def cond_config():
    return default_model_config("conditional", channels=3, size=16, attributes=ATTRS)


def tiny_cond_config():
    """A smaller conditional model (8x8, channels 8/16) for the sampling tests: same code paths, less compute."""
    cfg = default_model_config("conditional", channels=3, size=8, attributes=ATTRS)
    cfg["unet"]["block_out_channels"] = [8, 16]
    return cfg


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: torch single-threaded for this module


@pytest.fixture(scope="module")
def tiny_cond():
    return build_model(tiny_cond_config(), seed=5)


@pytest.fixture(scope="module")
def cond_model():
    return build_model(cond_config(), seed=3)


@pytest.fixture(scope="module")
def uncond_model():
    return build_model(uncond_config(), seed=3)


# ---------------------------------------------------------------- configs and the wrapper

def test_parameter_counts_in_target_ranges(uncond_model, cond_model):
    assert 150_000 <= count_parameters(uncond_model) <= 200_000
    assert 200_000 <= count_parameters(cond_model) <= 300_000
    # conditioning parameters: one (V+1, 32) table and one 32-vector per attribute
    extra = sum((len(v) + 1) * 32 + 32 for v in ATTRS.values())
    cond_only = sum(p.numel() for n, p in cond_model.named_parameters() if n.startswith("cond_"))
    assert cond_only == extra
    assert all(p.requires_grad for p in cond_model.parameters())


def test_configs_are_json_and_checked():
    for cfg in (uncond_config(), cond_config()):
        assert json.loads(json.dumps(cfg)) == cfg
        assert cfg["scheduler"]["num_train_timesteps"] == 1000
    with pytest.raises(UserError, match="attribute"):
        default_model_config("conditional", channels=3, size=16, attributes=None)
    with pytest.raises(UserError, match="unknown model kind"):
        default_model_config("text", channels=3, size=16)
    with pytest.raises(UserError, match="identifier"):
        default_model_config("conditional", channels=3, size=16, attributes={"a.b": ["x"]})
    sched = make_scheduler(cond_config())
    assert len(sched.alphas_cumprod) == 1000


def test_build_model_is_seeded_and_leaves_global_rng_alone():
    torch.manual_seed(123)
    expected_next = torch.rand(1)
    torch.manual_seed(123)
    a, b, c = build_model(uncond_config(), 0), build_model(uncond_config(), 0), build_model(uncond_config(), 1)
    assert torch.equal(torch.rand(1), expected_next)
    assert model_fingerprint(a) == model_fingerprint(b) != model_fingerprint(c)
    names = [n for n, _ in a.named_parameters()]
    assert names[0].startswith("unet.") and any(n.startswith("unet.down_blocks.0.") for n in names)


def test_condition_embedding_matches_table_lookup(cond_model):
    cond = torch.tensor([[0, 2, 1], [-1, -1, -1], [3, -1, 0]])
    ctx = cond_model.encode_cond(cond, 3)
    assert ctx.shape == (3, 3, 32)
    for b in range(3):
        for a, name in enumerate(cond_model.attribute_names):
            table = cond_model.cond_embed[name].detach()
            row = table[-1] if cond[b, a] < 0 else table[cond[b, a]]
            torch.testing.assert_close(ctx[b, a], row + cond_model.cond_pos[name].detach(), rtol=0, atol=0)
    x, t = torch.randn(3, 3, 16, 16), torch.tensor([1, 500, 999])
    with torch.no_grad():
        torch.testing.assert_close(cond_model(x, t, None), cond_model(x, t, torch.full((3, 3), -1)))
        assert not torch.allclose(cond_model(x, t, None), cond_model(x, t, cond))


def test_unconditional_ignores_cond(uncond_model):
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([3, 700])
    with torch.no_grad():
        out = uncond_model(x, t)
        assert out.shape == x.shape
        assert torch.equal(out, uncond_model(x, t, torch.zeros(2, 3, dtype=torch.long)))


@pytest.mark.parametrize("kind", ["unconditional", "conditional"])
def test_vmap_grad_equals_per_example_autograd(kind, uncond_model, cond_model):
    model = uncond_model if kind == "unconditional" else cond_model
    c, s = model.channels, model.size
    gen = torch.Generator().manual_seed(0)
    n, T = 3, 4
    x = torch.randn(n, T, c, s, s, generator=gen)
    t = torch.randint(0, 1000, (n, T), generator=gen)
    eps = torch.randn(n, T, c, s, s, generator=gen)
    cond = torch.randint(-1, 2, (n, T, 3), generator=gen)
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss(p, xi, ti, ci, ei):
        out = functional_call(model, p, (xi, ti, ci if model.conditional else None))
        return ((out - ei) ** 2).mean()

    grads = vmap(grad(loss), in_dims=(None, 0, 0, 0, 0))(params, x, t, cond, eps)
    for i in range(n):
        model.zero_grad()
        loss(dict(model.named_parameters()), x[i], t[i], cond[i], eps[i]).backward()
        ref = torch.cat([p.grad.flatten() for _, p in model.named_parameters()])
        got = torch.cat([grads[k][i].flatten() for k, _ in model.named_parameters()])
        assert ref.norm() > 0
        assert ((got - ref).norm() / ref.norm()).item() <= 1e-5
    model.zero_grad(set_to_none=True)


# ---------------------------------------------------------------- checkpoints

def test_checkpoint_round_trip(tmp_path, cond_model):
    ids = np.array([2, 5, 7])
    path = save_checkpoint(tmp_path / "ck", cond_model, train_config=TrainConfig(steps=7),
                           dataset_info={"name": "fake", "n": 10}, train_ids=ids, extra={"note": "x"})
    assert sorted(p.name for p in path.iterdir()) == ["config.json", "model.safetensors"]
    ck = load_checkpoint(path)
    assert ck.fingerprint == model_fingerprint(cond_model)
    assert ck.config["fingerprint"] == ck.fingerprint
    assert ck.config["train_ids"] == [2, 5, 7] and ck.train_ids.tolist() == [2, 5, 7]
    assert ck.config["train_config"]["steps"] == 7
    assert ck.config["n_parameters"] == count_parameters(cond_model)
    assert ck.config["format"] == "gradtrace.checkpoint" and "torch" in ck.config["versions"]
    assert not ck.model.training and ck.model.attribute_values == ATTRS
    assert ck.extras["scheduler"].config.beta_schedule == cond_model.config["scheduler"]["beta_schedule"]
    x, t = torch.randn(4, 3, 16, 16), torch.tensor([0, 10, 500, 999])
    cond = torch.tensor([[0, 1, -1], [3, 2, 1], [-1, -1, -1], [1, 0, 0]])
    with torch.no_grad():
        assert torch.equal(ck.model(x, t, cond), cond_model(x, t, cond))


def test_the_same_weights_are_saved_as_the_same_bytes(tmp_path, uncond_model):
    """Bytes, not only tensors: a resumed run is checked byte for byte against an uninterrupted one."""
    files = [(save_checkpoint(tmp_path / f"ck{i}", uncond_model, train_config={"steps": 1}, dataset_info=None)
              / "model.safetensors").read_bytes() for i in range(12)]
    assert all(f == files[0] for f in files)


def test_checkpoint_errors_name_the_path(tmp_path, uncond_model):
    with pytest.raises(UserError, match="not found"):
        load_checkpoint(tmp_path / "nope")
    path = save_checkpoint(tmp_path / "ck", uncond_model, train_config={"steps": 1}, dataset_info=None)
    weights = path / "model.safetensors"
    good = weights.read_bytes()

    weights.write_bytes(good[: len(good) // 2])  # truncated
    with pytest.raises(UserError, match="corrupt") as err:
        load_checkpoint(path)
    assert str(weights) in str(err.value)

    other = build_model(uncond_config(), seed=99)  # valid file, other weights
    from safetensors.torch import save_file
    save_file({k: v.contiguous() for k, v in other.state_dict().items()}, str(weights))
    with pytest.raises(UserError, match="fingerprint"):
        load_checkpoint(path)

    weights.write_bytes(good)
    load_checkpoint(path)  # restored -> loads
    (path / "config.json").write_text("{broken")
    with pytest.raises(UserError, match="not valid JSON"):
        load_checkpoint(path)
    (path / "config.json").unlink()
    with pytest.raises(UserError, match="no config.json"):
        load_checkpoint(path)


# ---------------------------------------------------------------- sampling

def _manual_ddim(model, scheduler, n, cond, g, steps, eta, seed):
    """Independent guided DDIM loop (two separate forward passes per step)."""
    sched = DDIMScheduler.from_config(scheduler.config)
    sched.set_timesteps(steps)
    gen = torch.Generator().manual_seed(seed)
    x, null = torch.randn((n, 3, 8, 8), generator=gen), torch.full_like(cond, -1)
    with torch.no_grad():
        for t in sched.timesteps:
            tt = torch.full((x.shape[0],), int(t))
            e_c, e_n = model(x, tt, cond), model(x, tt, null)
            x = sched.step(e_n + g * (e_c - e_n), t, x, eta=eta, use_clipped_model_output=True,
                           generator=gen).prev_sample
    return x.clamp(-1, 1)


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_sampling_matches_manual_guided_ddim(tiny_cond, eta):
    sched = make_scheduler(tiny_cond.config)
    n, steps = 3, 4
    req = {"subject": "dog", "background": "light"}
    expected_codes = np.array([[1, -1, 1]] * n)
    for g in (1.0, 3.0, 0.0):
        img, codes = sample(tiny_cond, sched, n, attributes=req, guidance_scale=g, steps=steps, seed=11,
                            progress=False, eta=eta)
        assert np.array_equal(codes, expected_codes)
        ref = _manual_ddim(tiny_cond, sched, n, torch.as_tensor(expected_codes), g, steps, eta, 11)
        torch.testing.assert_close(img, ref, rtol=0, atol=1e-2)
        assert (img - ref).abs().mean() < 1e-4
    # g = 0 is the all-null prediction: the same as sampling with no attributes at all
    img0, _ = sample(tiny_cond, sched, n, attributes=req, guidance_scale=0.0, steps=steps, seed=11, progress=False,
                     eta=eta)
    none, codes = sample(tiny_cond, sched, n, attributes=None, steps=steps, seed=11, progress=False, eta=eta)
    assert (codes == -1).all()
    torch.testing.assert_close(img0, none, rtol=0, atol=1e-2)
    assert (img0 - none).abs().mean() < 1e-4


def test_sampling_is_deterministic_and_codes_accepted(tiny_cond):
    sched = make_scheduler(tiny_cond.config)
    kw = dict(steps=3, progress=False)
    a, _ = sample(tiny_cond, sched, 5, attributes={"style": "dots"}, seed=1, **kw)
    b, _ = sample(tiny_cond, sched, 5, attributes=np.array([-1, 2, -1]), seed=1, batch_size=5, **kw)
    assert torch.equal(a, b)  # codes array == dict request; default (eta=1) sampling is seeded
    a, _ = sample(tiny_cond, sched, 5, attributes={"style": "dots"}, seed=1, eta=0.0, **kw)
    b, _ = sample(tiny_cond, sched, 5, attributes={"style": "dots"}, seed=1, eta=0.0, batch_size=2, **kw)
    c, _ = sample(tiny_cond, sched, 5, attributes={"style": "dots"}, seed=2, eta=0.0, **kw)
    # ddim, eta=0: independent of batch size up to float noise (amplified ~1e4x by the first step at t=999)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-2)
    assert (a - b).abs().mean() < 1e-4
    assert not torch.allclose(a, c)
    assert a.shape == (5, 3, 8, 8) and a.min() >= -1 and a.max() <= 1
    d1, _ = sample(tiny_cond, sched, 2, sampler="ddpm", seed=4, **kw)
    d2, _ = sample(tiny_cond, sched, 2, sampler="ddpm", seed=4, **kw)
    assert torch.equal(d1, d2)


def test_sampling_bad_requests_raise(tiny_cond, uncond_model):
    sched = make_scheduler(tiny_cond.config)
    with pytest.raises(UserError, match=r"valid values are \['cat', 'dog', 'car', 'tree'\]"):
        sample(tiny_cond, sched, 1, attributes={"subject": "horse"}, steps=1, progress=False)
    with pytest.raises(UserError, match="unknown attribute 'colour'.*subject"):
        sample(tiny_cond, sched, 1, attributes={"colour": "red"}, steps=1, progress=False)
    with pytest.raises(UserError, match="out of range"):
        sample(tiny_cond, sched, 1, attributes=np.array([4, 0, 0]), steps=1, progress=False)
    with pytest.raises(UserError, match="eta"):
        sample(tiny_cond, sched, 1, eta=2.0, steps=1, progress=False)
    with pytest.raises(UserError, match="unknown sampler"):
        sample(tiny_cond, sched, 1, sampler="euler", steps=1, progress=False)
    with pytest.raises(UserError, match="unconditional"):
        sample(uncond_model, make_scheduler(uncond_model.config), 1, attributes={"subject": "cat"},
               steps=1, progress=False)
    img, codes = sample(uncond_model, make_scheduler(uncond_model.config), 2, steps=2, progress=False)
    assert img.shape == (2, 1, 8, 8) and codes is None
