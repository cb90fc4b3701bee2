"""scikit-learn's handwritten digits (1,797 images, 8x8, ships with scikit-learn: nothing is downloaded)."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from gradtrace.data.base import ImageDataset
from gradtrace.errors import UserError

NATIVE_SIZE = 8
N_DIGITS = 1797


def load_digits_dataset(*, size: int | None = None, n: int | None = None) -> ImageDataset:
    """Digits as (N, 1, 8, 8) in [-1, 1] (pixel 0..16 -> -1..1); ids = row index 0..1796; attribute "label".

    `size` other than 8 resizes bilinearly (values stay in [-1, 1]); `n` keeps the first n rows.
    """
    from sklearn.datasets import load_digits  # scikit-learn loads in ~1 s: only when digits are asked for

    bunch = load_digits()
    pixels = np.asarray(bunch.images, dtype=np.float32)  # (1797, 8, 8), values 0..16
    labels = np.asarray(bunch.target, dtype=np.int64)
    total = len(labels)
    if n is not None:
        if n > total:
            raise UserError(f"n={n} is more than the {total} images in digits; pass n <= {total}")
        pixels, labels = pixels[:n], labels[:n]
    images = torch.from_numpy(pixels / 8.0 - 1.0).unsqueeze(1).contiguous()
    if size is not None and size != NATIVE_SIZE:
        images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False,
                               antialias=size < NATIVE_SIZE).clamp_(-1.0, 1.0)
    return ImageDataset(
        name="digits",
        images=images,
        ids=np.arange(len(labels), dtype=np.int64),
        metadata=[{"label": int(y)} for y in labels.tolist()],
        attributes={"label": [str(d) for d in range(10)]},
    )
