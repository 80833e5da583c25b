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


# --- limits, per-op table, budgets (issue 5) ---------------------------------------------------------------------
def _big_activation_model(path: Path, floats: int) -> Path:
    """A tiny file whose run needs `floats` x 4 bytes a few times over (ConstantOfShape -> Add -> Mul)."""
    text = f"""
    <ir_version: 8, opset_import: ["" : 18]>
    g (float[1] X) => (float[1] Y) {{
        S = Constant <value = int64[1] {{{floats}}}> ()
        B = ConstantOfShape <value = float[1] {{1.0}}> (S)
        C = Add(B, X)
        D = Mul(C, C)
        Y = ReduceSum <keepdims = 1> (D)
    }}
    """
    model = onnx.parser.parse_model(text)
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(path))
    return path


def _cgroup_v1_writable() -> bool:
    from edgecompress.profiling.local import MemoryCap

    cap = MemoryCap(64)
    ok = cap.create() is None
    cap.remove()
    return ok


def _mm(tmp_path: Path) -> Path:
    path = tmp_path / "m.onnx"
    onnx.save(matmul_model(m=8, k=128, n=64, bias=True), str(path))
    return path


def test_pinned_to_cores_with_threads_capped(tmp_path: Path) -> None:
    prof = profile_local(_mm(tmp_path), dims={}, vocab_size=None, threads=4, runs=5, warmup=1, min_seconds=0.0,
                         cores=1)
    assert len(prof.cpu_affinity or []) == 1 and prof.limits["cores"] == 1
    assert prof.session["intra_op_num_threads"] == 1  # a 4-thread target emulated on 1 core gets 1 thread
    assert prof.limits["pinning"] in ("taskset", "sched_setaffinity")
    s = prof.latency_ms
    assert s.mean > 0 and s.std >= 0 and "±" in s.text()


def test_per_op_table_from_the_ort_profiler(tmp_path: Path) -> None:
    path = tmp_path / "two.onnx"
    text = """
    <ir_version: 8, opset_import: ["" : 18]>
    g (float[64, 256] X, float[256, 256] W) => (float[64, 256] Y) {
        H = MatMul(X, W)
        Y = Relu(H)
    }
    """
    onnx.save(onnx.parser.parse_model(text), str(path))
    prof = profile_local(path, dims={}, vocab_size=None, threads=1, runs=3, warmup=1, min_seconds=0.0,
                         op_profile_runs=4)
    ops = prof.ops
    assert ops is not None and ops["runs"] == 4
    by_op = {o["op_type"]: o for o in ops["by_op_type"]}
    assert set(by_op) == {"MatMul", "Relu"}
    assert by_op["MatMul"]["ms_per_run"] > by_op["Relu"]["ms_per_run"] > 0  # 4 MFLOP vs 16k elementwise
    assert abs(sum(o["share"] for o in ops["by_op_type"]) - 1.0) < 1e-9
    assert {n["provider"] for n in ops["nodes"]} == {"CPUExecutionProvider"}
    assert ops["nodes_by_provider"] == {"CPUExecutionProvider": 2}


def test_memory_cap_applied_or_a_recorded_warning(tmp_path: Path) -> None:
    prof = profile_local(_mm(tmp_path), dims={}, vocab_size=None, threads=1, runs=3, warmup=1, min_seconds=0.0,
                         memory_cap_mb=1024)
    if _cgroup_v1_writable():
        assert prof.limits["memory_cap_mb"] == 1024 and prof.limits["warnings"] == []
        assert 0 < prof.limits["cgroup"]["max_usage_mb"] < 1024 and prof.limits["cgroup"]["oom_kills"] == 0
    else:
        assert prof.limits["memory_cap_mb"] is None and "not capped" in prof.limits["warnings"][0]
    # a host without the controller: the run still happens, and says the cap was not applied
    prof = profile_local(_mm(tmp_path), dims={}, vocab_size=None, threads=1, runs=3, warmup=1, min_seconds=0.0,
                         memory_cap_mb=1024, cgroup_root=tmp_path / "no-cgroup")
    assert prof.limits["memory_cap_mb"] is None and prof.latency_ms.runs >= 3
    assert prof.limits["warnings"] == [f"memory not capped at 1024 MB: no cgroup-v1 memory controller at "
                                       f"{tmp_path / 'no-cgroup'}"]


def test_out_of_memory_is_a_failed_budget_not_a_crash(tmp_path: Path) -> None:
    from dataclasses import replace

    import pytest

    from edgecompress.budget import check
    from edgecompress.profiling import ProfileOptions, Workload, profile_artifact
    from edgecompress.profiling.local import OutOfMemory

    if not _cgroup_v1_writable():
        pytest.skip("this host has no writable cgroup-v1 memory controller (as root): no cap to hit")
    path = _big_activation_model(tmp_path / "big.onnx", 40_000_000)  # 160 MB per tensor, several alive
    with pytest.raises(OutOfMemory) as e:
        profile_local(path, dims={}, vocab_size=None, threads=1, runs=1, warmup=0, min_seconds=0.0,
                      memory_cap_mb=200)
    assert e.value.cap_mb == 200
    host = load_target("host")
    small = replace(host, hardware=replace(host.hardware, usable_ram_mb=200))
    profile, figures = profile_artifact(onnx.load(str(path)), path, small, Workload(), vocab_size=None,
                                        options=ProfileOptions(runs=1, min_seconds=0.0, op_profile_runs=0))
    assert profile["host"]["out_of_memory"] is True
    rows = {r.name: r for r in check(small.budgets, figures)}
    assert not rows["peak_ram"].passed and rows["peak_ram"].source == "measured"
    assert "out of memory" in rows["peak_ram"].note and rows["peak_ram"].miss().startswith("peak_ram: out of memory")
    assert not rows["latency_p90"].passed and rows["latency_p90"].source == "missing"


def test_load_time_budget_rows() -> None:
    from edgecompress.budget import Figure, check
    from edgecompress.targets import Budgets

    b = Budgets(max_size_mb=10, max_peak_ram_mb=100, max_latency_p90_ms=40, max_load_ms=500)
    figs = {"size": Figure(5, "MB", "measured"), "peak_ram": Figure(50, "MB", "measured"),
            "latency_p90": Figure(10, "ms", "measured"), "load_time": Figure(650, "ms", "measured")}
    rows = {r.name: r for r in check(b, figs)}
    assert not rows["load_time"].passed and rows["load_time"].miss() == "load_time 650.0 ms > 500.0 ms budget"
    del figs["load_time"]  # an estimate has no load time: no row rather than a "missing" failure
    assert "load_time" not in {r.name for r in check(b, figs)}
    failed = Figure(50, "MB", "measured", "out of memory: killed at the 50 MB cap", failed=True)
    row = next(r for r in check(b, {**figs, "peak_ram": failed}) if r.name == "peak_ram")
    assert not row.passed and row.note == failed.detail  # fails even though 50 <= 100


def test_load_time_budget_in_target_files(tmp_path: Path) -> None:
    import pytest

    from edgecompress.errors import ConfigError
    from edgecompress.targets import available_targets, load_target_file

    for name, path in available_targets().items():
        t = load_target_file(path)
        assert t.budgets.max_load_ms > 0, name
    assert load_target("jetson-orin-nano").budgets.max_load_ms > load_target("host").budgets.max_load_ms
    text = Path(load_target("host").path).read_text()
    no_load = tmp_path / "host.toml"
    no_load.write_text("\n".join(ln for ln in text.splitlines() if not ln.startswith("max_load_ms")))
    assert load_target_file(no_load).budgets.max_load_ms == 5000.0  # optional, with a default
    bad = tmp_path / "bad" / "host.toml"
    bad.parent.mkdir()
    bad.write_text(text.replace("max_load_ms = 2000", "max_load_ms = -1"))
    with pytest.raises(ConfigError, match=r"budgets\.max_load_ms"):
        load_target_file(bad)


def test_estimate_is_calibrated_per_precision_profile() -> None:
    from edgecompress.profiling.estimate import HOST_CALIBRATION

    model = matmul_model(m=256, k=512, n=512)
    host = estimate(model, load_target("host"), {})
    cal = host.details["calibration"]
    assert cal["profile"] == "fp32" and cal["factor"] == HOST_CALIBRATION["fp32"] and "median" in cal["method"]
    assert abs(host.latency_ms - host.details["roofline_ms"] * cal["factor"]) < 1e-9
    # elsewhere only the shape across precisions carries over: fp32 itself is the reference
    pi = estimate(model, load_target("raspberry-pi-5"), {})
    assert pi.details["calibration"]["factor"] == 1.0 and "relative to fp32" in pi.details["calibration"]["method"]
    gpu = estimate(model, load_target("server-gpu"), {})
    assert gpu.details["calibration"]["factor"] == 1.0 and gpu.latency_ms == gpu.details["roofline_ms"]
