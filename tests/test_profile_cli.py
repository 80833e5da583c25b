"""`edgecompress profile BUNDLE --target NAME`: measured here, estimated, bad input and its exit codes, --update."""

from __future__ import annotations

import json
import os
import shutil
import socket
from pathlib import Path

import onnx
import pytest
from click.testing import CliRunner
from conftest import matmul_model

from edgecompress.cli import main as cli


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import edgecompress

    d = tmp_path_factory.mktemp("profile-bundle")
    onnx.save(matmul_model(m=4, k=128, n=64, bias=True), str(d / "mm.onnx"))
    edgecompress.build(d / "mm.onnx", target="host", recipe="fp32", out=d / "b", runs=3)
    return d / "b"


def _snapshot(d: Path) -> dict[str, tuple[int, int]]:
    return {p.name: (p.stat().st_mtime_ns, p.stat().st_size) for p in d.iterdir()}


def _profile(*args: str) -> tuple[int, str]:
    res = CliRunner().invoke(cli, ["profile", *args])
    return res.exit_code, res.output


def test_profile_on_this_host_writes_nothing(bundle: Path) -> None:
    before = _snapshot(bundle)
    code, out = _profile(str(bundle), "--target", "host", "--runs", "5", "--json")
    assert code == 0, out
    r = json.loads(out)
    m = r["measured"]
    assert m["source"] == "measured" and m["latency_ms"]["runs"] >= 5
    assert m["latency_ms"]["mean"] > 0 and m["latency_ms"]["std"] >= 0
    assert m["limits"]["cores"] is None and m["limits"]["threads"] == 2  # the target's threads, unpinned
    assert m["limits"]["memory_cap_mb"] in (20480, None)  # host.toml's usable RAM, where cgroups allow
    assert r["ops"] and r["ops"][0]["providers"] == ["CPUExecutionProvider"]
    rows = {b["name"]: b for b in r["budgets"]}
    assert {"size", "peak_ram", "latency_p90", "load_time", "cosine_mean"} <= set(rows)
    assert rows["cosine_mean"]["source"] == "measured-on-host"  # carried over from the bundle's manifest
    assert _snapshot(bundle) == before


def test_profile_text_output(bundle: Path) -> None:
    code, out = _profile(str(bundle), "--target", "host", "--runs", "3", "--op-runs", "2")
    assert code == 0, out
    assert "±" in out and "top ops" in out and "Gemm" in out and "nothing written" in out


def test_non_host_target_is_estimated_unless_emulated(bundle: Path) -> None:
    code, out = _profile(str(bundle), "--target", "raspberry-pi-5", "--json")
    assert code == 0, out
    rows = {b["name"]: b for b in json.loads(out)["budgets"]}
    assert rows["latency_p90"]["source"] == "estimated" and "load_time" not in rows
    code, out = _profile(str(bundle), "--target", "raspberry-pi-5", "--emulate-cores", "1", "--runs", "3",
                         "--json")
    assert code == 0, out
    r = json.loads(out)
    assert r["measured"]["source"] == "measured-on-host" and r["measured"]["limits"]["cores"] == 1
    rows = {b["name"]: b for b in r["budgets"]}
    assert rows["latency_p90"]["source"] == rows["load_time"]["source"] == "measured-on-host"


def test_not_a_bundle(bundle: Path, tmp_path: Path) -> None:
    no_manifest = tmp_path / "no-manifest"
    no_manifest.mkdir()
    shutil.copy(bundle / "model.onnx", no_manifest / "model.onnx")
    no_model = tmp_path / "no-model"
    no_model.mkdir()
    shutil.copy(bundle / "manifest.json", no_model / "manifest.json")
    for d, what in ((no_manifest, "no manifest.json"), (no_model, "no model.onnx"),
                    (tmp_path / "missing", "not a directory")):
        before = sorted(p.name for p in d.iterdir()) if d.is_dir() else None
        code, out = _profile(str(d), "--target", "host")
        assert code == 10, out
        assert f"error: not a bundle: {d}" in out and what in out and len(out.strip().splitlines()) == 1
        assert (sorted(p.name for p in d.iterdir()) if d.is_dir() else None) == before


def test_device_url_and_reachability_errors(bundle: Path) -> None:
    code, out = _profile(str(bundle), "--target", "host", "--device", "ssh://pi@host:notaport")
    assert code == 11 and "malformed device URL" in out
    code, out = _profile(str(bundle), "--target", "host", "--device", "http://pi@host")
    assert code == 11 and "scheme must be ssh://" in out
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again below: nothing listens there
    code, out = _profile(str(bundle), "--target", "host", "--device", f"ssh://nobody@127.0.0.1:{port}",
                         "--insecure-accept-host-key", "--connect-timeout", "3")
    assert code == 12 and "cannot reach 127.0.0.1" in out
    code, out = _profile(str(bundle), "--target", "host", "--known-hosts", "/dev/null")
    assert code == 2 and "go with --device" in out
    code, out = _profile(str(bundle), "--target", "no-such-target")
    assert code == 2 and "unknown target" in out


def test_update_rewrites_manifest_and_report(bundle: Path, tmp_path: Path) -> None:
    b = tmp_path / "b"
    shutil.copytree(bundle, b)
    old = json.loads((b / "manifest.json").read_text())
    code, out = _profile(str(b), "--target", "raspberry-pi-5", "--update")
    assert code == 2 and "built for 'host'" in out  # a manifest holds one target's verdict
    assert json.loads((b / "manifest.json").read_text()) == old
    code, out = _profile(str(b), "--target", "host", "--runs", "4", "--update")
    assert code == 0, out
    new = json.loads((b / "manifest.json").read_text())
    assert new["profile"]["host"]["ops"]["by_op_type"] and "limits" in new["profile"]["host"]
    assert new["profile"]["host"]["load_ms"] != old["profile"]["host"]["load_ms"]
    assert "load_time" in {r["name"] for r in new["budgets"]}
    assert new["artifact"] == old["artifact"] and new["fidelity"] == old["fidelity"]
    assert "| budget |" in (b / "report.md").read_text() and "load_time" in (b / "report.html").read_text()
    assert new["profile"]["fp32_baseline"] == old["profile"]["fp32_baseline"]  # the build's own sections stay
    assert not [p for p in os.listdir(b) if p.startswith(".")]  # no temp files left behind


def rehash(b: Path) -> None:
    """Record a bundle's files as they are now in its manifest: a bundle is verified before it is profiled."""
    from edgecompress.bundle import hash_bundle_files
    from edgecompress.model import sha256_file

    m = json.loads((b / "manifest.json").read_text())
    m["artifact"].update(sha256=sha256_file(b / "model.onnx"), hashes=hash_bundle_files(b),
                         files=sorted(p.name for p in b.iterdir()))
    (b / "manifest.json").write_text(json.dumps(m))


def test_out_of_memory_under_the_target_cap(bundle: Path, tmp_path: Path) -> None:
    from test_profiling import _big_activation_model, _cgroup_v1_writable

    if not _cgroup_v1_writable():
        pytest.skip("this host has no writable cgroup-v1 memory controller (as root): no cap to hit")
    b = tmp_path / "big"
    b.mkdir()
    shutil.copy(bundle / "manifest.json", b / "manifest.json")
    _big_activation_model(b / "model.onnx", 40_000_000)
    rehash(b)
    tiny = tmp_path / "tiny-board.toml"
    host_toml = (Path(__file__).resolve().parents[1] / "targets" / "host.toml").read_text()
    tiny.write_text(host_toml.replace('name = "host"', 'name = "tiny-board"')
                    .replace("usable_ram_mb = 20480", "usable_ram_mb = 200"))
    code, out = _profile(str(b), "--target", str(tiny), "--runs", "1", "--op-runs", "0")
    assert code == 3, out
    assert "out of memory: killed at the 200 MB cap" in out and "peak_ram" in out
