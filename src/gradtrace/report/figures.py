"""Shared pieces of every picture: matplotlib's pyplot (on first use), saving a figure atomically, and showing an
image in [-1, 1]."""
from __future__ import annotations

import sys
from importlib import import_module

import numpy as np

from gradtrace.extras import require
from gradtrace.io import atomic_write


def pyplot():
    """matplotlib's pyplot on the Agg backend, imported on first use (matplotlib is the `report` extra): the one
    place every picture gets it, so a missing matplotlib is one line naming the extra."""
    matplotlib = require("matplotlib", "drawing a figure")
    if "matplotlib.pyplot" not in sys.modules:  # a notebook's own backend stays as it is
        matplotlib.use("Agg")
    return import_module("matplotlib.pyplot")


def save_figure(fig, path, *, dpi: int = 100, tight: bool = True) -> None:
    """Write `fig` to `path` (format from its suffix) atomically, then close it."""
    suffix = "." + str(path).rsplit(".", 1)[-1]
    try:
        with atomic_write(path, suffix=f".tmp{suffix}") as tmp:
            fig.savefig(tmp, dpi=dpi, bbox_inches="tight" if tight else None)
    finally:
        pyplot().close(fig)


def to_display(img) -> np.ndarray:
    """(C, H, W) in [-1, 1] → (H, W) or (H, W, 3) in [0, 1]."""
    a = np.asarray(img, dtype=np.float32)
    a = np.clip((a + 1.0) / 2.0, 0.0, 1.0)
    return a[0] if a.shape[0] == 1 else np.transpose(a, (1, 2, 0))


def show_image(ax, img) -> None:
    disp = to_display(img)
    ax.imshow(disp, cmap="gray" if disp.ndim == 2 else None, vmin=0, vmax=1, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])
