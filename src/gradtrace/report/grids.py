"""Pictures: image grids of samples and of attributions (each query, then its top-k training images)."""
from __future__ import annotations

import numpy as np

from gradtrace.report.figures import pyplot, save_figure, show_image


def image_grid(images, path, *, ncols: int = 8, titles: list[str] | None = None) -> None:
    images = np.asarray(images)
    n = len(images)
    nrows = max(1, (n + ncols - 1) // ncols)
    fig, axes = pyplot().subplots(nrows, ncols, figsize=(1.2 * ncols, 1.3 * nrows), squeeze=False)
    for i, ax in enumerate(axes.flat):
        if i < n:
            show_image(ax, images[i])
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
    # constrained layout places the title right above the grid (a fixed figure height left an empty band)
    fig, axes = pyplot().subplots(q, k + 1, figsize=(1.15 * (k + 1), 1.3 * q + (0.3 if title else 0)), squeeze=False,
                             layout="constrained")
    for r in range(q):
        show_image(axes[r, 0], query_images[r])
        axes[r, 0].set_title(query_titles[r] if query_titles else f"query {r}", fontsize=7, color="tab:blue")
        for c in range(k):
            show_image(axes[r, c + 1], train_images[r, c])
            cap = f"{scores[r, c]:.3g}"
            if train_titles:
                cap = f"{train_titles[r][c]}\n{cap}"
            axes[r, c + 1].set_title(cap, fontsize=6)
    if title:
        fig.suptitle(title, fontsize=9)
    save_figure(fig, path)
