"""How feature rows are kept on disk: float32, float16 (range-checked) or bfloat16 (raw uint16 bits, rounded to
nearest even), and a read-only float32 view of bfloat16 rows."""
from __future__ import annotations

import numpy as np

from gradtrace.choices import STORE_DTYPES as DTYPES
from gradtrace.errors import UserError

FLOAT16_MAX = float(np.finfo(np.float16).max)


def storage_dtype(name: str) -> np.dtype:
    """The numpy dtype features.npy holds for a settings dtype (bfloat16 as raw uint16 bits)."""
    if name not in DTYPES:
        raise UserError(f"unknown feature storage dtype '{name}'; use one of {', '.join(DTYPES)}")
    return np.dtype({"float32": np.float32, "float16": np.float16, "bfloat16": np.uint16}[name])


def encode_rows(block: np.ndarray, name: str) -> np.ndarray:
    """float32 rows → the storage representation (float16 refuses values beyond its range)."""
    block = np.asarray(block, dtype=np.float32)
    if name == "float16":
        peak = float(np.abs(block).max(initial=0.0))
        if peak > FLOAT16_MAX:
            raise UserError(f"a feature value ({peak:.3g}) exceeds the float16 range; store with dtype "
                            f"bfloat16 or float32")
        return block.astype(np.float16)
    if name == "bfloat16":  # round to nearest even on the upper 16 bits
        bits = block.view(np.uint32)
        rounded = bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))
        return (rounded >> np.uint32(16)).astype(np.uint16)
    return block


def decode_bfloat16(bits: np.ndarray) -> np.ndarray:
    return (np.asarray(bits, dtype=np.uint16).astype(np.uint32) << np.uint32(16)).view(np.float32)


class Bfloat16Rows:
    """Read-only (N, k) view of bfloat16 features (uint16 bits on disk); indexing decodes to float32.

    Indexing rows (`x[a:b]`) reads and decodes only those rows; `np.asarray(x)` decodes everything.
    """

    ndim = 2
    dtype = np.dtype(np.float32)

    def __init__(self, raw: np.ndarray):
        self.raw = raw
        self.shape = tuple(raw.shape)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, key) -> np.ndarray:
        return decode_bfloat16(self.raw[key])

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        out = decode_bfloat16(self.raw)
        return out if dtype is None else out.astype(dtype, copy=False)
