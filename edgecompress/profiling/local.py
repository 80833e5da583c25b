"""Profile an artifact on this host: the runner script in a fresh process, so memory is the model's own."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from edgecompress.errors import ProfileError

RUNNER = Path(__file__).with_name("runner.py")

_ONNX_TO_NUMPY = {onnx.TensorProto.INT64: "int64", onnx.TensorProto.INT32: "int32",
                  onnx.TensorProto.FLOAT: "float32", onnx.TensorProto.FLOAT16: "float16",
                  onnx.TensorProto.BOOL: "bool"}


@dataclass
class LatencyStats:
    p50: float
    p90: float
    p99: float
    mean: float
    std: float
    runs: int

    @classmethod
    def of(cls, samples: list[float]) -> LatencyStats:
        a = np.asarray(samples, dtype=np.float64)
        return cls(p50=float(np.percentile(a, 50)), p90=float(np.percentile(a, 90)),
                   p99=float(np.percentile(a, 99)), mean=float(a.mean()), std=float(a.std()), runs=len(a))


@dataclass
class HostProfile:
    latency_ms: LatencyStats
    load_ms: float
    peak_rss_mb: float
    baseline_rss_mb: float
    session: dict[str, Any]
    workload: dict[str, int]
    onnxruntime: str
    samples_ms: list[float] = field(default_factory=list)


def input_specs(model_path: Path, dims: dict[str, int], vocab_size: int | None) -> list[dict[str, Any]]:
    """What the runner feeds: random token ids, a full attention mask, zeros elsewhere."""
    m = onnx.load(str(model_path), load_external_data=False)
    inits = {i.name for i in m.graph.initializer}
    specs = []
    for inp in m.graph.input:
        if inp.name in inits:
            continue
        t = inp.type.tensor_type
        shape = []
        for d in t.shape.dim:
            if d.HasField("dim_value"):
                shape.append(d.dim_value)
            elif d.dim_param in dims:
                shape.append(dims[d.dim_param])
            else:
                raise ProfileError(f"input '{inp.name}' has a dimension '{d.dim_param}' the workload does not set")
        dtype = _ONNX_TO_NUMPY.get(t.elem_type, "float32")
        if inp.name == "input_ids":
            fill = "ids"
        elif inp.name == "attention_mask":
            fill = "ones"
        elif inp.name == "position_ids":
            fill = "range"
        elif dtype.startswith("float"):
            fill = "normal"
        else:
            fill = "zeros"
        specs.append({"name": inp.name, "dtype": dtype, "shape": shape, "fill": fill,
                      "high": int(vocab_size or 2)})
    return specs


def run_runner(spec: dict[str, Any], timeout_s: float = 600.0) -> dict[str, Any]:
    """Run runner.py on `spec` in a new process with only numpy and onnxruntime loaded."""
    with tempfile.TemporaryDirectory(prefix="edgecompress-prof-") as tmp:
        spec_path = Path(tmp) / "spec.json"
        spec_path.write_text(json.dumps(spec))
        env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
        env["OMP_NUM_THREADS"] = str(spec.get("threads") or 1)
        try:
            proc = subprocess.run([sys.executable, "-I", str(RUNNER), str(spec_path)], capture_output=True,
                                  text=True, timeout=timeout_s, env=env)
        except subprocess.TimeoutExpired:
            raise ProfileError(f"profiling took longer than {timeout_s:.0f} s", hint="lower --runs") from None
    if proc.returncode in (-9, 137):
        raise ProfileError("the profiled process was killed (out of memory?)")
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if not lines:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise ProfileError(f"the profiler process failed: {tail}")
    result: dict[str, Any] = json.loads(lines[-1])
    if not result.get("ok"):
        raise ProfileError(result.get("error", "the profiler process failed"))
    return result


def profile_local(model_path: Path, *, dims: dict[str, int], vocab_size: int | None, threads: int,
                  runs: int = 30, warmup: int = 5, min_seconds: float = 1.0,
                  optimized_model_path: Path | None = None) -> HostProfile:
    spec = {
        "model": str(model_path),
        "inputs": input_specs(model_path, dims, vocab_size),
        "threads": threads,
        "providers": ["CPUExecutionProvider"],
        "graph_optimization_level": "all",
        "warmup": warmup,
        "runs": runs,
        "min_seconds": min_seconds,
        "max_seconds": 300.0,
        "seed": 0,
        "optimized_model_path": str(optimized_model_path) if optimized_model_path else None,
    }
    r = run_runner(spec)
    return HostProfile(
        latency_ms=LatencyStats.of(r["latencies_ms"]),
        load_ms=r["load_ms"],
        peak_rss_mb=r["peak_rss_mb"],
        baseline_rss_mb=r["baseline_rss_mb"],
        session=r["session"],
        workload=dict(dims),
        onnxruntime=r["onnxruntime"],
        samples_ms=r["latencies_ms"],
    )
