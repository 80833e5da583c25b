from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from edgecompress.calibration import builtin_texts, load_texts, select_samples, trim_padding
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


def _source(total: int, batch: int = 8, length: int = 6):
    def batches():
        for start in range(0, total, batch):
            n = min(batch, total - start)
            ids = np.arange(start, start + n)[:, None].repeat(length, 1)
            yield {"input_ids": ids, "attention_mask": np.ones_like(ids)}

    return batches


def _ids(factory) -> list[int]:
    return [int(i) for b in factory() for i in b["input_ids"][:, 0]]


def test_seeded_sample_choice_is_reproducible_and_batched() -> None:
    first, choice = select_samples(_source(100), 30, seed=7)
    again, _ = select_samples(_source(100), 30, seed=7)
    other, _ = select_samples(_source(100), 30, seed=8)
    assert _ids(first) == _ids(again) != _ids(other)
    ids = _ids(first)
    assert len(ids) == len(set(ids)) == 30 and ids == sorted(ids)
    assert [len(b["input_ids"]) for b in first()] == [8, 8, 8, 6]
    assert choice.describe() == {"available": 100, "used": 30, "seed": 7, "batch_size": 8}
    everything, c = select_samples(_source(20), 256, seed=0)
    assert _ids(everything) == list(range(20)) and c.count == 20


def test_fewer_calibration_texts_than_a_batch_is_a_data_error() -> None:
    with pytest.raises(DataError) as e:
        select_samples(_source(5), 256, seed=0)
    assert e.value.one_line() == ("calibration data has 5 texts, fewer than one batch of 8 "
                                  "(give at least 8 texts with --calibration)")


def test_samples_of_different_lengths_never_share_a_batch() -> None:
    def mixed():
        yield from _source(12, length=6)()
        yield from _source(12, length=9)()

    factory, _ = select_samples(mixed, 24, seed=0)
    shapes = [b["input_ids"].shape for b in factory()]
    assert sum(s[0] for s in shapes) == 24 and {s[1] for s in shapes} == {6, 9}


def test_trim_padding_cuts_to_the_longest_text() -> None:
    mask = np.array([[1, 1, 0, 0, 0], [1, 1, 1, 0, 0]])
    batch = {"input_ids": mask * 5, "attention_mask": mask}
    trimmed = trim_padding(batch)
    assert trimmed["input_ids"].shape == (2, 3) and (trimmed["attention_mask"] == mask[:, :3]).all()
    odd = {"x": np.zeros((2, 4, 3)), "attention_mask": mask}
    assert trim_padding(odd) is odd  # not every input is [batch, seq]: left alone


def test_long_calibration_texts_are_truncated_with_a_warning(tiny_bert: Path, tmp_path: Path) -> None:
    from edgecompress.calibration import TextSet
    from edgecompress.export import inspect_model
    from edgecompress.tasks import EncoderTask, TextInputs

    long_text = " ".join(["word"] * 400)
    texts = TextSet(tuple([long_text] + ["short text"] * 9), "test")
    task = EncoderTask(inspect_model(tiny_bert), TextInputs(
        model_dir=tiny_bert, export_dir=tiny_bert, input_names=["input_ids", "attention_mask", "token_type_ids"],
        eval_texts=TextSet(("a text",), "test"), calibration_texts=texts))
    assert any("1 calibration texts are longer than" in w for w in task.warnings)
    lengths = {b["input_ids"].shape[1] for b in task.calibration_batches()}
    assert lengths == {min(128, task.max_len)}
