"""Profilers: local (this host, measured), estimate (roofline, labelled), and the self-contained runner.

`profile_artifact` is the one entry point `build` (and later `profile`) calls: it returns the profile section of
the manifest plus the figures the budgets are checked against, each with its source.
"""

from __future__ import annotations

import contextlib
import platform
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import onnx

from edgecompress.budget import BudgetRow, Figure
from edgecompress.model import artifact_size_bytes
from edgecompress.progress import NullProgress, Progress
from edgecompress.targets import Target

if TYPE_CHECKING:
    from edgecompress.profiling.ssh import DeviceOptions


@dataclass(frozen=True)
class ProfileOptions:
    """How to measure. Where the figures come from, first match wins: device (ssh), emulate (Arm under qemu,
    profiling/emulate.py), this host (a host target, or any target with emulate_cores), else the roofline."""

    runs: int = 30
    threads: int | None = None  # intra-op threads on this host (default: the target's, capped at the cores)
    emulate_cores: int | None = None  # measure here pinned to N cores, threads capped at N
    memory_cap: bool = True  # cap the runner at the target's usable RAM (cgroup v1) where this host allows
    op_profile_runs: int = 5  # runs of a second, ORT-profiled session for the per-op table; 0: none
    min_seconds: float = 1.0
    device: DeviceOptions | None = None  # ssh lab device (profiling/ssh.py)
    # --emulate (profiling/emulate.py) adds its field here and its branch in profile_artifact


def profile_artifact(model: onnx.ModelProto, model_path: Path, target: Target, dims: dict[str, int], *,
                     vocab_size: int | None, runs: int = 30, progress: Progress | None = None,
                     threads: int | None = None, options: ProfileOptions | None = None,
                     ) -> tuple[dict[str, Any], dict[str, Figure]]:
    """threads: intra-op threads for a measurement on this host (default: the target's).

    options (from `edgecompress profile`) overrides runs and threads."""
    from edgecompress.profiling.estimate import estimate

    opts = options or ProfileOptions(runs=runs, threads=threads)
    progress = progress or NullProgress()
    from edgecompress.profiling.decoder import is_decoder_workload, profile_decoder

    if is_decoder_workload(dims):  # a causal LM (tasks.DecoderTask): prefill + token-by-token decode
        measure = opts.device is None and bool(target.host or opts.emulate_cores)
        where = (f" on {opts.device.url.name}" if opts.device is not None else " on this host" if measure
                 else ", estimated")
        with progress.step(f"profile decoder (prefill, decode){where}"):
            return profile_decoder(model, model_path, target, dims, vocab_size=vocab_size, threads=opts.threads,
                                   cores=opts.emulate_cores, measure=measure, device=opts.device,
                                   memory_cap_mb=float(target.hardware.usable_ram_mb) if opts.memory_cap else None)
    profile: dict[str, Any] = {"workload": dict(dims)}
    figures = {"size": Figure(artifact_size_bytes(model_path) / 1e6, "MB", "measured",
                              "model file plus external data")}
    with progress.step("estimate (roofline)"):
        est = estimate(model, target, dims)
    profile["estimate"] = {"source": "estimated", "method": est.method, "latency_ms": est.latency_ms,
                           "peak_ram_mb": est.peak_ram_mb, **est.details}
    if opts.device is not None:
        with progress.step(f"profile on {opts.device.url.name} ({opts.runs} runs)"):
            _measure_on_device(model_path, target, dims, vocab_size, opts, profile, figures)
    # elif opts.emulate: ... (profiling/emulate.py)
    elif target.host or opts.emulate_cores:
        with progress.step(f"profile on this host ({opts.runs} runs)"):
            _measure_here(model_path, target, dims, vocab_size, opts, profile, figures)
    else:
        figures["peak_ram"] = Figure(est.peak_ram_mb, "MB", "estimated", "roofline memory model")
        figures["latency_p90"] = Figure(est.latency_ms, "ms", "estimated", "roofline")
    return profile, figures


def _measure_here(model_path: Path, target: Target, dims: dict[str, int], vocab_size: int | None,
                  opts: ProfileOptions, profile: dict[str, Any], figures: dict[str, Figure]) -> None:
    from edgecompress.profiling.local import OutOfMemory, profile_local
    from edgecompress.profiling.transport import figure_source, record_out_of_memory

    section, source = figure_source(target, on_device=False)
    # pin only when asked: a sweep runs several jobs at once, each already given its share of threads
    cores = opts.emulate_cores
    cap = float(target.hardware.usable_ram_mb) if opts.memory_cap else None
    try:
        hp = profile_local(model_path, dims=dims, vocab_size=vocab_size,
                           threads=opts.threads or target.runtime.threads, runs=opts.runs,
                           min_seconds=opts.min_seconds, cores=cores, memory_cap_mb=cap,
                           op_profile_runs=opts.op_profile_runs)
    except OutOfMemory as e:
        record_out_of_memory(profile, figures, section, source, e.cap_mb)
        return
    profile[section] = {**hp.section(source), "machine": platform.machine()}
    where = "VmHWM of the runner process" + ("" if target.host else f" on this host pinned to {cores} cores")
    figures["peak_ram"] = Figure(hp.peak_rss_mb, "MB", source, where)
    figures["latency_p90"] = Figure(hp.latency_ms.p90, "ms", source, "p90, single stream (MLPerf)")
    figures["load_time"] = Figure(hp.load_ms, "ms", source, "session creation")


def _measure_on_device(model_path: Path, target: Target, dims: dict[str, int], vocab_size: int | None,
                       opts: ProfileOptions, profile: dict[str, Any], figures: dict[str, Figure]) -> None:
    from edgecompress.profiling.local import HostProfile, input_specs, runner_spec
    from edgecompress.profiling.ssh import profile_on_device

    assert opts.device is not None
    threads = opts.threads or target.runtime.threads
    spec = runner_spec(model_path.name, input_specs(model_path, dims, vocab_size), threads=threads, runs=opts.runs,
                       min_seconds=opts.min_seconds, max_seconds=max(1.0, opts.device.run_timeout_s * 0.8),
                       op_profile_runs=opts.op_profile_runs)
    run = profile_on_device(model_path, spec, opts.device)
    hp = HostProfile.from_result(run.result, dims, {"threads": threads, "warnings": run.warnings})
    profile["device"] = {**hp.section("measured"), "device": run.device, "url": str(opts.device.url),
                         "remote_python": run.remote_python, "python": run.result.get("python"),
                         "remote_dir_removed": run.removed}
    on = f"on {run.device}"
    figures["peak_ram"] = Figure(hp.peak_rss_mb, "MB", "measured", f"VmHWM of the runner {on}")
    figures["latency_p90"] = Figure(hp.latency_ms.p90, "ms", "measured", f"p90, single stream (MLPerf), {on}")
    figures["load_time"] = Figure(hp.load_ms, "ms", "measured", f"session creation {on}")


# --- `edgecompress profile`: an existing bundle ------------------------------------------------------------------
@dataclass
class BundleProfile:
    bundle: Path
    target: Target
    profile: dict[str, Any]
    budgets: list[BudgetRow]
    manifest: dict[str, Any]  # the bundle's manifest.json as read (untouched unless update_bundle)

    @property
    def passed(self) -> bool:
        return all(r.passed for r in self.budgets)

    def summary(self) -> dict[str, Any]:
        measured = self.profile.get("device") or self.profile.get("host") or {}
        return {"bundle": str(self.bundle), "target": self.target.name, "passed": self.passed,
                "measured": {k: measured[k] for k in ("source", "device", "latency_ms", "load_ms", "peak_rss_mb",
                                                       "baseline_rss_mb", "limits", "out_of_memory", "note",
                                                       "by_threads", "peak_ram_with_kv_at_context_mb")
                             if k in measured},
                "estimate": {k: self.profile["estimate"][k] for k in ("latency_ms", "peak_ram_mb", "decode_tok_s",
                                                                      "ttft_ms") if k in self.profile["estimate"]},
                "ops": (measured.get("ops") or {}).get("by_op_type", [])[:10],
                "budgets": [r.as_dict() for r in self.budgets], "failed": [r.miss() for r in self.budgets
                                                                            if not r.passed]}


def read_bundle(bundle: Path) -> tuple[dict[str, Any], Path]:
    """(manifest.json as a dict, the model path), every file the manifest names verified (verify_bundle).

    A BundleError (exit 10) names what is missing or malformed; BundleTampered (exit 16) what does not match."""
    import json

    from edgecompress.errors import BundleError

    hint = "give a directory written by `edgecompress build` (model.onnx + manifest.json)"
    if not bundle.is_dir():
        raise BundleError(f"not a bundle: {bundle} is not a directory", hint=hint)
    mpath = bundle / "manifest.json"
    if not mpath.is_file():  # is_file: a regular file (a FIFO would block the read)
        raise BundleError(f"not a bundle: {bundle} has no manifest.json", hint=hint)
    if mpath.stat().st_size > 64 * 2**20:
        raise BundleError(f"not a bundle: {mpath} is larger than 64 MiB", hint=hint)
    try:
        manifest = json.loads(mpath.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise BundleError(f"not a bundle: {mpath} is not a readable manifest ({e})", hint=hint) from None
    if not isinstance(manifest, dict):
        raise BundleError(f"not a bundle: {mpath} is not a JSON object", hint=hint)
    for key, kind in (("source", dict), ("target", dict), ("recipe", dict), ("fidelity", dict), ("profile", dict),
                      ("budgets", list)):
        if key in manifest and not isinstance(manifest[key], kind):
            raise BundleError(f"malformed manifest {mpath}: '{key}' must be a JSON "
                              f"{'object' if kind is dict else 'array'}", hint=hint)
    return manifest, verify_bundle(bundle, manifest)


def _named_file(bundle: Path, name: object, field: str) -> Path:
    """A file the manifest names: a relative path that resolves (symlinks followed) inside the bundle."""
    from edgecompress.errors import BundleError, BundleTampered

    if not isinstance(name, str) or not name or "\x00" in name:
        raise BundleError(f"malformed manifest in {bundle}: {field} must be a file name, got {name!r}")
    p = bundle / name
    root = bundle.resolve()
    if Path(name).is_absolute() or root not in p.resolve().parents:
        raise BundleTampered(f"bundle {bundle} failed verification: {field} '{name}' points outside the bundle",
                             hint="rebuild the bundle; never profile a bundle from an untrusted source")
    return p


def verify_bundle(bundle: Path, manifest: dict[str, Any]) -> Path:
    """Check every file the manifest names before anything reads it: inside the bundle, a regular file, and
    matching its recorded sha256 (artifact.sha256 for the model, artifact.hashes for every other file; bundles of
    older versions have only the first). Returns the model path."""
    import re

    from edgecompress.errors import BundleError, BundleTampered
    from edgecompress.model import UnsafeExternalData, artifact_files, sha256_file

    art = manifest.get("artifact")
    if not isinstance(art, dict):
        raise BundleError(f"malformed manifest in {bundle}: no artifact section",
                          hint="give a directory written by `edgecompress build`")
    model_path = _named_file(bundle, art.get("file", "model.onnx"), "artifact.file")
    files = art.get("files", [])
    hashes = art.get("hashes", {})
    recorded = art.get("sha256")
    if not isinstance(files, list) or not isinstance(hashes, dict) or not isinstance(recorded, str) \
            or not re.fullmatch(r"[0-9a-f]{64}", recorded):
        raise BundleError(f"malformed manifest in {bundle}: artifact.files must be a list, artifact.hashes a "
                          "mapping and artifact.sha256 a sha256 hex digest",
                          hint="give a directory written by `edgecompress build`")
    tampered = "rebuild the bundle, or restore the file from the original build"
    hint = "give a directory written by `edgecompress build` (model.onnx + manifest.json)"
    for path in (model_path, *(_named_file(bundle, name, "artifact.files") for name in files)):
        if not path.exists():
            raise BundleError(f"not a bundle: {bundle} has no {path.relative_to(bundle)}", hint=hint)
    checks = {model_path: recorded}
    for name, digest in hashes.items():
        if not isinstance(digest, str):
            raise BundleError(f"malformed manifest in {bundle}: artifact.hashes['{name}'] is not a digest")
        checks.setdefault(_named_file(bundle, name, "artifact.hashes"), digest)
    for path, digest in checks.items():
        if not path.is_file():
            what = f"has no {path.relative_to(bundle)}" if not path.exists() else \
                f"has {path.relative_to(bundle)}, which is not a regular file"
            raise BundleError(f"not a bundle: {bundle} {what}", hint=hint)
        if sha256_file(path) != digest:
            raise BundleTampered(f"bundle {bundle} failed verification: {path.relative_to(bundle)} does not match "
                                 "the sha256 in manifest.json (modified after the build)", hint=tampered)
    try:
        data_files = artifact_files(model_path)[1:]
    except UnsafeExternalData as e:
        raise BundleTampered(f"bundle {bundle} failed verification: {e}", hint=tampered) from None
    except Exception as e:  # not ONNX at all: the recorded hash matched, so the build wrote it this way
        raise BundleError(f"not a bundle: {model_path} is not a readable ONNX model "
                          f"({(str(e).splitlines() or [type(e).__name__])[0]})") from None
    unhashed = [p for p in data_files if hashes and p.relative_to(bundle).as_posix() not in hashes]
    if unhashed:
        raise BundleTampered(f"bundle {bundle} failed verification: {unhashed[0].name} is external data the "
                             "manifest has no hash for", hint=tampered)
    return model_path


def bundle_dims(model: onnx.ModelProto, bundle: Path, target: Target) -> dict[str, int]:
    """The target's workload on the model's symbolic dims: the first is the batch, the others the sequence
    (capped at config.json's max_position_embeddings), as the build's tasks do."""
    import json

    seq = target.workload.sequence_length
    try:
        cfg = json.loads((bundle / "config.json").read_text(encoding="utf-8"))
        seq = min(seq, int(cfg.get("max_position_embeddings") or seq))
    except (OSError, ValueError, TypeError, AttributeError):
        pass
    dims: dict[str, int] = {}
    inits = {i.name for i in model.graph.initializer}
    for inp in model.graph.input:
        if inp.name in inits:
            continue
        for i, d in enumerate(inp.type.tensor_type.shape.dim):
            if d.dim_param:
                dims.setdefault(d.dim_param, target.workload.batch if i == 0 else seq)
    return dims


def profile_bundle(bundle: Path, target: str | Path, options: ProfileOptions | None = None,
                   progress: Progress | None = None, emulated: dict[str, Any] | None = None) -> BundleProfile:
    """Profile an existing bundle for a target; writes nothing (see update_bundle).

    `emulated`: the report of profiling.emulate.emulate_bundle; its fidelity, computed by Arm kernels, replaces the
    build's host-computed fidelity in the budget rows (source `emulated`) and is kept in the profile section.
    """
    import json

    from edgecompress import budget
    from edgecompress.errors import BundleError
    from edgecompress.metrics import METRICS
    from edgecompress.profiling.decoder import DECODER_TASK, bundle_decoder_dims
    from edgecompress.targets import load_target

    tgt = load_target(target)
    manifest, model_path = read_bundle(Path(bundle))
    if isinstance(manifest.get("recipe"), dict) and manifest["recipe"].get("components"):
        from edgecompress.errors import UsageError

        # one file's figures would be reported as the whole model's: refuse rather than mislead
        raise UsageError(f"{bundle} is a multi-file model ({', '.join(manifest['recipe']['components'])}): "
                         "`profile` measures one file and cannot compose a clip's figures yet",
                         hint="rebuild it for the target with `edgecompress build`, whose profile composes them")
    try:
        model = onnx.load(str(model_path))
    except Exception as e:  # a truncated or foreign file: not something we built
        raise BundleError(f"not a bundle: {model_path} is not a readable ONNX model ({e})") from None
    vocab = None
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
        vocab = int(json.loads((model_path.parent / "config.json").read_text(encoding="utf-8"))["vocab_size"])
    # a decoder is profiled as one (prefill, decode tok/s, KV cache) and held to the target's decoder budgets
    dec_dims = bundle_decoder_dims(model, model_path.parent, manifest, tgt)
    if dec_dims is not None:
        tgt = tgt.for_task(DECODER_TASK)
    dims = dec_dims if dec_dims is not None else bundle_dims(model, model_path.parent, tgt)
    profile, figures = profile_artifact(model, model_path, tgt, dims, vocab_size=vocab, progress=progress,
                                        options=options or ProfileOptions())
    for name, value in (manifest.get("fidelity") or {}).get("metrics", {}).items():
        if name in METRICS and isinstance(value, (int, float)):
            figures[name] = budget.Figure(float(value), METRICS[name].unit, "measured-on-host")
    if emulated is not None:
        profile["emulated"] = emulated
        arm = (emulated.get("fidelity") or {}).get("arm") or {}
        for name, value in arm.items():
            if name in METRICS and isinstance(value, (int, float)):
                figures[name] = budget.Figure(float(value), METRICS[name].unit, "emulated",
                                              f"Arm kernels under qemu ({emulated.get('qemu_cpu')})")
    return BundleProfile(Path(bundle), tgt, profile, budget.check(tgt.budgets, figures), manifest)


def update_bundle(result: BundleProfile) -> None:
    """Rewrite the bundle's manifest.json (profile, budgets), report.md and report.html, each atomically."""
    import os
    import tempfile

    from edgecompress.errors import UsageError
    from edgecompress.manifest import Manifest
    from edgecompress.report import render_html, render_markdown

    built_for = (result.manifest.get("target") or {}).get("name")
    if built_for != result.target.name:
        raise UsageError(f"--update: the bundle was built for '{built_for}', not '{result.target.name}'",
                         hint=f"profile it with --target {built_for}, or drop --update")
    verify_bundle(result.bundle, result.manifest)  # again: a file may have changed while we measured
    try:
        m = Manifest.from_dict(result.manifest)
    except (TypeError, KeyError, ValueError, AttributeError) as e:
        from edgecompress.errors import BundleError

        raise BundleError(f"--update: malformed manifest in {result.bundle} ({type(e).__name__}: {e})",
                          hint="rebuild the bundle") from None
    # keep what the build added (e.g. fp32_baseline); a new measurement replaces the old measured sections
    m.profile = {**{k: v for k, v in m.profile.items() if k not in ("host", "device")}, **result.profile}
    m.budgets = result.budgets
    for name, text in (("manifest.json", m.to_json()), ("report.md", render_markdown(m)),
                       ("report.html", render_html(m))):
        fd, tmp = tempfile.mkstemp(prefix=f".{name}.", dir=result.bundle)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(text)
            os.replace(tmp, result.bundle / name)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
