"""Proof that a build runs quantized: which kernels ONNX Runtime actually runs the matrix products with.

A quantized file is no proof: ORT may fold a QDQ MatMul+Add into a float Gemm at load time and run it in fp32. So we
let ORT optimize the deployable model for the target's execution providers, save that optimized graph (a diagnostic,
not a deployable file: at level "all" it may hold hardware-specific ops), and measure the share of MatMul/Gemm FLOPs
that run in integer or 4-bit kernels there. A quantizing recipe whose share is 0 did not quantize anything that
runs, and is an error.

Layering: profiling; imports errors, model, profiling.cost and profiling.fusion (emulate lazily).
"""

from __future__ import annotations

import logging
import os
import platform
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import onnx

from edgecompress.errors import PassError, ProfileError
from edgecompress.model import artifact_size_bytes
from edgecompress.profiling.cost import (
    INT8_MATMUL_OPS,
    LOWBIT_MATMUL_OPS,
    MATMUL_OPS,
    concrete_shapes,
    node_costs,
    numel,
)

if TYPE_CHECKING:
    from edgecompress.targets import Target

log = logging.getLogger(__name__)

# Kernels that multiply in integers or from 4-bit weights (MatMulNBits dequantizes blockwise inside the kernel).
INTEGER_KERNELS = INT8_MATMUL_OPS | LOWBIT_MATMUL_OPS
DIAGNOSTICS_DIR = "diagnostics"
_EP_SHORT = {"CPUExecutionProvider": "cpu", "CUDAExecutionProvider": "cuda", "TensorrtExecutionProvider": "tensorrt",
             "XnnpackExecutionProvider": "xnnpack", "CoreMLExecutionProvider": "coreml", "QNNExecutionProvider": "qnn",
             "OpenVINOExecutionProvider": "openvino", "DmlExecutionProvider": "dml", "NnapiExecutionProvider": "nnapi",
             "ACLExecutionProvider": "acl", "ArmNNExecutionProvider": "armnn"}
# protobuf cannot serialize past 2 GB: larger optimized graphs keep their weights in a side file
_EXTERNAL_OVER_BYTES = 1_500_000_000


@dataclass
class KernelShare:
    """MatMul-family FLOPs of one graph at a concrete workload, split by the kernel that runs them."""

    matmul_flops: float
    integer_flops: float
    fp16_flops: float = 0.0  # float kernels reading fp16 (ORT runs fp16 as fp32 between casts where it lacks them)
    by_op: dict[str, dict[str, float]] = field(default_factory=dict)  # op -> {"nodes", "gflops"}
    unsized: list[str] = field(default_factory=list)  # MatMul-family nodes whose shapes stayed unknown

    @property
    def share(self) -> float:
        return self.integer_flops / self.matmul_flops if self.matmul_flops else 0.0


def kernel_share(model: onnx.ModelProto, dims: dict[str, int], reference: onnx.ModelProto | None = None
                 ) -> KernelShare:
    """Share of MatMul-family FLOPs in INTEGER_KERNELS, by op type (not by the cost model's precision guess: a MatMul
    fed by DequantizeLinear in an *optimized* graph is exactly the fp32 fallback we are looking for).

    ORT's symbolic shape inference does not know some fused contrib ops (DynamicQuantizeMatMul,
    MatMulIntegerToFloat), nor the shape arithmetic ORT leaves after inserting casts, and stops there. ORT keeps
    the names of the values it fuses or re-types (up to a prefix), so missing shapes are taken from `reference`
    (the unoptimized model) by name.
    """
    costs = node_costs(model, dims)
    nodes = {n.name or n.output[0]: n for n in model.graph.node}
    ref_shapes: dict[str, tuple[int, ...] | None] | None = None
    total = integer = fp16 = 0.0
    by_op: dict[str, dict[str, float]] = {}
    unsized: list[str] = []
    for c in costs:
        if c.op_type not in MATMUL_OPS:
            continue
        flops = c.flops
        if flops == 0 and reference is not None:
            if ref_shapes is None:
                ref_shapes = concrete_shapes(reference, dims)[0]
            flops = _flops_from(nodes[c.name], ref_shapes, model)
        if flops == 0:
            unsized.append(c.name)
        entry = by_op.setdefault(c.op_type, {"nodes": 0, "gflops": 0.0})
        entry["nodes"] += 1
        entry["gflops"] += flops / 1e9
        total += flops
        if c.op_type in INTEGER_KERNELS:
            integer += flops
        elif c.precision == "fp16":
            fp16 += flops
    return KernelShare(total, integer, fp16, {k: {"nodes": v["nodes"], "gflops": round(v["gflops"], 4)}
                                              for k, v in sorted(by_op.items())}, unsized)


# Prefixes ORT puts on the names of values it re-types (fp16 ops run in fp32 between casts on CPUs without fp16).
_ORT_PREFIXES = ("InsertedPrecisionFreeCast_", "FusedBack_")


def _shape(shapes: dict[str, tuple[int, ...] | None], name: str) -> tuple[int, ...] | None:
    for prefix in ("", *_ORT_PREFIXES):
        if name.startswith(prefix) and shapes.get(name.removeprefix(prefix)) is not None:
            return shapes[name.removeprefix(prefix)]
    return None


def _flops_from(node: onnx.NodeProto, shapes: dict[str, tuple[int, ...] | None], model: onnx.ModelProto) -> float:
    out = _shape(shapes, node.output[0])
    if out is None:
        return 0.0
    k = next((a.i for a in node.attribute if a.name == "K"), 0)  # MatMulNBits
    if not k:
        a_shape = _shape(shapes, node.input[0])
        if a_shape:
            k = a_shape[-1]
        else:  # B of MatMulInteger / DynamicQuantizeMatMul / MatMulIntegerToFloat is a [K, N] initializer
            inits = {t.name: t for t in model.graph.initializer}
            b = inits.get(node.input[1]) if len(node.input) > 1 else None
            k = b.dims[0] if b is not None and len(b.dims) == 2 else 0
    return 2.0 * numel(out) * k


def save_optimized(model_path: Path, out_dir: Path, providers: tuple[str, ...] | list[str]
                   ) -> tuple[onnx.ModelProto, Path, list[str], list[str]]:
    """Let ORT optimize `model_path` (level all) for those of `providers` available here; save it in out_dir as
    optimized-<first provider>.onnx. Returns (optimized model, its path, providers used, providers missing here).
    """
    import onnxruntime as ort

    available = set(ort.get_available_providers())
    used = [p for p in providers if p in available] or ["CPUExecutionProvider"]
    missing = [p for p in providers if p not in available]
    ep = _EP_SHORT.get(used[0], used[0].removesuffix("ExecutionProvider").lower())
    out_path = out_dir / f"optimized-{ep}.onnx"
    out_dir.mkdir(parents=True, exist_ok=True)
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.optimized_model_filepath = str(out_path)
    so.intra_op_num_threads = 1
    so.log_severity_level = 3  # its "may contain hardware specific optimizations" warning is the point here
    if artifact_size_bytes(model_path) > _EXTERNAL_OVER_BYTES:
        so.add_session_config_entry("session.optimized_model_external_initializers_file_name",
                                    out_path.name + ".data")
    try:
        ort.InferenceSession(str(model_path), so, providers=used)
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ProfileError(f"onnxruntime could not load the model to optimize it: {first}") from e
    return onnx.load(str(out_path), load_external_data=False), out_path, used, missing


def inspect_kernels(model_path: Path, out_dir: Path, providers: tuple[str, ...] | list[str], dims: dict[str, int],
                    *, quantizing: bool, reference: onnx.ModelProto | None = None, target: Target | None = None
                    ) -> dict[str, Any]:
    """Save ORT's optimized graph under out_dir and report the integer-kernel share of MatMul FLOPs: the target's
    (top-level keys, `source` says whose) and this host's (`host`, when the target is not this host).

    The target's figure is this host's for a host target; for an Arm target it is aarch64 ORT's own optimized graph
    under qemu when `edgecompress emulator setup` has been run (`emulated`), else profiling/fusion.py's documented
    model of what Arm builds fuse (`modelled`). Raises PassError when `quantizing` and the target's share is 0: the
    build claimed a quantized model that runs in float there.
    """
    host = _host_kernels(model_path, out_dir, providers, dims, reference)
    if target is None or target.host:
        report = {**host, "source": "measured-on-host", "whose": "this host's ONNX Runtime (the target)"}
    else:
        report = {**_target_kernels(model_path, out_dir, dims, reference, target, host), "host": host}
    log.info("integer-kernel share of MatMul FLOPs on %s: %.3f (%s)", report.get("target", "this host"),
             report["integer_matmul_flops_share"], report["source"])
    if quantizing and not any(op in INTEGER_KERNELS and v["nodes"] for op, v in report["by_op"].items()):
        raise PassError(
            f"the quantized model runs no MatMul in an integer or 4-bit kernel on "
            f"{report.get('target', ', '.join(host['providers']))} ({report['source']}: {report['by_op']})",
            hint="ONNX Runtime folded the quantized ops back to float; try another recipe")
    return report


def _host_kernels(model_path: Path, out_dir: Path, providers: tuple[str, ...] | list[str], dims: dict[str, int],
                  reference: onnx.ModelProto | None) -> dict[str, Any]:
    optimized, path, used, missing = save_optimized(model_path, out_dir, providers)
    share = kernel_share(optimized, dims, reference)
    report = _figures(share.share, share.matmul_flops, share.integer_flops, share.by_op, dims)
    report.update({
        "fp16_matmul_flops_share": round(share.fp16_flops / share.matmul_flops, 4) if share.matmul_flops else 0.0,
        "machine": f"{platform.machine()} (this host)",
        "optimized_graph": f"{out_dir.name}/{path.name}",
        "providers": used,
        "graph_optimization_level": "all",
        "note": "ONNX Runtime's optimized graph for these providers, saved for inspection only (it may hold "
                "hardware-specific ops): shares are of MatMul/Gemm FLOPs run by integer or 4-bit kernels there",
    })
    if missing:
        report["providers_not_available_here"] = missing
        report["note"] += (f"; {', '.join(missing)} not available on this host, so this is the "
                           f"{', '.join(used)} graph, not the target's")
    if share.unsized:
        report["unsized_nodes"] = share.unsized
    return report


def _figures(share: float, total: float, integer: float, by_op: dict[str, dict[str, float]], dims: dict[str, int]
             ) -> dict[str, Any]:
    return {"integer_matmul_flops_share": round(share, 4), "matmul_gflops": round(total / 1e9, 4),
            "integer_matmul_gflops": round(integer / 1e9, 4),
            "integer_kernels": sorted(op for op in by_op if op in INTEGER_KERNELS), "by_op": by_op,
            "workload": dict(dims)}


def _target_kernels(model_path: Path, out_dir: Path, dims: dict[str, int], reference: onnx.ModelProto | None,
                    target: Target, host: dict[str, Any]) -> dict[str, Any]:
    from edgecompress.profiling.fusion import modelled_share, rules_for

    base = {"target": target.name, "machine": f"{target.hardware.arch} ({target.hardware.cpu})"}
    if not any(p in _CPU_PROVIDERS for p in target.runtime.providers):
        return {**{k: v for k, v in host.items() if k in _FIGURE_KEYS}, **base, "source": "measured-on-host",
                "whose": "this host's CPU graph: the target's providers "
                         f"({', '.join(target.runtime.providers)}) are not modelled"}
    if target.hardware.arch == "aarch64" and platform.machine() != "aarch64":
        emulated = _emulated(model_path, out_dir, dims, reference, target)
        if emulated is not None:
            return {**emulated, **base}
    model = reference if reference is not None else onnx.load(str(model_path), load_external_data=False)
    rules = rules_for(target.hardware.arch, target.hardware.isa)
    m = modelled_share(model, dims, rules)
    return {**_figures(m.share, m.matmul_flops, m.integer_flops, m.by_op, dims), **base, "source": "modelled",
            "whose": f"the target's ({rules.family} ONNX Runtime CPU provider), modelled from the deployable graph",
            "method": rules.source, "isa": sorted(target.hardware.isa)}


_CPU_PROVIDERS = ("CPUExecutionProvider", "XnnpackExecutionProvider", "NnapiExecutionProvider",
                  "QNNExecutionProvider", "CoreMLExecutionProvider", "ACLExecutionProvider", "ArmNNExecutionProvider")
_FIGURE_KEYS = ("integer_matmul_flops_share", "matmul_gflops", "integer_matmul_gflops", "integer_kernels", "by_op",
                "workload")


def _emulated(model_path: Path, out_dir: Path, dims: dict[str, int], reference: onnx.ModelProto | None,
              target: Target) -> dict[str, Any] | None:
    """aarch64 ORT's optimized graph under qemu with the target's CPU model, if the emulator is set up."""
    from edgecompress.profiling import emulate

    if emulate.Emulator(emulate.emulator_dir()).ready() is None or os.environ.get("EDGECOMPRESS_NO_EMULATION"):
        return None
    cpu = emulate.qemu_cpu(target)
    dest = out_dir / "optimized-cpu-aarch64.onnx"
    files = [model_path, *(p for p in model_path.parent.glob(model_path.name + ".*") if p.is_file())]
    try:  # load only (no batches): ORT writes its optimized graph at session creation
        emulate.run_in_emulator(files, [], cpu, optimized_to=dest)
        optimized = onnx.load(str(dest), load_external_data=False)
    except Exception as e:  # an emulator problem must not fail the build: the documented model stands in
        log.warning("emulated kernel check failed (%s); using the documented model", e)
        dest.unlink(missing_ok=True)
        return None
    share = kernel_share(optimized, dims, reference)
    return {**_figures(share.share, share.matmul_flops, share.integer_flops, share.by_op, dims),
            "source": "emulated", "qemu_cpu": cpu, "optimized_graph": f"{out_dir.name}/{dest.name}",
            "whose": f"the target's: aarch64 ONNX Runtime under qemu-user ({cpu}), its own optimized graph"}
