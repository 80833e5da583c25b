#!/usr/bin/env python3
"""Self-contained profiling runner: standard library, numpy and onnxruntime only.

It is run as a script in a fresh process (locally, or copied to a lab device), so that its peak RSS is the model's
cost plus the runtime's and nothing of edgecompress, torch or transformers. It must not import edgecompress.

    python runner.py SPEC.json            # prints one JSON object on stdout

SPEC: {"model": path, "inputs": [{"name", "dtype", "shape", "fill": "ids"|"ones"|"zeros", "high"}],
       "threads": int, "providers": [...], "graph_optimization_level": "all"|"extended"|"basic"|"disabled",
       "warmup": int, "runs": int, "min_seconds": float, "max_seconds": float, "seed": int,
       "optimized_model_path": path or null}
"""

from __future__ import annotations

import json
import os
import platform
import resource
import sys
import time


def _status_mb(field: str) -> float | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return None


def peak_rss_mb() -> float:
    hwm = _status_mb("VmHWM")
    if hwm is not None:
        return hwm
    ru = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return ru / (1024.0 * 1024.0) if sys.platform == "darwin" else ru / 1024.0


def current_rss_mb() -> float:
    rss = _status_mb("VmRSS")
    return rss if rss is not None else peak_rss_mb()


def make_inputs(np, specs, seed):
    rng = np.random.default_rng(seed)
    feed = {}
    for s in specs:
        shape = tuple(s["shape"])
        dtype = np.dtype(s["dtype"])
        fill = s.get("fill", "zeros")
        if fill == "ids":
            low = min(1000, max(0, int(s.get("high", 2)) - 1))
            feed[s["name"]] = rng.integers(low, int(s.get("high", 2)), size=shape).astype(dtype)
        elif fill == "ones":
            feed[s["name"]] = np.ones(shape, dtype=dtype)
        elif fill == "range":
            feed[s["name"]] = np.broadcast_to(np.arange(shape[-1], dtype=dtype), shape).copy()
        elif fill == "normal":
            feed[s["name"]] = rng.standard_normal(size=shape).astype(dtype)
        else:
            feed[s["name"]] = np.zeros(shape, dtype=dtype)
    return feed


def main(argv: list[str]) -> int:
    with open(argv[1]) as f:
        spec = json.load(f)
    result: dict = {"ok": False, "python": platform.python_version(), "machine": platform.machine()}
    try:
        import numpy as np
        import onnxruntime as ort
    except ImportError as e:
        result["error"] = f"missing module on this machine: {e.name}"
        result["error_kind"] = "missing-dependency"
        print(json.dumps(result))
        return 3
    result["onnxruntime"] = ort.__version__
    result["numpy"] = np.__version__

    opts = ort.SessionOptions()
    threads = int(spec.get("threads", 0))
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    levels = {"disabled": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
              "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
              "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
              "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}
    level = spec.get("graph_optimization_level", "all")
    opts.graph_optimization_level = levels[level]
    if spec.get("optimized_model_path"):
        opts.optimized_model_filepath = spec["optimized_model_path"]
    available = ort.get_available_providers()
    providers = [p for p in spec.get("providers", ["CPUExecutionProvider"]) if p in available] or [
        "CPUExecutionProvider"]

    feed = make_inputs(np, spec["inputs"], int(spec.get("seed", 0)))
    result["baseline_rss_mb"] = current_rss_mb()  # interpreter + numpy + onnxruntime, no session yet

    t0 = time.perf_counter()
    try:
        sess = ort.InferenceSession(spec["model"], opts, providers=providers)
    except Exception as e:
        result["error"] = f"onnxruntime could not load the model: {str(e).splitlines()[0] if str(e) else e}"
        result["error_kind"] = "load"
        print(json.dumps(result))
        return 4
    result["load_ms"] = (time.perf_counter() - t0) * 1e3
    result["after_load_rss_mb"] = current_rss_mb()
    result["providers_used"] = sess.get_providers()

    warmup, runs = int(spec.get("warmup", 5)), int(spec.get("runs", 30))
    min_s, max_s = float(spec.get("min_seconds", 0.0)), float(spec.get("max_seconds", 120.0))
    try:
        for _ in range(warmup):
            sess.run(None, feed)
        lat = []
        start = time.perf_counter()
        while True:
            t = time.perf_counter()
            sess.run(None, feed)
            lat.append((time.perf_counter() - t) * 1e3)
            elapsed = time.perf_counter() - start
            if (len(lat) >= runs and elapsed >= min_s) or elapsed >= max_s:
                break
    except Exception as e:
        result["error"] = f"onnxruntime failed while running the model: {str(e).splitlines()[0]}"
        result["error_kind"] = "run"
        print(json.dumps(result))
        return 5
    result.update(
        ok=True,
        latencies_ms=lat,
        warmup=warmup,
        peak_rss_mb=peak_rss_mb(),
        session={"intra_op_num_threads": threads, "inter_op_num_threads": 1, "execution_mode": "sequential",
                 "graph_optimization_level": level, "providers": providers},
        cpu_count=os.cpu_count(),
    )
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
