"""`--data hf:PATH`: a Hugging Face dataset written by `datasets` itself (save_to_disk, a DatasetDict, parquet files)
loads as the same pixels, captions and labels as the arrays it was made from, picks columns by option, and gives
the same features as the same images in an image folder."""
from __future__ import annotations

import json

import datasets
import numpy as np
import pytest
from PIL import Image
from sklearn.datasets import load_digits

from gradtrace.cli import main
from gradtrace.data.registry import is_text_spec, load_dataset
from gradtrace.data.text import TextDataset
from gradtrace.errors import UserError

pytestmark = pytest.mark.usefixtures("one_thread")
N = 12
NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
FEAT = ["--dim", "96", "--timesteps", "2", "--chunk", "16", "--no-progress"]


def digits_uint8() -> tuple[np.ndarray, np.ndarray]:
    d = load_digits()
    return (d.images[:N] * 255 / 16).astype(np.uint8), d.target[:N]


def build(columns=("image", "text", "label")) -> datasets.Dataset:
    pixels, target = digits_uint8()
    image, text, label = columns
    features = datasets.Features({image: datasets.Image(), text: datasets.Value("string"),
                                  label: datasets.ClassLabel(names=NAMES)})
    return datasets.Dataset.from_dict({image: [Image.fromarray(p, mode="L") for p in pixels],
                                       text: [f"a handwritten {NAMES[t]}" for t in target],
                                       label: [int(t) for t in target]}, features=features)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    build().save_to_disk(str(root / "disk"))
    build().to_parquet(str(root / "one.parquet"))
    (root / "shards").mkdir()
    full = build()
    full.select(range(0, 5)).to_parquet(str(root / "shards" / "part-0.parquet"))
    full.select(range(5, N)).to_parquet(str(root / "shards" / "part-1.parquet"))
    datasets.DatasetDict({"train": build(), "test": build().select(range(4))}).save_to_disk(str(root / "dict"))
    build(("pic", "desc", "y")).save_to_disk(str(root / "renamed"))
    datasets.Dataset.from_dict({"text": ["first document", "second one", "third"]}).save_to_disk(str(root / "docs"))
    return root


@pytest.mark.parametrize("where", ["disk", "one.parquet", "shards", "dict", "renamed?image=pic&text=desc&label=y"])
def test_images_captions_and_labels_are_the_arrays_they_were_made_from(saved, where):
    ds = load_dataset(f"hf:{saved / where}")
    pixels, target = digits_uint8()
    np.testing.assert_array_equal(ds.images.numpy(), (pixels[:, None].astype(np.float32) / 127.5 - 1.0))
    assert ds.ids.tolist() == list(range(N))
    assert [m["text"] for m in ds.metadata] == [f"a handwritten {NAMES[t]}" for t in target]
    assert [m["label"] for m in ds.metadata] == [NAMES[t] for t in target]
    assert ds.attributes == {"label": NAMES}  # the ClassLabel's own order: names[i] is class i
    assert not is_text_spec(f"hf:{saved / where}")


def test_splits_size_n_and_documents(saved):
    assert len(load_dataset(f"hf:{saved / 'dict'}?split=test")) == 4
    assert load_dataset(f"hf:{saved / 'disk'}", n=5).ids.tolist() == list(range(5))
    assert load_dataset(f"hf:{saved / 'disk'}", size=4).images.shape == (N, 1, 4, 4)
    docs = load_dataset(f"hf:{saved / 'docs'}")
    assert isinstance(docs, TextDataset) and docs.texts == ["first document", "second one", "third"]
    assert is_text_spec(f"hf:{saved / 'docs'}")


@pytest.mark.parametrize("spec, words", [
    ("dict?split=valid", "has the splits train, test, not 'valid'"),
    ("disk?split=train", "without splits"),
    ("disk?colour=red", "unknown hf option 'colour'"),
    ("disk?text=caption", "no column 'caption'"),
    ("missing", "not found"),
    ("", "needs a path"),
])
def test_bad_specs_are_refused_in_one_line(saved, spec, words):
    with pytest.raises(UserError, match=words):
        load_dataset(f"hf:{saved / spec}" if spec else "hf:")


def test_cli_features_equal_an_image_folders_and_sources_carry_captions(pipeline, saved, tmp_path):
    """The digits model featurizes the hf dataset exactly as the same images written as a folder."""
    pixels, target = digits_uint8()
    folder = tmp_path / "folder"
    folder.mkdir()
    for i, p in enumerate(pixels):
        Image.fromarray(p, mode="L").save(folder / f"{i:02d}.png")
    args = ["featurize", "--checkpoint", str(pipeline / "run"), *FEAT]
    assert main([*args, "--data", f"hf:{saved / 'disk'}", "--out", str(tmp_path / "hf")]) == 0
    assert main([*args, "--data", f"imagefolder:{folder}", "--out", str(tmp_path / "img")]) == 0
    np.testing.assert_array_equal(np.load(tmp_path / "hf" / "features.npy"), np.load(tmp_path / "img" / "features.npy"))
    assert main(["attribute", "--train", str(tmp_path / "hf"), "--queries", str(pipeline / "fq"), "--top-k", "3",
                 "--lambda-c", "0.1", "--no-report", "--out", str(tmp_path / "attr"), "--no-progress"]) == 0
    doc = json.loads((tmp_path / "attr" / "attributions.json").read_text())
    for t in (t for q in doc["queries"] for t in q["top"]):
        assert t["source"] == {"text": f"a handwritten {NAMES[target[t['train_id']]]}",
                               "caption": NAMES[target[t["train_id"]]]}


def test_integer_labels_keep_their_numeric_class_order(tmp_path):
    """Twelve integer classes: class index = the label itself ("10" is class 10, not the third of sorted strings)."""
    images, _ = digits_uint8()
    labels = [i % 12 for i in range(24)]
    pictures = [Image.fromarray(images[i % len(images)]) for i in range(24)]
    ds = datasets.Dataset.from_dict({"image": pictures, "label": labels},
                                    features=datasets.Features({"image": datasets.Image(),
                                                                "label": datasets.Value("int64")}))
    ds.save_to_disk(str(tmp_path / "twelve"))
    loaded = load_dataset(f"hf:{tmp_path / 'twelve'}")
    classes = loaded.attributes["label"]
    assert classes == [str(i) for i in range(12)]
    assert loaded.class_indices("label", classes).tolist() == labels


def test_class_label_names_keep_the_datasets_order_and_its_integers_are_the_class_indices(tmp_path):
    """A ClassLabel whose names are not sorted: class i is names[i] for the classifier, as for the user's model
    trained on the dataset's integers (sorted strings would make "ant" class 0)."""
    from gradtrace.adapters.classifier.configs import label_of
    from gradtrace.data.sources import dataset_examples

    names = ["zebra", "ant", "moose"]
    images, _ = digits_uint8()
    labels = [0, 1, 2, 2, 1, 0, 0, 2, 1]
    ds = datasets.Dataset.from_dict({"image": [Image.fromarray(images[i]) for i in range(9)], "label": labels},
                                    features=datasets.Features({"image": datasets.Image(),
                                                                "label": datasets.ClassLabel(names=names)}))
    ds.save_to_disk(str(tmp_path / "animals"))
    loaded = load_dataset(f"hf:{tmp_path / 'animals'}")
    assert [m["label"] for m in loaded.metadata] == [names[i] for i in labels]
    attribute, classes = label_of(loaded)
    assert (attribute, classes) == ("label", names)
    assert loaded.class_indices(attribute, classes).tolist() == labels
    examples = dataset_examples(f"hf:{tmp_path / 'animals'}", labels=(attribute, classes))
    assert np.asarray(examples.cond).tolist() == labels  # what the classifier's margin is taken at
