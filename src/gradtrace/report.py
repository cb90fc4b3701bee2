"""Pictures: image grids of samples and of attributions (each query, then its top-k training images)."""
from __future__ import annotations

import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def to_display(img) -> np.ndarray:
    """(C, H, W) in [-1, 1] → (H, W) or (H, W, 3) in [0, 1]."""
    a = np.asarray(img, dtype=np.float32)
    a = np.clip((a + 1.0) / 2.0, 0.0, 1.0)
    return a[0] if a.shape[0] == 1 else np.transpose(a, (1, 2, 0))


def _show(ax, img) -> None:
    disp = to_display(img)
    ax.imshow(disp, cmap="gray" if disp.ndim == 2 else None, vmin=0, vmax=1, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])


def save_figure(fig, path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")
    fig.savefig(tmp, dpi=100, bbox_inches="tight")
    plt.close(fig)
    os.replace(tmp, path)


def image_grid(images, path, *, ncols: int = 8, titles: list[str] | None = None) -> None:
    images = np.asarray(images)
    n = len(images)
    nrows = max(1, (n + ncols - 1) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(1.2 * ncols, 1.3 * nrows), squeeze=False)
    for i, ax in enumerate(axes.flat):
        if i < n:
            _show(ax, images[i])
            if titles:
                ax.set_title(titles[i], fontsize=7)
        else:
            ax.axis("off")
    save_figure(fig, path)


def attribution_grid(query_images, train_images, scores, path, *, query_titles: list[str] | None = None,
                     train_titles: list[list[str]] | None = None, title: str | None = None) -> None:
    """One row per query: the query, then its top-k training images captioned with their scores.

    query_images (Q, C, H, W); train_images (Q, k, C, H, W); scores (Q, k).
    """
    query_images, train_images, scores = map(np.asarray, (query_images, train_images, scores))
    q, k = scores.shape
    fig, axes = plt.subplots(q, k + 1, figsize=(1.15 * (k + 1), 1.3 * q + (0.4 if title else 0)), squeeze=False)
    for r in range(q):
        _show(axes[r, 0], query_images[r])
        axes[r, 0].set_title(query_titles[r] if query_titles else f"query {r}", fontsize=7, color="tab:blue")
        for c in range(k):
            _show(axes[r, c + 1], train_images[r, c])
            cap = f"{scores[r, c]:.3g}"
            if train_titles:
                cap = f"{train_titles[r][c]}\n{cap}"
            axes[r, c + 1].set_title(cap, fontsize=6)
    if title:
        fig.suptitle(title, fontsize=9)
    save_figure(fig, path)
