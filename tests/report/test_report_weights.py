"""gradtrace.report_weights: the drawn numbers equal the inputs (bars, cosines), group names parse, PNGs are written."""
from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pytest
from PIL import Image

from gradtrace.errors import UserError
from gradtrace.report.weights import (
    attribution_comparison,
    block_colours,
    cosine_heatmap,
    cosine_matrix,
    describe_group,
    weights_bars,
    weights_figure,
)

NAMES = ["conv_in", "time_embedding", "down_blocks.0", "down_blocks.1", "down_blocks.1.self_attn.q",
         "down_blocks.1.cross_attn.k", "mid_block", "mid_block.cross_attn.out", "up_blocks.0",
         "up_blocks.1.self_attn.v", "conv_out", "cond_embed", "cond_pos"]


def test_describe_group():
    assert describe_group("up_blocks.1.cross_attn.out") == {"block": "up_blocks.1", "attention": "cross",
                                                            "projection": "out", "label": "up_blocks.1 cross out"}
    assert describe_group("mid_block.self_attn.q")["attention"] == "self"
    assert describe_group("down_blocks.0")["block"] == "down_blocks.0"
    assert describe_group("down_blocks.0")["attention"] is None
    assert describe_group("cond_pos")["block"] == "cond_embed"
    assert describe_group("conv_out")["label"] == "conv_out"
    blocks = list(block_colours(NAMES))
    assert blocks == ["conv_in", "time_embedding", "down_blocks.0", "down_blocks.1", "mid_block", "up_blocks.0",
                      "up_blocks.1", "conv_out", "cond_embed"]


def test_bars_are_the_normalised_weights_and_cross_attention_is_hatched():
    rng = np.random.default_rng(0)
    sets = {"uniform": np.ones(len(NAMES)), "general": rng.random(len(NAMES)), "style": 3 * rng.random(len(NAMES))}
    fig = weights_figure(sets, NAMES)
    try:
        panels = [ax for ax in fig.axes if ax.get_title() in sets]
        assert [ax.get_title() for ax in panels] == list(sets)
        for ax in panels:
            w = np.asarray(sets[ax.get_title()], dtype=float)
            drawn = [p.get_width() for p in ax.patches]
            np.testing.assert_allclose(drawn, w / w.sum(), rtol=1e-12)
            hatched = [bool(p.get_hatch()) for p in ax.patches]
            assert hatched == [".cross_attn." in n for n in NAMES]
            colours = block_colours(NAMES)
            np.testing.assert_allclose(ax.patches[3].get_facecolor()[:3], colours["down_blocks.1"][:3])
    finally:
        plt.close(fig)


def test_cosine_matrix_matches_numpy_and_heatmap_is_written(tmp_path):
    rng = np.random.default_rng(1)
    vectors = {f"v{i}": rng.random(7) for i in range(4)}
    labels, mat = cosine_matrix(vectors)
    x = np.stack(list(vectors.values()))
    ref = (x @ x.T) / np.outer(np.linalg.norm(x, axis=1), np.linalg.norm(x, axis=1))
    assert labels == list(vectors)
    np.testing.assert_allclose(mat, ref, rtol=1e-12)
    drawn = cosine_heatmap(vectors, tmp_path / "cos.png")
    np.testing.assert_allclose(drawn, ref, rtol=1e-12)
    assert Image.open(tmp_path / "cos.png").size[0] > 100


def test_pngs_are_written(tmp_path):
    path = weights_bars({"a": np.ones(len(NAMES)), "b": np.arange(1, len(NAMES) + 1)}, NAMES, tmp_path / "w.png")
    w, h = Image.open(path).size
    assert h > w * 0.5 and path.stat().st_size < 200_000
    rng = np.random.default_rng(2)
    q = rng.uniform(-1, 1, (2, 3, 16, 16))
    rows = {"uniform": (rng.uniform(-1, 1, (2, 4, 3, 16, 16)), rng.normal(size=(2, 4))),
            "style": (rng.uniform(-1, 1, (2, 4, 3, 16, 16)), rng.normal(size=(2, 4)))}
    hl = {"style": rng.random((2, 4)) < 0.5}
    out = attribution_comparison(q, rows, tmp_path / "grid.png", highlight=hl, title="t",
                                 train_titles={"uniform": [["x"] * 4] * 2})
    w, h = Image.open(out).size
    assert w > 200 and h > 200


def test_bad_weights_are_refused(tmp_path):
    with pytest.raises(UserError):
        weights_bars({"a": np.ones(3)}, NAMES, tmp_path / "x.png")
    with pytest.raises(UserError):
        weights_bars({"a": -np.ones(len(NAMES))}, NAMES, tmp_path / "x.png")
    with pytest.raises(UserError):
        attribution_comparison(np.zeros((2, 3, 4, 4)), {"u": (np.zeros((2, 3, 3, 4, 4)), np.zeros((1, 3)))},
                               tmp_path / "y.png")
