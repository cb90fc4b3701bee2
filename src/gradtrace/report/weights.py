"""Pictures of learned group weights: bars by block, a cosine heatmap, and attribution grids side by side.

    weights_bars({"uniform": u, "general": g, "style": s}, group_names, "weights.png")
    cosine_heatmap({"trak:general": g, "trak:style": s, ...}, "cosine.png")     # returns the matrix
    attribution_comparison(query_images, {"uniform": (imgs, scores), ...}, "grid.png")

Bars: one panel per weight vector (side by side, sharing the group axis), one horizontal bar per group,
coloured by its block (conv_in, time_embedding, down_blocks.i, mid_block, up_blocks.i, conv_out, cond_*);
attention projections are labelled "self q" / "cross k" ... and cross-attention bars are hatched. A dotted
line marks the uniform weight 1/M (weights are shown normalised to sum to 1).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from gradtrace.adapters.diffusion.groups import describe_group
from gradtrace.errors import UserError
from gradtrace.report.figures import pyplot, save_figure, show_image
from gradtrace.weights.diagnostics import cosine


def block_colours(group_names: Sequence[str]) -> dict[str, Any]:
    """A distinct colour per block, in order of first appearance."""
    blocks = list(dict.fromkeys(describe_group(n)["block"] for n in group_names))
    cmap = pyplot().get_cmap("tab10" if len(blocks) <= 10 else "tab20")
    return {b: cmap(i % cmap.N) for i, b in enumerate(blocks)}


def _normalised(weight_sets: Mapping[str, Any], m: int) -> dict[str, np.ndarray]:
    if not weight_sets:
        raise UserError("no weight vectors to draw; pass at least one {label: weights}")
    out = {}
    for label, w in weight_sets.items():
        v = np.asarray(w, dtype=np.float64).reshape(-1)
        if v.size != m or not np.isfinite(v).all() or (v < 0).any() or v.sum() <= 0:
            raise UserError(f"weights '{label}' must be {m} finite non-negative numbers with a positive sum, "
                            f"got shape {v.shape}")
        out[str(label)] = v / v.sum()
    return out


def weights_figure(weight_sets: Mapping[str, Any], group_names: Sequence[str], *, title: str | None = None):
    """The bar figure (see module docstring); bar widths are the normalised weights in group order."""
    names = [str(n) for n in group_names]
    sets = _normalised(weight_sets, len(names))
    colours = block_colours(names)
    info = [describe_group(n) for n in names]
    m, p = len(names), len(sets)
    fig, axes = pyplot().subplots(1, p, figsize=(2.0 + 1.9 * p, 0.6 + 0.17 * m), sharey=True, squeeze=False)
    y = np.arange(m)
    top = max(float(v.max()) for v in sets.values())
    for ax, (label, v) in zip(axes[0], sets.items()):
        ax.barh(y, v, color=[colours[d["block"]] for d in info], height=0.8,
                hatch=None, edgecolor="none")
        for patch, d in zip(ax.patches, info):
            if d["attention"] == "cross":
                patch.set_hatch("////")
                patch.set_edgecolor("white")
        ax.axvline(1.0 / m, color="0.3", linestyle=":", linewidth=0.8)
        ax.set_xlim(0, top * 1.08)
        ax.set_title(label, fontsize=8)
        ax.tick_params(axis="x", labelsize=6)
        ax.grid(axis="x", color="0.9", linewidth=0.5)
        ax.set_axisbelow(True)
    axes[0, 0].set_yticks(y)
    axes[0, 0].set_yticklabels([d["label"] for d in info], fontsize=6)
    axes[0, 0].invert_yaxis()
    Patch = pyplot().matplotlib.patches.Patch  # loaded by pyplot
    handles = [Patch(color=c, label=b) for b, c in colours.items()]
    handles.append(Patch(facecolor="0.6", hatch="////", edgecolor="white", label="cross-attention"))
    fig.legend(handles=handles, loc="lower center", ncol=min(5, len(handles)), fontsize=6, frameon=False,
               bbox_to_anchor=(0.5, -0.02 - 0.018 * (len(handles) // 5)))
    fig.suptitle(title or "group weights (normalised; dotted = uniform 1/M)", fontsize=9)
    fig.tight_layout(rect=(0, 0.04, 1, 0.97))
    return fig


def weights_bars(weight_sets: Mapping[str, Any], group_names: Sequence[str], path, *,
                 title: str | None = None) -> Path:
    """Save `weights_figure` as a PNG at `path`."""
    save_figure(weights_figure(weight_sets, group_names, title=title), path)
    return Path(path)


def cosine_matrix(vectors: Mapping[str, Any]) -> tuple[list[str], np.ndarray]:
    """(labels, (P, P) cosine similarities) between every pair of weight vectors."""
    labels = [str(k) for k in vectors]
    vs = [vectors[k] for k in vectors]
    mat = np.array([[cosine(a, b) for b in vs] for a in vs], dtype=np.float64)
    return labels, mat


def cosine_heatmap(vectors: Mapping[str, Any], path, *, title: str | None = None) -> np.ndarray:
    """Save a heatmap of `cosine_matrix(vectors)` (annotated when small) and return the matrix."""
    labels, mat = cosine_matrix(vectors)
    p = len(labels)
    if p == 0:
        raise UserError("no weight vectors to compare; pass at least one {label: weights}")
    side = 1.6 + 0.3 * p
    fig, ax = pyplot().subplots(figsize=(side + 0.8, side))
    # colour range = the data's range: learned weights stay near uniform, so cosines bunch up just below 1
    low = float(mat.min()) if mat.min() < 1.0 else 0.0
    im = ax.imshow(mat, vmin=low, vmax=1.0, cmap="viridis")
    ax.set_xticks(range(p))
    ax.set_yticks(range(p))
    ax.set_xticklabels(labels, rotation=90, fontsize=6)
    ax.set_yticklabels(labels, fontsize=6)
    if p <= 24:
        for i in range(p):
            for j in range(p):
                text = f"{mat[i, j]:.2f}"
                ax.text(j, i, text[1:] if text.startswith("0.") else text, ha="center",
                        va="center", fontsize=4.5 if p > 12 else 6,
                        color="black" if mat[i, j] > low + 0.6 * (1 - low) else "white")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.03).ax.tick_params(labelsize=6)
    ax.set_title(title or f"cosine similarity between weight vectors (colour range {low:.2f}..1)", fontsize=9)
    save_figure(fig, path)
    return mat


def attribution_comparison(query_images: Any, rows: Mapping[str, tuple], path, *,
                           query_titles: Sequence[str] | None = None,
                           train_titles: Mapping[str, Sequence[Sequence[str]]] | None = None,
                           highlight: Mapping[str, Any] | None = None, title: str | None = None) -> Path:
    """Per query, one row per weighting: the query, then its top-k training images under that weighting.

    rows: label -> (train_images (Q, k, C, H, W), scores (Q, k)); highlight: label -> (Q, k) bool (green
    frame = True, red = False, e.g. "shares the query's aspect value"); train_titles: label -> (Q, k) str.
    """
    query_images = np.asarray(query_images)
    labels = list(rows)
    if not labels:
        raise UserError("no weightings to compare; pass at least one {label: (images, scores)}")
    q = len(query_images)
    k = np.asarray(rows[labels[0]][1]).shape[1]
    for label in labels:
        imgs, sc = np.asarray(rows[label][0]), np.asarray(rows[label][1])
        if imgs.shape[:2] != (q, k) or sc.shape != (q, k):
            raise UserError(f"row '{label}' must hold ({q}, {k}) images and scores, "
                            f"got {imgs.shape[:2]} and {sc.shape}")
    n_rows = q * len(labels)
    fig, axes = pyplot().subplots(n_rows, k + 1, figsize=(0.95 * (k + 1) + 0.6, 1.05 * n_rows + (0.4 if title else 0)),
                             squeeze=False)
    for qi in range(q):
        for li, label in enumerate(labels):
            r = qi * len(labels) + li
            imgs, sc = np.asarray(rows[label][0]), np.asarray(rows[label][1])
            ax0 = axes[r, 0]
            if li == 0:
                show_image(ax0, query_images[qi])
                ax0.set_title(query_titles[qi] if query_titles else f"query {qi}", fontsize=6, color="tab:blue")
            else:
                ax0.axis("off")
            ax0.text(-0.12, 0.5, label, transform=ax0.transAxes, ha="right", va="center", fontsize=7)
            for c in range(k):
                ax = axes[r, c + 1]
                show_image(ax, imgs[qi, c])
                cap = f"{sc[qi, c]:.2g}"
                if train_titles and label in train_titles:
                    cap = f"{train_titles[label][qi][c]}\n{cap}"
                ax.set_title(cap, fontsize=5, pad=1.5)
                if highlight is not None and label in highlight:
                    good = bool(np.asarray(highlight[label])[qi, c])
                    size = imgs.shape[-1]
                    ax.add_patch(pyplot().Rectangle((-0.5, -0.5), size, size, fill=False, linewidth=2.2,
                                                    edgecolor="tab:green" if good else "tab:red"))
    height = 1.05 * n_rows + (0.4 if title else 0)
    if title:
        fig.suptitle(title, fontsize=8)
    fig.tight_layout(pad=0.3, h_pad=0.4, w_pad=0.2, rect=(0, 0, 1, 1 - (0.4 / height if title else 0)))
    save_figure(fig, path)
    return Path(path)
