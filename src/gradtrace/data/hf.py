"""A Hugging Face `datasets` dataset on disk as a gradtrace dataset: `--data hf:PATH[?image=COL&text=COL&label=COL
&split=NAME]`.

PATH is a folder written by `Dataset.save_to_disk` (or `DatasetDict.save_to_disk`: `split` picks one, default
"train"), a `.parquet` file, or a folder of `.parquet` files (read in sorted order, e.g. `to_parquet` shards).
Columns, unless named in the options:

- image: the first column whose feature is `datasets.Image` (else one named "image" or "img"); without one, the
  rows are text documents (a `TextDataset`, for language models);
- text: "text", else "caption", else "prompt" (an image's caption, the conditioning of text-to-image models;
  a document's text);
- label: "label"; it becomes the "label" attribute, as an image folder's class sub-folders do (classifiers read
  it). A class's index is the dataset's own integer: a `ClassLabel` gives its names in its own order (names[i] is
  class i), plain integer labels 0..max keep their numeric order; only string labels are sorted.

Ids are row positions (0..N-1), stable while the dataset does not change (its fingerprint is checked by later
stages). `datasets` (and pyarrow) load only when such a dataset is opened.
"""
from __future__ import annotations

import io
from pathlib import Path
from urllib.parse import parse_qsl

import numpy as np
import torch

from gradtrace.data.base import ImageDataset
from gradtrace.data.imagefolder import attribute_vocab, to_pixels
from gradtrace.data.text import TextDataset
from gradtrace.errors import UserError
from gradtrace.extras import require

PREFIX = "hf:"
OPTIONS = ("image", "text", "label", "split")
TEXT_COLUMNS = ("text", "caption", "prompt")
IMAGE_COLUMNS = ("image", "img")
DEFAULT_SPLIT = "train"


def parse_hf(spec: str) -> tuple[Path, dict[str, str]]:
    """(path, options) of "hf:PATH?key=value&..."; unknown options are refused."""
    body = str(spec).strip()[len(PREFIX):]
    path, _, query = body.partition("?")
    if not path:
        raise UserError("hf needs a path: pass hf:PATH (a save_to_disk folder or parquet files)")
    options = dict(parse_qsl(query, keep_blank_values=True, strict_parsing=False)) if query else {}
    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        raise UserError(f"unknown hf option {unknown[0]!r}; use {', '.join(OPTIONS)} "
                        "(e.g. hf:PATH?image=img&text=caption)")
    return Path(path).expanduser(), options


def open_hf(path: Path, split: str | None):
    """The `datasets.Dataset` at `path` (save_to_disk folder, a parquet file or a folder of them)."""
    datasets = require("datasets", "hf: data")  # the `hf` extra
    pq = require("pyarrow.parquet", "hf: data")
    if not path.exists():
        raise UserError(f"hf dataset not found: {path}; pass hf:PATH with a save_to_disk folder or parquet files")
    parquet = [path] if path.is_file() else sorted(path.glob("*.parquet"))
    if path.is_dir() and ((path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists()):
        ds = datasets.load_from_disk(str(path))
        if isinstance(ds, datasets.DatasetDict):
            name = split or DEFAULT_SPLIT
            if name not in ds:
                raise UserError(f"{path} has the splits {', '.join(ds)}, not {name!r}; pass hf:{path}?split=NAME")
            ds = ds[name]
        elif split is not None:
            raise UserError(f"{path} is a single dataset without splits; drop ?split={split}")
        return ds
    if not parquet or any(p.suffix != ".parquet" for p in parquet):
        raise UserError(f"{path} is neither a save_to_disk folder (dataset_info.json) nor parquet files; save it "
                        "with Dataset.save_to_disk or to_parquet")
    try:
        tables = [pq.read_table(p) for p in parquet]
    except Exception as exc:  # pyarrow raises several types for a damaged file
        raise UserError(f"cannot read parquet {path}: {exc}; write it again with Dataset.to_parquet") from None
    return datasets.Dataset(tables[0] if len(tables) == 1 else _concat(tables))


def _concat(tables):
    import pyarrow as pa

    try:
        return pa.concat_tables(tables)
    except pa.ArrowInvalid as exc:
        raise UserError(f"the parquet files differ in their columns ({exc}); keep one dataset per folder") from None


def _columns(ds, options: dict) -> tuple[str | None, str | None, str | None]:
    """(image, text, label) column names: the options', else the defaults (see the module docstring)."""
    import datasets

    names = list(ds.column_names)
    for key in ("image", "text", "label"):
        if options.get(key) and options[key] not in names:
            raise UserError(f"hf dataset has no column {options[key]!r} (its columns: {', '.join(names)}); "
                            f"pass ?{key}=COLUMN")
    image = options.get("image") or next((c for c in names if isinstance(ds.features[c], datasets.Image)), None) \
        or next((c for c in IMAGE_COLUMNS if c in names), None)
    text = options.get("text") or next((c for c in TEXT_COLUMNS if c in names), None)
    label = options.get("label") or ("label" if "label" in names else None)
    return image, text, label


def _pil(value, row: int):
    from PIL import Image

    if isinstance(value, Image.Image):
        return value
    if isinstance(value, dict) and value.get("bytes"):
        return Image.open(io.BytesIO(value["bytes"]))
    if isinstance(value, dict) and value.get("path"):
        return Image.open(value["path"])
    raise UserError(f"row {row} of the image column holds {type(value).__name__}, not an image; pass ?image=COLUMN")


def load_hf(spec: str, *, size: int | None = None, n: int | None = None) -> ImageDataset | TextDataset:
    """The dataset of an "hf:PATH[?options]" spec (see the module docstring); `n` keeps the first n rows."""
    path, options = parse_hf(spec)
    ds = open_hf(path, options.get("split"))
    if n is not None:
        if n > len(ds):
            raise UserError(f"n={n} is more than the {len(ds)} rows of {path}; pass n <= {len(ds)}")
        ds = ds.select(range(n))
    if len(ds) == 0:
        raise UserError(f"{path} has no rows; save a dataset with at least one example")
    image, text, label = _columns(ds, options)
    if image is None and text is None:
        raise UserError(f"hf dataset {path} has neither an image nor a text column (its columns: "
                        f"{', '.join(ds.column_names)}); pass ?image=COLUMN or ?text=COLUMN")
    names = getattr(ds.features.get(label), "names", None) if label else None
    texts = None if text is None else [str(t) for t in ds[text]]
    labels = None if label is None else list(ds[label])
    rows = []
    for i in range(len(ds)):
        meta = {}
        if texts is not None:
            meta["text"] = texts[i]
        if labels is not None:
            meta["label"] = names[int(labels[i])] if names is not None else labels[i]
        rows.append(meta)
    ids = np.arange(len(ds), dtype=np.int64)
    name = f"{PREFIX}{path.resolve()}" + (f"?{'&'.join(f'{k}={v}' for k, v in sorted(options.items()))}"
                                         if options else "")
    if image is None:
        return TextDataset(name=name, texts=[m.pop("text") for m in rows], ids=ids, metadata=rows)
    pixels = to_pixels([_pil(value, i) for i, value in enumerate(ds[image])], size)
    return ImageDataset(name=name, images=torch.from_numpy(pixels), ids=ids, metadata=rows,
                        attributes=_vocab(rows, labels, names))


def _vocab(rows: list[dict], int_labels, names) -> dict[str, list[str]]:
    """The attribute vocabulary; a label's class index is the dataset's own integer (as a classifier trained on
    them expects), not its place among sorted strings ("10" before "2", "ant" before "zebra"): a `ClassLabel`'s
    names in their order, or integer labels' numeric order 0..max."""
    vocab = attribute_vocab(rows)
    if names is not None and "label" in vocab:
        vocab["label"] = [str(n) for n in names]
    elif int_labels and "label" in vocab and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0
                                                 for v in int_labels):
        vocab["label"] = [str(i) for i in range(max(int_labels) + 1)]
    return vocab


def hf_holds_text(spec: str) -> bool:
    """True when an hf: dataset has no image column (its rows are documents)."""
    path, options = parse_hf(spec)
    image, _, _ = _columns(open_hf(path, options.get("split")), options)
    return image is None
