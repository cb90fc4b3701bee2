"""Classifier training and labels: one SGD step against plain autograd, determinism for a seed, a killed and
resumed run to the same bits, learning, the label of each dataset, and bad labels refused in one line."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torch.nn import functional as F

from fixtures.classifiers import kind_and_options
from gradtrace.adapters import get_adapter
from gradtrace.adapters.checkpoint import model_fingerprint
from gradtrace.adapters.classifier import TrainConfig, train
from gradtrace.adapters.loop import batch_stream, stream_generators
from gradtrace.adapters.train_state import TrainState
from gradtrace.data import load_dataset
from gradtrace.data.base import ImageDataset
from gradtrace.errors import UserError

pytestmark = pytest.mark.usefixtures("one_thread")

ADAPTER = get_adapter("classifier")
KEY = {"run": "test"}


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits", n=120)


def config_of(name: str, ds) -> dict:
    kind, options = kind_and_options(name)
    return ADAPTER.default_model_config(ds, kind, model_options=options)


def same_state(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_one_sgd_step_is_the_autograd_step(digits):
    """steps=1, no warm-up, no momentum or decay: w1 = w0 − lr ∇ mean CE over the first batch of the seeded order."""
    config = config_of("resnet-batch", digits)
    cfg = TrainConfig(steps=1, batch_size=16, optimizer="sgd", lr=0.1, momentum=0.0, weight_decay=0.0,
                      warmup_steps=0, seed=5)
    trained = train(config, digits, cfg, progress=False)
    start = ADAPTER.build(config, seed=5).train()
    rows = next(batch_stream(len(digits), 16, stream_generators(5, ("batch",))["batch"]))
    labels = torch.as_tensor(digits.class_indices("label", config["classes"], rows.numpy()))
    F.cross_entropy(start(digits.images[rows]), labels).backward()
    for (name, p), q in zip(start.named_parameters(), trained.parameters()):
        torch.testing.assert_close(q, p - 0.1 * p.grad, rtol=1e-5, atol=1e-6, msg=name)
    # BatchNorm's running statistics moved with the batch, as torch's own train-mode forward moves them
    torch.testing.assert_close(trained.bn1.running_mean, start.bn1.running_mean)
    assert float(start.bn1.running_mean.abs().max()) > 0
    with torch.no_grad():
        first = F.cross_entropy(ADAPTER.build(config, seed=5).train()(digits.images[rows]), labels)
    assert trained.train_log["losses"][0] == pytest.approx(float(first), rel=1e-6)


@pytest.mark.parametrize("name", ["resnet", "vit", "factory"])
def test_training_is_deterministic_for_a_seed(digits, name):
    config = config_of(name, digits)
    cfg = dict(steps=5, batch_size=16, warmup_steps=2)
    before = torch.random.get_rng_state()
    a = train(config, digits, TrainConfig(seed=1, **cfg), progress=False)
    assert torch.equal(torch.random.get_rng_state(), before)  # no global RNG used
    b = train(config, digits, TrainConfig(seed=1, **cfg), progress=False)
    c = train(config, digits, TrainConfig(seed=2, **cfg), progress=False)
    assert same_state(a, b) and np.array_equal(a.train_log["losses"], b.train_log["losses"])
    assert model_fingerprint(a) != model_fingerprint(c)


class Killed(Exception):
    pass


class StopAfter(TrainState):
    """Raises right after step `stop` (the kill), saving every `every` steps as a real run does."""

    def __init__(self, path, stop: int, every: str):
        super().__init__(path, KEY, every=every)
        self.stop, self.saved = stop, []

    def save(self, step: int) -> None:
        super().save(step)
        self.saved.append(step)

    def step_done(self, step: int) -> None:
        super().step_done(step)
        if step == self.stop:
            raise Killed


@pytest.mark.parametrize("name,optimizer", [("resnet-batch", "sgd"), ("vit", "adamw")])
def test_a_killed_run_resumes_to_the_same_bits(digits, tmp_path, name, optimizer):
    config = config_of(name, digits)
    cfg = TrainConfig(steps=9, batch_size=20, optimizer=optimizer, lr=0.05 if optimizer == "sgd" else 3e-3,
                      warmup_steps=3, grad_clip=1.0, seed=4)
    ids = digits.ids[::2]
    whole = train(config, digits, cfg, ids=ids, progress=False)
    path = tmp_path / ".train-state.pt"
    first = StopAfter(path, stop=7, every="5")
    with pytest.raises(Killed):
        train(config, digits, cfg, ids=ids, progress=False, resume=first)
    again = TrainState(path, KEY, every="5")
    resumed = train(config, digits, cfg, ids=ids, progress=False, resume=again)
    assert first.saved == [5] and again.resumed_from == 5  # steps 6 and 7 ran twice, the second time from the file
    assert same_state(resumed, whole)  # weights and BatchNorm buffers
    assert np.array_equal(resumed.train_log["losses"], whole.train_log["losses"])
    assert resumed.train_ids.tolist() == sorted(ids.tolist())


def test_training_learns_the_labels():
    ds = load_dataset("digits", n=300)
    config = ADAPTER.default_model_config(ds, "resnet", model_options={"widths": [8, 16], "blocks": [1, 1]})
    model = train(config, ds, TrainConfig(steps=60, batch_size=32, lr=3e-2, warmup_steps=5), ids=ds.ids[:200],
                  progress=False)
    losses = model.train_log["losses"]
    assert losses[-10:].mean() < 0.5 * losses[:10].mean()  # measured: 0.77 against 2.30
    with torch.no_grad():
        predicted = model(ds.images[200:]).argmax(1).numpy()
    truth = np.array([int(m["label"]) for m in ds.metadata[200:]])
    assert (predicted == truth).mean() > 0.6  # held-out accuracy; chance is 0.1 (measured: 0.85)


# ---------------------------------------------------------------------------------- labels

def test_the_label_of_each_dataset(tmp_path):
    digits = load_dataset("digits", n=30)
    config = ADAPTER.default_model_config(digits, "resnet")
    assert (config["label"], config["classes"], config["num_classes"]) == ("label", [str(d) for d in range(10)], 10)
    ex = ADAPTER.examples(config, {"kind": "dataset", "spec": "digits", "n": 30}, ids=[3, 7, 11])
    assert ex.cond.tolist() == [3, 7, 1]  # sklearn's digits: row i is digit i mod 10 for the first rows
    shapes = load_dataset("shapes", n=24)
    config = ADAPTER.default_model_config(shapes, "vit")
    assert config["label"] == "subject" and config["patch_size"] == 4
    ex = ADAPTER.examples(config, {"kind": "dataset", "spec": "shapes", "n": 24})
    assert [config["classes"][c] for c in ex.cond] == [m["subject"] for m in shapes.metadata]
    style = ADAPTER.default_model_config(shapes, "resnet", model_options={"label": "style"})
    assert style["label"] == "style" and style["classes"] == ["solid", "outline", "stripes", "dots"]


def folder(root, layout: dict[str, int], seed: int = 0):
    """Class sub-folders of 8x8 gray PNGs: {class: count}."""
    rng = np.random.default_rng(seed)
    for cls, count in layout.items():
        (root / cls).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8), mode="L").save(root / cls / f"{i}.png")
    return root


def test_class_folders_are_labels_and_bad_labels_are_refused(tmp_path):
    root = folder(tmp_path / "pets", {"dog": 3, "cat": 2})
    ds = load_dataset(f"imagefolder:{root}")
    config = ADAPTER.default_model_config(ds, "resnet", model_options={"widths": [4], "blocks": [1]})
    assert config["classes"] == ["cat", "dog"] and config["label"] == "label"
    ex = ADAPTER.examples(config, {"kind": "dataset", "spec": f"imagefolder:{root}"})
    assert ex.cond.tolist() == [0, 0, 1, 1, 1]  # cat/0, cat/1, dog/0, dog/1, dog/2
    # held-out images of a class the model never saw
    other = folder(tmp_path / "more", {"cat": 1, "fox": 1})
    with pytest.raises(UserError, match=r"label='fox', not one of the model's classes \(cat, dog\)") as info:
        ADAPTER.examples(config, {"kind": "dataset", "spec": f"imagefolder:{other}"})
    assert "\n" not in str(info.value)
    # a folder without classes, a dataset attribute that is not there, generated samples
    flat = tmp_path / "flat"
    flat.mkdir()
    (root / "dog" / "0.png").rename(flat / "0.png")
    with pytest.raises(UserError, match="has no class labels; give the images a 'label' column"):
        ADAPTER.default_model_config(load_dataset(f"imagefolder:{flat}"), "resnet")
    with pytest.raises(UserError, match="no attribute 'colour' to use as the label"):
        ADAPTER.default_model_config(ds, "resnet", model_options={"label": "colour"})
    with pytest.raises(UserError, match="not generated samples"):
        ADAPTER.examples(config, {"kind": "samples", "path": str(tmp_path)})
    # an image without a label in the label column
    rows = [{"file_name": "a.png", "label": "x"}, {"file_name": "b.png", "label": "y"}]
    images = torch.zeros(3, 1, 8, 8)
    partial = ImageDataset(name="partial", images=images, ids=np.arange(3), attributes={"label": ["x", "y"]},
                           metadata=[*rows, {"file_name": "c.png"}])
    with pytest.raises(UserError, match="image id 2 has no 'label' label"):
        partial.class_indices("label", ["x", "y"])
    with pytest.raises(UserError, match="image id 2 has no 'label' label"):
        train(ADAPTER.default_model_config(partial, "resnet"), partial, TrainConfig(steps=1), progress=False)


def test_bad_model_settings_are_refused_in_one_line(digits):
    cases = [("resnet", {"widths": [4, 8], "blocks": [1]}, "one entry per stage"),
             ("resnet", {"depth": 3}, "unknown resnet setting(s) ['depth']"),
             ("resnet", {"norm": "layer"}, "'norm' must be one of group, batch"),
             ("vit", {"patch_size": 3}, "does not divide the image size 8"),
             ("vit", {"hidden_dim": 10, "num_heads": 4}, "not divisible by 'num_heads'"),
             ("factory", {}, "needs the function that builds the model"),
             ("factory", {"factory": "no_such_pkg.models:net"}, "cannot import the model factory"),
             ("factory", {"factory": "fixtures.classifiers:not_a_module"}, "returned a dict, not an nn.Module"),
             ("factory", {"factory": "fixtures.classifiers:with_own_config"}, "has its own .config attribute"),
             ("factory", {"factory": "fixtures.classifiers:small_cnn", "kwargs": {"num_classes": 3}},
              "returns (2, 3) for a batch of 2 images, not logits (2, 10)"),
             ("factory", {"factory": "fixtures.classifiers:small_cnn", "kwargs": {"channels": 3}},
              "cannot take images of shape (1, 8, 8)"),
             ("factory", {"factory": "fixtures.classifiers:small_cnn", "kwargs": {"depth": 3}},
              "failed with kwargs")]
    for kind, options, needle in cases:
        with pytest.raises(UserError) as info:
            ADAPTER.default_model_config(digits, kind, model_options=options)
        assert needle in str(info.value) and "\n" not in str(info.value), (kind, options, str(info.value))
    with pytest.raises(UserError, match="unknown classifier train settings"):
        ADAPTER.train_config({"epochs": 3})
    with pytest.raises(UserError, match="optimizer must be one of adamw, sgd"):
        ADAPTER.train_config({"optimizer": "lion"})
