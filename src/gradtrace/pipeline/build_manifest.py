"""What the build steps (`build-pipeline`, `build-lm`) share: the manifest they write last beside the folder they
build, and the rule that reuses a finished build instead of building it again.

    if finished_build(out, FORMAT, "model_index.json", spec, dataset_info, ("fingerprint",)): return out
"""
from __future__ import annotations

from pathlib import Path

from gradtrace.errors import UserError
from gradtrace.io import read_json
from gradtrace.pipeline.spec import Spec

MANIFEST = "gradtrace_build.json"


def finished_build(out: Path, fmt: str, marker: str, spec: Spec, dataset_info: dict, data_keys: tuple) -> bool:
    """True when `out` holds a finished build (its manifest of format `fmt` and the file `marker`) of the same spec
    (whatever `out` was) and the same data (`dataset_info`'s `data_keys`): the build steps' shared reuse rule."""
    if not (out / MANIFEST).exists() or not (out / marker).exists():
        return False
    try:
        old = read_json(out / MANIFEST, "build manifest")
    except UserError:
        return False
    settings = {k: v for k, v in spec.to_dict().items() if k != "out"}
    old_settings = {k: v for k, v in (old.get("spec") or {}).items() if k != "out"}
    old_data = old.get("dataset") or {}
    return (old.get("format") == fmt and old_settings == settings
            and all(old_data.get(k) == dataset_info[k] for k in data_keys))
