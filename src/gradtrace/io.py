"""Files and manifests: atomic writes that follow the umask, JSON-safe values, hashes, the command line.

Every artefact gradtrace writes goes through `atomic_write` (a temporary file in the same directory,
renamed into place once complete), so a crash never leaves half a file, and the result has the mode any
other new file would have under the process umask (never the 0600 of a bare temporary file).
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import platform
import re
import socket
import sys
import tempfile
from contextlib import contextmanager
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np

from gradtrace import __version__  # the front door sets it before any submodule loads
from gradtrace.errors import UserError


def versions() -> dict[str, str]:
    """Versions of the packages that shape numbers."""
    out = {"gradtrace": __version__, "torch": _installed("torch"), "numpy": np.__version__,
           "python": sys.version.split()[0], "platform": platform.platform()}
    diffusers = _installed("diffusers")
    if diffusers is not None:  # pragma: no branch - diffusers is a hard dependency
        out["diffusers"] = diffusers
    return out


def _installed(package: str) -> str | None:
    """The installed version of `package`, read without importing it (torch and diffusers take seconds to load,
    and this module is below the CLI's start-up)."""
    try:
        return version(package)
    except PackageNotFoundError:  # pragma: no cover - torch and diffusers are hard dependencies
        return None


def command_line() -> str:
    """The command that is running, as recorded in manifests: ``gradtrace <arguments>``."""
    return " ".join(["gradtrace", *sys.argv[1:]])


def _umask_mode() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def process_alive(pid: int) -> bool:
    """True while process `pid` (of this host) exists and is not a zombie."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a killed process whose parent died may linger as a zombie nobody reaps: that is dead too
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[-1].split()[0] != "Z"
    except OSError:
        return True


def _writer_tag() -> str:
    """Host and pid of this writer, as temporary names carry them (dots in the host name would confuse parsing)."""
    return f"{socket.gethostname().replace('.', '_')}-{os.getpid()}"


def remove_stale_temps(path: str | os.PathLike) -> None:
    """Delete the temporary files of `path` left by writers of this host that died mid-write (e.g. SIGKILL); a
    live writer's (of this host or another sharing the folder) are kept."""
    path = Path(path)
    host = _writer_tag().rsplit("-", 1)[0]
    pattern = re.compile(rf"^\.{re.escape(path.name)}\.{re.escape(host)}-(\d+)\.[A-Za-z0-9_]+\.tmp")
    try:
        names = os.listdir(path.parent)
    except OSError:
        return
    for name in names:
        found = pattern.match(name)
        if found and not process_alive(int(found.group(1))):
            try:
                os.unlink(path.parent / name)
            except OSError:
                pass


def check_can_write(directory: str | os.PathLike) -> None:
    """Raise the OSError that writing into `directory` (made if missing) would meet: a file in its place or above
    it, a read-only filesystem, no permission. Nothing is created; long stages call it before they start."""
    path = Path(directory).absolute()
    probe = path
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(path))
    if os.statvfs(probe).f_flag & os.ST_RDONLY:
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
    if not os.access(probe, os.W_OK | os.X_OK):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))


def writer_temp(path: str | os.PathLike, suffix: str = ".tmp") -> Path:
    """A new empty temporary file beside `path` whose name carries this writer's host and pid, after removing the
    ones of `path` that dead writers of this host left (`remove_stale_temps`); the caller renames or deletes it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.{_writer_tag()}.", suffix=suffix)
    os.close(fd)
    return Path(tmp)


@contextmanager
def atomic_write(path: str | os.PathLike, suffix: str = ".tmp") -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it is renamed to `path` with the umask's mode.

    The temporary name is unique per call and carries the writer's host and pid (several processes may write
    the same file at once: the last rename wins, and every version is complete). On error the temporary file
    is removed; one left by a killed writer is removed by the next write of `path`. `suffix` (starting with
    ".tmp") lets writers that insist on an extension (``np.save`` adds ``.npy``) keep it.
    """
    path = Path(path)
    if path.is_dir():  # named before any temporary file exists, so the error names the user's path
        raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), str(path))
    tmp = writer_temp(path, suffix)
    try:
        yield Path(tmp)
        os.chmod(tmp, _umask_mode())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_json_atomic(path: str | os.PathLike, obj: Any, *, indent: int | None = 2) -> None:
    """Write JSON to `path` atomically (see `atomic_write`). `indent=None` writes one line with the C encoder (for
    large documents: several times faster than the indented pure-Python one)."""
    with atomic_write(path) as tmp:
        with open(tmp, "w") as fh:
            if indent is None:
                fh.write(json.dumps(obj, sort_keys=False, default=json_default))
            else:
                json.dump(obj, fh, indent=indent, sort_keys=False, default=json_default)
            fh.write("\n")
            fh.flush()
            os.fsync(fh.fileno())


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path` atomically (see `atomic_write`). Serializers that write files themselves (torch.save,
    safetensors) report a full disk as their own RuntimeError or SafetensorError; serialized to bytes first, a
    full disk is an OSError (ENOSPC), which the CLI reports in one line."""
    with atomic_write(path) as tmp:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())


def os_error_of(exc: Exception, path: str | os.PathLike) -> OSError | None:
    """The OSError a library's own I/O error stands for, from the "(os error N)" of Rust crates' messages
    (safetensors: "I/O error: No space left on device (os error 28)"); None when it names none."""
    found = re.search(r"os error (\d+)", str(exc))
    if found is None:
        return None
    code = int(found.group(1))
    return OSError(code, os.strerror(code), str(path))


def write_npy_atomic(path: str | os.PathLike, array: Any, *, stage: str | None = None,
                     cause: str = "diverged or non-finite inputs") -> None:
    """Write one array as ``.npy`` to `path` atomically (see `atomic_write`); a float array with NaN/Inf is refused
    first (`check_finite`, naming `stage`, by default the file)."""
    check_finite(array, stage or f"writing {Path(path).name}", cause)
    with atomic_write(path, suffix=".tmp.npy") as tmp:
        np.save(tmp, np.asarray(array))


def read_json(path: str | os.PathLike, what: str = "file") -> Any:
    """Read JSON, turning a missing or broken file into a one-line UserError."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{what} not found: {path}")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{what} is not valid JSON: {path} ({exc.msg if hasattr(exc, 'msg') else exc})")


def json_default(obj: Any) -> Any:
    """`json.dump`'s `default` for numpy scalars and arrays and paths."""
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.floating):
        return float(obj)
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def jsonable(obj: Any) -> Any:
    """`obj` as it reads back from JSON (tuples become lists, numpy values plain numbers)."""
    return json.loads(json.dumps(obj, default=json_default))


def sha256_arrays(arrays: Iterable[Any]) -> str:
    """Fingerprint of a sequence of numpy arrays / torch tensors (dtype, shape and bytes)."""
    h = hashlib.sha256()
    for a in arrays:
        if hasattr(a, "detach"):
            a = a.detach().cpu().contiguous().numpy()
        a = np.ascontiguousarray(a)
        h.update(str(a.dtype).encode())
        h.update(str(a.shape).encode())
        h.update(a.tobytes())
    return h.hexdigest()


def derive_seed(*parts: int) -> int:
    """A 63-bit seed from integers, stable across platforms and processes."""
    digest = hashlib.sha256(":".join(str(int(p)) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def check_unique_ids(ids: Any, where: str, fix: str) -> None:
    """Refuse ids that repeat (credit would go to the wrong examples), naming the first repeated id: the one check
    of every reader of ids (feature stores, datasets, LDS subsets, attributions runs)."""
    ids = np.asarray(ids).reshape(-1)
    values, counts = np.unique(ids, return_counts=True)
    if (counts > 1).any():
        first = values[counts > 1]
        raise UserError(f"{where}: id {int(first[0])} appears {int(counts[counts > 1][0])} times"
                        f"{f' ({len(first)} ids repeat)' if len(first) > 1 else ''}; ids must be unique: {fix}")


def check_finite(array: Any, stage: str, cause: str) -> None:
    """Refuse to write an artefact holding NaN or Inf (a float array): one line naming the stage, the first bad
    row and the likely cause. Every artefact writer calls it before anything reaches the disk."""
    arr = array.detach().cpu().numpy() if hasattr(array, "detach") else np.asarray(array)
    if arr.dtype.kind not in "fc" or arr.size == 0:
        return
    bad = ~np.isfinite(arr)
    if bad.any():
        where = np.argwhere(bad)[0]
        row = f" (row {int(where[0])}{f', {int(bad.sum())} values' if bad.sum() > 1 else ''})" if arr.ndim else ""
        raise UserError(f"{stage}: NaN/Inf in the output{row}, nothing written; likely cause: {cause}")


def check_match(expected: dict, found: dict, keys: Iterable[str], what: str, fix: str) -> None:
    """Refuse with a one-line reason when any of `keys` differs between two manifests."""
    for key in keys:
        if expected.get(key) != found.get(key):
            raise UserError(f"{what}: '{key}' differs ({_short(found.get(key))} vs expected "
                            f"{_short(expected.get(key))}); {fix}")


def _short(value: Any) -> str:
    text = json.dumps(value, default=json_default)
    return text if len(text) <= 60 else text[:57] + "..."
