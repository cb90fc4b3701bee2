"""`load_dataset(spec)`: one entry point for every dataset source."""
from __future__ import annotations

from numbers import Integral

from gradtrace.data.base import ImageDataset
from gradtrace.data.digits import load_digits_dataset
from gradtrace.data.hf import PREFIX as HF_PREFIX, hf_holds_text, load_hf
from gradtrace.data.imagefolder import load_imagefolder
from gradtrace.data.shapes import family_caption as shapes_family_caption, load_shapes
from gradtrace.data.text import TextDataset, load_fortunes, load_jsonl, load_textfolder
from gradtrace.errors import UserError

KNOWN_SPECS = ("digits", "shapes", "imagefolder:PATH", "hf:PATH", "jsonl:PATH", "textfolder:PATH", "fortunes")


def _check_positive(name: str, value: int | None) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, Integral) or value < 1:
        raise UserError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


TEXT_PREFIXES = ("jsonl:", "textfolder:")


def is_text_spec(spec) -> bool:
    """True for a text dataset spec (jsonl:PATH, textfolder:PATH, fortunes)."""
    text = str(spec).strip()
    if text.startswith(HF_PREFIX):  # an hf: dataset without an image column holds documents
        return hf_holds_text(text)
    return text == "fortunes" or text.startswith(TEXT_PREFIXES)


def family_caption(spec: str, aspect: str, value: str, rng) -> str | None:
    """A built-in caption with `aspect` = `value` and the dataset's other factors drawn from `rng` (None: the dataset
    has none)."""
    return shapes_family_caption(aspect, value, rng) if str(spec).strip() == "shapes" else None


def load_dataset(spec: str, *, size: int | None = None, seed: int = 0,
                 n: int | None = None) -> ImageDataset | TextDataset:
    """Load a dataset by spec: "digits", "shapes" or "imagefolder:PATH"; text: "jsonl:PATH", "textfolder:PATH" or
    "fortunes" (`gradtrace.data.text`); a Hugging Face dataset on disk, images or text: "hf:PATH[?options]"
    (`gradtrace.data.hf`).

    size: image side (shapes: default 16, at least 12; imagefolder: default the first image's; digits: 8,
          other sizes are resized bilinearly). seed: the shapes jitter (other sources ignore it).
    n:    keep the first n images (shapes: render n images, cycling through the factor combinations).
    """
    size = _check_positive("size", size)
    n = _check_positive("n", n)
    if isinstance(seed, bool) or not isinstance(seed, Integral) or seed < 0:
        raise UserError(f"seed must be a non-negative integer, got {seed!r}")
    text = str(spec).strip()
    if text == "digits":
        return load_digits_dataset(size=size, n=n)
    if text == "shapes":
        return load_shapes(size=size, seed=int(seed), n=n)
    if text.startswith("imagefolder:"):
        path = text[len("imagefolder:"):]
        if not path:
            raise UserError("imagefolder needs a folder: pass imagefolder:PATH")
        return load_imagefolder(path, size=size, n=n)
    if text.startswith(HF_PREFIX):
        return load_hf(text, size=size, n=n)
    for prefix, loader in zip(TEXT_PREFIXES, (load_jsonl, load_textfolder)):
        if text.startswith(prefix):
            if not text[len(prefix):]:
                raise UserError(f"{prefix[:-1]} needs a path: pass {prefix}PATH")
            return loader(text[len(prefix):], n=n)
    if text == "fortunes":
        return load_fortunes(n=n)
    raise UserError(f"unknown dataset {spec!r}; known: {', '.join(KNOWN_SPECS)}")
