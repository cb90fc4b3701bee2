"""The ddpm-cifar10 model config: the CIFAR-10 DDPM UNet, counted against its architecture in closed form."""
import pytest
import torch

from gradtrace.adapters.diffusion import build_model, make_scheduler
from gradtrace.adapters.diffusion.configs import DDPM_CIFAR10, default_model_config
from gradtrace.errors import UserError


def _closed_form_count(c_img=3, ch=(128, 256, 256, 256), layers=2, attn_levels=(1,)):
    """Parameters of the DDPM UNet from its layer shapes (Ho et al.'s architecture as diffusers lays it out)."""
    temb = 4 * ch[0]

    def conv(cin, cout, k=3):
        return cin * cout * k * k + cout

    def resnet(cin, cout):
        return 2 * cin + conv(cin, cout) + temb * cout + cout + 2 * cout + conv(cout, cout) + \
            (conv(cin, cout, 1) if cin != cout else 0)

    def attn(c):  # one head: group norm, q, k, v and the output projection
        return 2 * c + 4 * (c * c + c)

    n = conv(c_img, ch[0]) + (ch[0] * temb + temb) + (temb * temb + temb)
    skips, prev = [ch[0]], ch[0]
    for i, c in enumerate(ch):
        for _ in range(layers):
            n += resnet(prev, c) + (attn(c) if i in attn_levels else 0)
            prev = c
            skips.append(c)
        if i < len(ch) - 1:
            n += conv(c, c)
            skips.append(c)
    n += 2 * resnet(ch[-1], ch[-1]) + attn(ch[-1])
    for i, c in enumerate(reversed(ch)):
        level = len(ch) - 1 - i
        for _ in range(layers + 1):
            n += resnet(prev + skips.pop(), c) + (attn(c) if level in attn_levels else 0)
            prev = c
        if level > 0:
            n += conv(c, c)
    return n + 2 * ch[0] + conv(ch[0], c_img)


def test_ddpm_cifar10_has_the_architectures_parameter_count_and_runs():
    cfg = default_model_config(DDPM_CIFAR10, channels=3, size=32)
    model = build_model(cfg, seed=0)
    count = sum(p.numel() for p in model.parameters())
    assert count == _closed_form_count()
    assert 35.6e6 < count < 35.8e6  # "35.7M parameters", the published size of google/ddpm-cifar10-32
    sched = make_scheduler(cfg)
    assert float(sched.betas[0]) == pytest.approx(1e-4) and float(sched.betas[-1]) == pytest.approx(0.02)
    x = torch.zeros(1, 3, 32, 32)
    with torch.no_grad():
        assert model(x, torch.tensor([10])).shape == (1, 3, 32, 32)


def test_ddpm_cifar10_refuses_sizes_it_cannot_downsample():
    with pytest.raises(UserError, match="multiple of 8"):
        default_model_config(DDPM_CIFAR10, channels=3, size=12)


def test_the_adapter_offers_ddpm_cifar10_as_a_model():
    from types import SimpleNamespace

    from gradtrace.adapters import get_adapter

    adapter = get_adapter("diffusion-unet")
    assert DDPM_CIFAR10 in adapter.model_kinds
    ds = SimpleNamespace(name="mine", channels=3, size=32, attributes={"colour": ["red", "blue"]})
    cfg = adapter.default_model_config(ds, DDPM_CIFAR10)
    assert cfg["kind"] == "unconditional" and cfg["unet"]["block_out_channels"] == [128, 256, 256, 256]
