"""A user's unconditional diffusers model: a DDPMPipeline folder, or a bare UNet2DModel folder with its scheduler
config, featurized through the CLI and checked against a plain autograd loop."""
import numpy as np
import pytest
import torch

from fixtures.pipelines import tiny_ddpm
from gradtrace.adapters import adapter_of
from gradtrace.cli import main
from gradtrace.data import load_dataset
from gradtrace.features.store import FeatureStore

pytestmark = pytest.mark.usefixtures("one_thread")


def test_ddpm_pipeline_and_bare_unet_features_equal_a_plain_loop(tmp_path):
    tiny_ddpm(tmp_path / "pipe")
    tiny_ddpm(tmp_path / "bare", bare=True)
    for name in ("pipe", "bare"):
        assert main(["featurize", "--checkpoint", str(tmp_path / name), "--data", "digits", "--n", "6", "--out",
                     str(tmp_path / f"f-{name}"), "--projection", "identity", "--timesteps", "2",
                     "--no-progress"]) == 0
    got = np.asarray(FeatureStore.open(tmp_path / "f-pipe").features)
    np.testing.assert_array_equal(got, np.asarray(FeatureStore.open(tmp_path / "f-bare").features))
    adapter = adapter_of(tmp_path / "pipe")
    ckpt = adapter.load(tmp_path / "pipe")
    objective = adapter.objective(ckpt, "loss", 2, 0)
    m, unet = objective.measurement, ckpt.model.unet
    params = dict(ckpt.model.named_parameters())
    order = [params[n] for g in FeatureStore.open(tmp_path / "f-pipe").settings["groups"] for n in g["params"]]
    ds = load_dataset("digits", n=6)
    rows = []
    for i in range(6):
        noise = m.noise([int(ds.ids[i])], (1, 8, 8))
        xt, t = m.noisy_inputs(ds.images[i:i + 1], noise, objective.alphas_cumprod)
        loss = ((unet(xt[0], t).sample - noise[0]) ** 2).mean()
        grads = torch.autograd.grad(loss, order)
        rows.append(torch.cat([g.reshape(-1) for g in grads]).numpy())
    np.testing.assert_allclose(got, np.stack(rows), rtol=2e-4, atol=1e-6)


def test_a_unet_folder_without_scheduler_is_refused(tmp_path, capsys):
    tiny_ddpm(tmp_path / "bare", bare=True)
    (tmp_path / "bare" / "scheduler_config.json").unlink()
    assert main(["featurize", "--checkpoint", str(tmp_path / "bare"), "--out", str(tmp_path / "f")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "UNet2DModel alone" in err
