"""gradtrace.data: the ImageDataset type, digits, shapes, encode_attributes and load_dataset.

Imagefolder tests live in tests/test_data_imagefolder.py.
"""
from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from gradtrace.data import ImageDataset, encode_attributes, load_dataset, render_shape, shapes as S
from gradtrace.errors import UserError


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


@pytest.fixture(scope="module")
def shapes():
    return load_dataset("shapes")


def one_line_error(fn, *needles):
    with pytest.raises(UserError) as info:
        fn()
    msg = str(info.value)
    assert "\n" not in msg
    for needle in needles:
        assert needle in msg, (needle, msg)
    return msg


# ---------------------------------------------------------------------------------------------- digits
def test_digits_match_sklearn(digits):
    ref = load_digits()
    assert digits.images.shape == (1797, 1, 8, 8) and digits.images.dtype == torch.float32
    assert (digits.channels, digits.size, len(digits)) == (1, 8, 1797)
    assert digits.images.min().item() == -1.0 and digits.images.max().item() == 1.0
    np.testing.assert_array_equal(digits.images[:, 0].numpy(), ref.images.astype(np.float32) / 8.0 - 1.0)
    np.testing.assert_array_equal(digits.ids, np.arange(1797))
    assert digits.ids.dtype == np.int64
    assert [m["label"] for m in digits.metadata] == ref.target.tolist()
    assert digits.attributes == {"label": [str(d) for d in range(10)]}
    np.testing.assert_array_equal(digits.attribute_codes(), ref.target.reshape(-1, 1))
    json.dumps(digits.metadata)  # serialisable


def test_digits_n_and_size(digits):
    first = load_dataset("digits", n=10)
    assert torch.equal(first.images, digits.images[:10]) and first.ids.tolist() == list(range(10))
    one_line_error(lambda: load_dataset("digits", n=5000), "n=5000", "1797")
    big = load_dataset("digits", size=16, n=50)
    assert big.images.shape == (50, 1, 16, 16)
    assert big.images.min() >= -1.0 and big.images.max() <= 1.0
    # bilinear 2x upsampling keeps the mean of each image up to the border effect
    assert torch.allclose(big.images.mean((1, 2, 3)), digits.images[:50].mean((1, 2, 3)), atol=0.02)


def test_subset_and_index_of_round_trip(digits):
    want = np.array([5, 3, 1000])
    sub = digits.subset(want)
    np.testing.assert_array_equal(sub.ids, want)
    assert torch.equal(sub.images, digits.images[want])
    assert [m["label"] for m in sub.metadata] == [digits.metadata[i]["label"] for i in want]
    np.testing.assert_array_equal(digits.index_of(want), want)  # ids == rows for digits
    np.testing.assert_array_equal(sub.index_of([1000, 5]), [2, 0])
    np.testing.assert_array_equal(sub.attribute_codes(), digits.attribute_codes()[want])
    # ids that are not row numbers: a subset of a subset maps back through ids
    sub2 = digits.subset(np.arange(100, 200)).subset(torch.tensor([150, 101]))
    np.testing.assert_array_equal(sub2.ids, [150, 101])
    assert torch.equal(sub2.images, digits.images[[150, 101]])
    one_line_error(lambda: digits.subset([1, 5000]), "5000")
    one_line_error(lambda: digits.subset([4, 2, 4]), "id 4 more than once")
    one_line_error(lambda: sub.index_of([7]), "id 7")
    one_line_error(lambda: digits.subset([1.5]), "integers")


def test_fingerprint_stable_and_sensitive(digits):
    again = load_dataset("digits")
    assert digits.fingerprint() == again.fingerprint()
    assert len(digits.fingerprint()) == 64 and int(digits.fingerprint(), 16) >= 0
    changed_pixel = load_dataset("digits")
    changed_pixel.images[7, 0, 3, 3] += 0.01
    changed_label = load_dataset("digits")
    changed_label.metadata[0] = {"label": 9 - changed_label.metadata[0]["label"]}
    changed_ids = ImageDataset("digits", digits.images, digits.ids + 1, digits.metadata, digits.attributes)
    changed_vocab = ImageDataset("digits", digits.images, digits.ids, digits.metadata,
                                 {"label": [str(d) for d in range(10)] + ["x"]})
    prints = {d.fingerprint() for d in [digits, changed_pixel, changed_label, changed_ids, changed_vocab]}
    assert len(prints) == 5
    info = digits.info()
    assert info == {"name": "digits", "n": 1797, "channels": 1, "size": 8, "attributes": digits.attributes,
                    "fingerprint": digits.fingerprint()}
    json.dumps(info)


def test_dataset_validates_its_parts():
    imgs = torch.zeros(3, 1, 4, 4)
    one_line_error(lambda: ImageDataset("x", imgs, np.arange(2), [{}] * 3, {}), "ids")
    one_line_error(lambda: ImageDataset("x", imgs, np.array([0, 1, 1]), [{}] * 3, {}), "unique")
    one_line_error(lambda: ImageDataset("x", imgs, np.arange(3), [{}] * 2, {}), "metadata")
    bad = ImageDataset("x", imgs, np.arange(3), [{"a": "p"}, {"a": "q"}, {}], {"a": ["p"]})
    one_line_error(bad.attribute_codes, "'q'", "id 1")


# ---------------------------------------------------------------------------------------------- shapes
def test_shapes_default_layout(shapes):
    assert shapes.images.shape == (960, 3, 16, 16) and shapes.images.dtype == torch.float32
    assert shapes.images.min() >= -1.0 and shapes.images.max() <= 1.0
    np.testing.assert_array_equal(shapes.ids, np.arange(960))
    assert shapes.attributes == {"subject": ["circle", "square", "triangle", "cross", "diamond", "bar"],
                                 "style": ["solid", "outline", "stripes", "dots"],
                                 "background": ["plain", "checker", "gradient", "noise"]}
    codes = shapes.attribute_codes()
    for j, name in enumerate(shapes.attributes):  # codes agree with the metadata strings
        assert [shapes.attributes[name][c] for c in codes[:, j]] == [m[name] for m in shapes.metadata]
    json.dumps(shapes.metadata)


def test_shapes_balanced(shapes):
    codes = shapes.attribute_codes()
    combos, counts = np.unique(codes, axis=0, return_counts=True)
    assert len(combos) == 96 and set(counts.tolist()) == {10}  # every combination exactly 10 times
    for n, expect in [(48, [8, 12, 12]), (96, [16, 24, 24]), (200, None)]:
        c = load_dataset("shapes", n=n).attribute_codes()
        for j, k in enumerate([6, 4, 4]):
            per_value = np.bincount(c[:, j], minlength=k)
            if expect is not None:
                assert set(per_value.tolist()) == {expect[j]}
            assert per_value.max() - per_value.min() <= n // 24  # near balance for any n


def test_shapes_deterministic_and_prefix_stable(shapes):
    again = load_dataset("shapes")
    assert torch.equal(shapes.images, again.images) and shapes.fingerprint() == again.fingerprint()
    other = load_dataset("shapes", seed=1)
    assert not torch.equal(shapes.images, other.images)
    assert (shapes.images - other.images).abs().mean() > 0.05
    np.testing.assert_array_equal(shapes.attribute_codes(), other.attribute_codes())  # same factors, new jitter
    prefix = load_dataset("shapes", n=100)
    assert torch.equal(prefix.images, shapes.images[:100])  # image i does not depend on n
    assert prefix.metadata == shapes.metadata[:100]


def test_shapes_size_option():
    big = load_dataset("shapes", size=32, n=24)
    assert big.images.shape == (24, 3, 32, 32)
    # the same scene drawn finer: 2x2 average pooling lands close to the 16x16 image, outside the noise texture
    small = load_dataset("shapes", n=24)
    keep = [m["background"] != "noise" for m in small.metadata]
    pooled = torch.nn.functional.avg_pool2d(big.images[keep], 2)
    assert (pooled - small.images[keep]).abs().mean() < 0.06
    one_line_error(lambda: load_dataset("shapes", size=11), "12")
    one_line_error(lambda: render_shape("circle", "solid", "plain", size=8), "12")


def test_render_matches_geometry():
    """Unjittered solid shapes on the plain background: pixel colours and covered area match the closed form."""
    bg = S.PLAIN_RGB * 2 - 1
    fg = S.SHAPE_RGB * 2 - 1
    r = S.RADIUS
    areas = {"circle": np.pi * r**2, "square": (2 * 0.82 * r) ** 2, "diamond": 2 * (1.18 * r) ** 2,
             "bar": (2 * 1.05 * r) * (2 * 0.48 * r), "triangle": 3 * np.sqrt(3) / 4 * (1.2 * r) ** 2,
             "cross": 2 * (2 * r) * (0.84 * r) - (0.84 * r) ** 2}
    for subject, area in areas.items():
        raw = render_shape(subject, "solid", "plain")
        assert raw.shape == (3, 16, 16) and raw.dtype == np.float32
        img = raw.astype(np.float64)
        np.testing.assert_allclose(img[:, 0, 0], bg, atol=1e-6)  # corner is background
        np.testing.assert_allclose(img[:, 8, 8], fg, atol=1e-6)  # centre is shape
        coverage = (img[0] - bg[0]) / (fg[0] - bg[0])
        assert abs(coverage.sum() - area) < 0.03 * area, (subject, coverage.sum(), area)
    # unjittered rendering is deterministic, including the noise texture
    a = render_shape("cross", "dots", "noise")
    assert np.array_equal(a, render_shape("cross", "dots", "noise"))
    one_line_error(lambda: render_shape("hexagon", "solid", "plain"), "hexagon", "circle")


def test_combo_order_is_a_bijection():
    s, t, b = S.combo_of(np.arange(96))
    assert len(set(zip(s.tolist(), t.tolist(), b.tolist()))) == 96
    assert all(np.array_equal(x, y) for x, y in zip(S.combo_of(np.arange(96) + 96), (s, t, b)))


@pytest.mark.parametrize("factor", [0, 1, 2], ids=["subject", "style", "background"])
def test_each_factor_changes_the_unjittered_image(factor):
    """Two renders differing only in one factor differ clearly: mean |diff| >= 0.03 and some pixel by >= 0.4
    (a fifth of the range)."""
    vocab = [S.SUBJECTS, S.STYLES, S.BACKGROUNDS]
    cache = {c: render_shape(*c) for c in itertools.product(*vocab)}
    smallest_mean, smallest_max = np.inf, np.inf
    for combo in cache:
        for other in vocab[factor]:
            if other == combo[factor]:
                continue
            alt = list(combo)
            alt[factor] = other
            diff = np.abs(cache[combo] - cache[tuple(alt)])
            smallest_mean, smallest_max = min(smallest_mean, diff.mean()), min(smallest_max, diff.max())
    assert smallest_mean >= 0.03 and smallest_max >= 0.4, (smallest_mean, smallest_max)


def test_each_factor_is_recoverable_by_a_linear_classifier(shapes):
    """Logistic regression on raw pixels, trained on repetitions 0-4 and tested on 5-9: accuracy >= 0.95 per factor.

    Chance is 1/6 for subject and 1/4 for style and background.
    """
    x = shapes.images.reshape(len(shapes), -1).numpy()
    codes = shapes.attribute_codes()
    train = shapes.ids // 96 < 5
    for j, name in enumerate(shapes.attributes):
        clf = make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=2000))
        clf.fit(x[train], codes[train, j])
        accuracy = clf.score(x[~train], codes[~train, j])
        assert accuracy >= 0.95, (name, accuracy)


# ---------------------------------------------------------------------------------------------- encode / load
def test_encode_attributes(shapes, digits):
    assert encode_attributes(shapes, {"style": "dots"}).tolist() == [-1, 3, -1]
    assert encode_attributes(shapes, {}).tolist() == [-1, -1, -1]
    row = encode_attributes(shapes.attributes, {"background": "noise", "subject": "bar", "style": None})
    assert row.dtype == np.int64 and row.tolist() == [5, -1, 3]
    assert encode_attributes(digits, {"label": 3}).tolist() == [3] == encode_attributes(digits, {"label": "3"}).tolist()
    codes = shapes.attribute_codes()
    for i in [0, 17, 500]:
        values = {k: shapes.metadata[i][k] for k in shapes.attributes}
        np.testing.assert_array_equal(encode_attributes(shapes, values), codes[i])
    one_line_error(lambda: encode_attributes(shapes, {"style": "wavy"}), "wavy", "solid, outline, stripes, dots")
    one_line_error(lambda: encode_attributes(shapes, {"colour": "red"}), "colour", "subject, style, background")
    one_line_error(lambda: encode_attributes({}, {"label": "1"}), "no attributes")


def test_load_dataset_rejects_bad_input():
    one_line_error(lambda: load_dataset("cifar"), "cifar", "digits", "shapes", "imagefolder:PATH")
    one_line_error(lambda: load_dataset("imagefolder:"), "imagefolder:PATH")
    one_line_error(lambda: load_dataset("digits", n=0), "n must be")
    one_line_error(lambda: load_dataset("shapes", seed=-1), "seed")
    assert load_dataset(" shapes ", n=np.int64(3), seed=np.int64(2)).images.shape == (3, 3, 16, 16)
