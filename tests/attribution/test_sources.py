"""Attribution outputs name each example by its source, not only by its integer id: the file name (relative to
the folder, whose sorted order gives the ids) and caption of an image folder's example, the label of a built-in
dataset's, the index and prompt of a generated sample; attributions.json, the HTML report and the text report
carry them. Checked against the folder written here and scikit-learn's digits labels, not the loader's output."""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from sklearn.datasets import load_digits

from gradtrace.cli import main
from gradtrace.data.sources import TEXT_CHARS, example_sources

pytestmark = pytest.mark.usefixtures("one_thread")
FEAT = ["--dim", "96", "--timesteps", "2", "--chunk", "16", "--no-progress"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """12 digits as 8x8 grayscale PNGs under two sub-folders, named so that sorted order is not writing order."""
    digits = load_digits()
    root = tmp_path_factory.mktemp("sources") / "images"
    rows = []
    for i in range(12):
        name = f"{'zb'[i % 2]}/digit-{11 - i:02d}.png"
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray((digits.images[i] * 255 / 16).astype(np.uint8), mode="L").save(root / name)
        rows.append({"file_name": name, "text": f"a handwritten {digits.target[i]}, number {i}"})
    (root / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root, {r["file_name"]: r["text"] for r in rows}


def test_attributions_json_names_files_captions_and_samples(pipeline, folder, tmp_path):
    root, text_of = folder
    store, out = tmp_path / "ft", tmp_path / "attr"
    assert main(["featurize", "--checkpoint", str(pipeline / "run"), "--data", f"imagefolder:{root}",
                 "--out", str(store), *FEAT]) == 0
    assert main(["attribute", "--train", str(store), "--queries", str(pipeline / "fq"), "--top-k", "5",
                 "--lambda-c", "0.1", "--out", str(out), "--no-progress"]) == 0
    doc = json.loads((out / "attributions.json").read_text())
    files = sorted(text_of)  # the imagefolder id rule: the position in sorted order of the relative paths
    prompts = json.loads((pipeline / "queries" / "manifest.json").read_text()).get("prompts")
    assert prompts is None  # an unprompted digits model: its samples are named by their index
    for q in doc["queries"]:
        assert q["source"]["sample"] == q["query_id"]
        for t in q["top"]:
            assert t["source"] == {"file": files[t["train_id"]], "text": text_of[files[t["train_id"]]]}

    # the HTML report shows the file name and caption under each training image
    assert main(["report", "--attributions", str(out), "--out", str(tmp_path / "r.html"), "--no-progress"]) == 0
    html = (tmp_path / "r.html").read_text()
    for t in doc["queries"][0]["top"]:
        name = files[t["train_id"]]
        assert f"{name} · {text_of[name]}" in html


def test_a_builtin_datasets_examples_carry_their_labels(pipeline):
    doc = json.loads((pipeline / "attr" / "attributions.json").read_text())
    target = load_digits().target
    tops = [t for q in doc["queries"] for t in q["top"]]
    assert tops and all(t["source"] == {"caption": str(target[t["train_id"]])} for t in tops)


def test_long_texts_are_cut_and_unknown_ids_refused(tmp_path):
    docs = ["short one", "x" * (TEXT_CHARS + 50)]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    source = {"kind": "dataset", "spec": f"jsonl:{tmp_path / 'd.jsonl'}", "n": None, "size": None, "seed": 0}
    assert example_sources(source, [1, 0]) == [{"text": "x" * TEXT_CHARS + "…"}, {"text": "short one"}]
    with pytest.raises(Exception, match="id 7 is not in"):
        example_sources(source, [7])
