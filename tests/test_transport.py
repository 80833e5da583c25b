"""Profiling transports: the one decision of where a measurement runs and what its figures are labelled, and the
one out-of-memory rule, checked through fake launchers (the real ssh launcher: test_ssh.py with a real sshd; the
emulator: test_emulate.py)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnx
import pytest
from conftest import matmul_model

from edgecompress.budget import check
from edgecompress.profiling import ProfileOptions, Workload, measuring_transport, profile_artifact
from edgecompress.profiling.local import LocalTransport
from edgecompress.profiling.ssh import DeviceOptions, SshTransport, parse_device_url
from edgecompress.profiling.transport import OutOfMemory, RunnerRun, RunnerTransport, out_of_memory
from edgecompress.profiling.workload import DECODER
from edgecompress.targets import load_target


@dataclass
class RecordingTransport:
    """A fake launcher that runs the real runner here and says it ran on a device (or not)."""

    on_device: bool
    calls: list[tuple[list[Path], dict[str, Any]]] = field(default_factory=list)

    def run(self, files: list[Path], spec: dict[str, Any]) -> RunnerRun:
        self.calls.append((files, spec))
        run = LocalTransport().run(files, spec)
        device = {"device": "fake-pi", "url": "ssh://fake-pi", "remote_python": "python3",
                  "remote_dir_removed": True} if self.on_device else {}
        return RunnerRun(run.result, limits={} if self.on_device else run.limits, device=device)


@dataclass
class KilledTransport:
    """A fake launcher whose runner is killed: at our cap (cap_mb), or without a cap (None)."""

    cap_mb: float | None
    on_device: bool = False

    def run(self, files: list[Path], spec: dict[str, Any]) -> RunnerRun:
        oom = out_of_memory(cap_mb=self.cap_mb, killed=True, where=" on fake-pi" if self.on_device else "")
        assert oom is not None
        raise oom


def _model(tmp_path: Path) -> Path:
    path = tmp_path / "m.onnx"
    onnx.save(matmul_model(m=4, k=64, n=32), str(path))
    return path


def _opts(transport: RunnerTransport) -> ProfileOptions:
    return ProfileOptions(runs=3, min_seconds=0.0, op_profile_runs=0, transport=transport)


def test_one_place_picks_the_transport() -> None:
    host, pi = load_target("host"), load_target("raspberry-pi-5")
    local = measuring_transport(host, ProfileOptions())
    assert isinstance(local, LocalTransport) and local.memory_mb == host.hardware.usable_ram_mb
    assert local.cores is None and not local.on_device
    assert measuring_transport(host, ProfileOptions(memory_cap=False)).memory_mb is None  # type: ignore[union-attr]
    pinned = measuring_transport(pi, ProfileOptions(emulate_cores=4))
    assert isinstance(pinned, LocalTransport) and pinned.cores == 4
    assert measuring_transport(pi, ProfileOptions()) is None  # nothing measured: estimated
    dev = DeviceOptions(parse_device_url("ssh://pi@raspberrypi.local"))
    ssh = measuring_transport(host, ProfileOptions(device=dev))
    assert isinstance(ssh, SshTransport) and ssh.on_device
    fake = KilledTransport(None)
    assert measuring_transport(pi, ProfileOptions(device=dev, transport=fake)) is fake


@pytest.mark.parametrize(("target", "on_device", "section", "source"), [
    ("host", False, "host", "measured"),
    ("raspberry-pi-5", False, "host", "measured-on-host"),
    ("raspberry-pi-5", True, "device", "measured"),
])
def test_figures_are_labelled_by_where_they_ran(tmp_path: Path, target: str, on_device: bool, section: str,
                                                source: str) -> None:
    path = _model(tmp_path)
    fake = RecordingTransport(on_device)
    profile, figures = profile_artifact(onnx.load(str(path)), path, load_target(target), Workload(),
                                        vocab_size=None, options=_opts(fake))
    assert len(fake.calls) == 1 and fake.calls[0][0][0] == path
    assert profile[section]["source"] == source and ({"host", "device"} - {section}).isdisjoint(profile)
    assert {figures[k].source for k in ("peak_ram", "latency_p90", "load_time")} == {source}
    assert figures["latency_p90"].value == profile[section]["latency_ms"]["p90"] > 0
    if on_device:
        assert profile["device"]["device"] == "fake-pi" and "on fake-pi" in figures["peak_ram"].detail


@pytest.mark.parametrize("on_device", [False, True])
def test_a_kill_at_the_cap_fails_peak_ram_at_the_cap(tmp_path: Path, on_device: bool) -> None:
    path = _model(tmp_path)
    target = load_target("raspberry-pi-5")
    profile, figures = profile_artifact(onnx.load(str(path)), path, target, Workload(), vocab_size=None,
                                        options=_opts(KilledTransport(200.0, on_device)))
    section = "device" if on_device else "host"
    assert profile[section]["out_of_memory"] is True and profile[section]["memory_cap_mb"] == 200.0
    rows = {r.name: r for r in check(target.budgets, figures)}
    assert not rows["peak_ram"].passed and rows["peak_ram"].value == 200.0
    assert "killed at the 200 MB cap" in rows["peak_ram"].note


def test_a_kill_without_a_cap_is_out_of_memory_too(tmp_path: Path) -> None:
    """ssh.py's and local.py's uncapped "killed (out of memory?)" go through the same handler: a failed peak_ram
    (at the target's usable RAM: it did not finish), not a crash."""
    path = _model(tmp_path)
    target = load_target("raspberry-pi-5")
    profile, figures = profile_artifact(onnx.load(str(path)), path, target, Workload(), vocab_size=None,
                                        options=_opts(KilledTransport(None, on_device=True)))
    assert profile["device"]["out_of_memory"] is True and profile["device"]["memory_cap_mb"] is None
    peak = figures["peak_ram"]
    assert peak.failed and peak.value == target.hardware.usable_ram_mb and peak.source == "measured"
    assert "the runner on fake-pi was killed (out of memory?)" in peak.detail
    assert not {r.name: r for r in check(target.budgets, figures)}["peak_ram"].passed


def test_a_decoder_workload_goes_through_the_same_handler(tmp_path: Path) -> None:
    from test_llm import _grid_decoder_graph

    from edgecompress.model import save_model

    model = _grid_decoder_graph()
    path = tmp_path / "model.onnx"
    save_model(model, path)
    target = load_target("phone-arm64")
    dims = {"prompt_length": 128, "new_tokens": 64, "context_length": 2048, "kv_bytes_per_token": 46_080}
    profile, figures = profile_artifact(model, path, target, Workload(DECODER, dims), vocab_size=48,
                                        options=_opts(KilledTransport(300.0)))
    assert profile["kind"] == DECODER and profile["host"]["out_of_memory"] is True
    assert figures["peak_ram"].failed and figures["peak_ram"].value == 300.0
    assert figures["peak_ram"].source == "measured-on-host"
    # no transport: estimated, as before
    _, est = profile_artifact(model, path, target, Workload(DECODER, dims), vocab_size=48)
    assert est["peak_ram"].source == "estimated" and not est["peak_ram"].failed


def test_the_out_of_memory_rule() -> None:
    assert out_of_memory(cap_mb=None, killed=False) is None
    assert out_of_memory(cap_mb=None, killed=False, error="std::bad_alloc") is None  # no cap: the runner's error
    capped = out_of_memory(cap_mb=512.0, killed=False, error="Failed to allocate memory")
    assert isinstance(capped, OutOfMemory) and capped.cap_mb == 512.0
    assert out_of_memory(cap_mb=512.0, killed=False, oom_kills=1) is not None
    uncapped = out_of_memory(cap_mb=None, killed=True, where=" on pi")
    assert uncapped is not None and uncapped.cap_mb is None and "on pi was killed" in uncapped.message


def test_local_transport_is_a_runner_transport(tmp_path: Path) -> None:
    """A real local run: the result is the runner's, the limits say what was applied."""
    from edgecompress.profiling.local import input_specs, runner_spec

    path = _model(tmp_path)
    t: RunnerTransport = LocalTransport(memory_mb=None)
    run = t.run([path], runner_spec("ignored", input_specs(path, {}, None), threads=1, runs=2, warmup=0,
                                    min_seconds=0.0))
    assert run.result["ok"] and len(run.result["latencies_ms"]) >= 2 and run.limits["memory_cap_mb"] is None
