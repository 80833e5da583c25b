from __future__ import annotations

from pathlib import Path

import pytest

from edgecompress.bundle import StagedDir, check_out_dir
from edgecompress.errors import OutputError


def test_commit_moves_the_stage_into_place(tmp_path: Path) -> None:
    out = tmp_path / "a" / "b" / "bundle"
    with StagedDir(out, force=False) as stage:
        (stage.path / "model.onnx").write_text("m")
        assert not out.exists()
        stage.commit()
    assert (out / "model.onnx").read_text() == "m"
    assert [p.name for p in out.parent.iterdir()] == ["bundle"]


def test_failure_leaves_nothing_not_even_created_parents(tmp_path: Path) -> None:
    out = tmp_path / "new" / "bundle"
    with pytest.raises(RuntimeError), StagedDir(out, force=False) as stage:
        (stage.path / "half.onnx").write_text("x")
        raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_interrupt_keeps_the_old_bundle(tmp_path: Path) -> None:
    out = tmp_path / "bundle"
    out.mkdir()
    (out / "model.onnx").write_text("old")
    with pytest.raises(KeyboardInterrupt), StagedDir(out, force=True) as stage:
        (stage.path / "model.onnx").write_text("new")
        raise KeyboardInterrupt
    assert (out / "model.onnx").read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["bundle"]


def test_force_replaces_only_at_commit(tmp_path: Path) -> None:
    out = tmp_path / "bundle"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with StagedDir(out, force=True) as stage:
        (stage.path / "new.txt").write_text("new")
        assert (out / "old.txt").exists()
        stage.commit()
    assert [p.name for p in out.iterdir()] == ["new.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["bundle"]


def test_out_checks(tmp_path: Path) -> None:
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(OutputError, match="is a file"):
        check_out_dir(f, force=True)
    d = tmp_path / "d"
    d.mkdir()
    with pytest.raises(OutputError, match="already exists"):
        check_out_dir(d, force=False)
    check_out_dir(d, force=True)
