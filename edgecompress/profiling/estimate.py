"""Estimates for a target that is not at hand: a per-node roofline, labelled as such.

latency = sum over nodes of max(FLOPs / (peak at the node's precision x compute efficiency),
                                bytes / (bandwidth x bandwidth efficiency))
memory  = runtime baseline + resident weights + the peak set of live activations (a liveness walk of the graph)

The efficiency factors come from the target file: the share of the roofline real kernels reach.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import onnx

from edgecompress.graph import GraphIndex
from edgecompress.profiling.cost import DTYPE_BYTES, NodeCost, concrete_shapes, node_costs, numel
from edgecompress.targets import Target

GPU_PROVIDERS = ("CUDAExecutionProvider", "TensorrtExecutionProvider")


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


def resident_weight_bytes(model: onnx.ModelProto) -> float:
    total = 0.0
    for init in model.graph.initializer:
        n = 1
        for d in init.dims:
            n *= d
        total += n * DTYPE_BYTES.get(init.data_type, 4)
    return total


def estimate(model: onnx.ModelProto, target: Target, dims: dict[str, int]) -> Estimate:
    costs = node_costs(model, dims)
    latency, split = roofline_ms(costs, target)
    weights = resident_weight_bytes(model)
    activations = peak_activation_bytes(model, dims)
    ram_mb = target.estimate.runtime_baseline_mb + (weights + activations) / 2**20
    by_precision: dict[str, float] = {}
    for c in costs:
        if c.is_matmul:
            by_precision[c.precision] = by_precision.get(c.precision, 0.0) + c.flops
    return Estimate(
        latency_ms=latency,
        peak_ram_mb=ram_mb,
        method="roofline per node (FLOPs and bytes at the node's precision vs the target's peaks), "
               "scaled by the target's efficiency factors",
        details={
            **split,
            "gflops": sum(c.flops for c in costs) / 1e9,
            "matmul_gflops_by_precision": {k: v / 1e9 for k, v in sorted(by_precision.items())},
            "gbytes_moved": sum(c.bytes for c in costs) / 1e9,
            "compute_efficiency": target.estimate.compute_efficiency,
            "bandwidth_efficiency": target.estimate.bandwidth_efficiency,
            "threads": target.runtime.threads,
            "weights_mb": weights / 2**20,
            "peak_activations_mb": activations / 2**20,
            "runtime_baseline_mb": target.estimate.runtime_baseline_mb,
            "nodes": len(costs),
        },
    )
