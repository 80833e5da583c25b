"""Estimates for a target that is not at hand: a per-node roofline, labelled as such.

latency = sum over nodes of max(FLOPs / (peak at the node's precision x compute efficiency),
                                bytes / (bandwidth x bandwidth efficiency))
memory  = runtime baseline + the larger of (resident weights + the peak set of live activations, a liveness walk of
          the graph) and the load-time peak of graphs ORT constant-folds at load (codebooks; profiling/weights.py)

The efficiency factors come from the target file: the share of the roofline real kernels reach. The result is
then scaled by a per-profile factor (the model's dominant MatMul precision: fp32, int8, int4) calibrated once
against this dev host: measured / roofline latency over models x recipes (benchmarks/estimator_error.py, which
also reports the leave-one-model-out error). On the host target the factor applies as measured. Other CPU targets
get only its shape across precisions (factor / the fp32 factor): their peaks are theoretical, while host.toml's
are measured GEMM rates, so the absolute level does not carry over. The factor is recorded with the method.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import onnx

from edgecompress.graph import GraphIndex
from edgecompress.isa import GPU_PROVIDERS  # one home for the fact
from edgecompress.profiling.cost import DTYPE_BYTES, NodeCost, concrete_shapes, node_costs, numel
from edgecompress.targets import Target

# measured / roofline on the dev host (2-core AMD EPYC, AVX2, 1 thread), per precision profile; from
# `make bench-estimate` (benchmarks/results/estimator_error.json, "factors_all_points"). A profile not listed: 1.0.
# Leave-one-model-out error there: median 12%, worst 31% (uncalibrated: median 142%, worst 233%).
HOST_CALIBRATION: dict[str, float] = {"fp32": 0.375, "int8": 0.336, "int4": 0.481}
CALIBRATION_METHOD = ("roofline x the median measured/roofline latency ratio of the model's precision profile, "
                      "calibrated on the dev host over models x recipes (benchmarks/estimator_error.py)")


@dataclass
class Estimate:
    latency_ms: float
    peak_ram_mb: float
    method: str
    details: dict[str, Any] = field(default_factory=dict)


def _peak_gops(target: Target, precision: str) -> float:
    hw = target.hardware
    gpu = any(p in GPU_PROVIDERS for p in target.runtime.providers)
    if precision == "int8":
        return hw.peak_gops_int8
    if precision == "fp16" and (gpu or "fp16" in hw.isa):
        return hw.peak_gflops_fp16
    return hw.peak_gflops_fp32  # fp32, int4 weight-only (dequantized to fp32), fp16 without fp16 arithmetic


def roofline_ms(costs: list[NodeCost], target: Target) -> tuple[float, dict[str, float]]:
    hw, eff = target.hardware, target.estimate
    gpu = any(p in GPU_PROVIDERS for p in target.runtime.providers)
    # CPU peaks are for all cores; fewer threads get their share
    share = 1.0 if gpu else min(target.runtime.threads, hw.cores) / hw.cores
    bandwidth = hw.bandwidth_gbs * 1e9 * eff.bandwidth_efficiency
    total, compute_bound, memory_bound = 0.0, 0.0, 0.0
    for c in costs:
        t_compute = c.flops / (_peak_gops(target, c.precision) * 1e9 * eff.compute_efficiency * share)
        t_memory = c.bytes / bandwidth
        total += max(t_compute, t_memory)
        if t_compute >= t_memory:
            compute_bound += t_compute
        else:
            memory_bound += t_memory
    return total * 1e3, {"compute_bound_ms": compute_bound * 1e3, "memory_bound_ms": memory_bound * 1e3}


def peak_activation_bytes(model: onnx.ModelProto, dims: dict[str, int]) -> float:
    """Largest total of simultaneously live activations, walking the nodes in graph (topological) order."""
    shapes, types = concrete_shapes(model, dims)
    idx = GraphIndex(model)
    last_use: dict[str, int] = {}
    for i, node in enumerate(model.graph.node):
        for name in node.input:
            last_use[name] = i
    outputs = set(idx.graph_outputs)
    live: dict[str, float] = {
        n: numel(shapes.get(n)) * DTYPE_BYTES.get(types.get(n, 1), 4) for n in idx.graph_inputs
    }
    peak = sum(live.values())
    for i, node in enumerate(model.graph.node):
        for out in node.output:
            if out and not idx.is_initializer(out):
                live[out] = numel(shapes.get(out)) * DTYPE_BYTES.get(types.get(out, 1), 4)
        peak = max(peak, sum(live.values()))
        for name in list(live):
            if last_use.get(name, -1) <= i and name not in outputs:
                del live[name]
    return peak


def profile_of(details: dict[str, Any]) -> str:
    """The precision profile of a model: the precision of most of its MatMul FLOPs."""
    by = details.get("matmul_gflops_by_precision") or {}
    return max(by, key=by.__getitem__) if by else "fp32"


def calibration_for(target: Target, profile: str) -> tuple[float, str]:
    """(factor, why) for a target and a precision profile."""
    if any(p in GPU_PROVIDERS for p in target.runtime.providers):
        return 1.0, "not calibrated: GPU providers (the calibration is of ORT's CPU kernels)"
    if profile not in HOST_CALIBRATION or "fp32" not in HOST_CALIBRATION:
        return 1.0, f"not calibrated: no factor for the {profile} profile"
    if target.host:
        return HOST_CALIBRATION[profile], CALIBRATION_METHOD
    return HOST_CALIBRATION[profile] / HOST_CALIBRATION["fp32"], (
        CALIBRATION_METHOD + "; relative to fp32 on targets other than the host (theoretical peaks)")


def estimate(model: onnx.ModelProto, target: Target, dims: dict[str, int]) -> Estimate:
    costs = node_costs(model, dims)
    roofline, split = roofline_ms(costs, target)
    from edgecompress.profiling.weights import weight_memory

    wm = weight_memory(model)  # after ORT's load-time folding (codebook decode), not the file's bytes
    weights = wm.resident_bytes
    activations = peak_activation_bytes(model, dims)
    # a graph folded at load holds its intermediates then, before any activation exists
    ram_mb = target.estimate.runtime_baseline_mb + max(weights + activations, wm.load_peak_bytes) / 2**20
    by_precision: dict[str, float] = {}
    by_op: dict[str, float] = {}  # the per-op-type breakdown report.html plots when nothing was measured
    for c in costs:
        by_op[c.op_type] = by_op.get(c.op_type, 0.0) + roofline_ms([c], target)[0]
        if c.is_matmul:
            by_precision[c.precision] = by_precision.get(c.precision, 0.0) + c.flops
    profile = profile_of({"matmul_gflops_by_precision": by_precision})
    factor, why = calibration_for(target, profile)
    latency = roofline * factor
    return Estimate(
        latency_ms=latency,
        peak_ram_mb=ram_mb,
        method="roofline per node (FLOPs and bytes at the node's precision vs the target's peaks), "
               "scaled by the target's efficiency factors",
        details={
            **split,
            "roofline_ms": roofline,
            "calibration": {"profile": profile, "factor": factor, "method": why},
            "gflops": sum(c.flops for c in costs) / 1e9,
            "matmul_gflops_by_precision": {k: v / 1e9 for k, v in sorted(by_precision.items())},
            "gbytes_moved": sum(c.bytes for c in costs) / 1e9,
            "compute_efficiency": target.estimate.compute_efficiency,
            "bandwidth_efficiency": target.estimate.bandwidth_efficiency,
            "threads": target.runtime.threads,
            "weights_mb": weights / 2**20,
            "load_peak_mb": wm.load_peak_bytes / 2**20 if wm.folds else None,
            "peak_activations_mb": activations / 2**20,
            "runtime_baseline_mb": target.estimate.runtime_baseline_mb,
            "nodes": len(costs),
            "ms_by_op_type": {k: round(v * factor, 4) for k, v in sorted(by_op.items(), key=lambda kv: -kv[1])},
        },
    )
