"""Profiling a decoder (causal LM with its KV cache): prefill, decode tokens/s, time to first token, memory.

On this host (a host target, or --emulate-cores) the runner's decoder mode generates in a fresh process at one
thread and at the target's thread count. Elsewhere it is estimated and labelled so: decoding reads every weight
and the KV cache so far once per token (bandwidth-bound), prefill is compute-bound. The memory figure adds the KV
cache at the target's context length, whichever way the rest was obtained.
"""

from __future__ import annotations

import platform
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from edgecompress.budget import Figure
from edgecompress.model import artifact_size_bytes
from edgecompress.targets import Target


def is_decoder_workload(dims: dict[str, int]) -> bool:
    """tasks.DecoderTask.profile_dims marks its workload with these keys."""
    return "new_tokens" in dims and "kv_bytes_per_token" in dims


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
    hw, eff = target.hardware, target.estimate
    kv_token = dims["kv_bytes_per_token"]
    # mean context while generating: the prompt plus half the new tokens
    mean_ctx = dims["prompt_length"] + dims["new_tokens"] / 2
    bytes_per_token = weight_bytes + kv_token * mean_ctx
    tok_s = eff.bandwidth_efficiency * hw.bandwidth_gbs * 1e9 / bytes_per_token
    flops = 2.0 * weight_elements(model) * dims["prompt_length"]
    prefill_ms = flops / (hw.peak_gflops_fp32 * 1e9 * eff.compute_efficiency) * 1e3
    kv_ctx = kv_token * dims["context_length"]
    ram_mb = eff.runtime_baseline_mb + (weight_bytes + kv_ctx) / 1e6
    return {"source": "estimated", "method": "decode: bandwidth x efficiency / (weight + KV bytes per token); "
                                              "prefill: 2 x params x prompt / (peak fp32 x efficiency)",
            "decode_tok_s": tok_s, "decode_step_ms": 1e3 / tok_s, "prefill_ms": prefill_ms, "ttft_ms": prefill_ms,
            "peak_ram_mb": ram_mb, "bytes_per_token": bytes_per_token}


def measure_decoder(model_path: Path, threads: int, dims: dict[str, int], vocab_size: int | None,
                    cores: int | None = None, repeats: int = 3) -> dict[str, Any]:
    from edgecompress.profiling.local import run_runner

    spec = {"mode": "decoder", "model": str(model_path), "threads": threads,
            "prompt_length": dims["prompt_length"], "new_tokens": dims["new_tokens"],
            "vocab_size": int(vocab_size or 2), "repeats": repeats, "seed": 0}
    result, limits = run_runner(spec, cores=cores)
    return {**result, "limits": limits}


def profile_decoder(model: onnx.ModelProto, model_path: Path, target: Target, dims: dict[str, int], *,
                    vocab_size: int | None, threads: int | None, cores: int | None, measure: bool,
                    ) -> tuple[dict[str, Any], dict[str, Figure]]:
    size = artifact_size_bytes(model_path)
    kv_ctx = dims["kv_bytes_per_token"] * dims["context_length"]
    profile: dict[str, Any] = {"workload": dict(dims), "kind": "decoder",
                               "kv_cache": {"bytes_per_token": dims["kv_bytes_per_token"],
                                            "context_length": dims["context_length"],
                                            "mb_at_context": kv_ctx / 1e6}}
    figures = {"size": Figure(size / 1e6, "MB", "measured", "model file plus external data")}
    est = estimate_decoder(model, float(size), target, dims)
    profile["estimate"] = {**est, "latency_ms": est["decode_step_ms"]}
    if not measure:
        figures["decode_tok_s"] = Figure(est["decode_tok_s"], "tok/s", "estimated", "bandwidth-bound decode")
        figures["ttft"] = Figure(est["ttft_ms"], "ms", "estimated", "compute-bound prefill")
        figures["latency_p90"] = Figure(est["decode_step_ms"], "ms", "estimated", "one decode step")
        figures["peak_ram"] = Figure(est["peak_ram_mb"], "MB", "estimated",
                                     f"baseline + weights + KV cache at {dims['context_length']} tokens")
        return profile, figures
    source = "measured" if target.host else "measured-on-host"
    n = threads or target.runtime.threads
    runs = {1: measure_decoder(model_path, 1, dims, vocab_size, cores)}
    if n != 1:
        runs[n] = measure_decoder(model_path, n, dims, vocab_size, cores)
    main = runs[n]
    # the runner's cache only grew to prompt + new tokens; the budget is for the target's whole context
    kv_seen = dims["kv_bytes_per_token"] * (dims["prompt_length"] + dims["new_tokens"])
    peak = main["peak_rss_mb"] + max(0, kv_ctx - kv_seen) / 1e6
    profile["host"] = {"source": source, "machine": platform.machine(), "onnxruntime": main.get("onnxruntime"),
                       "load_ms": main["load_ms"], "baseline_rss_mb": main["baseline_rss_mb"],
                       "peak_rss_mb": main["peak_rss_mb"], "peak_ram_with_kv_at_context_mb": peak,
                       "by_threads": {str(t): {k: r[k] for k in ("decode_tok_s", "ttft_ms", "prefill_ms",
                                                                 "decode_step_ms", "peak_rss_mb")}
                                      for t, r in runs.items()}}
    figures["decode_tok_s"] = Figure(main["decode_tok_s"], "tok/s", source, f"{n} threads, median of repeats")
    figures["ttft"] = Figure(main["ttft_ms"], "ms", source, f"prefill of {dims['prompt_length']} tokens")
    figures["latency_p90"] = Figure(main["decode_step_ms"]["p90"], "ms", source, "p90 of one decode step")
    figures["peak_ram"] = Figure(peak, "MB", source, f"VmHWM + KV cache grown to {dims['context_length']} tokens")
    figures["load_time"] = Figure(main["load_ms"], "ms", source, "session creation")
    return profile, figures
