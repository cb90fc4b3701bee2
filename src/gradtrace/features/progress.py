"""Which chunks of a feature store are on disk: one small file per writer, merged when read.

A store's rows are written in chunks with fixed boundaries (chunk c = rows [c·R, (c+1)·R)). Each writer (the
one process of a plain `featurize` is rank 0; rank r of a torchrun job) records the chunks it finished in its own
file, ``progress.json`` for rank 0 and ``progress-rank<r>.json`` for the others, = {"rows_done": rows of those
chunks, "chunks": {c: sha256 of the chunk's stored bytes}, "numerics": {key: the numerics a chunk was computed
under (`gradtrace.features.numerics`)}, "chunk_numerics": {c: key}}, rewritten atomically after each chunk is
flushed.
Readers take the union over every writer's file, so ranks never write the same file, a killed rank loses
nothing it recorded, and a rerun with any number of ranks redoes exactly the chunks nobody recorded. Stores
written before ranks existed have ``progress.json`` = {"rows_done": n} only (a prefix of whole chunks): it is
read as those chunks, without digests.
"""
from __future__ import annotations

import hashlib
import re
from pathlib import Path

import numpy as np

from gradtrace.errors import UserError
from gradtrace.features.numerics import numerics_id
from gradtrace.io import read_json, write_json_atomic

LEGACY = "progress.json"
RANK_FILE = re.compile(r"^progress-rank(\d+)\.json$")


def rank_file(rank: int) -> str:
    return LEGACY if int(rank) == 0 else f"progress-rank{int(rank)}.json"


def is_progress_file(name: str) -> bool:
    return name == LEGACY or RANK_FILE.match(name) is not None


def chunk_bounds(n_rows: int, chunk_rows: int) -> list[tuple[int, int]]:
    """(start, stop) of every chunk, in order."""
    return [(s, min(s + chunk_rows, n_rows)) for s in range(0, n_rows, chunk_rows)]


def digest(*arrays: np.ndarray | None) -> str:
    """sha256 of the stored bytes of a chunk's rows (features, and row factors where kept)."""
    h = hashlib.sha256()
    for a in arrays:
        if a is not None:
            h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


class ChunkProgress:
    """The finished chunks of the store at `path`, as seen by writer `rank` (see the module docstring)."""

    def __init__(self, path, n_rows: int, chunk_rows: int, rank: int = 0):
        self.path, self.rank = Path(path), int(rank)
        self.bounds = chunk_bounds(int(n_rows), int(chunk_rows))
        self.chunk_rows = int(chunk_rows)
        own = self.path / rank_file(self.rank)
        self.mine: dict[int, str | None] = {}
        self.mine_numerics: dict[int, dict | None] = {}
        if own.exists():
            doc = read_json(own, "feature store progress")
            self.mine = {int(c): d for c, d in self._read(own, doc).items()}
            self.mine_numerics = _chunk_numerics(doc)

    def _read(self, file: Path, doc=None) -> dict[int, str | None]:
        doc = read_json(file, "feature store progress") if doc is None else doc
        if isinstance(doc, dict) and "chunks" not in doc and "rows_done" in doc:  # written before ranks existed
            rows = int(doc["rows_done"])
            return {c: None for c, (_, stop) in enumerate(self.bounds) if stop <= rows}
        chunks = doc.get("chunks") if isinstance(doc, dict) else None
        if not isinstance(chunks, dict):
            raise UserError(f"{file} is not a feature store progress file; featurize again into a new directory")
        return {int(c): d for c, d in chunks.items()}

    def numerics(self) -> dict[int, dict | None]:
        """The numerics every recorded chunk was computed under (None: recorded before numerics were kept)."""
        out: dict[int, dict | None] = {}
        for file in sorted(self.path.iterdir()):
            if is_progress_file(file.name):
                doc = read_json(file, "feature store progress")
                for c in self._read(file, doc):
                    if 0 <= c < len(self.bounds) and out.get(c) is None:
                        out[c] = _chunk_numerics(doc).get(c)
        out.update({c: n for c, n in self.mine_numerics.items() if n is not None or c not in out})
        return out

    def done(self) -> dict[int, str | None]:
        """Every chunk any writer recorded (chunk index → digest, None for legacy records)."""
        out: dict[int, str | None] = {}
        for file in sorted(self.path.iterdir()):
            if is_progress_file(file.name):
                for c, d in self._read(file).items():
                    if 0 <= c < len(self.bounds):
                        out[c] = d if out.get(c) is None else out[c]
        out.update(self.mine)
        return out

    def rows_done(self) -> int:
        return sum(stop - start for c, (start, stop) in enumerate(self.bounds) if c in self.done())

    def missing(self) -> list[int]:
        done = self.done()
        return [c for c in range(len(self.bounds)) if c not in done]

    def mark(self, chunk: int, chunk_digest: str, numerics: dict | None = None) -> None:
        """Record chunk `chunk` as on disk (call after its rows are flushed), computed under `numerics`."""
        self.mine[int(chunk)] = chunk_digest
        self.mine_numerics[int(chunk)] = numerics
        rows = sum(self.bounds[c][1] - self.bounds[c][0] for c in self.mine)
        keys = {c: self._key(n) for c, n in self.mine_numerics.items() if n is not None}
        table = {keys[c]: n for c, n in self.mine_numerics.items() if n is not None}
        write_json_atomic(self.path / rank_file(self.rank),
                          {"rows_done": rows, "chunks": {str(c): d for c, d in sorted(self.mine.items())},
                           "numerics": table, "chunk_numerics": {str(c): k for c, k in sorted(keys.items())}})

    def _key(self, numerics: dict) -> str:
        """`numerics_id`, computed once per record object (a writer passes the same record for every chunk)."""
        cache = self.__dict__.setdefault("_keys", {})
        if id(numerics) not in cache:
            cache[id(numerics)] = (numerics, numerics_id(numerics))  # the record is kept: its id stays its own
        return cache[id(numerics)][1]

    def start(self) -> None:
        """A new, empty store: no writer's record of an earlier store may survive."""
        for file in self.path.iterdir():
            if is_progress_file(file.name):
                file.unlink()
        self.mine, self.mine_numerics = {}, {}
        write_json_atomic(self.path / LEGACY, {"rows_done": 0, "chunks": {}})


def _chunk_numerics(doc) -> dict[int, dict | None]:
    """chunk → its numerics record, from one progress file's document (empty for files without them)."""
    if not isinstance(doc, dict) or not isinstance(doc.get("chunk_numerics"), dict):
        return {}
    table = doc.get("numerics") if isinstance(doc.get("numerics"), dict) else {}
    return {int(c): table.get(key) for c, key in doc["chunk_numerics"].items()}
