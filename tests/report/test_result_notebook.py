"""`AttributionResult`: an attribute output folder as a notebook sees it. Its rows equal the run's arrays
(topk_ids.npy, topk_scores.npy, topk_contributions.npy), its PIL images the data's pixels, and its inline HTML
renders in a real headless Chromium with every image loaded and the sources under the images."""
from __future__ import annotations

import json
import os

import numpy as np
import pandas as pd
import pytest
from sklearn.datasets import load_digits

import gradtrace
from fixtures.browser import Browser
from gradtrace.cli import main
from gradtrace.errors import UserError
from gradtrace.pipeline.result import scoped_css


@pytest.fixture(scope="module")
def result(pipeline):
    return gradtrace.AttributionResult.open(pipeline / "attr")


def test_rows_equal_the_arrays_of_the_run(pipeline, result):
    ids, scores = np.load(pipeline / "attr" / "topk_ids.npy"), np.load(pipeline / "attr" / "topk_scores.npy")
    contrib = np.load(pipeline / "attr" / "topk_contributions.npy")
    frame = result.to_pandas()
    assert isinstance(frame, pd.DataFrame) and len(frame) == ids.size
    assert frame["train_id"].tolist() == ids.reshape(-1).tolist()
    np.testing.assert_allclose(frame["score"], scores.reshape(-1), rtol=1e-6)
    groups = result.doc["groups"]
    np.testing.assert_allclose(frame[[f"contribution:{g}" for g in groups]].to_numpy(),
                               contrib.reshape(-1, len(groups)), rtol=1e-6, atol=1e-12)
    assert frame["query_id"].tolist() == np.repeat(np.load(pipeline / "fq" / "ids.npy"), ids.shape[1]).tolist()
    target = load_digits().target
    assert frame["train_caption"].tolist() == [str(target[i]) for i in ids.reshape(-1)]
    assert frame["query_sample"].tolist() == frame["query_id"].tolist()
    with pytest.raises(UserError, match="query 999 is not in"):
        result.top(999)


def test_images_are_the_data_as_pil(pipeline, result):
    qid = result.query_ids[0]
    query, top = result.images(qid)
    samples = np.load(pipeline / "queries" / "images.npy")  # (n, 1, 8, 8) in [-1, 1]
    expect = (np.clip((samples[qid, 0] + 1) / 2, 0, 1) * 255 + 0.5).astype(np.uint8)
    np.testing.assert_array_equal(np.asarray(query), expect)
    digits = load_digits()  # the training images: sklearn's 0..16 scaled to [-1, 1] by the digits loader
    for image, t in zip(top, result.top(qid)):
        pixels = digits.images[t["train_id"]] / 16.0 * 2 - 1
        np.testing.assert_array_equal(np.asarray(image), (np.clip((pixels + 1) / 2, 0, 1) * 255 + 0.5).astype(np.uint8))


def test_inline_html_renders_every_image_with_its_source(result, tmp_path):
    fragment = result._repr_html_()
    assert "<body" not in fragment and "body{" not in fragment  # it restyles nothing around it
    (tmp_path / "cell.html").write_text(f"<!DOCTYPE html><html><body><p id=around>notebook</p>{fragment}</body></html>")
    with Browser(width=1000, height=800) as b:
        b.load(tmp_path / "cell.html")
        dom = b.evaluate("""(() => ({
          sections: [...document.querySelectorAll('.gradtrace section.query')].map(s => s.id),
          images: [...document.querySelectorAll('.gradtrace img')].map(i => i.complete && i.naturalWidth),
          captions: [...document.querySelectorAll('.gradtrace figure.train figcaption')].map(c => c.innerText),
          font: getComputedStyle(document.getElementById('around')).fontFamily}))()""")
    doc = result.doc
    assert dom["sections"] == [f"query-{q['query_id']}" for q in doc["queries"]]
    k = doc["manifest"]["top_k"]
    assert len(dom["images"]) == len(doc["queries"]) * (1 + k) and all(w and w > 0 for w in dom["images"])
    tops = [t for q in doc["queries"] for t in q["top"]]
    for caption, t in zip(dom["captions"], tops):
        assert caption.startswith(f"#{t['rank']} · id {t['train_id']}") and caption.endswith(t["source"]["caption"])
    assert "system-ui" not in dom["font"]  # the report's style stays inside the result


def test_scoped_css_prefixes_every_selector():
    assert scoped_css("body{margin:0}h1,h2{color:red}", ".g") == ".g{margin:0}\n.g h1,.g h2{color:red}"
    json.dumps(scoped_css(gradtrace.report.html.CSS, ".g"))  # the report's own sheet parses


def test_weights_inline_render_their_chart_and_are_the_files_values(pipeline, result, tmp_path):
    out = tmp_path / "w.json"
    assert main(["learn-weights", "--train", str(pipeline / "ft"), "--queries", str(pipeline / "fq"), "--steps", "10",
                 "--out", str(out), "--no-progress"]) == 0
    weights = gradtrace.WeightsResult.open(out)
    doc = json.loads(out.read_text())
    assert weights.weights == doc["weights"] and list(weights.weights) == result.doc["groups"]
    assert weights.to_pandas()["weight"].tolist() == list(doc["weights"].values())
    assert os.fspath(weights) == str(out)
    cells = [result._repr_html_(), weights._repr_html_()]  # two notebook cells on one page
    assert all("<body" not in c and "body{" not in c for c in cells)
    (tmp_path / "nb.html").write_text("<!DOCTYPE html><html><body>" + "".join(f"<div class=cell>{c}</div>"
                                                                             for c in cells) + "</body></html>")
    with Browser(width=1000, height=800) as b:
        b.load(tmp_path / "nb.html")
        dom = b.evaluate("""(() => [...document.querySelectorAll('div.cell')].map(c => ({
          images: [...c.querySelectorAll('img')].map(i => i.complete && i.naturalWidth),
          charts: [...c.querySelectorAll('img.chart')].map(i => i.alt),
          text: c.innerText})))()""")
    k = result.doc["manifest"]["top_k"]
    assert len(dom[0]["images"]) == len(result.query_ids) * (1 + k) and all(w and w > 0 for w in dom[0]["images"])
    assert dom[1]["charts"] == ["weights for general"] and all(w and w > 0 for w in dom[1]["images"])
    assert str(out) in dom[1]["text"] and "Aspect: general" in dom[1]["text"]
    with pytest.raises(UserError, match="not a weights file"):
        gradtrace.WeightsResult.open(pipeline / "attr" / "attributions.json")
