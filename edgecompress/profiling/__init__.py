"""Profilers: local (this host, measured), estimate (roofline, labelled), and the self-contained runner.

`profile_artifact` is the one entry point `build` (and later `profile`) calls: it returns the profile section of
the manifest plus the figures the budgets are checked against, each with its source.
"""

from __future__ import annotations

import contextlib
import logging
import platform
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import onnx

from edgecompress.budget import BudgetRow, Figure
from edgecompress.model import artifact_size_bytes
from edgecompress.profiling.workload import DECODER, FORWARD, Workload, recorded_budget_section
from edgecompress.progress import NullProgress, Progress
from edgecompress.targets import Target

if TYPE_CHECKING:
    from edgecompress.profiling.cost import NodeCost
    from edgecompress.profiling.ssh import DeviceOptions
    from edgecompress.profiling.transport import RunnerTransport

log = logging.getLogger(__name__)


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
    # measure through this RunnerTransport instead (tests: a fake launcher); wins over device and this host
    transport: RunnerTransport | None = None


def measuring_transport(target: Target, opts: ProfileOptions) -> RunnerTransport | None:
    """The one decision of where a measurement runs: the given transport, else a lab device over ssh, else this
    host for a host target or with --emulate-cores (pinned, capped at the target's usable RAM where it can be);
    None: nothing is measured, the figures are estimated. (--emulate is numerics only: profiling/emulate.py.)"""
    if opts.transport is not None:
        return opts.transport
    if opts.device is not None:
        from edgecompress.profiling.ssh import SshTransport

        return SshTransport(opts.device)
    if target.host or opts.emulate_cores:
        from edgecompress.profiling.local import LocalTransport

        # pin only when asked: a sweep runs several jobs at once, each already given its share of threads
        return LocalTransport(cores=opts.emulate_cores,
                              memory_mb=float(target.hardware.usable_ram_mb) if opts.memory_cap else None)
    return None


def profile_artifact(model: onnx.ModelProto, model_path: Path, target: Target, workload: Workload, *,
                     vocab_size: int | None, runs: int = 30, progress: Progress | None = None,
                     threads: int | None = None, options: ProfileOptions | None = None,
                     ) -> tuple[dict[str, Any], dict[str, Figure]]:
    """workload: what the task adapter asks for (its kind and dims). threads: intra-op threads for a measurement
    on this host (default: the target's).

    options (from `edgecompress profile`) overrides runs and threads."""
    from edgecompress.profiling.estimate import estimate

    opts = options or ProfileOptions(runs=runs, threads=threads)
    progress = progress or NullProgress()
    dims = workload.dims
    transport = measuring_transport(target, opts)
    where = (f" on {opts.device.url.name}" if opts.device is not None and transport is not None
             and transport.on_device else "" if transport is None else " on this host")
    if workload.kind == DECODER:  # a causal LM: prefill + token-by-token decode
        from edgecompress.profiling.decoder import profile_decoder

        with progress.step(f"profile decoder (prefill, decode){where or ', estimated'}"):
            return profile_decoder(model, model_path, target, dims, vocab_size=vocab_size, threads=opts.threads,
                                   transport=transport)
    profile: dict[str, Any] = {"workload": dict(dims)}
    figures = {"size": Figure(artifact_size_bytes(model_path) / 1e6, "MB", "measured",
                              "model file plus external data")}
    with progress.step("estimate (roofline)"):
        est = estimate(model, target, dims)
    profile["estimate"] = {"source": "estimated", "method": est.method, "latency_ms": est.latency_ms,
                           "peak_ram_mb": est.peak_ram_mb, **est.details}
    if transport is not None:
        with progress.step(f"profile{where} ({opts.runs} runs)"):
            _measure(model_path, target, dims, vocab_size, opts, transport, profile, figures)
    else:
        figures["peak_ram"] = Figure(est.peak_ram_mb, "MB", "estimated", "roofline memory model")
        figures["latency_p90"] = Figure(est.latency_ms, "ms", "estimated", "roofline")
    return profile, figures


def estimated_latency_ms(model: onnx.ModelProto, model_bytes: float, target: Target, workload: Workload) -> float:
    """The estimate's latency figure for the workload: one forward pass, or one decode step for a decoder."""
    if workload.kind == DECODER:
        from edgecompress.profiling.decoder import estimate_decoder

        return float(estimate_decoder(model, model_bytes, target, workload.dims)["decode_step_ms"])
    from edgecompress.profiling.estimate import estimate

    return estimate(model, target, workload.dims).latency_ms


@dataclass(frozen=True)
class WeightsPrediction:
    """--recipe auto's figures before building, from the weights' bytes alone (search.predict)."""

    resident_mb: float
    latency_ms: float | None
    decode_tok_s: float | None = None  # a decoder workload: bandwidth-bound decode, compute-bound prefill
    ttft_ms: float | None = None


def predict_from_weights(workload: Workload, target: Target, *, resident_bytes: float, params: float,
                         forward_costs: Callable[[], list[NodeCost]]) -> WeightsPrediction:
    """resident_bytes: the weights once loaded; params: their count; forward_costs: the graph's per-node costs as
    the candidate would run them (only a forward workload reads them: a roofline over them)."""
    if workload.kind == DECODER:  # memory includes the KV cache, latency is one decode step
        from edgecompress.profiling.decoder import estimate_decoder_from

        est = estimate_decoder_from(resident_bytes, params, target, workload.dims)
        return WeightsPrediction(est["peak_ram_mb"], est["decode_step_ms"], est["decode_tok_s"], est["ttft_ms"])
    latency = None
    try:
        from edgecompress.profiling.estimate import roofline_ms

        latency, _ = roofline_ms(forward_costs(), target)
    except Exception as e:  # the prediction is an optimisation; building still measures
        log.debug("no latency prediction: %s", e)
    return WeightsPrediction(resident_bytes / 2**20 + target.estimate.runtime_baseline_mb, latency)


def _measure(model_path: Path, target: Target, dims: dict[str, int], vocab_size: int | None,
             opts: ProfileOptions, transport: RunnerTransport, profile: dict[str, Any],
             figures: dict[str, Figure]) -> None:
    """One forward-pass workload measured through the transport: latency p90, peak RAM, load time."""
    from edgecompress.profiling.local import HostProfile, input_specs, runner_spec
    from edgecompress.profiling.transport import OutOfMemory, figure_source, model_files, record_out_of_memory

    section, source = figure_source(target, on_device=transport.on_device)
    threads = opts.threads or target.runtime.threads
    cores = None if transport.on_device else opts.emulate_cores
    if cores:  # pinned to the target's cores: no more threads than cores
        threads = min(threads, cores) if threads else cores
    device = opts.device if transport.on_device else None
    # on a device the run must end well within its run timeout; here, the runner's own 300 s ceiling
    max_seconds = max(1.0, device.run_timeout_s * 0.8) if device else 300.0
    spec = runner_spec(model_path.name if device else str(model_path), input_specs(model_path, dims, vocab_size),
                       threads=threads, runs=opts.runs, min_seconds=opts.min_seconds, max_seconds=max_seconds,
                       op_profile_runs=opts.op_profile_runs)
    try:
        run = transport.run(model_files(model_path) if transport.on_device else [model_path], spec)
    except OutOfMemory as e:
        record_out_of_memory(profile, figures, section, source, e, target)
        return
    if not transport.on_device:
        limits = dict(run.limits)
        limits["threads"] = threads
        hp = HostProfile.from_result(run.result, dims, limits)
        profile[section] = {**hp.section(source), "machine": platform.machine()}
        where = "VmHWM of the runner process" + ("" if target.host else f" on this host pinned to {cores} cores")
        figures["peak_ram"] = Figure(hp.peak_rss_mb, "MB", source, where)
        figures["latency_p90"] = Figure(hp.latency_ms.p90, "ms", source, "p90, single stream (MLPerf)")
        figures["load_time"] = Figure(hp.load_ms, "ms", source, "session creation")
        return
    hp = HostProfile.from_result(run.result, dims, {"threads": threads, "warnings": run.warnings})
    dev = run.device
    profile[section] = {**hp.section(source), "device": dev.get("device"), "url": dev.get("url"),
                        "remote_python": dev.get("remote_python"), "python": run.result.get("python"),
                        "remote_dir_removed": dev.get("remote_dir_removed")}
    on = f"on {dev.get('device')}"
    figures["peak_ram"] = Figure(hp.peak_rss_mb, "MB", source, f"VmHWM of the runner {on}")
    figures["latency_p90"] = Figure(hp.latency_ms.p90, "ms", source, f"p90, single stream (MLPerf), {on}")
    figures["load_time"] = Figure(hp.load_ms, "ms", source, f"session creation {on}")


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
    from edgecompress.profiling.decoder import bundle_decoder_dims
    from edgecompress.targets import load_target
    from edgecompress.taskspec import METRICS

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
    # a decoder is profiled as one (prefill, decode tok/s, KV cache); the bundle is held to the budget section its
    # build recorded (its task's fact: a decoder's [budgets.decoder])
    dec_dims = bundle_decoder_dims(model, model_path.parent, manifest, tgt)
    tgt = tgt.for_budget_section(recorded_budget_section(manifest, decoder=dec_dims is not None))
    workload = (Workload(DECODER, dec_dims) if dec_dims is not None
                else Workload(FORWARD, bundle_dims(model, model_path.parent, tgt)))
    profile, figures = profile_artifact(model, model_path, tgt, workload, vocab_size=vocab, progress=progress,
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
