"""The CLI through click's CliRunner: every bad input is one line, a documented exit code, nothing written."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from edgecompress.cli import main

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner()


def invoke(runner: CliRunner, *args: str):  # type: ignore[no-untyped-def]
    return runner.invoke(main, list(args), catch_exceptions=False)


def assert_one_line_error(result, code: int, needle: str) -> None:  # type: ignore[no-untyped-def]
    assert result.exit_code == code, (result.exit_code, result.output)
    err = result.stderr.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    assert needle in err, err
    assert "Traceback" not in result.output


def test_help_shows_real_examples(runner: CliRunner) -> None:
    for cmd in ([], ["build"], ["targets"], ["targets", "list"], ["targets", "show"], ["recipes"]):
        out = invoke(runner, *cmd, "--help").output
        assert "Example" in out and "edgecompress " in out, cmd


def test_targets_list_and_show(runner: CliRunner) -> None:
    r = invoke(runner, "targets", "list", "--json")
    assert r.exit_code == 0
    assert {t["name"] for t in json.loads(r.output)} >= {"host", "raspberry-pi-5", "server-gpu"}
    r = invoke(runner, "targets", "show", "raspberry-pi-5")
    shown = json.loads(r.output)
    assert shown["hardware"]["cores"] == 4 and "dotprod" in shown["hardware"]["isa"]
    assert_one_line_error(invoke(runner, "targets", "show", "jetson"), 2, "did you mean jetson-orin-nano")


def test_recipes_lists_int8_dynamic(runner: CliRunner) -> None:
    assert "int8-dynamic" in invoke(runner, "recipes").output


@pytest.fixture
def out(tmp_path: Path) -> Path:
    return tmp_path / "out" / "bundle"


def assert_nothing_written(out: Path) -> None:
    assert not out.exists()
    assert not out.parent.exists() or list(out.parent.iterdir()) == []


def test_missing_model_path(runner: CliRunner, tmp_path: Path, out: Path) -> None:
    r = invoke(runner, "build", str(tmp_path / "nope"), "--target", "host", "--out", str(out))
    assert_one_line_error(r, 2, "model path not found")
    assert_nothing_written(out)


def test_directory_without_config(runner: CliRunner, tmp_path: Path, out: Path) -> None:
    (tmp_path / "m").mkdir()
    r = invoke(runner, "build", str(tmp_path / "m"), "--target", "host", "--out", str(out))
    assert_one_line_error(r, 2, "not a Hugging Face model directory (no config.json)")
    assert_nothing_written(out)


def test_unsupported_architecture(runner: CliRunner, tmp_path: Path, out: Path) -> None:
    m = tmp_path / "m"
    m.mkdir()
    (m / "config.json").write_text(json.dumps({"model_type": "frobnicator", "architectures": ["FrobModel"]}))
    (m / "model.safetensors").write_bytes(b"")
    r = invoke(runner, "build", str(m), "--target", "host", "--out", str(out))
    assert_one_line_error(r, 2, "architecture 'frobnicator' is not supported")
    assert_nothing_written(out)


def test_unsupported_task(runner: CliRunner, tiny_bert: Path, out: Path) -> None:
    r = invoke(runner, "build", str(tiny_bert), "--task", "fill-mask", "--target", "host", "--out", str(out))
    assert_one_line_error(r, 2, "task 'fill-mask' is not supported")
    assert_nothing_written(out)


def test_remote_code_is_refused(runner: CliRunner, tiny_bert: Path, tmp_path: Path, out: Path) -> None:
    m = tmp_path / "m"
    shutil.copytree(tiny_bert, m)
    cfg = json.loads((m / "config.json").read_text())
    cfg["auto_map"] = {"AutoModel": "modeling_x.XModel"}
    (m / "config.json").write_text(json.dumps(cfg))
    r = invoke(runner, "build", str(m), "--target", "host", "--out", str(out))
    assert_one_line_error(r, 2, "edgecompress does not run")
    assert_nothing_written(out)


def test_unknown_target(runner: CliRunner, tiny_bert: Path, out: Path) -> None:
    r = invoke(runner, "build", str(tiny_bert), "--target", "raspbery-pi-5", "--out", str(out))
    assert_one_line_error(r, 2, "unknown target 'raspbery-pi-5'")
    assert "raspberry-pi-5" in r.stderr
    assert_nothing_written(out)


def test_malformed_target_file(runner: CliRunner, tiny_bert: Path, tmp_path: Path, out: Path) -> None:
    bad = tmp_path / "dev.toml"
    bad.write_text((REPO / "targets" / "host.toml").read_text().replace('name = "host"', 'name = "dev"')
                   .replace("threads = 2", "threads = 0"))
    r = invoke(runner, "build", str(tiny_bert), "--target", str(bad), "--out", str(out))
    assert_one_line_error(r, 2, f"malformed target file {bad}: key 'runtime.threads'")
    assert_nothing_written(out)


def test_unknown_recipe(runner: CliRunner, tiny_bert: Path, out: Path) -> None:
    r = invoke(runner, "build", str(tiny_bert), "--target", "host", "--recipe", "int8-dynamc", "--out", str(out))
    assert_one_line_error(r, 2, "did you mean int8-dynamic")
    assert_nothing_written(out)


@pytest.mark.parametrize("flag", ["--calibration", "--eval"])
@pytest.mark.parametrize(
    ("name", "content", "needle"),
    [("empty.txt", b"", "holds no texts"), ("bin.txt", b"\x00\xff\x00", "looks binary"),
     ("dir.txt", None, "is a directory")],
)
def test_bad_text_files(runner: CliRunner, tiny_bert: Path, tmp_path: Path, out: Path, flag: str, name: str,
                        content: bytes | None, needle: str) -> None:
    p = tmp_path / name
    if content is None:
        p.mkdir()
    else:
        p.write_bytes(content)
    r = invoke(runner, "build", str(tiny_bert), "--target", "host", flag, str(p), "--out", str(out))
    assert_one_line_error(r, 2, needle)
    assert_nothing_written(out)


def test_out_is_a_file(runner: CliRunner, tiny_bert: Path, tmp_path: Path) -> None:
    f = tmp_path / "file"
    f.write_text("keep me")
    r = invoke(runner, "build", str(tiny_bert), "--target", "host", "--out", str(f), "--force")
    assert_one_line_error(r, 2, "is a file")
    assert f.read_text() == "keep me"


def test_existing_out_without_force(runner: CliRunner, tiny_bert: Path, tmp_path: Path) -> None:
    d = tmp_path / "existing"
    d.mkdir()
    (d / "mine.txt").write_text("keep me")
    r = invoke(runner, "build", str(tiny_bert), "--target", "host", "--out", str(d))
    assert_one_line_error(r, 2, "already exists")
    assert (d / "mine.txt").read_text() == "keep me" and len(list(d.iterdir())) == 1
