"""A user's folder of images, with an optional metadata.jsonl (the Hugging Face `imagefolder` convention).

Layout: image files (png, jpg, jpeg, bmp, webp; subfolders allowed) anywhere under the folder, and optionally
`metadata.jsonl` at its top: one JSON object per line with "file_name" (the path relative to the folder,
with "/" separators) and any other columns.

Ids are the row index in sorted order of the relative paths (case-sensitive, "/"-separated). They are stable
as long as the set of files does not change; adding or removing a file renumbers the files sorted after it.
Columns whose value is a string or an integer in every row become attributes (values sorted as strings),
except "text", the caption of a text-to-image example; every column is kept in each image's metadata,
together with "file_name".

Without metadata.jsonl, a folder whose images all lie in sub-folders (`PATH/<class>/<image>`, deeper folders
inside a class allowed: torchvision's `ImageFolder` convention) gets one attribute, "label": the name of each
image's top-level sub-folder (the classes sorted, as torchvision sorts them). Images directly in the folder
mean no classes: then no attribute at all.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from gradtrace.data.base import ImageDataset
from gradtrace.errors import UserError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
METADATA_FILE = "metadata.jsonl"
CAPTION = "text"  # the caption column (Hugging Face convention): kept in metadata, never an attribute
LABEL = "label"   # a classifier's label column, or the class sub-folder of an image (no metadata.jsonl)
GRAY_MODES = {"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F"}


def list_images(root: Path) -> list[str]:
    """Relative "/"-separated paths of the image files under root, sorted."""
    rels = [p.relative_to(root).as_posix() for p in root.rglob("*")
            if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES]
    return sorted(rels)


def read_metadata(path: Path) -> dict[str, dict]:
    """file_name -> row (a dict), from a metadata.jsonl file; errors name the line."""
    rows: dict[str, dict] = {}
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"cannot read {path}: {exc}; save it as UTF-8 text") from None
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise UserError(f"{path} line {number} is not valid JSON ({exc.msg}); "
                            "write one JSON object per line") from None
        if not isinstance(row, dict) or not isinstance(row.get("file_name"), str):
            raise UserError(f"{path} line {number} has no \"file_name\" string; "
                            "each line needs {\"file_name\": \"relative/path.png\", ...}")
        name = Path(row["file_name"]).as_posix()
        if name.startswith("./"):
            name = name[2:]
        if name in rows:
            raise UserError(f"{path} line {number} repeats file_name {name!r}; keep one row per image")
        row["file_name"] = name
        rows[name] = row
    return rows


def attribute_vocab(rows: list[dict]) -> dict[str, list[str]]:
    """Columns (other than file_name and the caption, "text") whose value is a str or int in every row
    -> sorted string values."""
    if not rows:
        return {}
    columns = [k for k in rows[0] if k not in ("file_name", CAPTION)]
    vocab = {}
    for col in columns:
        values = [r.get(col) for r in rows]
        if all(isinstance(v, (str, int)) and not isinstance(v, bool) for v in values):
            vocab[col] = sorted({str(v) for v in values})
    return vocab


def class_folder_rows(files: list[str]) -> tuple[list[dict], dict[str, list[str]]]:
    """(rows, vocabulary) of a folder without metadata: "label" = the top-level sub-folder of each image when
    every image lies in one (torchvision's ImageFolder convention), else no attribute."""
    if not files or any("/" not in name for name in files):
        return [{"file_name": name} for name in files], {}
    rows = [{"file_name": name, LABEL: name.split("/", 1)[0]} for name in files]
    return rows, {LABEL: sorted({row[LABEL] for row in rows})}


def _open(path: Path):
    from PIL import Image

    try:
        with Image.open(path) as img:
            img.load()
            return img.copy()
    except Exception as exc:  # PIL raises many types for broken files
        raise UserError(f"cannot read image {path}: {exc}; replace or remove the file") from None


def fit_square(img, size: int):
    """Resize the shorter side to `size` (bicubic), then centre-crop to size x size."""
    from PIL import Image

    w, h = img.size
    if (w, h) == (size, size):
        return img
    scale = size / min(w, h)
    new = (max(size, round(w * scale)), max(size, round(h * scale)))
    if new != (w, h):
        img = img.resize(new, resample=Image.Resampling.BICUBIC)
    left, top = (new[0] - size) // 2, (new[1] - size) // 2
    return img.crop((left, top, left + size, top + size))


def to_pixels(images: list, size: int | None) -> np.ndarray:
    """PIL images as float32 (N, C, size, size) in [-1, 1]: C = 1 if every image is grayscale, else 3 (RGB); each
    resized (shorter side) and centre-cropped by `fit_square`; `size` defaults to the first image's smaller side."""
    mode = "L" if all(img.mode in GRAY_MODES for img in images) else "RGB"
    if size is None:
        size = min(images[0].size)
    arrays = []
    for img in images:
        arr = np.asarray(fit_square(img.convert(mode), size), dtype=np.float32)
        arrays.append(arr[None] if mode == "L" else arr.transpose(2, 0, 1))
    return (np.stack(arrays) / 127.5 - 1.0).astype(np.float32)


def load_imagefolder(path: str, *, size: int | None = None, n: int | None = None) -> ImageDataset:
    """Load a folder of images as (N, C, size, size) in [-1, 1]; C = 1 if every image is grayscale, else 3.

    `size` defaults to the first image's smaller side. An image of another size has its shorter side resized
    to `size` (bicubic) and is then centre-cropped to size x size, so nothing is squashed (the Resize +
    CenterCrop of torchvision and of diffusers' training scripts). `n` keeps the first n images in sorted order.
    """

    root = Path(path).expanduser()
    if not root.is_dir():
        raise UserError(f"image folder not found: {root}; pass imagefolder:PATH with an existing folder")
    root = root.resolve()
    files = list_images(root)
    if not files:
        raise UserError(f"no images in {root}; put {', '.join(IMAGE_SUFFIXES)} files in it")

    meta_path = root / METADATA_FILE
    rows: list[dict]
    if meta_path.exists():
        table = read_metadata(meta_path)
        present = set(files)
        for name in table:
            if name not in present:
                raise UserError(f"{meta_path} names {name!r}, which is not an image file in {root}; "
                                "fix the file_name or add the image")
        for name in files:
            if name not in table:
                raise UserError(f"image {root / name} has no row in {meta_path}; add a line with "
                                f"\"file_name\": \"{name}\"")
        rows = [dict(table[name]) for name in files]
        vocab = attribute_vocab(rows)  # over every image, so the vocabulary does not depend on n
    else:
        rows, vocab = class_folder_rows(files)

    if n is not None:
        if n > len(files):
            raise UserError(f"n={n} is more than the {len(files)} images in {root}; pass n <= {len(files)}")
        files, rows = files[:n], rows[:n]

    pixels = to_pixels([_open(root / name) for name in files], size)
    return ImageDataset(
        name=f"imagefolder:{root}",
        images=torch.from_numpy(pixels),
        ids=np.arange(len(files), dtype=np.int64),
        metadata=rows,
        attributes=vocab,
    )
