"""Procedural shapes: three independent factors (subject, style, background) that we control exactly.

Every image is drawn from signed distance functions on the pixel grid (anti-aliased one pixel wide), so a
whole dataset renders in one vectorised pass. Geometry is in units of size/16, so a 32x32 image is the
16x16 one drawn finer. Image i draws its jitter from its own generator `numpy.random.default_rng([seed, i])`,
so image i is the same whatever `n` is: loading n=100 gives the first 100 images of the default load.
"""
from __future__ import annotations

import numpy as np
import torch

from gradtrace.data.base import ImageDataset
from gradtrace.errors import UserError

SUBJECTS = ["circle", "square", "triangle", "cross", "diamond", "bar"]
STYLES = ["solid", "outline", "stripes", "dots"]
BACKGROUNDS = ["plain", "checker", "gradient", "noise"]
ATTRIBUTES = {"subject": SUBJECTS, "style": STYLES, "background": BACKGROUNDS}
STYLE_WORDS = {"solid": "solid", "outline": "outlined", "stripes": "striped", "dots": "dotted"}

DEFAULT_SIZE = 16
MIN_SIZE = 12
REPEATS = 10  # default N = 6 * 4 * 4 combinations * 10 = 960
N_COMBOS = len(SUBJECTS) * len(STYLES) * len(BACKGROUNDS)

# Colours in [0, 1]. The shape is bright and warm; every background stays dark so the silhouette reads.
SHAPE_RGB = np.array([0.98, 0.84, 0.30])
SHADE = 0.55  # the unlit part of a striped / dotted shape: the shape colour at 55 % brightness
PLAIN_RGB = np.array([0.10, 0.12, 0.30])
CHECKER_RGB = (np.array([0.06, 0.06, 0.08]), np.array([0.34, 0.34, 0.38]))
GRADIENT_RGB = (np.array([0.02, 0.08, 0.08]), np.array([0.14, 0.42, 0.36]))
NOISE_RGB, NOISE_AMP = np.array([0.26, 0.15, 0.10]), 0.16

# Geometry, in units of size / 16 (pixels at the default size).
RADIUS = 5.4          # nominal shape radius
SHIFT = 1.0           # +- position jitter
SCALE_JITTER = 0.10   # scale drawn from 1 +- this
OUTLINE_WIDTH = 1.4
STRIPE_PERIOD = 3.6   # perpendicular period of the diagonal stripes
DOT_PERIOD = 4.0
DOT_RADIUS = 1.15
CHECKER_CELL = 4.0
COLOUR_JITTER = 0.06
BACKGROUND_JITTER = 0.04


def combo_of(i: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Factor indices (subject, style, background) of image positions `i`, cycling through all 96 combinations.

    The order keeps every prefix close to balanced: subject = c mod 6 and style = c mod 4 change every image,
    background = (c div 4) mod 4 every four; the shift after 48 makes the 96 combinations all distinct.
    """
    c = np.asarray(i, dtype=np.int64) % N_COMBOS
    subject = (c + c // 48) % len(SUBJECTS)
    style = c % len(STYLES)
    background = (c // len(STYLES)) % len(BACKGROUNDS)
    return subject, style, background


def _check_size(size: int) -> int:
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < MIN_SIZE:
        raise UserError(f"shapes size must be an integer >= {MIN_SIZE}, got {size!r}; pass size={DEFAULT_SIZE}")
    return int(size)


def _jitter(n: int, size: int, seed: int, start: int = 0) -> dict[str, np.ndarray]:
    """Per-image jitter; image i uses only its own generator default_rng([seed, i])."""
    out = {k: np.zeros((n,) + shp) for k, shp in
           [("dx", ()), ("dy", ()), ("scale", ()), ("colour", (3,)), ("bg", (3,)), ("noise", (size, size))]}
    for k in range(n):
        rng = np.random.default_rng([int(seed), start + k])
        out["dx"][k], out["dy"][k] = rng.uniform(-SHIFT, SHIFT, size=2)
        out["scale"][k] = 1.0 + rng.uniform(-SCALE_JITTER, SCALE_JITTER)
        out["colour"][k] = rng.uniform(-COLOUR_JITTER, COLOUR_JITTER, size=3)
        out["bg"][k] = rng.uniform(-BACKGROUND_JITTER, BACKGROUND_JITTER, size=3)
        out["noise"][k] = rng.uniform(-1.0, 1.0, size=(size, size))
    return out


def _no_jitter(n: int, size: int, rng: np.random.Generator | None) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0) if rng is None else rng
    noise = rng.uniform(-1.0, 1.0, size=(n, size, size))  # the noise background still needs a texture
    zeros = np.zeros(n)
    return {"dx": zeros, "dy": zeros, "scale": np.ones(n), "colour": np.zeros((n, 3)), "bg": np.zeros((n, 3)),
            "noise": noise}


def _box(px: np.ndarray, py: np.ndarray, hx: np.ndarray, hy: np.ndarray) -> np.ndarray:
    """Exact signed distance to an axis-aligned box with half extents (hx, hy)."""
    qx, qy = np.abs(px) - hx, np.abs(py) - hy
    outside = np.hypot(np.maximum(qx, 0.0), np.maximum(qy, 0.0))
    return outside + np.minimum(np.maximum(qx, qy), 0.0)


def _sdf(subject: int, px: np.ndarray, py: np.ndarray, r: np.ndarray) -> np.ndarray:
    """Signed distance (pixels, negative inside) of shape `subject` with radius r, centred at the origin."""
    name = SUBJECTS[subject]
    if name == "circle":
        return np.hypot(px, py) - r
    if name == "square":
        return _box(px, py, 0.82 * r, 0.82 * r)
    if name == "triangle":  # equilateral, pointing up, centred on its centroid (image y grows downwards)
        big = 1.2 * r
        py = py - 0.12 * r  # sit it a little lower so it looks centred
        edges = [0.0 * px + py, 0.866 * px - 0.5 * py, -0.866 * px - 0.5 * py]
        return np.maximum.reduce(edges) - big / 2
    if name == "cross":
        return np.minimum(_box(px, py, r, 0.42 * r), _box(px, py, 0.42 * r, r))
    if name == "diamond":
        return (np.abs(px) + np.abs(py) - 1.18 * r) / np.sqrt(2.0)
    if name == "bar":
        return _box(px, py, 1.05 * r, 0.48 * r)
    raise AssertionError(name)  # pragma: no cover


def _render(subject: np.ndarray, style: np.ndarray, background: np.ndarray, size: int,
            jit: dict[str, np.ndarray]) -> np.ndarray:
    """Vectorised renderer: (N,) factor indices -> float32 (N, 3, size, size) in [-1, 1]."""
    n, u = len(subject), size / 16.0
    grid = np.arange(size) + 0.5
    x, y = grid[None, None, :], grid[None, :, None]  # (1, 1, W), (1, H, 1)
    col = lambda a: np.asarray(a, dtype=np.float64).reshape(-1, 1, 1)  # noqa: E731

    # --- background, (N, H, W, 3)
    bg = np.empty((n, size, size, 3))
    tone = jit["bg"][:, None, None, :]
    for b, name in enumerate(BACKGROUNDS):
        m = background == b
        if not m.any():
            continue
        k = int(m.sum())
        if name == "plain":
            img = np.broadcast_to(PLAIN_RGB, (k, size, size, 3))
        elif name == "checker":
            cell = CHECKER_CELL * u
            odd = ((np.floor(x / cell) + np.floor(y / cell)) % 2)[..., None]  # (1, H, W, 1)
            img = np.broadcast_to(CHECKER_RGB[0] + odd * (CHECKER_RGB[1] - CHECKER_RGB[0]), (k, size, size, 3))
        elif name == "gradient":
            t = (grid / size)[None, :, None, None]
            img = np.broadcast_to(GRADIENT_RGB[0] + t * (GRADIENT_RGB[1] - GRADIENT_RGB[0]), (k, size, size, 3))
        else:  # noise: luminance noise over a brown base
            img = NOISE_RGB + NOISE_AMP * jit["noise"][m][..., None]
        bg[m] = img + tone[m]

    # --- silhouette: signed distance in pixels
    cx = col(size / 2.0 + jit["dx"] * u)
    cy = col(size / 2.0 + jit["dy"] * u)
    r = col(RADIUS * u * jit["scale"])
    sdf = np.empty((n, size, size))
    for s in range(len(SUBJECTS)):
        m = subject == s
        if m.any():
            sdf[m] = _sdf(s, x - cx[m], y - cy[m], r[m])
    inside = np.clip(0.5 - sdf, 0.0, 1.0)  # anti-aliased coverage

    # --- style: how much of each pixel is the shape colour (lit), how much the shade, the rest background
    w = OUTLINE_WIDTH * u
    band = np.clip(w / 2 + 0.5 - np.abs(sdf + w / 2), 0.0, 1.0)
    diag = (x + y) / np.sqrt(2.0)
    stripes = np.clip(0.5 + 1.6 * np.cos(2 * np.pi * diag / (STRIPE_PERIOD * u)), 0.0, 1.0)
    p = DOT_PERIOD * u
    dist = np.hypot((x % p) - p / 2, (y % p) - p / 2)
    dots = np.clip(DOT_RADIUS * u + 0.5 - dist, 0.0, 1.0)
    lit, shade = np.empty((n, size, size)), np.zeros((n, size, size))
    for t, name in enumerate(STYLES):
        m = style == t
        if not m.any():
            continue
        if name == "solid":
            lit[m] = inside[m]
        elif name == "outline":
            lit[m] = band[m]
        else:
            pattern = stripes if name == "stripes" else dots
            lit[m] = inside[m] * pattern
            shade[m] = inside[m] * (1.0 - pattern)
    colour = np.clip(SHAPE_RGB + jit["colour"], 0.0, 1.0)[:, None, None, :]
    lit, shade = lit[..., None], shade[..., None]
    img = bg * (1.0 - lit - shade) + colour * lit + (SHADE * colour) * shade
    img = np.clip(img, 0.0, 1.0).transpose(0, 3, 1, 2)
    return (img * 2.0 - 1.0).astype(np.float32)


def _index(value: str, names: list[str], what: str) -> int:
    if value not in names:
        raise UserError(f"unknown {what} {value!r}; valid: {', '.join(names)}")
    return names.index(value)


def render_shape(subject: str, style: str, background: str, size: int = DEFAULT_SIZE, *,
                 rng: np.random.Generator | None = None, jitter: bool = False) -> np.ndarray:
    """One image, float32 (3, size, size) in [-1, 1].

    Without jitter the shape is centred at its nominal scale and colour; the noise background draws its
    texture from `rng` (default: a fixed generator, so the result is deterministic). With jitter=True, the
    position, scale and colours are drawn from `rng` as well.
    """
    size = _check_size(size)
    idx = [np.array([_index(subject, SUBJECTS, "subject")]), np.array([_index(style, STYLES, "style")]),
           np.array([_index(background, BACKGROUNDS, "background")])]
    if jitter:
        rng = np.random.default_rng() if rng is None else rng
        jit = _jitter(1, size, int(rng.integers(2**63)))
    else:
        jit = _no_jitter(1, size, rng)
    return _render(*idx, size, jit)[0]


def caption(subject: str, style: str, background: str) -> str:
    """The generated caption of a shapes image, e.g. "a striped circle on a checker background"."""
    return f"{_a(STYLE_WORDS[style])} {subject} on a {background} background"


def _a(word: str) -> str:
    return f"{'an' if word[0] in 'aeiou' else 'a'} {word}"


def family_caption(aspect: str, value: str, rng: np.random.Generator) -> str:
    """A whole caption with `aspect` = `value` and the other factors drawn from `rng`, e.g. for background = noise
    "a striped circle on a noise background": one member of that value's family of learning prompts."""
    if aspect not in ATTRIBUTES:
        raise UserError(f"unknown shapes aspect {aspect!r}; use one of {', '.join(ATTRIBUTES)}")
    values = {a: value if a == aspect else vals[int(rng.integers(len(vals)))] for a, vals in ATTRIBUTES.items()}
    return caption(values["subject"], values["style"], values["background"])


def load_shapes(*, size: int | None = None, seed: int = 0, n: int | None = None) -> ImageDataset:
    """The shapes dataset: image i has combination i mod 96 (see `combo_of`) and its own jitter.

    Default N = 96 combinations x 10 = 960, RGB, 16x16. ids = 0..N-1. Metadata holds the three factors, a
    caption naming them ("text", the Hugging Face caption column, see `caption`) and the jitter: dx, dy (centre
    shift in units of size/16, within +-1) and scale (within 1 +- 0.1).
    """
    size = _check_size(DEFAULT_SIZE if size is None else size)
    n = N_COMBOS * REPEATS if n is None else int(n)
    if n < 1:
        raise UserError(f"shapes n must be a positive integer, got {n}; pass e.g. n={N_COMBOS * REPEATS}")
    subject, style, background = combo_of(np.arange(n))
    jit = _jitter(n, size, seed)
    images = _render(subject, style, background, size, jit)
    metadata = [
        {"subject": SUBJECTS[a], "style": STYLES[b], "background": BACKGROUNDS[c],
         "text": caption(SUBJECTS[a], STYLES[b], BACKGROUNDS[c]),
         "dx": round(float(dx), 4), "dy": round(float(dy), 4), "scale": round(float(sc), 4)}
        for a, b, c, dx, dy, sc in zip(subject.tolist(), style.tolist(), background.tolist(),
                                       jit["dx"].tolist(), jit["dy"].tolist(), jit["scale"].tolist())
    ]
    return ImageDataset(
        name="shapes",
        images=torch.from_numpy(images),
        ids=np.arange(n, dtype=np.int64),
        metadata=metadata,
        attributes={k: list(v) for k, v in ATTRIBUTES.items()},
    )
