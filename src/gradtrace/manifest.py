"""Manifests: JSON written atomically beside every artefact, saying what produced it."""
from __future__ import annotations

import hashlib
import json
import os
import platform
import sys
import tempfile
from pathlib import Path
from typing import Any, Iterable

from gradtrace.errors import UserError


def versions() -> dict[str, str]:
    """Versions of the packages that shape numbers."""
    import numpy
    import torch

    import gradtrace

    out = {"gradtrace": gradtrace.__version__, "torch": torch.__version__, "numpy": numpy.__version__,
           "python": sys.version.split()[0], "platform": platform.platform()}
    from importlib.metadata import PackageNotFoundError, version

    try:  # read the installed version without importing diffusers (seconds of start-up)
        out["diffusers"] = version("diffusers")
    except PackageNotFoundError:  # pragma: no cover - diffusers is a hard dependency
        pass
    return out


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    """Write JSON to `path` via a temporary file and rename, so a crash never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump(obj, fh, indent=2, sort_keys=False, default=_json_default)
            fh.write("\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def read_json(path: str | os.PathLike, what: str = "file") -> Any:
    """Read JSON, turning a missing or broken file into a one-line UserError."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{what} not found: {path}")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{what} is not valid JSON: {path} ({exc.msg if hasattr(exc, 'msg') else exc})")


def sha256_arrays(arrays: Iterable[Any]) -> str:
    """Fingerprint of a sequence of numpy arrays / torch tensors (dtype, shape and bytes)."""
    import numpy as np

    h = hashlib.sha256()
    for a in arrays:
        if hasattr(a, "detach"):
            a = a.detach().cpu().contiguous().numpy()
        a = np.ascontiguousarray(a)
        h.update(str(a.dtype).encode())
        h.update(str(a.shape).encode())
        h.update(a.tobytes())
    return h.hexdigest()


def check_match(expected: dict, found: dict, keys: Iterable[str], what: str, fix: str) -> None:
    """Refuse with a one-line reason when any of `keys` differs between two manifests."""
    for key in keys:
        if expected.get(key) != found.get(key):
            raise UserError(f"{what}: '{key}' differs ({_short(found.get(key))} vs expected "
                            f"{_short(expected.get(key))}); {fix}")


def _short(value: Any) -> str:
    text = json.dumps(value, default=_json_default)
    return text if len(text) <= 60 else text[:57] + "..."


def _json_default(obj: Any) -> Any:
    import numpy as np

    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.floating):
        return float(obj)
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")
