from __future__ import annotations

import json
from pathlib import Path

import pytest

from edgecompress.calibration import builtin_texts, load_texts
from edgecompress.errors import DataError


def test_builtin_corpus_has_disjoint_splits() -> None:
    cal, ev = builtin_texts("calibration"), builtin_texts("evaluation")
    assert len(cal.texts) >= 200 and len(ev.texts) >= 150
    assert not set(cal.texts) & set(ev.texts)


def test_txt_jsonl_csv_tsv(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("first text\n\n  second text  \n")
    assert load_texts(tmp_path / "a.txt").texts == ("first text", "second text")
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps({"text": t, "id": i}) for i, t in enumerate("xyz")))
    assert load_texts(tmp_path / "a.jsonl").texts == ("x", "y", "z")
    (tmp_path / "a.csv").write_text('id,sentence\n1,"hello, world"\n2,bye\n')
    assert load_texts(tmp_path / "a.csv", "sentence").texts == ("hello, world", "bye")
    (tmp_path / "a.tsv").write_text("text\tlabel\ngood film\t1\n")
    assert load_texts(tmp_path / "a.tsv").texts == ("good film",)


@pytest.mark.parametrize(
    ("name", "content", "column", "needle"),
    [
        ("empty.txt", b"", None, "holds no texts"),
        ("blank.txt", b"\n  \n\n", None, "holds no texts"),
        ("bin.txt", b"\x00\x01\x02binary", None, "looks binary"),
        ("latin1.txt", "caf\u00e9".encode("latin-1"), None, "not UTF-8"),
        ("bad.jsonl", b'{"text": "ok"}\nnot json\n', None, "bad.jsonl:2 is not valid JSON"),
        ("nofield.jsonl", b'{"sentence": "ok"}\n', None, "no string field 'text'"),
        ("nocol.csv", b"id,sentence\n1,hi\n", None, "no 'text' column (columns: id, sentence)"),
        ("wrongcol.csv", b"id,sentence\n1,hi\n", "body", "no column 'body'"),
        ("data.parquet", b"PAR1", None, "unsupported text file type"),
    ],
)
def test_bad_text_files_are_one_line_data_errors(tmp_path: Path, name: str, content: bytes, column: str | None,
                                                 needle: str) -> None:
    p = tmp_path / name
    p.write_bytes(content)
    with pytest.raises(DataError) as e:
        load_texts(p, column)
    assert needle in e.value.one_line()
    assert "\n" not in e.value.one_line()


def test_missing_and_directory_paths(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="not found"):
        load_texts(tmp_path / "nope.txt")
    (tmp_path / "dir.txt").mkdir()
    with pytest.raises(DataError, match="is a directory"):
        load_texts(tmp_path / "dir.txt")
    (tmp_path / "dangling.txt").symlink_to(tmp_path / "gone")
    with pytest.raises(DataError, match="not found"):
        load_texts(tmp_path / "dangling.txt")
