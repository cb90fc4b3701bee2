"""The locks of a feature store's writers (flock, released when the holder closes them or dies).

`.lock`: held exclusively by a single writer; shared by the ranks of one torchrun job, each of which also holds
`.lock-rank<r>` exclusively. So a second writer of the same store (or a second job's rank r) is refused in one
line, and a single writer and a job never write at once. `.lock-create`: held (blocking) while a writer creates,
opens or finishes the store, so ranks that start together create it once.
"""
from __future__ import annotations

import fcntl
from pathlib import Path

from gradtrace.errors import UserError

LOCK = ".lock"
CREATE_LOCK = ".lock-create"


def writer_locks(path: Path, rank: int, world: int) -> list:
    """A single writer's exclusive flock on `path/.lock`; for rank r of a job, a shared flock on it (a single
    writer then waits for the job, and the job for it) and an exclusive one on `.lock-rank<r>`."""
    if world <= 1:
        return [_flock(path / LOCK, fcntl.LOCK_EX, path)]
    shared = _flock(path / LOCK, fcntl.LOCK_SH, path)
    try:
        return [shared, _flock(path / f"{LOCK}-rank{int(rank)}", fcntl.LOCK_EX, path)]
    except BaseException:
        shared.close()
        raise


def _flock(file: Path, mode: int, store: Path):
    """A non-blocking flock on `file`, held by the returned open file."""
    fh = open(file, "a+b")
    try:
        fcntl.flock(fh.fileno(), mode | fcntl.LOCK_NB)
    except OSError:
        fh.close()
        raise UserError(f"another process is writing the feature store {store}; wait for it to finish (then run "
                        "the same command to resume or reuse it) or choose another --out") from None
    return fh


class create_lock:
    """A blocking flock on `path/.lock-create` while a writer creates, opens or finishes the store."""

    def __init__(self, path: Path):
        self.file = Path(path) / CREATE_LOCK

    def __enter__(self):
        self.fh = open(self.file, "a+b")
        fcntl.flock(self.fh.fileno(), fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc) -> None:
        self.fh.close()
