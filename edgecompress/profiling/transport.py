"""How runner.py gets run, where profile figures come from, and what an out-of-memory kill becomes: decided here.

Every launcher of the self-contained runner is a `RunnerTransport`: `run(files, spec) -> RunnerRun`, given the
model's files (model first, then its external data; any further file, e.g. fidelity inputs, goes into the job
directory by name) and the runner spec (runner.py). Implementations: `LocalTransport` (a fresh process on this
host, pinned and memory-capped where it can be: profiling/local.py), `SshTransport` (a lab device:
profiling/ssh.py), `EmulatorTransport` (the arm64 root under qemu-user: profiling/emulate.py); tests use a fake.
Each maps a kill of the runner through `out_of_memory`, the one rule, and raises the `OutOfMemory` it gives.

Encoder (`profiling/__init__.py`) and decoder (`profiling/decoder.py`) profiles ask `figure_source` which label a
measurement carries, pick the transport with `profiling.measuring_transport`, and turn `OutOfMemory` into the same
failed peak_ram figure with `record_out_of_memory`. Layering: errors, budget and targets only.
"""

from __future__ import annotations

import platform
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Protocol

from edgecompress.budget import Figure
from edgecompress.errors import ProfileError
from edgecompress.targets import Target

# spec keys that name a file in the job directory (a bare name; the transport resolves it where the runner runs)
JOB_FILES = ("batches", "outputs", "optimized_model_path")


@dataclass
class RunnerRun:
    """What a transport brings back: the runner's JSON result and what happened around the run."""

    result: dict[str, Any]
    limits: dict[str, Any] = field(default_factory=dict)  # this host: cores/memory cap applied (local.py)
    device: dict[str, Any] = field(default_factory=dict)  # a lab device: device, url, remote_python, removed
    warnings: list[str] = field(default_factory=list)
    fetched: dict[str, Path] = field(default_factory=dict)  # JOB_FILES key -> the runner's file, brought here


class RunnerTransport(Protocol):
    # True: the figures are the device's own ("device"/"measured"); False: this host's (figure_source)
    on_device: bool

    def run(self, files: list[Path], spec: dict[str, Any]) -> RunnerRun: ...


def model_files(model_path: Path) -> list[Path]:
    """model.onnx and its external-data files (relative names only: a location may not climb out)."""
    import onnx

    m = onnx.load(str(model_path), load_external_data=False)
    names: set[str] = set()
    for init in m.graph.initializer:
        if init.data_location == onnx.TensorProto.EXTERNAL:
            for kv in init.external_data:
                if kv.key == "location":
                    names.add(kv.value)
    files = [model_path]
    for name in sorted(names):
        p = PurePosixPath(name)
        if p.is_absolute() or ".." in p.parts:
            raise ProfileError(f"external data location '{name}' is not inside the bundle")
        files.append(model_path.parent / name)
    return files


def job_spec(spec: dict[str, Any], job_dir: str, model: str) -> dict[str, Any]:
    """The spec as the runner sees it in `job_dir`: the model's path, the work dir, JOB_FILES resolved."""
    out = {**spec, "model": model, "work_dir": job_dir}
    for key in JOB_FILES:
        if isinstance(out.get(key), str) and "/" not in out[key]:
            out[key] = f"{job_dir.rstrip('/')}/{out[key]}"
    return out


class OutOfMemory(ProfileError):
    """The runner was killed for memory: by our cap (cap_mb, the target's usable RAM) or, without one, by the
    system (cap_mb None: a SIGKILL with no cap of ours, most likely its out-of-memory killer)."""

    def __init__(self, message: str, hint: str | None = None, cap_mb: float | None = 0.0) -> None:
        super().__init__(message, hint)
        self.cap_mb = cap_mb

    def __reduce__(self) -> tuple[type, tuple[str, str | None, float | None]]:  # type: ignore[override]
        return (type(self), (self.message, self.hint, self.cap_mb))


def out_of_memory(*, cap_mb: float | None, killed: bool, oom_kills: int = 0, error: str = "",
                  where: str = "") -> OutOfMemory | None:
    """The one rule for a runner that did not finish: under our cap, a kill, a cgroup OOM kill or an allocation
    failure is out of memory at the cap; without a cap, a kill (SIGKILL) is out of memory as far as we can tell.
    None: not a memory failure (the caller reports its own error)."""
    if cap_mb and (killed or oom_kills or any(s in error for s in ("bad_alloc", "allocate"))):
        return OutOfMemory(f"out of memory: the model does not run within {cap_mb:.0f} MB",
                           hint="the target's usable RAM; choose a smaller recipe", cap_mb=cap_mb)
    if killed:
        return OutOfMemory(f"the runner{where} was killed (out of memory?)",
                           hint="a smaller recipe, or a device with more free memory", cap_mb=None)
    return None


def figure_source(target: Target, *, on_device: bool) -> tuple[str, str]:
    """(profile section, source label) of a measurement.

    A lab device over ssh is "measured" in "device"; this host measures a host target as itself ("measured"),
    any other target only stands in for it ("measured-on-host"), both in "host"."""
    if on_device:
        return "device", "measured"
    return "host", ("measured" if target.host else "measured-on-host")


def record_out_of_memory(profile: dict[str, Any], figures: dict[str, Figure], section: str, source: str,
                         error: OutOfMemory, target: Target) -> None:
    """A memory kill is a result, not a crash: peak_ram fails, the profile says why. Under our cap the figure is
    the cap; killed without one it is the target's usable RAM (the run did not finish: at least that much)."""
    if error.cap_mb:
        value, cap = error.cap_mb, error.cap_mb
        note = f"out of memory: killed at the {cap:.0f} MB cap (the target's usable RAM)"
    else:
        value, cap = float(target.hardware.usable_ram_mb), None
        note = (f"{error.message}: killed without a memory cap of ours, so it did not finish; counted as the "
                f"target's usable RAM ({value:.0f} MB)")
    profile[section] = {"source": source, "out_of_memory": True, "memory_cap_mb": cap, "note": note}
    if section == "host":
        profile[section]["machine"] = platform.machine()
    figures["peak_ram"] = Figure(value, "MB", source, note, failed=True)
