"""The common dataset type: images in [-1, 1], stable integer ids, per-image metadata, attribute vocabulary."""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping

import numpy as np
import torch

from gradtrace.errors import UserError

NULL_CODE = -1  # attribute code meaning "not specified" (the null / unconditional token)


def as_id_array(ids: Any) -> np.ndarray:
    """Turn a list / array / tensor / single int of ids into a 1-D int64 array."""
    if isinstance(ids, torch.Tensor):
        ids = ids.detach().cpu().numpy()
    arr = np.asarray(ids)
    if arr.ndim == 0:
        arr = arr.reshape(1)
    if arr.size == 0:
        return np.zeros(0, dtype=np.int64)
    if arr.ndim != 1 or not np.issubdtype(arr.dtype, np.integer):
        raise UserError(f"ids must be a 1-D sequence of integers, got dtype {arr.dtype} shape {arr.shape}; "
                        "pass e.g. dataset.ids[:10]")
    return arr.astype(np.int64)



def row_index(ids: np.ndarray) -> dict[int, int]:
    """id → row position, for `row_positions`."""
    return {int(i): r for r, i in enumerate(np.asarray(ids).tolist())}


def row_positions(row_of: dict[int, int], ids: Any, where: Callable[[], str]) -> np.ndarray:
    """Row positions (int64) of the given ids, in the order given; an id not in `row_of` raises UserError naming
    `where()` (e.g. "dataset digits (ids range 0..1796, 1797 images)")."""
    want = as_id_array(ids)
    rows = np.empty(len(want), dtype=np.int64)
    for k, i in enumerate(want.tolist()):
        r = row_of.get(i)
        if r is None:
            raise UserError(f"id {i} is not in {where()}; pick ids from dataset.ids")
        rows[k] = r
    return rows

@dataclass(eq=False, repr=False)
class ImageDataset:
    """Images with stable ids.

    name:       the spec it was loaded from ("digits", "shapes", "imagefolder:/abs/path").
    images:     float32 tensor (N, C, H, W), values in [-1, 1].
    ids:        int64 array (N,), a stable id per image (the same image gets the same id on every load).
    metadata:   one JSON-serialisable dict per image.
    attributes: conditioning vocabulary, attribute name -> ordered list of its values as strings.
    """

    name: str
    images: torch.Tensor
    ids: np.ndarray
    metadata: list[dict]
    attributes: dict[str, list[str]]

    def __post_init__(self) -> None:
        if not isinstance(self.images, torch.Tensor) or self.images.ndim != 4:
            raise UserError(f"dataset {self.name}: images must be a 4-D tensor (N, C, H, W)")
        if self.images.dtype != torch.float32:
            self.images = self.images.to(torch.float32)
        self.ids = as_id_array(self.ids)
        n = self.images.shape[0]
        if self.ids.shape != (n,):
            raise UserError(f"dataset {self.name}: {self.ids.shape[0]} ids for {n} images; give one id per image")
        if len(self.metadata) != n:
            raise UserError(f"dataset {self.name}: {len(self.metadata)} metadata rows for {n} images; "
                            "give one dict per image")
        if len(np.unique(self.ids)) != n:
            raise UserError(f"dataset {self.name}: ids are not unique; give every image its own id")
        self.attributes = {str(k): [str(v) for v in vals] for k, vals in (self.attributes or {}).items()}
        for k, vals in self.attributes.items():
            if len(set(vals)) != len(vals):
                raise UserError(f"dataset {self.name}: attribute {k!r} lists a value twice; make values unique")
        self._row_of: dict[int, int] | None = None

    def __repr__(self) -> str:
        return (f"ImageDataset(name={self.name!r}, n={len(self)}, channels={self.channels}, size={self.size}, "
                f"attributes={list(self.attributes)})")

    # ------------------------------------------------------------------ basic shape
    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def channels(self) -> int:
        return int(self.images.shape[1])

    @property
    def size(self) -> int:
        """Image height (images are square)."""
        return int(self.images.shape[2])

    # ------------------------------------------------------------------ ids
    def index_of(self, ids: Any) -> np.ndarray:
        """Row positions (int64) of the given ids, in the order given; an unknown id raises UserError."""
        if self._row_of is None:
            self._row_of = row_index(self.ids)
        return row_positions(self._row_of, ids, self._where)

    def _where(self) -> str:
        lo, hi = (int(self.ids.min()), int(self.ids.max())) if len(self) else (0, -1)
        return f"dataset {self.name} (ids range {lo}..{hi}, {len(self)} images)"

    def subset(self, ids: Any) -> "ImageDataset":
        """The rows whose id is in `ids`, in the order of `ids` (each id at most once: ids stay unique)."""
        rows = self.index_of(ids)
        if len(np.unique(rows)) != len(rows):
            values, counts = np.unique(self.ids[rows], return_counts=True)
            raise UserError(f"subset got id {int(values[counts > 1][0])} more than once; pass each id once")
        return ImageDataset(
            name=self.name,
            images=self.images[torch.as_tensor(rows, dtype=torch.long)].clone(),
            ids=self.ids[rows].copy(),
            metadata=[dict(self.metadata[r]) for r in rows.tolist()],
            attributes={k: list(v) for k, v in self.attributes.items()},
        )

    # ------------------------------------------------------------------ attributes
    def attribute_codes(self) -> np.ndarray:
        """int64 (N, A): index of each image's value in attributes[name]; -1 where the image has none.

        Columns follow the order of `attributes`. A value missing from the vocabulary raises UserError.
        """
        names = list(self.attributes)
        codes = np.full((len(self), len(names)), NULL_CODE, dtype=np.int64)
        for j, name in enumerate(names):
            lookup = {v: k for k, v in enumerate(self.attributes[name])}
            for r, meta in enumerate(self.metadata):
                value = meta.get(name)
                if value is None:
                    continue
                code = lookup.get(str(value))
                if code is None:
                    raise UserError(f"dataset {self.name}: image id {int(self.ids[r])} has {name}={value!r}, "
                                    f"which is not in the vocabulary {self.attributes[name]}; fix its metadata")
                codes[r, j] = code
        return codes

    def class_indices(self, attribute: str, classes: list[str], rows=None) -> np.ndarray:
        """int64 (N,) (or one per position in `rows`): each image's index in `classes` of its value of `attribute`
        (compared as strings), the label of a classifier; an image without a value, or with a value not in
        `classes`, raises UserError."""
        lookup = {str(c): k for k, c in enumerate(classes)}
        rows = np.arange(len(self)) if rows is None else np.asarray(rows, dtype=np.int64)
        out = np.empty(len(rows), dtype=np.int64)
        for k, r in enumerate(rows.tolist()):
            value = self.metadata[r].get(attribute)
            if value is None:
                raise UserError(f"dataset {self.name}: image id {int(self.ids[r])} has no {attribute!r} label; give "
                                f"every image one (a metadata.jsonl column or a class sub-folder)")
            code = lookup.get(str(value))
            if code is None:
                shown = ", ".join(map(str, classes[:12])) + (", ..." if len(classes) > 12 else "")
                raise UserError(f"dataset {self.name}: image id {int(self.ids[r])} has {attribute}={value!r}, not "
                                f"one of the model's classes ({shown}); use images of those classes or retrain")
            out[k] = code
        return out

    # ------------------------------------------------------------------ identity
    def fingerprint(self) -> str:
        """sha256 hex over the ids, the image bytes, the attribute vocabulary and each image's attribute codes."""
        h = hashlib.sha256(b"gradtrace.ImageDataset.v1\n")
        h.update(json.dumps(list(self.images.shape)).encode())
        h.update(self.ids.astype("<i8").tobytes())
        h.update(self.images.detach().cpu().contiguous().numpy().astype("<f4", copy=False).tobytes())
        h.update(json.dumps(self.attributes, sort_keys=False).encode())
        h.update(self.attribute_codes().astype("<i8").tobytes())
        return h.hexdigest()

    def info(self) -> dict:
        """Summary for manifests."""
        return {
            "name": self.name,
            "n": len(self),
            "channels": self.channels,
            "size": self.size,
            "attributes": {k: list(v) for k, v in self.attributes.items()},
            "fingerprint": self.fingerprint(),
        }


def encode_attributes(dataset_or_vocab: ImageDataset | Mapping[str, Iterable[str]],
                      values: Mapping[str, Any]) -> np.ndarray:
    """One row of attribute codes (int64, length A) for the given {name: value}; names not given get -1 (null).

    Values are compared as strings, so {"label": 3} and {"label": "3"} are the same.
    """
    vocab = dataset_or_vocab.attributes if isinstance(dataset_or_vocab, ImageDataset) else dataset_or_vocab
    vocab = {str(k): [str(v) for v in vals] for k, vals in vocab.items()}
    names = list(vocab)
    row = np.full(len(names), NULL_CODE, dtype=np.int64)
    for name, value in values.items():
        name = str(name)
        if name not in vocab:
            known = ", ".join(names) if names else "none (this dataset has no attributes)"
            raise UserError(f"unknown attribute {name!r}; known attributes: {known}")
        if value is None:
            continue
        try:
            row[names.index(name)] = vocab[name].index(str(value))
        except ValueError:
            raise UserError(f"unknown value {value!r} for attribute {name!r}; "
                            f"valid values: {', '.join(vocab[name])}") from None
    return row
