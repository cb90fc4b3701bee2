"""gradtrace.data: the imagefolder source, checked against independent PIL reads."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from gradtrace.data import load_dataset
from gradtrace.errors import UserError


def write_png(path, array, mode=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array, mode=mode).save(path)


def write_meta(folder, rows):
    (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def expected(path, mode="RGB", size=None):
    """Independent read: PIL -> mode -> optional bicubic resize -> (C, H, W) in [-1, 1]."""
    with Image.open(path) as img:
        img = img.convert(mode)
        if size is not None and img.size != (size, size):
            img = img.resize((size, size), Image.Resampling.BICUBIC)
        arr = np.asarray(img).astype(np.float64) / 127.5 - 1.0
    return arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)


@pytest.fixture()
def folder(tmp_path):
    """b.png, a.jpg, sub/c.png (RGB 6x6) and a metadata.jsonl listing them out of order."""
    rng = np.random.default_rng(0)
    root = tmp_path / "imgs"
    write_png(root / "b.png", rng.integers(0, 256, (6, 6, 3), dtype=np.uint8))
    write_png(root / "sub" / "c.png", rng.integers(0, 256, (6, 6, 3), dtype=np.uint8))
    Image.fromarray(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)).save(root / "a.jpg", quality=90)
    (root / "notes.txt").write_text("not an image")
    write_meta(root, [
        {"file_name": "sub/c.png", "style": "wavy", "count": 10, "score": 0.5},
        {"file_name": "a.jpg", "style": "flat", "count": 2, "score": 1.5, "note": "only here"},
        {"file_name": "b.png", "style": "wavy", "count": 1, "score": None},
    ])
    return root


def error(spec, *needles, **kwargs):
    with pytest.raises(UserError) as info:
        load_dataset(spec, **kwargs)
    msg = str(info.value)
    assert "\n" not in msg
    for needle in needles:
        assert needle in msg, (needle, msg)
    return msg


def test_pixels_order_ids_and_attributes(folder):
    ds = load_dataset(f"imagefolder:{folder}")
    assert ds.name == f"imagefolder:{folder.resolve()}"
    order = ["a.jpg", "b.png", "sub/c.png"]  # sorted relative paths
    assert [m["file_name"] for m in ds.metadata] == order
    np.testing.assert_array_equal(ds.ids, [0, 1, 2])
    assert ds.images.shape == (3, 3, 6, 6) and ds.images.dtype == torch.float32
    for row, name in enumerate(order):
        np.testing.assert_allclose(ds.images[row].numpy(), expected(folder / name), atol=1e-6)
    # str/int columns in every row are attributes (values sorted as strings); others stay metadata only
    assert ds.attributes == {"style": ["flat", "wavy"], "count": ["1", "10", "2"]}
    np.testing.assert_array_equal(ds.attribute_codes(), [[0, 2], [1, 0], [1, 1]])
    assert ds.metadata[0]["score"] == 1.5 and ds.metadata[0]["note"] == "only here"
    assert ds.metadata[2]["count"] == 10
    again = load_dataset(f"imagefolder:{folder}")
    assert again.fingerprint() == ds.fingerprint()


def test_resize_n_and_no_metadata(folder):
    ds = load_dataset(f"imagefolder:{folder}", size=4, n=2)
    assert ds.images.shape == (2, 3, 4, 4)
    for row, name in enumerate(["a.jpg", "b.png"]):
        np.testing.assert_allclose(ds.images[row].numpy(), expected(folder / name, size=4), atol=1e-6)
    assert ds.attributes == {"style": ["flat", "wavy"], "count": ["1", "10", "2"]}  # vocab over the whole folder
    error(f"imagefolder:{folder}", "n=4", "3 images", n=4)
    (folder / "metadata.jsonl").unlink()
    bare = load_dataset(f"imagefolder:{folder}")
    assert bare.attributes == {} and bare.attribute_codes().shape == (3, 0)
    assert [m["file_name"] for m in bare.metadata] == ["a.jpg", "b.png", "sub/c.png"]


def test_class_sub_folders_are_the_label_without_metadata(tmp_path):
    """torchvision's ImageFolder convention: PATH/<class>/<image> (deeper inside a class allowed); the classes
    sorted; a metadata.jsonl wins; an image directly in the folder means no classes."""
    rng = np.random.default_rng(2)
    root = tmp_path / "animals"
    for name in ["zebra/1.png", "ant/b.png", "ant/a.png", "cat/deep/er/x.png"]:
        write_png(root / name, rng.integers(0, 256, (4, 4, 3), dtype=np.uint8))
    ds = load_dataset(f"imagefolder:{root}")
    assert [m["file_name"] for m in ds.metadata] == ["ant/a.png", "ant/b.png", "cat/deep/er/x.png", "zebra/1.png"]
    assert ds.attributes == {"label": ["ant", "cat", "zebra"]}
    assert ds.attribute_codes()[:, 0].tolist() == [0, 0, 1, 2]
    assert [m["label"] for m in load_dataset(f"imagefolder:{root}", n=2).metadata] == ["ant", "ant"]
    assert load_dataset(f"imagefolder:{root}", n=2).attributes == {"label": ["ant", "cat", "zebra"]}  # all classes
    write_meta(root, [{"file_name": m["file_name"], "kind": "k"} for m in ds.metadata])
    assert load_dataset(f"imagefolder:{root}").attributes == {"kind": ["k"]}
    (root / "metadata.jsonl").unlink()
    write_png(root / "loose.png", rng.integers(0, 256, (4, 4, 3), dtype=np.uint8))
    assert load_dataset(f"imagefolder:{root}").attributes == {}


def test_grayscale_and_non_square(tmp_path):
    rng = np.random.default_rng(1)
    gray = tmp_path / "gray"
    write_png(gray / "x.png", rng.integers(0, 256, (5, 5), dtype=np.uint8))
    write_png(gray / "y.png", rng.integers(0, 256, (5, 5), dtype=np.uint8))
    ds = load_dataset(f"imagefolder:{gray}")
    assert ds.images.shape == (2, 1, 5, 5)
    np.testing.assert_allclose(ds.images[1].numpy(), expected(gray / "y.png", mode="L"), atol=1e-6)
    # one colour image makes the whole set RGB; a non-square image is centre-cropped, not squashed
    z = rng.integers(0, 256, (5, 7, 3), dtype=np.uint8)
    write_png(gray / "z.png", z)
    mixed = load_dataset(f"imagefolder:{gray}")
    assert mixed.images.shape == (3, 3, 5, 5)
    np.testing.assert_allclose(mixed.images[0].numpy(), expected(gray / "x.png"), atol=1e-6)
    assert torch.equal(mixed.images[0, 0], mixed.images[0, 2])  # gray -> RGB copies the channel
    np.testing.assert_allclose(mixed.images[2].numpy(), z[:, 1:6].transpose(2, 0, 1) / 127.5 - 1.0, atol=1e-6)
    # a larger one has its shorter side resized to the size first (10 x 14 -> 5 x 7), then the centre kept
    big = rng.integers(0, 256, (10, 14, 3), dtype=np.uint8)
    write_png(gray / "zz.png", big)
    small = np.asarray(Image.fromarray(big).resize((7, 5), Image.Resampling.BICUBIC)).astype(np.float64)
    again = load_dataset(f"imagefolder:{gray}")
    np.testing.assert_allclose(again.images[3].numpy(), small[:, 1:6].transpose(2, 0, 1) / 127.5 - 1.0, atol=1e-6)


def test_folder_errors(tmp_path):
    error(f"imagefolder:{tmp_path / 'missing'}", "not found", "missing")
    (tmp_path / "empty").mkdir()
    error(f"imagefolder:{tmp_path / 'empty'}", "no images", "empty")


def test_undecodable_image(folder):
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not a png")
    write_meta(folder, [{"file_name": n} for n in ["a.jpg", "b.png", "broken.png", "sub/c.png"]])
    error(f"imagefolder:{folder}", "cannot read image", "broken.png")


def test_metadata_errors(folder):
    meta = folder / "metadata.jsonl"
    meta.write_text('{"file_name": "a.jpg"}\n{"file_name": "b.png",\n{"file_name": "sub/c.png"}\n')
    error(f"imagefolder:{folder}", "metadata.jsonl line 2", "not valid JSON")
    write_meta(folder, [{"file_name": n} for n in ["a.jpg", "b.png", "sub/c.png", "ghost.png"]])
    error(f"imagefolder:{folder}", "ghost.png", "not an image file")
    write_meta(folder, [{"file_name": n} for n in ["a.jpg", "sub/c.png"]])
    error(f"imagefolder:{folder}", "b.png", "has no row")
    write_meta(folder, [{"file_name": "a.jpg"}, {"name": "b.png"}])
    error(f"imagefolder:{folder}", "line 2", "file_name")
