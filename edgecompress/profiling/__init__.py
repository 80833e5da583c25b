"""Profilers: local (this host, measured), estimate (roofline, labelled), and the self-contained runner.

`profile_artifact` is the one entry point `build` (and later `profile`) calls: it returns the profile section of
the manifest plus the figures the budgets are checked against, each with its source.
"""

from __future__ import annotations

import platform
from dataclasses import asdict
from pathlib import Path
from typing import Any

import onnx

from edgecompress.budget import Figure
from edgecompress.model import artifact_size_bytes
from edgecompress.progress import NullProgress, Progress
from edgecompress.targets import Target


def profile_artifact(model: onnx.ModelProto, model_path: Path, target: Target, dims: dict[str, int], *,
                     vocab_size: int | None, runs: int = 30, progress: Progress | None = None,
                     threads: int | None = None) -> tuple[dict[str, Any], dict[str, Figure]]:
    """threads: intra-op threads for a measurement on this host (default: the target's)."""
    from edgecompress.profiling.estimate import estimate
    from edgecompress.profiling.local import profile_local

    progress = progress or NullProgress()
    profile: dict[str, Any] = {"workload": dict(dims)}
    figures = {"size": Figure(artifact_size_bytes(model_path) / 1e6, "MB", "measured",
                              "model file plus external data")}
    with progress.step("estimate (roofline)"):
        est = estimate(model, target, dims)
    profile["estimate"] = {"source": "estimated", "method": est.method, "latency_ms": est.latency_ms,
                           "peak_ram_mb": est.peak_ram_mb, **est.details}
    if target.host:
        with progress.step(f"profile on this host ({runs} runs)"):
            hp = profile_local(model_path, dims=dims, vocab_size=vocab_size,
                               threads=threads or target.runtime.threads, runs=runs)
        profile["host"] = {"source": "measured", "latency_ms": asdict(hp.latency_ms), "load_ms": hp.load_ms,
                           "peak_rss_mb": hp.peak_rss_mb, "baseline_rss_mb": hp.baseline_rss_mb,
                           "model_rss_mb": hp.peak_rss_mb - hp.baseline_rss_mb, "session": hp.session,
                           "onnxruntime": hp.onnxruntime, "machine": platform.machine()}
        figures["peak_ram"] = Figure(hp.peak_rss_mb, "MB", "measured", "VmHWM of the runner process")
        figures["latency_p90"] = Figure(hp.latency_ms.p90, "ms", "measured")
    else:
        figures["peak_ram"] = Figure(est.peak_ram_mb, "MB", "estimated", "roofline memory model")
        figures["latency_p90"] = Figure(est.latency_ms, "ms", "estimated", "roofline")
    return profile, figures
