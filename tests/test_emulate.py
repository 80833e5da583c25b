"""Arm emulation: CPU model per target, the runner's fidelity mode, the not-set-up error, and (marker `arm`, run by
`make test-arm` after `edgecompress emulator setup`) real aarch64 onnxruntime under qemu-user."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from edgecompress.cli import main
from edgecompress.errors import ConfigError, ProfileError, UsageError
from edgecompress.profiling import emulate
from edgecompress.targets import available_targets, load_target

# Captured at import, before conftest points EDGECOMPRESS_CACHE_DIR at a throw-away dir: the arm tests use the
# emulator that `edgecompress emulator setup` built for this user.
USER_EMULATOR_DIR = emulate.emulator_dir()


def test_qemu_cpu_follows_the_target_features() -> None:
    assert emulate.qemu_cpu(load_target("raspberry-pi-4")) == "cortex-a72"  # Armv8.0, no dotprod
    assert emulate.qemu_cpu(load_target("raspberry-pi-5")) == "cortex-a76"  # dotprod, fp16
    assert emulate.qemu_cpu(load_target("jetson-orin-nano")) == "cortex-a76"
    assert emulate.qemu_cpu(load_target("phone-arm64")) == "max"  # i8mm: no named core in qemu 7.2
    for name in available_targets():
        t = load_target(name)
        if t.hardware.arch != "aarch64":
            with pytest.raises(ConfigError, match="not aarch64"):
                emulate.qemu_cpu(t)


def _int8_matmul_model(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """MatMulInteger with extreme values (u8 x s8 pair sums past the int16 range): a correct kernel gives the exact
    int32 product, whichever instructions it uses (NEON, dotprod, i8mm)."""
    rng = np.random.default_rng(0)
    a = rng.choice(np.array([0, 128, 200, 255], dtype=np.uint8), size=(4, 64))
    b = rng.choice(np.array([-128, -100, 100, 127], dtype=np.int8), size=(64, 16))
    text = """
        <ir_version: 8, opset_import: ["" : 17]>
        g (uint8[4, 64] a) => (int32[4, 16] y) {
            y = MatMulInteger(a, w)
        }
    """
    model = onnx.parser.parse_model(text)
    model.graph.initializer.append(onnx.numpy_helper.from_array(b, "w"))
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, path)
    return a, b


def test_runner_fidelity_mode_on_this_host(tmp_path: Path) -> None:
    """The same runner file the emulator runs: given batches in, outputs out, the optimized graph saved."""
    a, _ = _int8_matmul_model(tmp_path / "m.onnx")
    np.savez(tmp_path / "in.npz", **{"0/a": a, "1/a": a[::-1].copy()})
    spec = {"mode": "fidelity", "model": str(tmp_path / "m.onnx"), "batches": str(tmp_path / "in.npz"),
            "n_batches": 2, "outputs": str(tmp_path / "out.npz"), "threads": 1,
            "optimized_model_path": str(tmp_path / "opt.onnx")}
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    proc = subprocess.run([sys.executable, "-I", str(emulate.RUNNER), str(tmp_path / "spec.json")],
                          capture_output=True, text=True, timeout=120)
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    assert proc.returncode == 0 and r["ok"] and r["loaded"] and r["outputs"] == ["y"]
    import onnxruntime as ort

    sess = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    with np.load(tmp_path / "out.npz") as z:
        np.testing.assert_array_equal(z["0/y"], sess.run(None, {"a": a})[0])  # exactly what ORT gives here
        np.testing.assert_array_equal(z["1/y"], sess.run(None, {"a": a[::-1].copy()})[0])
    assert emulate.op_histogram(tmp_path / "opt.onnx") == {"MatMulInteger": 1}


def test_runner_fidelity_mode_reports_a_model_that_does_not_load(tmp_path: Path) -> None:
    (tmp_path / "bad.onnx").write_bytes(b"not a model")
    np.savez(tmp_path / "in.npz", x=np.zeros(1))
    spec = {"mode": "fidelity", "model": str(tmp_path / "bad.onnx"), "batches": str(tmp_path / "in.npz"),
            "n_batches": 1, "outputs": str(tmp_path / "out.npz")}
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    proc = subprocess.run([sys.executable, "-I", str(emulate.RUNNER), str(tmp_path / "spec.json")],
                          capture_output=True, text=True, timeout=120)
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    assert proc.returncode == 4 and r["error_kind"] == "load" and "could not load" in r["error"]
    assert not (tmp_path / "out.npz").exists()


def test_emulation_before_setup_names_the_setup_command(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from conftest import matmul_model

    import edgecompress

    monkeypatch.setenv("EDGECOMPRESS_EMULATOR_DIR", str(tmp_path / "none"))
    onnx.save(matmul_model(m=2, k=16, n=8), str(tmp_path / "mm.onnx"))  # a real bundle: it is verified first
    b = tmp_path / "b"
    edgecompress.build(tmp_path / "mm.onnx", target="host", recipe="fp32", out=b, runs=3)
    with pytest.raises(UsageError) as e:
        emulate.emulate_bundle(b, "raspberry-pi-5")
    assert "edgecompress emulator setup" in e.value.one_line()
    r = CliRunner().invoke(main, ["emulator", "run", str(b), "--target", "raspberry-pi-5"])
    assert r.exit_code == 2
    lines = r.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: the Arm emulator is not set up")
    assert "`edgecompress emulator setup`" in lines[0]
    assert not (tmp_path / "none").exists()  # nothing written
    r = CliRunner().invoke(main, ["profile", str(b), "--target", "raspberry-pi-5", "--emulate"])
    assert r.exit_code == 2 and len(r.output.strip().splitlines()) == 1, r.output
    assert "`edgecompress emulator setup`" in r.output


def test_emulator_dir_honours_the_cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("EDGECOMPRESS_EMULATOR_DIR", raising=False)
    monkeypatch.setenv("EDGECOMPRESS_CACHE_DIR", str(tmp_path))
    assert emulate.emulator_dir() == tmp_path / "emulator"


def test_setup_force_removes_only_a_root_edgecompress_made(tmp_path: Path) -> None:
    # a user's own directory where the emulator root would go is refused, never removed
    theirs = tmp_path / "emulator" / "rootfs"
    theirs.mkdir(parents=True)
    (theirs / "notes.txt").write_text("mine")
    with pytest.raises(ProfileError, match="not an emulator root edgecompress made"):
        emulate._remove_root(theirs)
    assert (theirs / "notes.txt").read_text() == "mine"
    (theirs / ".edgecompress-debootstrap-complete").write_text("x")  # the marker setup writes on completion
    emulate._remove_root(theirs)
    assert not theirs.exists()
    partial = tmp_path / "emulator" / "rootfs.partial"
    (partial / "debootstrap").mkdir(parents=True)  # debootstrap's own work dir: an interrupted setup
    emulate._remove_root(partial)
    assert not partial.exists()


def test_emulating_an_x86_target_is_a_usage_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not aarch64"):
        emulate.emulate_bundle(tmp_path, "host")


# ------------------------------------------------------------------------- real aarch64 (make test-arm, ~minutes)

needs_emulator = pytest.mark.skipif(
    emulate.Emulator(USER_EMULATOR_DIR).ready() is None or os.geteuid() != 0,
    reason="run `edgecompress emulator setup` as root first (make test-arm does)")


@pytest.fixture
def emulator_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EDGECOMPRESS_EMULATOR_DIR", str(USER_EMULATOR_DIR))


@pytest.mark.arm
@needs_emulator
@pytest.mark.parametrize("cpu", [
    # Found by this test: the non-dotprod path is off by exactly 2**16 in 5 of 64 outputs (an int16 wrap), also
    # with activations <= 127. Not confirmed on a real Cortex-A72 (could be ORT's kernel or qemu); strict, so a fix
    # in either shows up here.
    pytest.param("cortex-a72", marks=pytest.mark.xfail(strict=True, reason="int16 wrap on the non-dotprod path")),
    "cortex-a76", "max"])
def test_arm_int8_matmul_is_exact(cpu: str, tmp_path: Path, emulator_env: None) -> None:
    a, b = _int8_matmul_model(tmp_path / "m.onnx")
    result, outputs, ops = emulate.run_in_emulator([tmp_path / "m.onnx"], [{"a": a}], cpu)
    assert result["ok"] and result["machine"] == "aarch64", result
    exact = a.astype(np.int64) @ b.astype(np.int64)
    np.testing.assert_array_equal(outputs[0]["y"], exact)  # every Arm kernel path: exact int32
    assert ops == {"MatMulInteger": 1}


@pytest.mark.arm
@needs_emulator
def test_arm_emulated_bundle_reports_load_ops_and_fidelity(tiny_bert: Path, tmp_path: Path,
                                                           emulator_env: None) -> None:
    from edgecompress.pipeline import BuildOptions, build

    out = tmp_path / "b"
    build(BuildOptions(model=tiny_bert, target="raspberry-pi-5", recipe="int8-dynamic", out=out, runs=3))
    r = emulate.emulate_bundle(out, "raspberry-pi-5", max_texts=16)
    assert r["loads"] and r["runs"] and r["machine"] == "aarch64" and r["qemu_cpu"] == "cortex-a76"
    assert any("MatMulInteger" in op or "DynamicQuantizeMatMul" in op for op in r["ops"]), r["ops"]
    assert r["fidelity"]["reference"] == "PyTorch FP32"
    arm, host = r["fidelity"]["arm"], r["fidelity"]["host"]
    assert 0.5 < arm["cosine_mean"] <= 1.0 + 1e-9
    assert abs(arm["cosine_mean"] - host["cosine_mean"]) < 0.05  # same model, different int8 kernels
    assert r["host_vs_arm"]["max_abs_diff"] >= 0.0
    assert "timing" not in json.dumps(r).replace("no timings", "")


@pytest.mark.arm
@needs_emulator
def test_profile_emulate_budgets_fidelity_from_arm_kernels(tiny_bert: Path, tmp_path: Path,
                                                           emulator_env: None) -> None:
    from click.testing import CliRunner

    from edgecompress.cli import main
    from edgecompress.pipeline import BuildOptions, build

    out = tmp_path / "b"
    build(BuildOptions(model=tiny_bert, target="raspberry-pi-5", recipe="int8-dynamic", out=out, runs=3))
    r = CliRunner().invoke(main, ["profile", str(out), "--target", "raspberry-pi-5", "--emulate", "--json"])
    assert r.exit_code in (0, 3), r.output
    rows = {row["name"]: row for row in json.loads(r.stdout)["budgets"]}
    assert rows["cosine_mean"]["source"] == "emulated"
    assert rows["latency_p90"]["source"] == "estimated"  # never a timing from emulation
