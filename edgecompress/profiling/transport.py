"""Where profile figures come from, and what an out-of-memory kill becomes: decided here, once.

Encoder (`profiling/__init__.py`) and decoder (`profiling/decoder.py`) profiles both ask `figure_source` which label
a measurement carries and both turn a runner killed at the memory cap into the same failed peak_ram figure with
`record_out_of_memory`. `RunnerTransport` is the shape every launcher of runner.py has (local, ssh, emulator):
given the files and the runner spec, the runner's result dict.
"""

from __future__ import annotations

import platform
from pathlib import Path
from typing import Any, Protocol

from edgecompress.budget import Figure
from edgecompress.targets import Target


class RunnerTransport(Protocol):
    def run(self, files: list[Path], spec: dict[str, Any]) -> dict[str, Any]: ...


def figure_source(target: Target, *, on_device: bool) -> tuple[str, str]:
    """(profile section, source label) of a measurement.

    A lab device over ssh is "measured" in "device"; this host measures a host target as itself ("measured"),
    any other target only stands in for it ("measured-on-host"), both in "host"."""
    if on_device:
        return "device", "measured"
    return "host", ("measured" if target.host else "measured-on-host")


def record_out_of_memory(profile: dict[str, Any], figures: dict[str, Figure], section: str, source: str,
                         cap_mb: float) -> None:
    """A kill at the memory cap is a result, not a crash: peak_ram fails at the cap, the profile says why."""
    note = f"out of memory: killed at the {cap_mb:.0f} MB cap (the target's usable RAM)"
    profile[section] = {"source": source, "out_of_memory": True, "memory_cap_mb": cap_mb, "note": note,
                        "machine": platform.machine()}
    figures["peak_ram"] = Figure(cap_mb, "MB", source, note, failed=True)
