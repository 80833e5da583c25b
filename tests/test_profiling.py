from __future__ import annotations

from pathlib import Path

import onnx
from conftest import matmul_model

from edgecompress.profiling.cost import node_costs
from edgecompress.profiling.estimate import estimate, peak_activation_bytes
from edgecompress.profiling.local import LatencyStats, input_specs, profile_local
from edgecompress.targets import load_target


def test_matmul_flops_are_exact() -> None:
    costs = node_costs(matmul_model(m=4, k=64, n=32, bias=True), {})
    mm = next(c for c in costs if c.op_type == "MatMul")
    assert mm.flops == 2 * 4 * 64 * 32
    assert mm.weight_bytes == 64 * 32 * 4
    assert mm.precision == "fp32"


def test_roofline_scales_with_target_peaks() -> None:
    model = matmul_model(m=256, k=512, n=512)
    fast = estimate(model, load_target("phone-arm64"), {})
    slow = estimate(model, load_target("raspberry-pi-4"), {})
    assert slow.latency_ms > fast.latency_ms > 0
    assert fast.details["gflops"] == 2 * 256 * 512 * 512 / 1e9


def test_liveness_counts_inputs_and_outputs() -> None:
    model = matmul_model(m=4, k=8, n=16)
    assert peak_activation_bytes(model, {}) == (4 * 8 + 4 * 16) * 4


def test_latency_stats() -> None:
    s = LatencyStats.of([float(i) for i in range(1, 101)])
    assert s.runs == 100 and abs(s.p50 - 50.5) < 1e-9 and s.p90 > s.p50 and s.p99 > s.p90


def test_runner_measures_in_a_fresh_process(tmp_path: Path) -> None:
    path = tmp_path / "m.onnx"
    onnx.save(matmul_model(m=4, k=64, n=32), str(path))
    assert input_specs(path, {}, None)[0]["shape"] == [4, 64]
    prof = profile_local(path, dims={}, vocab_size=None, threads=1, runs=20, warmup=2, min_seconds=0.0)
    assert prof.latency_ms.runs >= 20 and prof.latency_ms.p50 > 0
    # the runner loads only numpy + onnxruntime: far below a torch/transformers process
    assert 0 < prof.baseline_rss_mb < prof.peak_rss_mb < 400
    assert prof.session["intra_op_num_threads"] == 1
