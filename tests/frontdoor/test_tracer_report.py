"""`Tracer.report`: the HTML report of the tracer's runs is the page `gradtrace report` writes for the same runs and
weights (the same sections, images, bars and captions; the manifest differs only in the command and the output
path), and it shows the tracer's runs over the latest queries side by side."""
from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.datasets import load_digits

import gradtrace
from fixtures.classifiers import small_cnn
from gradtrace.cli import main
from gradtrace.errors import UserError

pytestmark = pytest.mark.usefixtures("one_thread")
MANIFEST = re.compile(r'<section id="made-by">.*?</section>', re.S)


def pairs(rows: slice) -> list:
    d = load_digits()
    return [(Image.fromarray((x * 255 / 16).astype(np.uint8)), int(y)) for x, y in zip(d.images[rows], d.target[rows])]


def manifest_of(page: str) -> dict:
    return json.loads(re.search(r'id="gradtrace-manifest">(.*?)</script>', page).group(1).replace("<\\/", "</"))


def test_the_tracers_report_is_the_clis_page_for_the_same_runs(tmp_path, capsys):
    torch.manual_seed(0)
    kwargs = {"channels": 1, "num_classes": 10}
    tracer = gradtrace.Tracer(small_cnn(**kwargs), train=pairs(slice(0, 40)), store=tmp_path / "store",
                              factory=small_cnn, kwargs=kwargs, progress=False)
    with pytest.raises(UserError, match="no attribution to report yet"):
        tracer.report(tmp_path / "none.html")
    queries = pairs(slice(40, 44))
    other = tracer.attribute(pairs(slice(60, 62)), top_k=3)  # other queries: not on the latest queries' page
    uniform = tracer.attribute(queries, top_k=3)
    weights = tracer.learn_weights(pairs(slice(44, 60)), steps=10)
    learned = tracer.attribute(queries, top_k=3, weights=weights, out=tmp_path / "learned")
    page = tracer.report(tmp_path / "tracer.html", title="digits")

    assert main(["report", "--attributions", str(uniform.path), "--attributions", str(learned.path), "--weights",
                 str(weights), "--title", "digits", "--out", str(tmp_path / "cli.html"), "--no-progress"]) == 0, \
        capsys.readouterr().err
    ours, theirs = page.read_text(), (tmp_path / "cli.html").read_text()
    assert MANIFEST.sub("", ours) == MANIFEST.sub("", theirs)  # every section, image, bar and caption
    mine, cli = manifest_of(ours), manifest_of(theirs)
    assert mine["inputs"] == cli["inputs"] == {
        "attributions": [str(uniform.path.resolve()), str((tmp_path / "learned").resolve())],
        "weights": [str(weights.path.resolve())], "lds": [], "counterfactual": [], "retrieval": []}
    assert {**mine["spec"], "out": None} == {**cli["spec"], "out": None}
    assert str(other.path.resolve()) not in ours
    assert ours.count('<section class="query"') == len(queries)
    assert ours.count('<div class="run">') == 2 * len(queries)  # uniform and learned, side by side

    alone = tracer.report(tmp_path / "other.html", attributions=[other], weights=[])  # runs named by the caller
    assert manifest_of(alone.read_text())["inputs"]["attributions"] == [str(other.path.resolve())]
