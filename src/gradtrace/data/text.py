"""Text datasets for causal language models: one document per example, with stable integer ids.

    jsonl:PATH        one JSON object per line with a "text" string (the Hugging Face convention); other
                      columns are kept in each document's metadata; id = the line's row among non-blank lines
    textfolder:PATH   one document per .txt file (UTF-8, subfolders allowed); id = the row in sorted order of
                      the "/"-separated relative paths
    fortunes          Debian's `fortunes` package (/usr/share/games/fortunes/fortunes, entries separated by
                      lines holding "%"; GRADTRACE_FORTUNES names another folder): thousands of short real texts
                      that load offline (scripts/ensure_fortunes.sh installs the package)

A `TextDataset` holds raw text; the causal-LM adapter tokenizes it with the model folder's tokenizer into
fixed-length sequences. Its fingerprint covers the ids and the texts. Bad input (a missing or empty file, a line
that is not JSON or lacks "text", no .txt file) is refused in one line naming it.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from gradtrace.data.base import as_id_array, row_index, row_positions
from gradtrace.errors import UserError

TEXT = "text"
FORTUNES_DIR = "/usr/share/games/fortunes"
FORTUNES_FILE = "fortunes"


@dataclass(eq=False, repr=False)
class TextDataset:
    """Documents with stable ids (the text counterpart of `ImageDataset`: same id, subset and identity API)."""

    name: str
    texts: list[str]
    ids: np.ndarray
    metadata: list[dict]
    attributes: dict[str, list[str]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.ids = as_id_array(self.ids)
        if len(self.texts) != len(self.ids) or len(self.metadata) != len(self.ids):
            raise UserError(f"dataset {self.name}: {len(self.texts)} texts, {len(self.ids)} ids and "
                            f"{len(self.metadata)} metadata rows; give one of each per document")
        if len(np.unique(self.ids)) != len(self.ids):
            raise UserError(f"dataset {self.name}: ids are not unique; give every document its own id")
        self._row_of: dict[int, int] | None = None

    def __repr__(self) -> str:
        return f"TextDataset(name={self.name!r}, n={len(self)})"

    def __len__(self) -> int:
        return len(self.texts)

    def index_of(self, ids: Any) -> np.ndarray:
        """Row positions of the given ids, in the order given; an unknown id raises UserError."""
        if self._row_of is None:
            self._row_of = row_index(self.ids)
        return row_positions(self._row_of, ids, lambda: f"dataset {self.name} ({len(self)} documents)")

    def subset(self, ids: Any) -> "TextDataset":
        rows = self.index_of(ids)
        if len(np.unique(rows)) != len(rows):
            raise UserError("subset got an id more than once; pass each id once")
        return TextDataset(name=self.name, texts=[self.texts[r] for r in rows], ids=self.ids[rows].copy(),
                           metadata=[dict(self.metadata[r]) for r in rows.tolist()])

    def fingerprint(self) -> str:
        """sha256 hex over the ids and the texts."""
        h = hashlib.sha256(b"gradtrace.TextDataset.v1\n")
        h.update(self.ids.astype("<i8").tobytes())
        for text in self.texts:
            data = text.encode("utf-8")
            h.update(len(data).to_bytes(8, "little"))
            h.update(data)
        return h.hexdigest()

    def info(self) -> dict:
        return {"name": self.name, "kind": "text", "n": len(self), "attributes": {},
                "fingerprint": self.fingerprint()}


def _keep_first(texts: list[str], rows: list[dict], n: int | None, what: str) -> tuple[list[str], list[dict]]:
    if n is not None:
        if n > len(texts):
            raise UserError(f"n={n} is more than the {len(texts)} documents in {what}; pass n <= {len(texts)}")
        texts, rows = texts[:n], rows[:n]
    return texts, rows


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UserError(f"{path} is not UTF-8 text; save it as UTF-8") from None
    except OSError as exc:
        raise UserError(f"cannot read {path}: {exc.strerror or exc}; check the path") from None


def load_jsonl(path: str, *, n: int | None = None) -> TextDataset:
    """Documents from a JSON-lines file with a "text" column (blank lines skipped)."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise UserError(f"text file not found: {file}; pass jsonl:PATH with a .jsonl file (one JSON object per "
                        "line with a \"text\" string)")
    file = file.resolve()
    texts, rows = [], []
    for number, line in enumerate(_read_text(file).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise UserError(f"{file} line {number} is not valid JSON ({exc.msg}); write one JSON object per "
                            "line") from None
        if not isinstance(row, dict) or TEXT not in row:
            raise UserError(f"{file} line {number} has no \"{TEXT}\" column; each line needs "
                            "{\"text\": \"...\", ...}")
        if not isinstance(row[TEXT], str):
            raise UserError(f"{file} line {number}: \"{TEXT}\" is a {type(row[TEXT]).__name__}, not a string")
        texts.append(row[TEXT])
        rows.append({k: v for k, v in row.items() if k != TEXT})
    if not texts:
        raise UserError(f"{file} holds no documents (empty file); write one JSON object with a \"text\" per line")
    texts, rows = _keep_first(texts, rows, n, str(file))
    return TextDataset(name=f"jsonl:{file}", texts=texts, ids=np.arange(len(texts)), metadata=rows)


def load_textfolder(path: str, *, n: int | None = None) -> TextDataset:
    """One document per .txt file under the folder, in sorted order of the relative paths."""
    root = Path(path).expanduser()
    if not root.is_dir():
        raise UserError(f"text folder not found: {root}; pass textfolder:PATH with an existing folder")
    root = root.resolve()
    files = sorted(p.relative_to(root).as_posix() for p in root.rglob("*.txt") if p.is_file())
    if not files:
        raise UserError(f"no .txt files in {root}; put one document per .txt file in it")
    files, _ = _keep_first(files, [{}] * len(files), n, str(root))
    texts = [_read_text(root / name) for name in files]
    return TextDataset(name=f"textfolder:{root}", texts=texts, ids=np.arange(len(files)),
                       metadata=[{"file_name": name} for name in files])


def fortunes_dir() -> Path:
    return Path(os.environ.get("GRADTRACE_FORTUNES") or FORTUNES_DIR)


def read_fortunes(file: Path) -> list[str]:
    """The entries of one fortune file (separated by lines holding only "%"), stripped, empty ones dropped."""
    entries, current = [], []
    for line in _read_text(file).splitlines():
        if line.strip() == "%":
            entries.append("\n".join(current).strip())
            current = []
        else:
            current.append(line.rstrip())
    entries.append("\n".join(current).strip())
    return [e for e in entries if e]


def load_fortunes(*, n: int | None = None) -> TextDataset:
    """Debian's fortunes (the `fortunes` file of the package): one document per entry."""
    file = fortunes_dir() / FORTUNES_FILE
    if not file.is_file():
        raise UserError(f"no fortune file at {file}; run scripts/ensure_fortunes.sh (installs Debian's fortunes "
                        "package) or set GRADTRACE_FORTUNES to a folder holding a 'fortunes' file")
    texts = read_fortunes(file)
    if not texts:
        raise UserError(f"{file} holds no fortunes (entries separated by lines holding '%')")
    texts, rows = _keep_first(texts, [{} for _ in texts], n, str(file))
    return TextDataset(name="fortunes", texts=texts, ids=np.arange(len(texts)), metadata=rows)
