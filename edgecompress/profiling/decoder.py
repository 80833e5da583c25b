"""Profiling a decoder (causal LM with its KV cache): prefill, decode tokens/s, time to first token, memory.

On this host (a host target, or --emulate-cores) the runner's decoder mode generates in a fresh process at one
thread and at the target's thread count. Elsewhere it is estimated and labelled so: decoding reads every weight
and the KV cache so far once per token (bandwidth-bound), prefill is compute-bound. The memory figure adds the KV
cache at the target's context length, whichever way the rest was obtained.
"""

from __future__ import annotations

import platform
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx

from edgecompress.budget import Figure
from edgecompress.model import artifact_size_bytes
from edgecompress.profiling.workload import DECODER, recorded_kind
from edgecompress.targets import Target

if TYPE_CHECKING:
    from edgecompress.profiling.transport import RunnerTransport


def decoder_dims(target: Target, kv_bytes_per_token: int) -> dict[str, int]:
    """The target's decoder workload, keyed as the decoder task adapter's profile_dims keys it (and so the runner
    and the estimate read it): the prompt prefilled with an empty cache, then new_tokens decoded one at a time."""
    wl = target.workload
    prompt = min(wl.prompt_length, wl.context_length)
    return {"batch_size": 1, "sequence_length": prompt, "past_sequence_length": 0,
            "past_sequence_length + sequence_length": prompt, "prompt_length": prompt,
            "new_tokens": wl.new_tokens, "context_length": wl.context_length,
            "kv_bytes_per_token": kv_bytes_per_token}


def bundle_decoder_dims(model: onnx.ModelProto, bundle: Path, manifest: dict[str, Any], target: Target
                        ) -> dict[str, int] | None:
    """A decoder bundle's workload on `target`, or None when the bundle is not a decoder's.

    A decoder is what the build profiled as one (manifest profile.kind) or a graph fed its own KV cache
    (past_key_values.* inputs). The KV bytes per token come from config.json's shape and the cache inputs' element
    type."""
    import json

    from edgecompress.errors import BundleError, ConfigError
    from edgecompress.llm import decoder_shape

    past = [i for i in model.graph.input if i.name.startswith("past_key_values")]
    if recorded_kind(manifest) != DECODER and not past:
        return None
    try:
        config = json.loads((bundle / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise BundleError(f"decoder bundle {bundle}: no readable config.json ({e})",
                          hint="a decoder bundle carries the model's config.json; rebuild it") from None
    shape = decoder_shape(config)  # a ModelError (usage) if it lacks the layer/head sizes
    kv_bytes = 2 if past and past[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT16 else 4
    wl = target.workload
    if shape.max_positions and wl.context_length > shape.max_positions:
        raise ConfigError(f"target {target.name}: context_length {wl.context_length} exceeds the model's maximum "
                          f"of {shape.max_positions} positions",
                          hint="lower [workload] context_length in the target file")
    return decoder_dims(target, shape.kv_bytes_per_token(kv_bytes))


def weight_elements(model: onnx.ModelProto) -> int:
    """Parameters behind the initializers: a packed 4-bit uint8 byte (4-bit MatMulNBits, *.q4) holds two."""
    total = 0
    packed = {n.input[1] for n in model.graph.node if n.op_type == "MatMulNBits"
              and next((a.i for a in n.attribute if a.name == "bits"), 4) == 4}
    for init in model.graph.initializer:
        n = int(np.prod(init.dims)) if init.dims else 1
        total += 2 * n if init.name in packed or init.name.endswith(".q4") else n
    return total


def estimate_decoder(model: onnx.ModelProto, weight_bytes: float, target: Target, dims: dict[str, int]
                     ) -> dict[str, Any]:
    """weight_bytes: the file's; a graph whose weights ORT decodes at load (codebooks) is estimated at its decoded
    size, and its memory at the load-time folding peak when that is higher (profiling/weights.py)."""
    from edgecompress.profiling.weights import weight_memory

    wm = weight_memory(model)
    if not wm.folds:
        return estimate_decoder_from(weight_bytes, weight_elements(model), target, dims)
    return estimate_decoder_from(max(weight_bytes, wm.resident_bytes), weight_elements(model), target, dims,
                                 load_peak_bytes=wm.load_peak_bytes)


def estimate_decoder_from(weight_bytes: float, params: float, target: Target, dims: dict[str, int],
                          load_peak_bytes: float | None = None) -> dict[str, Any]:
    """The estimate from the weights' bytes and parameter count alone (also --recipe auto's prediction)."""
    hw, eff = target.hardware, target.estimate
    kv_token = dims["kv_bytes_per_token"]
    # mean context while generating: the prompt plus half the new tokens
    mean_ctx = dims["prompt_length"] + dims["new_tokens"] / 2
    bytes_per_token = weight_bytes + kv_token * mean_ctx
    tok_s = eff.bandwidth_efficiency * hw.bandwidth_gbs * 1e9 / bytes_per_token
    flops = 2.0 * params * dims["prompt_length"]
    prefill_ms = flops / (hw.peak_gflops_fp32 * 1e9 * eff.compute_efficiency) * 1e3
    kv_ctx = kv_token * dims["context_length"]
    # the KV cache grows after the session is loaded, so a load-time folding peak competes with it, not adds
    ram_mb = eff.runtime_baseline_mb + max(weight_bytes + kv_ctx, load_peak_bytes or 0.0) / 1e6
    return {"source": "estimated", "method": "decode: bandwidth x efficiency / (weight + KV bytes per token); "
                                              "prefill: 2 x params x prompt / (peak fp32 x efficiency)"
                                              + ("; memory: the larger of weights + KV cache and the load-time "
                                                 "folding peak" if load_peak_bytes else ""),
            "load_peak_mb": (load_peak_bytes or 0.0) / 1e6 or None,
            "decode_tok_s": tok_s, "decode_step_ms": 1e3 / tok_s, "prefill_ms": prefill_ms, "ttft_ms": prefill_ms,
            "peak_ram_mb": ram_mb, "bytes_per_token": bytes_per_token}


def _spec(model_path: Path, threads: int, dims: dict[str, int], vocab_size: int | None, repeats: int
          ) -> dict[str, Any]:
    return {"mode": "decoder", "model": str(model_path), "threads": threads,
            "prompt_length": dims["prompt_length"], "new_tokens": dims["new_tokens"],
            "vocab_size": int(vocab_size or 2), "repeats": repeats, "seed": 0}


def measure_decoder(model_path: Path, threads: int, dims: dict[str, int], vocab_size: int | None,
                    cores: int | None = None, repeats: int = 3, memory_mb: float | None = None) -> dict[str, Any]:
    """Generate in a fresh process on this host (pinned to `cores`, capped at `memory_mb` where it can be)."""
    from edgecompress.profiling.local import LocalTransport

    run = LocalTransport(cores, memory_mb).run([model_path], _spec(model_path, threads, dims, vocab_size, repeats))
    return {**run.result, "limits": run.limits}


def profile_decoder(model: onnx.ModelProto, model_path: Path, target: Target, dims: dict[str, int], *,
                    vocab_size: int | None, threads: int | None, transport: RunnerTransport | None,
                    ) -> tuple[dict[str, Any], dict[str, Figure]]:
    """transport: where to generate (profiling.measuring_transport: this host, a lab device, a fake); None: the
    estimate alone. The estimate is always in the profile, next to any measurement."""
    size = artifact_size_bytes(model_path)
    kv_ctx = dims["kv_bytes_per_token"] * dims["context_length"]
    profile: dict[str, Any] = {"workload": dict(dims), "kind": DECODER,
                               "kv_cache": {"bytes_per_token": dims["kv_bytes_per_token"],
                                            "context_length": dims["context_length"],
                                            "mb_at_context": kv_ctx / 1e6}}
    figures = {"size": Figure(size / 1e6, "MB", "measured", "model file plus external data")}
    est = estimate_decoder(model, float(size), target, dims)
    profile["estimate"] = {**est, "latency_ms": est["decode_step_ms"]}
    if transport is None:
        figures["decode_tok_s"] = Figure(est["decode_tok_s"], "tok/s", "estimated", "bandwidth-bound decode")
        figures["ttft"] = Figure(est["ttft_ms"], "ms", "estimated", "compute-bound prefill")
        figures["latency_p90"] = Figure(est["decode_step_ms"], "ms", "estimated", "one decode step")
        figures["peak_ram"] = Figure(est["peak_ram_mb"], "MB", "estimated",
                                     f"baseline + weights + KV cache at {dims['context_length']} tokens")
        return profile, figures
    n = threads or target.runtime.threads
    from edgecompress.profiling.transport import OutOfMemory, figure_source, model_files, record_out_of_memory

    section, source = figure_source(target, on_device=transport.on_device)
    files = model_files(model_path) if transport.on_device else [model_path]
    extra: dict[str, Any] = {}
    where = ""

    def run(t: int) -> dict[str, Any]:
        r = transport.run(files, _spec(model_path, t, dims, vocab_size, 3))
        if not transport.on_device:
            return {**r.result, "limits": r.limits}
        extra.update({**r.device, "warnings": r.warnings})
        return r.result

    try:
        runs = {1: run(1)}
        if n != 1:
            runs[n] = run(n)
    except OutOfMemory as e:
        record_out_of_memory(profile, figures, section, source, e, target)
        return profile, figures
    if transport.on_device:
        where = f" on {extra.get('device')}"
    main = runs[n]
    # the runner's cache only grew to prompt + new tokens; the budget is for the target's whole context
    kv_seen = dims["kv_bytes_per_token"] * (dims["prompt_length"] + dims["new_tokens"])
    peak = main["peak_rss_mb"] + max(0, kv_ctx - kv_seen) / 1e6
    profile[section] = {"source": source, "machine": main.get("machine", platform.machine()),
                        "onnxruntime": main.get("onnxruntime"), "threads": n, "limits": main.get("limits", {}),
                        "load_ms": main["load_ms"], "baseline_rss_mb": main["baseline_rss_mb"],
                        "peak_rss_mb": main["peak_rss_mb"], "peak_ram_with_kv_at_context_mb": peak,
                        "by_threads": {str(t): {k: r[k] for k in ("decode_tok_s", "ttft_ms", "prefill_ms",
                                                                  "decode_step_ms", "peak_rss_mb")}
                                       for t, r in runs.items()}, **extra}
    figures["decode_tok_s"] = Figure(main["decode_tok_s"], "tok/s", source,
                                     f"{n} threads{where}, median of repeats")
    figures["ttft"] = Figure(main["ttft_ms"], "ms", source, f"prefill of {dims['prompt_length']} tokens{where}")
    figures["latency_p90"] = Figure(main["decode_step_ms"]["p90"], "ms", source, f"p90 of one decode step{where}")
    figures["peak_ram"] = Figure(peak, "MB", source,
                                 f"VmHWM + KV cache grown to {dims['context_length']} tokens{where}")
    figures["load_time"] = Figure(main["load_ms"], "ms", source, f"session creation{where}")
    return profile, figures
