"""`gradtrace eval mislabel --methods ekfac` on a tiny digits ResNet: the stored self-influence (uniform and
learned) against kronfluence's own `compute_self_scores`, run here with a plain Task written from scratch
(cross-entropy at the flipped labels; the margin as the measurement) on the factors the stage fitted; the modules
grouped by hand for the learned weights; the c of the label-free grid; AUC against sklearn; bad input in one line."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from kronfluence.analyzer import Analyzer, prepare_model
from kronfluence.arguments import ScoreArguments
from kronfluence.task import Task
from sklearn.metrics import roc_auc_score
from torch.utils.data import TensorDataset

from gradtrace.adapters import get_adapter
from gradtrace.cli import main

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.filterwarnings("ignore::FutureWarning")]

N_DATA, TRAIN = 150, np.arange(0, 120)
ARGS = ["--projection", "rademacher", "--dim", "64", "--num-learning", "20", "--learn-steps", "20", "--bootstrap",
        "50", "--no-progress"]


@pytest.fixture(scope="module")
def done(tmp_path_factory):
    root = tmp_path_factory.mktemp("mislabel-ekfac")
    (root / "train.txt").write_text("\n".join(map(str, TRAIN)) + "\n")
    assert main(["train", "--adapter", "classifier", "--data", "digits", "--n", str(N_DATA), "--ids",
                 str(root / "train.txt"), "--steps", "25", "--batch-size", "32", "--lr", "0.03", "--model-options",
                 '{"widths": [4, 8], "blocks": [1, 1]}', "--out", str(root / "run"), "--no-progress"]) == 0
    assert main(["eval", "mislabel", "--run", str(root / "run"), "--out", str(root / "loss"), "--methods", "ekfac",
                 "--measurement", "loss", *ARGS]) == 0
    shutil.copytree(root / "loss" / "model", root / "margin" / "model")  # the same flips: the same model
    assert main(["eval", "mislabel", "--run", str(root / "run"), "--out", str(root / "margin"), "--methods",
                 "ekfac", "--measurement", "margin", "--lambda-c", "0.1", *ARGS]) == 0
    return root


class PlainTask(Task):
    """Cross-entropy training loss; margin z_y − log Σ_{c≠y} exp z_c as the measurement."""

    def compute_train_loss(self, batch, model, sample=False):
        assert not sample  # the factors are the stage's; only scores are computed here
        x, y = batch
        return F.cross_entropy(model(x), y, reduction="sum")

    def compute_measurement(self, batch, model):
        x, y = batch
        z = model(x)
        z_y = z.gather(1, y[:, None])[:, 0]
        others = z.masked_fill(F.one_hot(y, z.shape[1]).bool(), float("-inf"))
        return (z_y - torch.logsumexp(others, dim=1)).sum()


def group_of(module: str) -> str:
    """The `block` preset of a torchvision ResNet, written out: stem conv, one group per residual block, head."""
    return {"conv1": "stem", "fc": "head"}.get(module, ".".join(module.split(".")[:2]))


def kronfluence_self_scores(ml, tmp_path, damping: float, measurement: bool) -> dict[str, np.ndarray]:
    """kronfluence's own self-influence of the corrupted training set, total and per module."""
    adapter = get_adapter("classifier")
    ckpt = adapter.load(ml / "model")
    ex = adapter.examples(ckpt.model_config, {"kind": "dataset", "spec": "digits", "n": N_DATA, "size": None,
                                              "seed": 0}, ids=TRAIN)
    flips = json.loads((ml / "flips.json").read_text())
    labels = np.asarray(ex.cond, dtype=np.int64).copy()
    labels[np.searchsorted(TRAIN, flips["flipped_ids"])] = flips["noisy"]
    data = TensorDataset(torch.as_tensor(ex.images, dtype=torch.float32), torch.as_tensor(labels))
    shutil.copytree(ml / "ekfac-factors", tmp_path / "factors")
    task = PlainTask()
    analyzer = Analyzer("kronfluence", prepare_model(ckpt.model, task), task, cpu=True, disable_tqdm=True,
                        output_dir=str(tmp_path / "factors"))
    out = {}
    for per_module in (False, True):
        name = f"plain-{per_module}"
        analyzer.compute_self_scores(name, "ekfac", data, per_device_train_batch_size=50, overwrite_output_dir=True,
                                     score_args=ScoreArguments(damping_factor=damping,
                                                               compute_per_module_scores=per_module,
                                                               use_measurement_for_self_influence=measurement))
        out.update({k: v.double().numpy() for k, v in analyzer.load_self_scores(name).items()})
    return out


@pytest.mark.parametrize("measurement", ["loss", "margin"])
def test_ekfac_self_influence_is_kronfluences_own(done, tmp_path, measurement):
    ml = done / measurement
    doc = json.loads((ml / "mislabel.json").read_text())
    (r,) = doc["results"]
    assert (r["method"], r["kernel"]) == ("ekfac", "ekfac") and r["fitted"]["engine"] == "kronfluence"
    groups = ["stem", "layer1.0", "layer2.0", "head"]
    assert r["group_names"] == groups
    if measurement == "loss":  # --lambda-c auto: the grid's label-free best
        assert r["c"] == min(r["lambda_grid"], key=lambda row: (row[1], row[0]))[0]
    else:
        assert r["c"] == 0.1 and r["lambda_grid"] is None
    scores = np.load(ml / "self_influence.npz")
    want = kronfluence_self_scores(ml, tmp_path, r["fitted"]["damping"], measurement == "margin")
    sign = -1.0 if measurement == "margin" else 1.0  # a helpful example raises the margin: scores say "helpful"
    total = sign * want.pop("all_modules")
    uniform = scores["ekfac/ekfac/uniform"]
    np.testing.assert_allclose(uniform, total, rtol=1e-4, atol=1e-6 * np.abs(total).max())
    per_group = np.zeros((len(TRAIN), len(groups)))
    for module, s in want.items():
        per_group[:, groups.index(group_of(module))] += sign * s
    np.testing.assert_allclose(per_group.sum(1), total, rtol=1e-4, atol=1e-6 * np.abs(total).max())
    w = np.array([r["learned_weights"]["weights"][g] for g in groups])
    saved = json.loads((ml / "weights" / "ekfac-ekfac.json").read_text())
    assert saved["group_names"] == groups and [saved["weights"][g] for g in groups] == pytest.approx(w.tolist())
    assert not np.allclose(w, w.mean())  # learned, not left uniform
    learned = per_group @ w
    np.testing.assert_allclose(scores["ekfac/ekfac/learned"], learned, rtol=1e-4, atol=1e-6 * np.abs(learned).max())
    flipped = scores["flipped"]
    for name in ("uniform", "learned"):
        assert r["scores"][name]["auc"] == pytest.approx(roc_auc_score(flipped, scores[f"ekfac/ekfac/{name}"]))
    if measurement == "loss":  # the loss self-influence of a fit example is positive
        assert (uniform > 0).all()


def test_ekfac_kernel_is_its_own(done, tmp_path, capsys):
    code = main(["eval", "mislabel", "--run", str(done / "run"), "--out", str(tmp_path / "x"), "--methods",
                 "ekfac:shared", *ARGS])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "has its own kernel" in err, err
    assert not (tmp_path / "x").exists()
