"""Shared fixtures and helpers: one tiny trained pipeline (checkpoint, samples, train/query feature stores),
untrained tiny models with random inputs, and a single-threaded torch for a test module."""
import numpy as np
import pytest
import torch

from gradtrace.cli import main
from gradtrace.models.configs import default_model_config
from gradtrace.models.unet import build_model, make_scheduler

ATTRS = {"subject": ["circle", "square", "cross"], "style": ["solid", "outline"], "background": ["plain", "checker"]}


def tiny_model(kind):
    """(untrained default model of `kind`, its scheduler): 8x8 grey unconditional or 16x16 RGB on ATTRS."""
    if kind == "unconditional":
        cfg = default_model_config("unconditional", channels=1, size=8)
    else:
        cfg = default_model_config("conditional", channels=3, size=16, attributes=ATTRS)
    return build_model(cfg, seed=1), make_scheduler(cfg)


def random_inputs(model, n, seed=0):
    """(images in [-1, 1], ids 100.., codes with nulls or None) for `model`, seeded."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand((n, model.channels, model.size, model.size), generator=gen) * 2 - 1
    cond = None
    if model.conditional:
        cond = np.stack([torch.randint(-1, len(v), (n,), generator=gen).numpy() for v in ATTRS.values()], 1)
    return x, np.arange(100, 100 + n), cond


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models: one torch thread is faster and immune to OpenMP spin-waits when the cores are shared.
    A module opts in with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

FEAT = ["--dim", "96", "--timesteps", "2", "--chunk", "16", "--no-progress"]


@pytest.fixture(scope="session")
def pipeline(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    assert main(["train", "--data", "digits", "--n", "48", "--steps", "15", "--batch-size", "16",
                 "--out", str(root / "run"), "--no-progress"]) == 0
    assert main(["sample", "--checkpoint", str(root / "run"), "--num", "3", "--sample-steps", "4",
                 "--out", str(root / "queries"), "--no-progress"]) == 0
    assert main(["featurize", "--checkpoint", str(root / "run"), "--out", str(root / "ft"), *FEAT]) == 0
    assert main(["featurize", "--checkpoint", str(root / "run"), "--samples", str(root / "queries"),
                 "--out", str(root / "fq"), *FEAT]) == 0
    assert main(["attribute", "--train", str(root / "ft"), "--queries", str(root / "fq"), "--top-k", "5",
                 "--lambda-c", "0.1", "--out", str(root / "attr"), "--no-progress"]) == 0
    return root


