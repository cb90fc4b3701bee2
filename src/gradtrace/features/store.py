"""The feature store: a directory of memory-mapped arrays and the manifest that says what made them.

Layout::

    manifest.json    format, settings (model fingerprint, groups and their column slices, projection,
                     measurement, dtype, chunk rows, source data), provenance, status
    features.npy     (N, k) in the settings' dtype: float32 (default), float16, or bfloat16 (stored as
                     its raw uint16 bits; `features` decodes rows to float32), written chunk by chunk
    ids.npy          (N,) int64 example ids
    cond.npy         (N, A) int64 conditioning codes (conditional models only)
    progress.json    the chunks finished so far, one file per writer (`gradtrace.features.progress`)

Writing is resumable: chunks have fixed boundaries and each chunk's rows depend only on the example
and the settings, so a run killed at any point and started again with the same settings finishes with
arrays bit-identical to an uninterrupted run. Several writers (the ranks of a torchrun job) may fill one store,
each its own chunks; the store is finished (status "complete") by the writer that finds every chunk recorded,
after checking each chunk's bytes against the digest its writer recorded. A store made with other settings
is refused, and so is a write that would mix rows computed under other numerics (thread count, device, dtype,
library versions: `gradtrace.features.numerics`) unless the writer allows it (recorded in the manifest).
"""
from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

import numpy as np

from gradtrace.choices import STORE_DTYPES as DTYPES  # noqa: F401  (the CLI's choices)
from gradtrace.errors import UserError
from gradtrace.features.locks import create_lock, writer_locks
from gradtrace.features.numerics import check_not_mixed, distinct
from gradtrace.features.progress import ChunkProgress, digest, is_progress_file
from gradtrace.io import check_finite, check_match, check_unique_ids, jsonable, read_json, versions, write_json_atomic

FORMAT = "gradtrace-features"
FORMAT_VERSION = 1
OWN_FILES = {"manifest.json", "features.npy", "ids.npy", "cond.npy", "progress.json", "row_scale.npy"}
ROW_SCALE = "row_scale.npy"  # (N,) float64 per-example factor of a method (settings["row_scale"] says which)
# Settings that must agree between training features and query features to score one against the other.
COMPAT_KEYS = ("model_fingerprint", "groups", "projection", "measurement", "dtype", "precision")
COMPAT_DEFAULTS = {"precision": "float32"}  # stores written before the key existed
FLOAT16_MAX = float(np.finfo(np.float16).max)
CACHE = ".gradtrace-cache"
FEATURE_CAUSE = ("the model's gradients overflowed: a diverged checkpoint, inputs outside the model's range, or "
                 "half-precision activations out of range (featurize with --dtype float32)")


class FeatureStore:
    def __init__(self, path: Path, manifest: dict, writable: bool):
        self.path = Path(path)
        self.manifest = manifest
        self.writable = writable
        mode = "r+" if writable else "r"
        self.dtype = manifest.get("settings", {}).get("dtype", "float32")
        self._raw = np.load(self.path / "features.npy", mmap_mode=mode)
        # What readers use: the memmap itself (float32 / float16), or bfloat16 rows decoded on access.
        self.features = Bfloat16Rows(self._raw) if self.dtype == "bfloat16" else self._raw
        self.ids = np.load(self.path / "ids.npy")
        cond_path = self.path / "cond.npy"
        self.cond = np.load(cond_path) if cond_path.exists() else None
        scale_path = self.path / ROW_SCALE
        self._row_scale = np.load(scale_path, mmap_mode=mode) if scale_path.exists() else None

    @property
    def stored(self) -> np.ndarray:
        """The rows as stored (float32, float16, or bfloat16's raw uint16 bits): what chunk digests are of."""
        return self._raw

    @property
    def row_scale(self) -> np.ndarray | None:
        """The per-example factor a method needs beside the features (DAS's residual factor), or None."""
        return None if self._row_scale is None else np.asarray(self._row_scale, dtype=np.float64)

    # ----------------------------------------------------------------- creation and resume
    @classmethod
    def create(cls, path, settings: dict, ids, cond=None, *, provenance: dict | None = None,
               overwrite: bool = False, rank: int = 0, world: int = 1, numerics: dict | None = None,
               allow_mixed_numerics: bool = False) -> "FeatureStore":
        """Open `path` for writing: a new store, or the unfinished/finished store with equal settings. A single
        writer (`world` 1) holds `.lock` exclusively until `finish`, `release` or the process ends, so a second
        writer is refused in one line instead of interleaving rows; the ranks of one job (`world` > 1) share it
        and each holds its own `.lock-rank<r>`. `numerics` (`gradtrace.features.numerics.current`) are recorded with
        every chunk this writer writes; an unfinished store whose chunks were computed under others is refused
        unless `allow_mixed_numerics` (then recorded in the manifest)."""
        path = Path(path)
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        check_unique_ids(ids, "the examples to featurize", "deduplicate the input set")
        if not isinstance(settings.get("chunk_rows"), int) or settings["chunk_rows"] < 1:
            raise UserError("store settings need chunk_rows, a positive integer (the rows of one write)")
        if path.exists() and not path.is_dir():
            raise UserError(f"feature store path is a file, not a directory: {path}; choose another --out")
        if path.is_dir() and not (path / "manifest.json").exists():
            _refuse_foreign(path)  # before the lock file, so a refused folder is left as it was
        existed = path.is_dir()
        path.mkdir(parents=True, exist_ok=True)
        locks = writer_locks(path, rank, world)
        try:
            with create_lock(path):
                if overwrite and world > 1:
                    raise UserError("--overwrite replaces a store; run it once without torchrun, then featurize "
                                    "with the ranks")
                store = cls._create(path, settings, ids, cond, provenance=provenance, overwrite=overwrite)
                store.progress = ChunkProgress(path, len(ids), int(settings["chunk_rows"]), rank)
                store.numerics, store.folder_existed = numerics, existed
                if not store.complete:
                    store._admit_numerics(numerics, allow_mixed_numerics)
        except BaseException:
            for lock in locks:
                lock.close()
            raise
        store._locks = locks
        return store

    def _admit_numerics(self, numerics: dict | None, allow: bool) -> None:
        """Refuse a writer whose numerics differ from those of the recorded chunks, unless mixing is allowed now or
        was before; record the permission in the manifest."""
        allowed = allow or bool(self.manifest.get("mixed_numerics_allowed"))
        if numerics is not None:
            check_not_mixed(self.progress.numerics().values(), f"feature store {self.path}", allowed=allowed,
                            now=numerics)
        if allow and not self.manifest.get("mixed_numerics_allowed"):
            self.manifest["mixed_numerics_allowed"] = True
            write_json_atomic(self.path / "manifest.json", self.manifest)

    @classmethod
    def _create(cls, path: Path, settings: dict, ids: np.ndarray, cond, *, provenance: dict | None,
                overwrite: bool) -> "FeatureStore":
        if path.exists() and any(path.iterdir()):
            if (path / "manifest.json").exists():
                old = read_json(path / "manifest.json", "feature store manifest")
                same = _with_defaults(old.get("settings", {})) == jsonable(settings) and np.array_equal(
                    np.load(path / "ids.npy"), ids)
                if same:
                    return cls(path, old, writable=True)
                if not overwrite:
                    key = _first_difference(_with_defaults(old.get("settings", {})), jsonable(settings)) or "ids"
                    raise UserError(f"{path} holds a feature store made with other settings ('{key}' "
                                    f"differs); choose a new output directory or pass --overwrite")
            else:
                _refuse_foreign(path)
            if overwrite:
                for name in os.listdir(path):
                    if name in OWN_FILES or is_progress_file(name):
                        (path / name).unlink()
        path.mkdir(parents=True, exist_ok=True)
        n, dim = len(ids), int(settings["dim"])
        storage = storage_dtype(settings.get("dtype", "float32"))
        np.save(path / "ids.npy", ids)
        if cond is not None:
            np.save(path / "cond.npy", np.asarray(cond, dtype=np.int64))
        arr = np.lib.format.open_memmap(path / "features.npy", mode="w+", dtype=storage, shape=(n, dim))
        arr.flush()
        del arr
        reserve(path / "features.npy")
        if settings.get("row_scale"):
            scale = np.lib.format.open_memmap(path / ROW_SCALE, mode="w+", dtype=np.float64, shape=(n,))
            scale.flush()
            del scale
            reserve(path / ROW_SCALE)
        ChunkProgress(path, n, int(settings["chunk_rows"])).start()
        manifest = {"format": FORMAT, "format_version": FORMAT_VERSION, "status": "incomplete",
                    "rows": n, "settings": jsonable(settings), "provenance": provenance or {},
                    "versions": versions()}
        write_json_atomic(path / "manifest.json", manifest)  # last: its presence marks a store
        return cls(path, manifest, writable=True)

    @property
    def rows_done(self) -> int:
        if self.manifest.get("status") == "complete":
            return len(self.ids)
        return self._progress().rows_done()

    @property
    def complete(self) -> bool:
        return self.manifest.get("status") == "complete"

    def _progress(self) -> ChunkProgress:
        progress = getattr(self, "progress", None)
        return progress if progress is not None else ChunkProgress(self.path, len(self.ids),
                                                                   int(self.settings["chunk_rows"]))

    def missing_chunks(self) -> list[int]:
        """Indices of the chunks no writer has recorded (none once the store is complete)."""
        return [] if self.complete else self._progress().missing()

    def write(self, start: int, block: np.ndarray, row_scale: np.ndarray | None = None, *,
              numerics: dict | None = None) -> None:
        """Write rows [start, start+len(block)), whole chunks (and their row factors, when the store keeps them),
        and record each chunk as done once it is on disk, computed under `numerics` (default: the writer's)."""
        if not self.writable:
            raise RuntimeError("store opened read-only")
        progress = self.progress
        stop = start + len(block)
        first, last = start // progress.chunk_rows, -(-stop // progress.chunk_rows)
        if start % progress.chunk_rows or not 0 <= first < last <= len(progress.bounds) or \
                stop != progress.bounds[last - 1][1]:
            raise RuntimeError(f"rows {start}..{stop} are not whole chunks of {progress.chunk_rows} rows")
        if (row_scale is None) != (self._row_scale is None):
            raise RuntimeError("row factors must be written exactly when the store keeps them")
        check_finite(block, f"featurize (rows {start}..{stop - 1})", FEATURE_CAUSE)
        scale = None if row_scale is None else np.asarray(row_scale, dtype=np.float64)
        if scale is not None:
            if scale.shape != (len(block),):
                raise RuntimeError(f"row factors of rows {start}..{stop - 1} must be one per row")
            check_finite(scale, f"featurize row factors (rows {start}..{stop - 1})", FEATURE_CAUSE)
        self._raw[start:stop] = encode_rows(block, self.dtype)
        self._raw.flush()
        if scale is not None:
            self._row_scale[start:stop] = scale
            self._row_scale.flush()
        for c in range(first, last):
            progress.mark(c, self._chunk_digest(*progress.bounds[c]), numerics or getattr(self, "numerics", None))

    def _chunk_digest(self, start: int, stop: int) -> str:
        return digest(self._raw[start:stop], None if self._row_scale is None else self._row_scale[start:stop])

    def finish(self) -> bool:
        """Mark the store complete when every chunk is recorded and its bytes match the digest its writer
        recorded (True); leave it unfinished while chunks are missing (False: other ranks still writing)."""
        with create_lock(self.path):
            self.manifest = read_json(self.path / "manifest.json", "feature store manifest")
            if not self.complete:
                done = self.progress.done()
                if len(done) < len(self.progress.bounds):
                    return False
                for c, (start, stop) in enumerate(self.progress.bounds):
                    if done[c] is not None and done[c] != self._chunk_digest(start, stop):
                        raise UserError(f"feature store {self.path}: rows {start}..{stop - 1} changed after they "
                                        "were written; featurize again into a new directory")
                records = self.progress.numerics().values()
                check_not_mixed(records, f"feature store {self.path}",
                                allowed=bool(self.manifest.get("mixed_numerics_allowed")))
                self.manifest["numerics"] = distinct(records)
                self.manifest["status"] = "complete"
                write_json_atomic(self.path / "manifest.json", self.manifest)
        self.release()
        return True

    def release(self) -> None:
        """Give up the writer's locks (a later `create` of the same store may then resume it)."""
        for lock in getattr(self, "_locks", []):
            lock.close()
        self._locks = []

    # ----------------------------------------------------------------- reading
    @classmethod
    def open(cls, path, *, require_complete: bool = True) -> "FeatureStore":
        """A finished store (or, with require_complete=False, an unfinished one), its arrays checked against
        the manifest: readable, of the manifest's dtype and shape, one id (and conditioning row, and factor)
        per row. Anything else is refused in one line naming the file."""
        path = Path(path)
        if not (path / "manifest.json").exists():
            raise UserError(f"no feature store at {path} (manifest.json missing); run `gradtrace featurize` first")
        manifest = read_json(path / "manifest.json", "feature store manifest")
        if not isinstance(manifest, dict) or not isinstance(manifest.get("settings"), dict):
            raise UserError(f"{path / 'manifest.json'} is not a feature store manifest (a JSON object with "
                            "settings); featurize again into a new directory")
        if manifest.get("format") != FORMAT or manifest.get("format_version") != FORMAT_VERSION:
            raise UserError(f"{path} is not a gradtrace feature store of format version {FORMAT_VERSION}")
        if require_complete and manifest.get("status") != "complete":
            raise UserError(f"feature store {path} is unfinished; rerun the same featurize command to resume it")
        needed = ("features.npy", "ids.npy") + ((ROW_SCALE,) if manifest["settings"].get("row_scale") else ())
        for name in needed:
            if not (path / name).exists():
                raise UserError(f"feature store {path} lacks {name}; featurize again into a new directory")
        try:
            store = cls(path, manifest, writable=False)
        except (ValueError, OSError, EOFError) as exc:  # truncated or not an .npy file at all
            raise UserError(f"feature store {path} has an unreadable array ({str(exc).splitlines()[0][:120]}); "
                            "featurize again into a new directory") from None
        store._check_arrays()
        return store

    def _check_arrays(self) -> None:
        m, where = self.manifest, self.path
        try:
            rows, dim = int(m["rows"]), int(m["settings"]["dim"])
        except (KeyError, TypeError, ValueError):
            raise UserError(f"{where / 'manifest.json'} lacks rows or settings.dim; featurize again") from None
        want = storage_dtype(self.settings.get("dtype", "float32"))
        if self._raw.dtype != want:
            raise UserError(f"feature store {where}: features.npy holds {self._raw.dtype}, the manifest says "
                            f"{self.settings.get('dtype', 'float32')}; featurize again into a new directory")
        if self.features.shape != (rows, dim):
            raise UserError(f"feature store {where}: features.npy has shape {self.features.shape}, "
                            f"manifest says ({rows}, {dim}); featurize again")
        for name, arr in (("ids.npy", self.ids), ("cond.npy", self.cond), (ROW_SCALE, self._row_scale)):
            if arr is not None and (arr.ndim < 1 or arr.shape[0] != rows):
                raise UserError(f"feature store {where}: {name} has {arr.shape[0] if arr.ndim else 0} rows, the "
                                f"manifest says {rows}; featurize again into a new directory")
        if self.ids.dtype.kind not in "iu":
            raise UserError(f"feature store {where}: ids.npy holds {self.ids.dtype}, not integer ids; featurize again "
                            "into a new directory")
        check_unique_ids(self.ids, f"feature store {where} (ids.npy)", "featurize again into a new directory")

    @property
    def settings(self) -> dict:
        return self.manifest["settings"]

    @property
    def group_slices(self) -> list[tuple[str, int, int]]:
        return [(g["name"], int(g["start"]), int(g["stop"])) for g in self.settings["groups"]]

    @property
    def group_names(self) -> list[str]:
        return [g["name"] for g in self.settings["groups"]]

    def check_compatible(self, other: "FeatureStore") -> None:
        """Refuse to score `other` (queries) against this store (training set) unless settings agree."""
        check_match({**COMPAT_DEFAULTS, **self.settings}, {**COMPAT_DEFAULTS, **other.settings}, COMPAT_KEYS,
                    what=f"query features {other.path} do not match training features {self.path}",
                    fix="featurize both with the same checkpoint, groups, projection, measurement and dtypes")


def _refuse_foreign(path: Path) -> None:
    """Refuse a folder holding files that are not a feature store's (its own, or hidden ones)."""
    if any(name not in OWN_FILES and not is_progress_file(name) and not name.startswith(".")
           for name in os.listdir(path)):
        raise UserError(f"{path} is not empty and is not a feature store; choose an empty directory")


def reserve(file: Path) -> None:
    """Allocate a sparse array file's blocks now, so a full disk fails here with ENOSPC (an OSError the CLI
    reports in one line) instead of killing a later memmap write with SIGBUS. Filesystems without
    fallocate are left as they are."""
    with open(file, "r+b") as fh:
        try:
            os.posix_fallocate(fh.fileno(), 0, os.fstat(fh.fileno()).st_size)
        except OSError as exc:
            if exc.errno in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
                return
            raise OSError(exc.errno, exc.strerror, str(file)) from None


def _with_defaults(settings: dict) -> dict:
    """Settings of a store written before a key existed, with that key at its default (so it still resumes and
    is reused by a newer version)."""
    out = {**COMPAT_DEFAULTS, **settings}
    if isinstance(out.get("spec"), dict):
        out["spec"] = {**COMPAT_DEFAULTS, **out["spec"]}
    return out


def cache_dir_for(store_path) -> Path:
    """Where derived inputs of a store's examples (e.g. VAE latents) are cached: beside the store, shared by
    the stores of one directory."""
    return Path(store_path).resolve().parent / CACHE


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


def remove_store(path) -> None:
    """Delete a store directory (only gradtrace's own files)."""
    path = Path(path)
    if (path / "manifest.json").exists():
        shutil.rmtree(path)


def _first_difference(a: dict, b: dict) -> str | None:
    first = [k for k in ("model_fingerprint", "source", "groups", "projection", "measurement") if k in a or k in b]
    for key in first + sorted((set(a) | set(b)) - set(first)):
        if a.get(key) != b.get(key):
            return key
    return None
