from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from edgecompress.bundle import StagedDir, check_out_dir
from edgecompress.errors import OutputError


def fake_bundle(d: Path, model: str = "old") -> Path:
    """A directory with an edgecompress manifest.json: what --force may replace."""
    d.mkdir(parents=True, exist_ok=True)
    (d / "manifest.json").write_text(json.dumps({"artifact": {}, "tool": {"edgecompress": "0"}, "target": {},
                                                 "recipe": {}, "schema": 1}))
    (d / "model.onnx").write_text(model)
    return d


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
    out = fake_bundle(tmp_path / "bundle")
    with pytest.raises(KeyboardInterrupt), StagedDir(out, force=True) as stage:
        (stage.path / "model.onnx").write_text("new")
        raise KeyboardInterrupt
    assert (out / "model.onnx").read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["bundle"]


def test_force_replaces_only_at_commit(tmp_path: Path) -> None:
    out = fake_bundle(tmp_path / "bundle")
    with StagedDir(out, force=True) as stage:
        (stage.path / "new.txt").write_text("new")
        assert (out / "model.onnx").exists()
        stage.commit()
    assert [p.name for p in out.iterdir()] == ["new.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["bundle"]


def test_out_checks(tmp_path: Path) -> None:
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(OutputError, match="is a file"):
        check_out_dir(f, force=True)
    d = fake_bundle(tmp_path / "d")
    with pytest.raises(OutputError, match="already exists"):
        check_out_dir(d, force=False)
    check_out_dir(d, force=True)
    user = tmp_path / "user"
    user.mkdir()
    with pytest.raises(OutputError, match="not an edgecompress bundle"):
        check_out_dir(user, force=True)
    with pytest.raises(OutputError, match="model's directory"):
        check_out_dir(d, force=True, protect=[d / "model.onnx"])
    with pytest.raises(OutputError, match="holds the model"):
        check_out_dir(tmp_path, force=True, protect=[d / "model.onnx"])


def _dead_pid() -> int:
    import subprocess
    import sys

    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_a_commit_killed_between_its_renames_is_undone_by_the_next_build(tmp_path: Path) -> None:
    """POSIX has no atomic swap of two directories: a SIGKILL between `out -> .out.old-*` and `stage -> out`
    leaves --out missing. The next build into it puts the old bundle back before anything else."""
    dead = _dead_pid()
    fake_bundle(tmp_path / f".bundle.old-{dead}-0123abcd", model="old")
    (tmp_path / f".bundle.partial-{dead}-4567cdef").mkdir()  # the killed build's complete stage
    out = tmp_path / "bundle"
    with pytest.raises(RuntimeError), StagedDir(out, force=True):
        assert (out / "model.onnx").read_text() == "old"
        raise RuntimeError("this build fails too")
    assert (out / "model.onnx").read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["bundle"]


def test_a_failed_second_rename_puts_the_old_bundle_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = fake_bundle(tmp_path / "bundle")
    real_replace = os.replace
    with StagedDir(out, force=True) as stage:
        def failing(src: object, dst: object) -> None:
            if Path(str(src)) == stage.path:
                raise OSError(28, "No space left on device")
            real_replace(src, dst)  # type: ignore[arg-type]

        monkeypatch.setattr(os, "replace", failing)
        with pytest.raises(OSError):
            stage.commit()
        monkeypatch.setattr(os, "replace", real_replace)
    assert (out / "model.onnx").read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["bundle"]


def test_a_second_writer_of_one_out_fails_at_once(tmp_path: Path) -> None:
    from edgecompress.errors import BusyError

    out = tmp_path / "bundle"
    with StagedDir(out, force=False), pytest.raises(BusyError, match=f"pid {os.getpid()}"), \
            StagedDir(out, force=False):
        pass
    assert list(tmp_path.iterdir()) == []
