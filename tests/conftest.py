"""Shared fixtures: one tiny trained pipeline (checkpoint, samples, train/query feature stores) and a
single-threaded torch for a test module; helpers live in tests/fixtures/."""
import pytest
import torch

from gradtrace.cli import main


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


