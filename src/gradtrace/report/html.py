"""Pieces of the self-contained HTML report: inline images, inline charts, and the page around them.

Everything a page shows is inside the one file: images are PNG data URIs, matplotlib figures likewise, and
the per-group contribution charts are inline SVG (one rectangle per group, coloured by block, self-attention lighter,
cross-attention hatched, each with a tooltip naming the group and its value). No script and no external resource, so the
file opens offline in any browser.
"""
from __future__ import annotations

import base64
import html
import io
import json
from typing import Iterable, Sequence

import numpy as np
from PIL import Image

from gradtrace.adapters.diffusion.groups import describe_group
from gradtrace.report.figures import pyplot, to_display
from gradtrace.report.weights import block_colours

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0 auto;max-width:1280px;padding:0 16px 40px;
color:#222;background:#fff;line-height:1.35}
h1{font-size:1.5em;margin:18px 0 4px}h2{font-size:1.2em;margin:22px 0 8px;border-bottom:1px solid #ddd}
h3{font-size:1em;margin:10px 0 4px}nav a{margin-right:12px}
.note{color:#555;font-size:.9em}
section.query{border:1px solid #e3e3e3;border-radius:6px;padding:8px 12px;margin:12px 0}
.qhead{display:flex;gap:14px;align-items:flex-start}
.run{margin:8px 0}.run h3{color:#444}
.topk{display:flex;flex-wrap:wrap;gap:8px}
figure{margin:0;text-align:center;font-size:.75em}
figure img{width:84px;height:84px;image-rendering:pixelated;border:1px solid #ccc;display:block;margin:0 auto}
figure.query img{width:112px;height:112px;border:2px solid #1f77b4}
figcaption{max-width:150px;overflow-wrap:anywhere}
svg.contrib{display:block;margin:2px auto 0}
table{border-collapse:collapse;font-size:.85em;margin:6px 0}td,th{border:1px solid #ddd;padding:3px 7px;text-align:left}
th{background:#f5f5f5}details{margin:6px 0}summary{cursor:pointer;color:#1f4e8c}
img.chart{max-width:100%;height:auto;border:0}
.legend span{display:inline-block;margin-right:10px;font-size:.8em}
.legend i{display:inline-block;width:10px;height:10px;margin-right:3px;vertical-align:middle}
pre{white-space:pre-wrap;font-size:.8em;background:#f7f7f7;padding:6px}
"""

HATCH = ('<defs><pattern id="hatch" width="4" height="4" patternUnits="userSpaceOnUse" '
         'patternTransform="rotate(45)"><rect width="4" height="4" fill="white" fill-opacity="0"/>'
         '<line x1="0" y1="0" x2="0" y2="4" stroke="white" stroke-width="1.6"/></pattern></defs>')


def esc(value) -> str:
    return html.escape(str(value), quote=True)


def png_uri(array: np.ndarray) -> str:
    """A data URI of an image (C, H, W) in [-1, 1] (the datasets' convention), as PNG at its own size."""
    disp = (to_display(array) * 255.0 + 0.5).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(disp, mode="L" if disp.ndim == 2 else "RGB").save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def figure_uri(fig, *, dpi: int = 110) -> str:
    """A data URI of a matplotlib figure as PNG (the figure is closed)."""
    buf = io.BytesIO()
    try:
        fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    finally:
        pyplot().close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def file_uri(path) -> str:
    """A data URI of a PNG file on disk."""
    with open(path, "rb") as fh:
        return "data:image/png;base64," + base64.b64encode(fh.read()).decode("ascii")


def hex_colours(group_names: Sequence[str]) -> dict[str, str]:
    """Block → hex colour, the same colours as the weights chart (`report.weights.block_colours`)."""
    to_hex = pyplot().matplotlib.colors.to_hex
    return {block: to_hex(c) for block, c in block_colours(group_names).items()}


def legend(group_names: Sequence[str]) -> str:
    """The colour key of the contribution charts: one swatch per block, and the cross-attention hatch."""
    items = [f'<span><i style="background:{c}"></i>{esc(b)}</span>' for b, c in hex_colours(group_names).items()]
    if any(describe_group(n)["attention"] == "self" for n in group_names):
        items.append('<span><i style="background:#888;opacity:.5"></i>self-attention (lighter)</span>')
    if any(describe_group(n)["attention"] == "cross" for n in group_names):
        items.append('<span><i style="background:repeating-linear-gradient(45deg,#888 0 2px,#fff 2px 4px)"></i>'
                     'cross-attention</span>')
    return '<div class="legend">' + "".join(items) + "</div>"


def bar_styles(group_names: Sequence[str]) -> list[tuple[str, str, str | None]]:
    """(group name, block colour, attention kind) per group: what `contribution_svg` draws each bar with,
    worked out once for a page."""
    colours = hex_colours(group_names)
    described = [describe_group(n) for n in group_names]
    return [(str(n), colours[d["block"]], d["attention"]) for n, d in zip(group_names, described)]


def contribution_svg(values: Iterable[float], styles: Sequence[tuple[str, str, str | None]], *, width: int = 150,
                     height: int = 46) -> str:
    """A bar per group (in group order, so blocks sit together), up for positive and down for negative
    contributions from a zero line; colour = block, lighter = self-attention, hatched = cross-attention,
    tooltip = group and value. `styles` from `bar_styles`."""
    v = np.asarray(list(values), dtype=np.float64)
    top, bottom = max(float(v.max()), 0.0), min(float(v.min()), 0.0)
    span = (top - bottom) or 1.0
    zero = height * top / span
    bar = width / max(len(styles), 1)
    parts = [f'<svg class="contrib" width="{width}" height="{height}" viewBox="0 0 {width} {height}" '
             f'xmlns="http://www.w3.org/2000/svg" role="img">', HATCH]
    for j, ((name, colour, attention), value) in enumerate(zip(styles, v)):
        h = abs(value) / span * height
        y = zero - h if value >= 0 else zero
        box = f'x="{j * bar:.2f}" y="{y:.2f}" width="{max(bar - 0.6, 0.6):.2f}" height="{max(h, 0.4):.2f}"'
        tip = f"<title>{esc(name)}: {value:.4g}</title>"
        shade = ' fill-opacity="0.5"' if attention == "self" else ""
        parts.append(f'<rect {box} fill="{colour}"{shade}>{tip}</rect>')
        if attention == "cross":
            parts.append(f'<rect {box} fill="url(#hatch)">{tip}</rect>')
    parts.append(f'<line x1="0" y1="{zero:.2f}" x2="{width}" y2="{zero:.2f}" stroke="#444" stroke-width="0.6"/>')
    parts.append("</svg>")
    return "".join(parts)


def table(header: Sequence[str], rows: Iterable[Sequence]) -> str:
    head = "".join(f"<th>{esc(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def facts(summary: str, items: dict) -> str:
    """A collapsible block of key → value facts (nested values shown as compact JSON)."""
    rows = []
    for key, value in items.items():
        text = value if isinstance(value, str) else json.dumps(value, default=str)
        if len(text) > 600:
            text = text[:600] + " …"
        rows.append((key, text))
    return f"<details><summary>{esc(summary)}</summary>{table(('fact', 'value'), rows)}</details>"


def page(title: str, body: Sequence[str], nav: Sequence[tuple[str, str]] = ()) -> str:
    links = "".join(f'<a href="#{esc(anchor)}">{esc(label)}</a>' for anchor, label in nav)
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            f"<title>{esc(title)}</title><style>{CSS}</style></head><body>"
            f"<h1>{esc(title)}</h1><nav>{links}</nav>" + "".join(body) + "</body></html>\n")
