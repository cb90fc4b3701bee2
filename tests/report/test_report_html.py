"""`gradtrace report`: the demo's page opened in a real headless Chromium (every query section, every image
loaded, a screenshot that is not blank), its numbers equal to the artefacts, aspects, refusals; the PNG grid."""
from __future__ import annotations

import io
import json
import re
import shutil

import numpy as np
import pytest
from PIL import Image

from fixtures.browser import Browser
from gradtrace.cli import main
from gradtrace.pipeline import DemoSpec, run_demo

TINY = {"n_train": 40, "steps": 10, "n_queries": 3, "sample_steps": 3, "dim": 64, "timesteps": 2, "top_k": 4,
        "n_learn": 8}


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "demo"
    run_demo(DemoSpec(out=str(out), quick=True), progress=False, settings=TINY)
    return out


@pytest.fixture(scope="module")
def page(demo):
    """What the browser sees of the demo's report.html: per query section its images and captions, per
    training image the values of its contribution bars (from the bar tooltips), and a screenshot."""
    with Browser(width=1280, height=900) as b:
        b.load(demo / "report.html")
        dom = b.evaluate("""(() => ({
          width: document.documentElement.scrollWidth,
          charts: [...document.querySelectorAll('img.chart')].map(i => i.complete && i.naturalWidth),
          sections: [...document.querySelectorAll('section.query')].map(s => ({
            id: s.id,
            query: [...s.querySelectorAll('figure.query img')].map(i => i.complete && i.naturalWidth),
            runs: [...s.querySelectorAll('div.run')].map(r => ({
              label: r.querySelector('h3').textContent,
              images: [...r.querySelectorAll('figure.train img')].map(i => i.complete && i.naturalWidth),
              captions: [...r.querySelectorAll('figure.train figcaption')].map(c => c.innerText),
              bars: [...r.querySelectorAll('figure.train svg')].map(svg =>
                [...svg.querySelectorAll('rect > title')].map(t => t.textContent))}))}))}))()""")
        png = b.screenshot()
    return dom, png


def test_the_page_has_one_section_per_query_with_every_image_loaded(demo, page):
    dom, _ = page
    doc = json.loads((demo / "attributions.json").read_text())
    assert [s["id"] for s in dom["sections"]] == [f"query-{q['query_id']}" for q in doc["queries"]]
    for section in dom["sections"]:
        assert len(section["query"]) == 1 and section["query"][0] > 0
        assert [r["label"] for r in section["runs"]] == ["uniform weights", "learned weights (general)"]
        for run in section["runs"]:
            assert len(run["images"]) == TINY["top_k"] and all(w and w > 0 for w in run["images"])
    assert dom["charts"] and all(w and w > 0 for w in dom["charts"])  # the weights chart
    assert dom["width"] <= 1280  # no sideways scrolling on a laptop-sized window


def test_the_screenshot_is_not_blank(demo, page):
    _, png = page
    (demo / "screenshot.png").write_bytes(png)
    img = np.asarray(Image.open(io.BytesIO(png)).convert("L"), dtype=np.float64)
    assert img.shape == (900, 1280)
    assert img.std() > 20 and (img < 200).mean() > 0.02  # text and images, not an empty white page


def test_captions_and_bars_equal_the_attribution_artefacts(demo, page):
    dom, _ = page
    for r, folder in enumerate([demo, demo / "learned"]):
        doc = json.loads((folder / "attributions.json").read_text())
        contrib = np.load(folder / "topk_contributions.npy")
        for qi, (section, query) in enumerate(zip(dom["sections"], doc["queries"])):
            run = section["runs"][r]
            for t, caption in zip(query["top"], run["captions"]):
                rank, tid, score = re.match(r"#(\d+) · id (\d+) · (\S+)", caption).groups()
                assert (int(rank), int(tid)) == (t["rank"], t["train_id"])
                assert float(score) == pytest.approx(t["score"], rel=1e-3)
            for j, bars in enumerate(run["bars"]):
                shown = dict(b.rsplit(": ", 1) for b in bars)
                assert list(shown) == doc["groups"]
                values = np.array([float(v) for v in shown.values()])
                np.testing.assert_allclose(values, contrib[qi, j], rtol=1e-3, atol=1e-9)
                assert values.sum() == pytest.approx(query["top"][j]["score"], rel=1e-3, abs=1e-6)


def test_weights_files_are_charted_one_section_per_aspect(demo, tmp_path, capsys):
    learned = json.loads((demo / "weights.json").read_text())
    learned["provenance"]["aspect"] = "style"
    (tmp_path / "style.json").write_text(json.dumps(learned))
    out = tmp_path / "r.html"
    assert main(["report", "--attributions", str(demo), "--weights", str(demo / "weights.json"), "--weights",
                 str(tmp_path / "style.json"), "--out", str(out), "--no-progress"]) == 0, capsys.readouterr().err
    text = out.read_text()
    assert 'id="weights-general"' in text and 'id="weights-style"' in text
    shrink = learned["provenance"]["guard"]["shrink"]   # the demo's weights: the default (holdout) guard's decision
    assert re.search(r"holdout guard: shrink towards uniform \(0 = uniform, 1 = as learned\)</td><td>"
                     + re.escape(json.dumps(shrink)) + "<", text)
    manifest = json.loads(re.search(r'id="gradtrace-manifest">(.*?)</script>', text).group(1))
    assert manifest["inputs"]["weights"] == [str((demo / "weights.json").resolve()),
                                             str((tmp_path / "style.json").resolve())]
    assert text.count('<section class="query"') == TINY["n_queries"]


def _refused(capsys, argv, words, out):
    assert main(argv + ["--out", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err and words in err, err
    assert not out.exists() or out.is_dir()


def test_bad_input_is_one_line(demo, tmp_path, capsys):
    out = tmp_path / "r.html"
    _refused(capsys, ["report"], "--attributions", out)
    _refused(capsys, ["report", "--attributions", str(tmp_path)], "attributions.json", out)
    (tmp_path / "junk.json").write_text("[1, 2]")
    _refused(capsys, ["report", "--attributions", str(demo), "--weights", str(tmp_path / "junk.json")],
             "not a weights file", out)
    _refused(capsys, ["report", "--attributions", str(demo), "--lds", str(demo)], "lds.json", out)
    other = tmp_path / "other"
    shutil.copytree(demo / "learned", other)
    doc = json.loads((other / "attributions.json").read_text())
    doc["queries"] = doc["queries"][:1]
    (other / "attributions.json").write_text(json.dumps(doc))
    for name in ("topk_ids.npy", "topk_scores.npy", "topk_contributions.npy", "scores.npy"):  # a whole run of 1
        if (other / name).exists():
            np.save(other / name, np.load(other / name)[:1])
    _refused(capsys, ["report", "--attributions", str(demo), "--attributions", str(other)], "other queries", out)
    (tmp_path / "dir.html").mkdir()
    _refused(capsys, ["report", "--attributions", str(demo)], "directory", tmp_path / "dir.html")


def test_the_png_grid_has_no_empty_band_under_its_title(demo):
    img = np.asarray(Image.open(demo / "report.png").convert("L"))
    blank = (img > 245).all(axis=1)
    rows = np.flatnonzero(~blank)
    longest = run = 0
    for b in blank[rows[0]:rows[-1]]:
        run = run + 1 if b else 0
        longest = max(longest, run)
    assert longest < 0.03 * img.shape[0]  # the old fixed-height title left 7% of the height empty
