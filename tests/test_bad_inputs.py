"""Bad inputs across every command and the API: each is one line on stderr with its documented exit code, no
traceback, nothing written or removed (the watched directory is listed before and after), and nothing hangs (FIFOs
and devices are refused before any read). Most cases are refused before any export and take milliseconds.

Also here: what edgecompress will never delete (a user's --out with --force, a user's dir as the cache root), a
tampered bundle refused by `profile` (exit 16), and SIGKILL during a real build, then a rerun, leaving nothing.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import onnx
import pytest
from click.testing import CliRunner
from conftest import matmul_model

import edgecompress
from edgecompress.cli import main
from edgecompress.errors import EdgeCompressError

REPO = Path(__file__).resolve().parents[1]
HOST_TOML = (REPO / "targets" / "host.toml").read_text()


def listing(d: Path) -> list[tuple[str, int, int]]:
    """Every path under d with its size and mtime: equal before and after means nothing written or removed."""
    out = []
    for p in sorted(d.rglob("*")):
        st = p.lstat()
        out.append((str(p.relative_to(d)), st.st_size if p.is_file() else 0, st.st_mtime_ns))
    return out


@pytest.fixture(scope="module")
def tiny_onnx(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("bad-inputs-model")
    onnx.save(matmul_model(m=4, k=128, n=64, bias=True), str(d / "mm.onnx"))
    return d / "mm.onnx"


@pytest.fixture(scope="module")
def bundle(tiny_onnx: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real bundle (fp32 of a tiny ONNX model, built on the host)."""
    out = tmp_path_factory.mktemp("bad-inputs-bundle") / "b"
    edgecompress.build(tiny_onnx, target="host", recipe="fp32", out=out, runs=1)
    return out


def _target(tmp: Path, name: str = "dev", **replace: str) -> str:
    text = HOST_TOML.replace('name = "host"', f'name = "{name}"')
    for old, new in replace.items():
        assert old in text, old
        text = text.replace(old, new)
    p = tmp / f"{name}.toml"
    p.write_text(text)
    return str(p)


def _file(tmp: Path, name: str, data: bytes) -> str:
    p = tmp / name
    p.write_bytes(data)
    return str(p)


def _fifo(tmp: Path, name: str) -> str:
    p = tmp / name
    os.mkfifo(p)
    return str(p)


def _sparse(tmp: Path, name: str, size: int) -> str:
    p = tmp / name
    with open(p, "wb") as f:
        f.truncate(size)
    return str(p)


def _model_with_external(tmp: Path, location: str) -> str:
    """An ONNX file whose one initializer points at `location` as external data."""
    m = matmul_model(m=4, k=8, n=4)
    w = m.graph.initializer[0]
    w.ClearField("raw_data")
    w.ClearField("float_data")
    w.data_location = onnx.TensorProto.EXTERNAL
    w.external_data.add(key="location", value=location)
    w.external_data.add(key="length", value=str(8 * 4 * 4))
    p = tmp / "ext.onnx"
    p.write_bytes(m.SerializeToString())
    return str(p)


def _huge_input_model(tmp: Path) -> str:
    m = onnx.parser.parse_model("""
    <ir_version: 8, opset_import: ["" : 18]>
    g (float[1000000000, 4096] X) => (float[1000000000, 4096] Y) { Y = Relu(X) }
    """)
    p = tmp / "huge.onnx"
    onnx.save(m, str(p))
    return str(p)


def _remote_code_model(tmp: Path) -> str:
    d = tmp / "remote"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "bert", "auto_map": {"AutoModel": "x.XModel"}}))
    (d / "model.safetensors").write_bytes(b"")
    return str(d)


def _user_dir(tmp: Path, name: str = "mine") -> str:
    d = tmp / name
    d.mkdir()
    (d / "thesis.txt").write_text("years of work")
    return str(d)


# (id, exit code, needle, args(tmp, model) -> argv). Every one is refused before any export.
B = ["build"]
BUILD_CASES: list[tuple[str, int, str, Callable[[Path, str], list[str]]]] = [
    ("runs-0", 2, "--runs", lambda t, m: [m, "--runs", "0"]),
    ("runs-negative", 2, "--runs", lambda t, m: [m, "--runs", "-1"]),
    ("runs-text", 2, "--runs", lambda t, m: [m, "--runs", "many"]),
    ("runs-absurd", 2, "runs", lambda t, m: [m, "--runs", "10000000"]),
    ("max-size-inf", 2, "finite", lambda t, m: [m, "--max-size-mb", "inf"]),
    ("max-size-nan", 2, "finite", lambda t, m: [m, "--max-size-mb", "nan"]),
    ("max-size-zero", 2, "--max-size-mb", lambda t, m: [m, "--max-size-mb", "0"]),
    ("max-ram-negative", 2, "--max-ram-mb", lambda t, m: [m, "--max-ram-mb", "-5"]),
    ("max-latency-nan", 2, "finite", lambda t, m: [m, "--max-latency-ms", "nan"]),
    ("min-fidelity-nan", 2, "--min-fidelity", lambda t, m: [m, "--min-fidelity", "nan"]),
    ("min-fidelity-above-1", 2, "cosine_mean", lambda t, m: [m, "--min-fidelity", "1.5"]),
    ("min-fidelity-below-minus-1", 2, "cosine_mean", lambda t, m: [m, "--min-fidelity", "-3"]),
    ("auto-flags-without-auto", 2, "--recipe auto", lambda t, m: [m, "--max-candidates", "2"]),
    ("unknown-option", 2, "--frobnicate", lambda t, m: [m, "--frobnicate"]),
    ("trust-remote-code-removed", 2, "--trust-remote-code", lambda t, m: [m, "--trust-remote-code"]),
    ("empty-text-column", 2, "text_column", lambda t, m: [m, "--text-column", " "]),
    ("unknown-target", 2, "unknown target", lambda t, m: [m, "--target", "raspbery-pi-5"]),
    ("target-file-missing", 2, "not found", lambda t, m: [m, "--target", str(t / "nope.toml")]),
    ("target-not-toml", 2, "valid TOML", lambda t, m: [m, "--target", _file(t, "dev.toml", b"[[[")]),
    ("target-fifo", 2, "not a regular file", lambda t, m: [m, "--target", _fifo(t, "dev.toml")]),
    ("target-huge", 2, "larger than", lambda t, m: [m, "--target", _sparse(t, "dev.toml", 2 << 20)]),
    ("target-nan-budget", 2, "budgets.max_size_mb", lambda t, m: [m, "--target", _target(
        t, **{"max_size_mb = ": "max_size_mb = nan #"})]),
    ("target-inf-bandwidth", 2, "hardware.bandwidth_gbs", lambda t, m: [m, "--target", _target(
        t, **{"bandwidth_gbs = ": "bandwidth_gbs = inf #"})]),
    ("target-floor-out-of-range", 2, "budgets.fidelity.cosine_mean", lambda t, m: [m, "--target", _target(
        t, **{"cosine_mean = ": "cosine_mean = 99 #"})]),
    ("target-floor-string", 2, "budgets.fidelity.cosine_mean", lambda t, m: [m, "--target", _target(
        t, **{"cosine_mean = ": "cosine_mean = 'high' #"})]),
    ("target-absurd-threads", 2, "runtime.threads", lambda t, m: [m, "--target", _target(
        t, **{"threads = 2": "threads = 100000"})]),
    ("target-zero-cores", 2, "hardware.cores", lambda t, m: [m, "--target", _target(
        t, **{"cores = 2": "cores = 0"})]),
    ("target-negative-baseline", 2, "estimate.runtime_baseline_mb", lambda t, m: [m, "--target", _target(
        t, **{"runtime_baseline_mb = ": "runtime_baseline_mb = -40 #"})]),
    ("target-huge-batch", 2, "workload.batch", lambda t, m: [m, "--target", _target(
        t, **{"batch = 1": "batch = 1000000000"})]),
    ("target-threads-wrong-type", 2, "runtime.threads", lambda t, m: [m, "--target", _target(
        t, **{"threads = 2": "threads = [2]"})]),
    ("eval-missing", 2, "not found", lambda t, m: [m, "--eval", str(t / "nope.txt")]),
    ("eval-fifo", 2, "not a regular file", lambda t, m: [m, "--eval", _fifo(t, "texts.txt")]),
    ("eval-dev-zero", 2, "not a regular file", lambda t, m: [m, "--eval", str(_link(t, "zero.txt", "/dev/zero"))]),
    ("eval-late-nul", 2, "NUL byte", lambda t, m: [m, "--eval", _file(t, "t.txt", b"a line\n" * 5000 + b"x\x00y")]),
    ("eval-long-line", 2, "characters long", lambda t, m: [m, "--eval", _file(t, "t.txt", b"w" * 200_001)]),
    ("eval-too-big", 2, "MiB", lambda t, m: [m, "--eval", _sparse(t, "t.txt", 300 << 20)]),
    ("eval-not-utf8", 2, "not UTF-8", lambda t, m: [m, "--eval", _file(t, "t.txt", b"caf\xe9\n")]),
    ("eval-empty", 2, "holds no texts", lambda t, m: [m, "--eval", _file(t, "t.txt", b"\n\n")]),
    ("eval-pdf", 2, "unsupported text file type", lambda t, m: [m, "--eval", _file(t, "t.pdf", b"%PDF")]),
    ("calibration-bad-jsonl", 2, "not valid JSON", lambda t, m: [m, "--calibration", _file(t, "c.jsonl", b"{")]),
    ("calibration-csv-no-column", 2, "no 'text' column",
     lambda t, m: [m, "--calibration", _file(t, "c.csv", b"a,b\n1,2\n")]),
    ("model-missing", 2, "not found", lambda t, m: [str(t / "nothing")]),
    ("model-dir-without-config", 2, "no config.json", lambda t, m: [_user_dir(t)]),
    ("model-onnx-garbage", 2, "not a readable ONNX model", lambda t, m: [_file(t, "g.onnx", b"\x08garbage")]),
    ("model-external-data-outside", 2, "outside the model's directory",
     lambda t, m: [_model_with_external(t, "../../etc/passwd")]),
    ("model-external-data-absolute", 2, "outside the model's directory",
     lambda t, m: [_model_with_external(t, "/etc/passwd")]),
    ("model-external-data-fifo", 2, "not a regular file",
     lambda t, m: [_model_with_external(t, Path(_fifo(t, "w.bin")).name)]),
    ("model-huge-declared-dim", 2, "too large to feed", lambda t, m: [_huge_input_model(t)]),
    ("model-remote-code", 2, "does not run", lambda t, m: [_remote_code_model(t)]),
    ("out-is-a-file", 2, "is a file", lambda t, m: [m, "--out", _file(t, "f", b"keep"), "--force"]),
    ("out-exists-no-force", 2, "already exists", lambda t, m: [m, "--out", _user_dir(t)]),
    ("out-user-dir-force", 2, "not an edgecompress bundle", lambda t, m: [m, "--out", _user_dir(t), "--force"]),
    ("out-is-model-dir", 2, "model's directory", lambda t, m: [m, "--out", str(Path(m).parent), "--force"]),
    ("out-is-model-ancestor", 2, "holds the model",
     lambda t, m: [m, "--out", str(Path(m).parent.parent), "--force"]),
]


def _link(tmp: Path, name: str, to: str) -> Path:
    p = tmp / name
    p.symlink_to(to)
    return p


def _invoke(args: list[str], env: dict[str, str] | None = None) -> Any:
    return CliRunner().invoke(main, args, env=env)


def _assert_one_line(r: Any, code: int, needle: str) -> None:
    err = r.stderr.strip()
    assert r.exit_code == code, (r.exit_code, r.output)
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    assert needle in err, err
    assert "Traceback" not in r.output, r.output
    assert r.exception is None or isinstance(r.exception, SystemExit), r.output


@pytest.mark.parametrize(("case", "code", "needle", "argv"), BUILD_CASES, ids=[c[0] for c in BUILD_CASES])
def test_build_refuses(case: str, code: int, needle: str, argv: Callable[[Path, str], list[str]], tmp_path: Path,
                       tiny_onnx: Path) -> None:
    work = tmp_path / "work"
    work.mkdir()
    model = work / "model" / "mm.onnx"
    model.parent.mkdir()
    shutil.copy(tiny_onnx, model)
    args = argv(work, str(model))
    if "--target" not in args:
        args += ["--target", "host"]
    if "--out" not in args:
        args += ["--out", str(work / "out")]
    before = listing(tmp_path)
    t0 = time.monotonic()
    r = _invoke(["build", *args, "--recipe", "fp32"])
    _assert_one_line(r, code, needle)
    assert listing(tmp_path) == before
    assert time.monotonic() - t0 < 30  # refused up front: nothing hung, nothing was exported


def test_a_second_build_into_a_locked_out_fails_at_once(tmp_path: Path, tiny_onnx: Path) -> None:
    from edgecompress.locks import locked

    out = tmp_path / "out"
    with locked(tmp_path / ".out.lock", wait=False, what="test"):
        before = listing(tmp_path)
        r = _invoke(["build", str(tiny_onnx), "--target", "host", "--recipe", "fp32", "--out", str(out)])
        _assert_one_line(r, 5, "being written by another edgecompress process")
        assert listing(tmp_path) == before


# --- profile / emulator run on a tampered or malformed bundle --------------------------------------------------
def _edit_manifest(b: Path, fn: Callable[[dict[str, Any]], Any]) -> None:
    m = json.loads((b / "manifest.json").read_text())
    out = fn(m)
    (b / "manifest.json").write_text(json.dumps(m if out is None else out))


def _flip_byte(p: Path, at: int = 100) -> None:
    data = bytearray(p.read_bytes())
    data[at] ^= 0x01
    p.write_bytes(bytes(data))


def _swap_for_symlink(b: Path) -> None:
    outside = b.parent / "elsewhere.onnx"
    shutil.copy(b / "model.onnx", outside)
    (b / "model.onnx").unlink()
    (b / "model.onnx").symlink_to(outside)


def _manifest_fifo(b: Path) -> None:
    (b / "manifest.json").unlink()
    os.mkfifo(b / "manifest.json")


PROFILE_CASES: list[tuple[str, int, str, Callable[[Path], Any], list[str]]] = [
    ("model-one-byte-altered", 16, "does not match the sha256", lambda b: _flip_byte(b / "model.onnx"), []),
    ("side-file-altered", 16, "diagnostics/optimized-cpu.onnx does not match",
     lambda b: _flip_byte(b / "diagnostics" / "optimized-cpu.onnx"), []),
    ("artifact-file-outside", 16, "points outside the bundle",
     lambda b: _edit_manifest(b, lambda m: m["artifact"].update(file="../../x.onnx")), []),
    ("artifact-file-absolute", 16, "points outside the bundle",
     lambda b: _edit_manifest(b, lambda m: m["artifact"].update(file="/etc/passwd")), []),
    ("artifact-files-outside", 16, "points outside the bundle",
     lambda b: _edit_manifest(b, lambda m: m["artifact"]["files"].append("../../../etc/passwd")), []),
    ("model-symlinked-outside", 16, "points outside the bundle", _swap_for_symlink, []),
    ("artifact-file-wrong-type", 10, "artifact.file must be a file name",
     lambda b: _edit_manifest(b, lambda m: m["artifact"].update(file=["model.onnx"])), []),
    ("artifact-sha-malformed", 10, "sha256 hex digest",
     lambda b: _edit_manifest(b, lambda m: m["artifact"].update(sha256="nope")), []),
    ("manifest-not-json", 10, "not a readable manifest", lambda b: (b / "manifest.json").write_text("{"), []),
    ("manifest-a-list", 10, "not a JSON object", lambda b: _edit_manifest(b, lambda m: [m]), []),
    ("manifest-fidelity-a-string", 10, "'fidelity' must be a JSON object",
     lambda b: _edit_manifest(b, lambda m: m.update(fidelity="great")), []),
    ("manifest-fifo", 10, "has no manifest.json", _manifest_fifo, []),
    ("model-missing", 10, "has no model.onnx", lambda b: (b / "model.onnx").unlink(), []),
    ("update-on-tampered", 16, "does not match", lambda b: _flip_byte(b / "model.onnx"), ["--update"]),
    ("runs-0", 2, "--runs", lambda b: None, ["--runs", "0"]),
    ("emulate-cores-0", 2, "--emulate-cores", lambda b: None, ["--emulate-cores", "0"]),
    ("device-bad-port", 11, "malformed device URL", lambda b: None, ["--device", "ssh://pi@host:99999"]),
    ("device-no-user", 11, "user name", lambda b: None, ["--device", "ssh://host"]),
    ("connect-timeout-nan", 2, "--connect-timeout", lambda b: None,
     ["--device", "ssh://pi@127.0.0.1:1", "--connect-timeout", "nan"]),
    ("identity-without-device", 2, "go with --device", lambda b: None, ["--identity", "/dev/null"]),
    ("target-nan", 2, "budgets.max_peak_ram_mb", lambda b: None, ["--target", "@nan-target"]),
]


@pytest.mark.parametrize(("case", "code", "needle", "tamper", "extra"), PROFILE_CASES,
                         ids=[c[0] for c in PROFILE_CASES])
def test_profile_refuses(case: str, code: int, needle: str, tamper: Callable[[Path], Any], extra: list[str],
                         bundle: Path, tmp_path: Path) -> None:
    b = tmp_path / "b"
    shutil.copytree(bundle, b, symlinks=True)
    tamper(b)
    if "@nan-target" in extra:
        extra = ["--target", _target(tmp_path, **{"max_peak_ram_mb = ": "max_peak_ram_mb = nan #"})]
    args = ["profile", str(b), *extra] + ([] if "--target" in extra else ["--target", "host"])
    before = listing(tmp_path)
    r = _invoke([*args, "--runs", "1"] if "--runs" not in extra else args)
    _assert_one_line(r, code, needle)
    assert listing(tmp_path) == before


@pytest.mark.parametrize(("case", "code", "needle", "tamper", "extra"), PROFILE_CASES[:12],
                         ids=[c[0] for c in PROFILE_CASES[:12]])
def test_emulator_run_verifies_before_anything(case: str, code: int, needle: str, tamper: Callable[[Path], Any],
                                               extra: list[str], bundle: Path, tmp_path: Path) -> None:
    """`emulator run` verifies the bundle as `profile` does, before it even looks for the emulator."""
    b = tmp_path / "b"
    shutil.copytree(bundle, b, symlinks=True)
    tamper(b)
    before = listing(tmp_path)
    _assert_one_line(_invoke(["emulator", "run", str(b), "--target", "raspberry-pi-5"]), code, needle)
    assert listing(tmp_path) == before


@pytest.mark.parametrize(("args", "needle"), [(["--texts", "0"], "--texts"), (["--target", "nope"], "unknown target")])
def test_emulator_run_refuses_bad_flags(args: list[str], needle: str, bundle: Path) -> None:
    _assert_one_line(_invoke(["emulator", "run", str(bundle), "--target", "raspberry-pi-5", *args]), 2, needle)


# --- targets, sweep, cache ----------------------------------------------------------------------------------------
OTHER_CASES: list[tuple[str, int, str, Callable[[Path], list[str]]]] = [
    ("targets-show-unknown", 2, "unknown target", lambda t: ["targets", "show", "nope"]),
    ("targets-show-malformed", 2, "runtime.threads",
     lambda t: ["targets", "show", _target(t, **{"threads = 2": "threads = -2"})]),
    ("targets-show-fifo", 2, "not a regular file", lambda t: ["targets", "show", _fifo(t, "x.toml")]),
    ("sweep-executor-bad-port", 2, "malformed executor",
     lambda t: ["sweep", "--out", str(t / "s"), "--executor", "dask://host:notaport"]),
    ("sweep-executor-no-port", 2, "malformed executor",
     lambda t: ["sweep", "--out", str(t / "s"), "--executor", "dask://host"]),
    ("sweep-executor-unknown", 2, "unknown executor", lambda t: ["sweep", "--out", str(t / "s"), "--executor", "ray"]),
    ("sweep-workers-0", 2, "--workers", lambda t: ["sweep", "--out", str(t / "s"), "--workers", "0"]),
    ("sweep-workers-absurd", 2, "--workers", lambda t: ["sweep", "--out", str(t / "s"), "--workers", "100000"]),
    ("sweep-runs-0", 2, "--runs", lambda t: ["sweep", "--out", str(t / "s"), "--runs", "0"]),
    ("sweep-unknown-target", 2, "unknown target", lambda t: ["sweep", "--out", str(t / "s"), "--targets", "nope"]),
    ("sweep-unknown-recipe", 2, "unknown recipe", lambda t: ["sweep", "--out", str(t / "s"), "--recipes", "nope"]),
    ("sweep-missing-model", 2, "model not found",
     lambda t: ["sweep", "--out", str(t / "s"), "--models", str(t / "none")]),
    ("sweep-duplicate-model", 2, "twice", lambda t: ["sweep", "--out", str(t / "s"), "--models", "minilm,minilm"]),
    ("sweep-bad-eval", 2, "NUL byte",
     lambda t: ["sweep", "--out", str(t / "s"), "--targets", "host", "--eval", _file(t, "e.txt", b"a\x00")]),
    ("sweep-out-is-file", 2, "is a file", lambda t: ["sweep", "--out", _file(t, "f", b"keep")]),
    ("sweep-out-user-dir", 2, "no sweep wrote", lambda t: ["sweep", "--out", _user_dir(t), "--targets", "host"]),
    ("sweep-no-models", 2, "no models", lambda t: ["sweep", "--out", str(t / "s"), "--models", ","]),
    ("cache-unknown-command", 2, "No such command", lambda t: ["cache", "purge"]),
]


@pytest.mark.parametrize(("case", "code", "needle", "argv"), OTHER_CASES, ids=[c[0] for c in OTHER_CASES])
def test_other_commands_refuse(case: str, code: int, needle: str, argv: Callable[[Path], list[str]],
                               tmp_path: Path) -> None:
    args = argv(tmp_path)
    before = listing(tmp_path)
    r = _invoke(args)
    _assert_one_line(r, code, needle)
    assert listing(tmp_path) == before


# --- the Python API validates as the CLI does -------------------------------------------------------------------
API_CASES: list[tuple[str, dict[str, Any], str]] = [
    ("runs-0", {"runs": 0}, "runs"),
    ("runs-bool", {"runs": True}, "runs"),
    ("runs-float", {"runs": 2.5}, "runs"),
    ("model-int", {"model": 123}, "model must be a path"),
    ("out-empty", {"out": ""}, "out must be a path"),
    ("force-string", {"force": "yes"}, "force must be true or false"),
    ("cache-none", {"cache": None}, "cache must be true or false"),
    ("target-none", {"target": None}, "target must be"),
    ("text-column-empty", {"text_column": ""}, "text_column"),
    ("out-user-dir-force", {"out": "@user", "force": True}, "not an edgecompress bundle"),
]


@pytest.mark.parametrize(("case", "kwargs", "needle"), API_CASES, ids=[c[0] for c in API_CASES])
def test_api_refuses(case: str, kwargs: dict[str, Any], needle: str, tiny_onnx: Path, tmp_path: Path) -> None:
    kw: dict[str, Any] = {"target": "host", "recipe": "fp32", "out": tmp_path / "out", **kwargs}
    if kw["out"] == "@user":
        kw["out"] = _user_dir(tmp_path)
    kw.setdefault("model", tiny_onnx)
    before = listing(tmp_path)
    with pytest.raises(EdgeCompressError, match=needle) as e:
        edgecompress.build(kw.pop("model"), **kw)
    assert e.value.exit_code == 2
    assert listing(tmp_path) == before


def test_api_budget_overrides_refuse_nan(tiny_onnx: Path, tmp_path: Path) -> None:
    from edgecompress.pipeline import BuildOptions, build

    for budgets in ({"max_size_mb": float("nan")}, {"max_size_mb": float("inf")}, {"max_sizemb": 3.0}):
        with pytest.raises(EdgeCompressError) as e:
            build(BuildOptions(model=tiny_onnx, target="host", recipe="fp32", out=tmp_path / "o", budgets=budgets))
        assert e.value.exit_code == 2
    with pytest.raises(EdgeCompressError, match="threads"):
        build(BuildOptions(model=tiny_onnx, target="host", recipe="fp32", out=tmp_path / "o", threads=10**6))
    assert list(tmp_path.iterdir()) == []


# --- every exception is one line with a documented code ------------------------------------------------------------
@pytest.mark.parametrize(("exc", "code", "needle"), [
    (OSError(28, "No space left on device", "/tmp/x"), 4, "out of disk space: /tmp/x"),
    (PermissionError(13, "Permission denied", "/root/x"), 4, "permission denied: /root/x"),
    (OSError(30, "Read-only file system", "/ro"), 4, "read-only file system"),
    (MemoryError(), 4, "out of memory"),
    (RuntimeError("boom\nsecond line"), 1, "internal error: RuntimeError: boom second line"),
    (KeyboardInterrupt(), 130, "interrupted"),
])
def test_unexpected_exceptions_are_one_line(exc: BaseException, code: int, needle: str,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    import edgecompress.cache

    def boom(self: Any) -> Any:
        raise exc

    monkeypatch.setattr(edgecompress.cache.Cache, "info", boom)
    r = _invoke(["cache", "info"])
    _assert_one_line(r, code, needle)


def test_ort_load_failure_is_one_line(bundle: Path, tmp_path: Path) -> None:
    """A model ONNX Runtime rejects (here: an op it does not know), recorded with a valid hash: exit 1, one line."""
    b = tmp_path / "b"
    shutil.copytree(bundle, b)
    m = onnx.load(str(b / "model.onnx"))
    m.graph.node[0].op_type = "NoSuchOp"
    onnx.save(m, str(b / "model.onnx"))
    from edgecompress.bundle import hash_bundle_files
    from edgecompress.model import sha256_file

    _edit_manifest(b, lambda d: d["artifact"].update(sha256=sha256_file(b / "model.onnx"),
                                                    hashes=hash_bundle_files(b)))
    before = listing(tmp_path)
    r = _invoke(["profile", str(b), "--target", "host", "--runs", "1", "--op-runs", "0"])
    assert r.exit_code == 1 and len(r.stderr.strip().splitlines()) == 1, r.output
    assert "NoSuchOp" in r.stderr and "Traceback" not in r.output
    assert listing(tmp_path) == before


# --- what edgecompress never deletes -------------------------------------------------------------------------------
def test_a_user_dir_given_as_out_force_survives_and_a_bundle_is_replaced(bundle: Path, tiny_onnx: Path,
                                                                         tmp_path: Path) -> None:
    user = Path(_user_dir(tmp_path))
    r = _invoke(["build", str(tiny_onnx), "--target", "host", "--recipe", "fp32", "--out", str(user), "--force"])
    _assert_one_line(r, 2, "not an edgecompress bundle")
    assert (user / "thesis.txt").read_text() == "years of work" and len(list(user.iterdir())) == 1
    old = tmp_path / "old-bundle"
    shutil.copytree(bundle, old)
    (old / "stale.txt").write_text("x")
    r = _invoke(["build", str(tiny_onnx), "--target", "host", "--recipe", "fp32", "--out", str(old), "--force",
                 "--runs", "1"])
    assert r.exit_code == 0, r.output
    assert not (old / "stale.txt").exists() and (old / "manifest.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine", "old-bundle"]


def test_a_user_dir_as_cache_root_survives_cache_clear(tiny_onnx: Path, tmp_path: Path) -> None:
    root = Path(_user_dir(tmp_path, "shared"))
    (root / "photos").mkdir()
    (root / "photos" / "cat.jpg").write_bytes(b"\xff\xd8")
    (root / "ab").mkdir()  # empty, and named like a cache shard
    env = {"EDGECOMPRESS_CACHE_DIR": str(root)}
    r = _invoke(["build", str(tiny_onnx), "--target", "host", "--recipe", "int8-dynamic", "--out",
                 str(tmp_path / "out"), "--runs", "1"], env=env)
    assert r.exit_code == 0, r.output
    r = _invoke(["cache", "info"], env=env)
    assert r.exit_code == 0 and "3 items edgecompress did not write" in r.stdout, r.output
    r = _invoke(["cache", "clear"], env=env)
    assert r.exit_code == 0, r.output
    assert "removed 3 entries" in r.stdout, r.stdout  # export, reference, the pass
    assert "left 3 items that edgecompress did not write" in r.stdout, r.stdout
    assert (root / "thesis.txt").read_text() == "years of work"
    assert (root / "photos" / "cat.jpg").read_bytes() == b"\xff\xd8" and (root / "ab").is_dir()
    assert sorted(p.name for p in root.iterdir()) == ["CACHEDIR.TAG", "ab", "photos", "thesis.txt"]


def test_a_corrupt_cache_entry_is_dropped_and_rebuilt(tiny_onnx: Path, tmp_path: Path,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    from edgecompress.cache import Cache

    root = tmp_path / "cache"
    kw: dict[str, Any] = {"target": "host", "recipe": "int8-dynamic", "runs": 1}
    os.environ["EDGECOMPRESS_CACHE_DIR"], saved = str(root), os.environ["EDGECOMPRESS_CACHE_DIR"]
    try:
        first = edgecompress.build(tiny_onnx, out=tmp_path / "a", **kw)
        entry = next((root / "pass").glob("*/*"))
        _flip_byte(entry / "model.onnx", at=50)
        with caplog.at_level("WARNING"):
            second = edgecompress.build(tiny_onnx, out=tmp_path / "b", **kw)
    finally:
        os.environ["EDGECOMPRESS_CACHE_DIR"] = saved
    assert "is corrupt" in caplog.text
    assert second.artifact.sha256 == first.artifact.sha256  # rebuilt, not the corrupt bytes
    assert any(m.startswith("pass/") for m in second.cache["misses"])
    assert Cache(root).get("pass", entry.name) is not None


def test_text_hashes_cannot_collide_by_joining() -> None:
    from edgecompress.cache import hash_texts

    assert hash_texts(["ab", "c"]) != hash_texts(["a", "bc"])
    assert hash_texts(["a\x00b"]) != hash_texts(["a", "b"])
    assert hash_texts([]) != hash_texts([""])


def test_stale_cache_temp_entries_and_locks_are_collected(tmp_path: Path) -> None:
    from edgecompress.cache import Cache, digest

    dead = _dead_pid()
    key = digest("k")
    shard = tmp_path / "export" / key[:2]
    shard.mkdir(parents=True)
    tmp = shard / f".{key}.tmp-{dead}-0123abcd"
    tmp.mkdir()
    (tmp / ".edgecompress-entry").write_text("export\n")
    (shard / f".{key}.lock").write_text(f"{dead}\n")
    live = shard / f".{key}.tmp-{os.getpid() + 0}-89abcdef"  # ours: never collected while we live
    live.mkdir()
    Cache(tmp_path)
    assert sorted(p.name for p in shard.iterdir()) == [live.name]


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


# --- SIGKILL during a real build, then a rerun: no leftovers -------------------------------------------------------
def _leftovers(*dirs: Path) -> list[str]:
    found = []
    for d in dirs:
        for p in d.rglob("*"):
            if ".partial-" in p.name or ".tmp-" in p.name or p.name.endswith(".lock") or ".old-" in p.name \
                    or p.name.startswith("edgecompress-prof-"):
                found.append(str(p))
    return found


@pytest.mark.parametrize("kill_when", ["staged", "profiling", "over-an-existing-bundle"])
def test_sigkill_during_a_build_then_a_rerun_leaves_nothing(kill_when: str, tiny_onnx: Path, bundle: Path,
                                                           tmp_path: Path) -> None:
    """Killed while the bundle is staged, while the profiler's temp dir exists, or while staged over an existing
    bundle (--force): the old bundle is intact after the kill, and the rerun collects what the killed process left.
    (A kill between the commit's two renames: tests/test_bundle.py.)"""
    out, cache, tmpdir = tmp_path / "out", tmp_path / "cache", tmp_path / "tmp"
    tmpdir.mkdir()
    if kill_when == "over-an-existing-bundle":
        shutil.copytree(bundle, out)
    env = {**os.environ, "EDGECOMPRESS_CACHE_DIR": str(cache), "TMPDIR": str(tmpdir),
           "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "edgecompress.cli", "build", str(tiny_onnx), "--target", "host", "--recipe",
           "int8-dynamic", "--out", str(out), "--runs", "30", "--force"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def hit() -> bool:
        if kill_when == "profiling":
            return any(tmpdir.glob("edgecompress-prof-*"))
        return any(tmp_path.glob(".out.partial-*/model.onnx"))

    deadline = time.monotonic() + 120
    while not hit():
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        assert time.monotonic() < deadline
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert _leftovers(tmp_path)  # the kill did leave something behind
    if kill_when == "over-an-existing-bundle":
        assert (out / "manifest.json").is_file()  # the old bundle is still there
    rerun = subprocess.run([*cmd[:-3], "--runs", "1", "--force"], env=env, capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr
    assert _leftovers(tmp_path) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "out", "tmp"]


def test_sigterm_during_a_long_call_into_c_exits_promptly(tmp_path: Path) -> None:
    """The main thread is inside one long C call (pbkdf2 releases the GIL, as ONNX Runtime and BLAS do), where
    Python cannot run its SIGTERM handler: the watchdog removes what was being written and exits 130."""
    staged = tmp_path / ".out.partial-1-0123abcd"
    script = f"""
import hashlib, sys
from pathlib import Path
from edgecompress import cli, locks
cli._interrupt_on_sigterm()
p = Path({str(staged)!r}); p.mkdir(); (p / "model.onnx").write_text("half")
locks.in_flight(p)
print("ready", flush=True)
hashlib.pbkdf2_hmac("sha256", b"p", b"s", 10**9)
"""
    env = {**os.environ, "PYTHONPATH": str(REPO), "EDGECOMPRESS_TERM_GRACE_S": "0.5"}
    proc = subprocess.Popen([sys.executable, "-c", script], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    time.sleep(1.0)  # inside the C call by now (a signal before it is handled by Python at once)
    t0 = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 130 and time.monotonic() - t0 < 10
    assert len(err.strip().splitlines()) == 1 and err.startswith("error: interrupted (SIGTERM)"), err
    assert list(tmp_path.iterdir()) == []


def test_dead_processes_profiler_dirs_and_cgroups_are_collected(tmp_path: Path) -> None:
    """Named by pid: only those of dead processes go; a live process's (ours) and anything else stay."""
    from edgecompress.profiling.local import collect_stale_cgroups, collect_stale_temp_dirs

    dead = _dead_pid()
    stale = [tmp_path / f"edgecompress-prof-{dead}-x1y2z3", tmp_path / f"edgecompress-{dead}-0123abcd"]
    kept = [tmp_path / f"edgecompress-prof-{os.getpid()}-abc", tmp_path / f"edgecompress-{os.getpid()}-89abcdef",
            tmp_path / "edgecompress-prof-notes", tmp_path / "mine"]
    for d in stale + kept:
        d.mkdir()
    (stale[0] / "spec.json").write_text("{}")
    assert collect_stale_temp_dirs(tmp_path) == [stale[0]]
    assert collect_stale_cgroups(tmp_path) == [stale[1]]
    assert sorted(tmp_path.iterdir()) == sorted(kept)


def test_a_full_disk_is_one_line_exit_4(tiny_onnx: Path, tmp_path: Path) -> None:
    """A real ENOSPC: --out on a 40 KiB tmpfs (needs the right to mount, as root in CI; skipped elsewhere)."""
    small = tmp_path / "small"
    small.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=40k", "tmpfs", str(small)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (not root)")
    try:
        r = _invoke(["build", str(tiny_onnx), "--target", "host", "--recipe", "fp32", "--out", str(small / "b"),
                     "--runs", "1", "--no-cache"])
        _assert_one_line(r, 4, "out of disk space")
        assert list(small.iterdir()) == []
    finally:
        subprocess.run(["umount", str(small)], capture_output=True)


# --- image and audio data files: one shared per-file check (datafile.py) ------------------------------------------
def _load_media(kind: str, path: Path) -> Any:
    from edgecompress import audio, media

    return media.load_media(path, "image") if kind == "image" else audio.load_audio_data(path)


@pytest.mark.parametrize("kind, suffix", [("image", ".png"), ("audio", ".wav")])
@pytest.mark.parametrize("make, needle", [
    (lambda t, n: _fifo(t, n), "is not a regular file"),  # reading a FIFO would block forever
    (lambda t, n: _file(t, n, b""), "is empty"),
    (lambda t, n: _sparse(t, n, 65 << 20), "MiB, more than the 64 MiB"),
    (lambda t, n: _file(t, "list.txt", f"{t / 'nothing'}{n[-4:]}\n".encode()), "file not found"),
    (lambda t, n: _fifo(t, "list.txt"), "is not a regular file"),  # the list file itself
])
def test_a_bad_media_file_is_one_line_for_images_and_clips(tmp_path: Path, kind: str, suffix: str,
                                                           make: Callable[[Path, str], str], needle: str) -> None:
    from edgecompress.errors import DataError

    path = Path(make(tmp_path, "x" + suffix))
    with pytest.raises(DataError, match=needle) as e:
        _load_media(kind, path)
    assert "\n" not in str(e.value) and e.value.exit_code == 2
