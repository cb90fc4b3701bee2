"""Text datasets: jsonl (a "text" column), a folder of .txt files and Debian's fortunes, against the files read
back here on their own; ids, subsets and the fingerprint."""
from __future__ import annotations

import json

import pytest

from fixtures.lms import FORTUNES, ensure_fortunes
from gradtrace.data import load_dataset
from gradtrace.errors import UserError


def test_jsonl_keeps_texts_in_order_with_their_other_columns(tmp_path):
    rows = [{"text": "one", "label": "a"}, {"text": "two\nlines", "n": 2}, {"text": "three"}]
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(rows[0]) + "\n\n" + "\n".join(json.dumps(r) for r in rows[1:]) + "\n")
    ds = load_dataset(f"jsonl:{path}")
    assert ds.texts == [r["text"] for r in rows] and ds.ids.tolist() == [0, 1, 2]
    assert ds.metadata[0] == {"label": "a"} and ds.metadata[1] == {"n": 2}
    assert load_dataset(f"jsonl:{path}", n=2).texts == ["one", "two\nlines"]
    sub = ds.subset([2, 0])
    assert sub.texts == ["three", "one"] and sub.ids.tolist() == [2, 0]
    path.write_text("\n".join(json.dumps({**r, "text": r["text"] + "!"}) for r in rows) + "\n")
    assert load_dataset(f"jsonl:{path}").fingerprint() != ds.fingerprint()


def test_textfolder_reads_one_document_per_txt_file_in_sorted_order(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "b.txt").write_text("bee")
    (tmp_path / "a.txt").write_text("ay")
    (tmp_path / "sub" / "c.txt").write_text("sea")
    (tmp_path / "notes.md").write_text("not a document")
    ds = load_dataset(f"textfolder:{tmp_path}")
    assert ds.texts == ["ay", "bee", "sea"]
    assert [m["file_name"] for m in ds.metadata] == ["a.txt", "b.txt", "sub/c.txt"]


def test_fortunes_are_the_entries_between_percent_lines():
    ensure_fortunes()
    entries = [e.strip() for e in FORTUNES.read_text(encoding="utf-8").split("\n%\n") if e.strip()]
    ds = load_dataset("fortunes")
    assert len(ds) == len(entries) > 100
    assert ds.texts == entries
    assert load_dataset("fortunes", n=7).ids.tolist() == list(range(7))


@pytest.mark.parametrize("content, words", [("", "empty file"), ('{"txt": "x"}\n', 'no "text" column'),
                                            ("not json\n", "not valid JSON"), ('{"text": 3}\n', "not a string")])
def test_bad_jsonl_is_refused_naming_the_problem(tmp_path, content, words):
    path = tmp_path / "d.jsonl"
    path.write_text(content)
    with pytest.raises(UserError, match=words):
        load_dataset(f"jsonl:{path}")


def test_an_empty_text_folder_is_refused(tmp_path):
    with pytest.raises(UserError, match="no .txt files"):
        load_dataset(f"textfolder:{tmp_path}")
