"""INT8 quantization passes built on ONNX Runtime's quantizers: dynamic, static (calibrated, ISA-aware) and mixed
(per-node sensitivity decides which MatMuls keep float activations)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import islice
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

from edgecompress.calibration import select_samples, trim_padding
from edgecompress.errors import ConfigError, PassError
from edgecompress.graph import GraphIndex, op_histogram
from edgecompress.passes import ort_quant
from edgecompress.passes.base import Pass, PassContext, PassResult
from edgecompress.passes.sensitivity import (
    Int8Simulation,
    int8_weight,
    node_sensitivity,
    output_cosines,
    quantizable_nodes,
    run_first_output,
)
from edgecompress.passes.smooth import smooth
from edgecompress.targets import Target

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DynamicInt8Config:
    per_channel: bool = True
    reduce_range: bool = False
    # The word-embedding Gather is most of a small encoder's bytes: quantize it too.
    op_types: tuple[str, ...] = ("MatMul", "Gather")


class DynamicInt8(Pass):
    """Weights to int8 (per output channel), activations quantized on the fly by ORT at run time."""

    name = "int8-dynamic"

    def __init__(self, config: DynamicInt8Config | None = None) -> None:
        super().__init__(config or DynamicInt8Config())

    def run(self, model: onnx.ModelProto, ctx: PassContext) -> PassResult:
        cfg: DynamicInt8Config = self.config
        before = op_histogram(model)
        out = ort_quant.quantize_dynamic(model, op_types=cfg.op_types, per_channel=cfg.per_channel,
                                         reduce_range=cfg.reduce_range)
        after = op_histogram(out)
        quantized = {op: after.get(op, 0) for op in ("MatMulInteger", "DynamicQuantizeLinear", "DequantizeLinear")}
        report = {
            "library": "onnxruntime.quantization.quantize_dynamic",
            "weight_type": "int8",
            "per_channel": cfg.per_channel,
            "reduce_range": cfg.reduce_range,
            "op_types": list(cfg.op_types),
            "ops_before": {k: before.get(k, 0) for k in ("MatMul", "Gather", "Gemm")},
            "quantized_ops": quantized,
        }
        if quantized["MatMulInteger"] == 0:
            report["skipped"] = "no MatMul with a constant weight was found to quantize"
            return PassResult(out, report, modified=False)
        return PassResult(out, report)


# --- ISA-aware settings ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class IsaChoice:
    """Integer types and range for a target's int8 kernels, and why."""

    activation_type: str  # "uint8" | "int8"
    reduce_range: bool
    reason: str
    weight_type: str = "int8"

    def describe(self) -> dict[str, object]:
        return {"activations": self.activation_type, "weights": self.weight_type, "reduce_range": self.reduce_range,
                "reason": self.reason}


def isa_choice(target: Target) -> IsaChoice:
    """S8S8 vs U8S8 and reduce_range from the target's ISA flags (target.hardware.isa).

    - x86: ORT's x86 int8 GEMMs take uint8 activations; int8 activations left most QDQ MatMuls as float MatMuls
      on the host (measured, ~1.0x FP32 latency). Without VNNI the AVX2 kernel (vpmaddubsw) adds u8 x s8 pairs in
      int16 and can saturate: weights are kept to 7 bits (reduce_range), the ORT-documented remedy.
    - Arm: the dot-product kernels (sdot, smmla: dotprod, i8mm) are signed x signed and accumulate in int32;
      plain NEON widens to 16/32 bits too: symmetric int8 both sides, full range.
    """
    isa, arch = target.hardware.isa, target.hardware.arch
    if arch == "aarch64" or "neon" in isa:
        kernels = "i8mm (smmla)" if "i8mm" in isa else "dotprod (sdot)" if "dotprod" in isa else "NEON widening"
        return IsaChoice("int8", False, f"Arm {kernels} int8 kernels are signed x signed with 32-bit accumulation: "
                                        "S8S8, full 8-bit range")
    vnni = isa & {"avx512_vnni", "avx_vnni"}
    if vnni:
        return IsaChoice("uint8", False, f"x86 with {'/'.join(sorted(vnni))}: U8S8 (ORT's x86 int8 GEMMs take "
                                         "uint8 activations), VNNI accumulates in int32 without saturation")
    return IsaChoice("uint8", True, "x86 without VNNI: U8S8 (ORT's x86 int8 GEMMs take uint8 activations); "
                                    "reduce_range keeps weights to 7 bits so u8 x s8 pair sums cannot saturate "
                                    "the AVX2 int16 accumulation")


# --- weights to int8, activations left in float -----------------------------------------------------------------
def weight_only_int8(model: onnx.ModelProto, nodes: Sequence[str], reduce_range: bool = False) -> onnx.ModelProto:
    """A copy where each MatMul in `nodes` keeps float activations but reads an int8 weight (per output channel)
    through DequantizeLinear: the file stays int8-sized, the compute stays float (no activation rounding)."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    inits = {t.name: t for t in m.graph.initializer}
    done: dict[str, str] = {}
    new_nodes: list[onnx.NodeProto] = []
    wanted = set(nodes)
    for node in m.graph.node:
        if node.name in wanted and node.op_type == "MatMul" and node.input[1] in inits:
            w_name = node.input[1]
            if w_name not in done:
                q, scale = int8_weight(numpy_helper.to_array(inits[w_name]), 1, reduce_range)
                qn, sn, out = f"{w_name}__w8", f"{w_name}__w8_scale", f"{w_name}__w8_dq"
                m.graph.initializer.extend([numpy_helper.from_array(q, qn), numpy_helper.from_array(scale, sn)])
                new_nodes.append(onnx.helper.make_node("DequantizeLinear", [qn, sn], [out], axis=1,
                                                       name=f"{node.name}__w8_dq"))
                done[w_name] = out
            node.input[1] = done[w_name]
        new_nodes.append(node)
    del m.graph.node[:]
    m.graph.node.extend(new_nodes)
    used = {i for n in m.graph.node for i in n.input}
    kept = [t for t in m.graph.initializer if t.name in used or t.name not in done]
    del m.graph.initializer[:]
    m.graph.initializer.extend(kept)
    return m


# --- per-token activations (standard ops, integer MatMul) -----------------------------------------------------------
# ORT's dynamic path (DynamicQuantizeLinear -> MatMulInteger, fused into DynamicQuantizeMatMul) gives the whole
# [batch * seq, K] activation ONE scale, so one outlier token coarsens every other token's grid. Here each token
# (row) gets its own symmetric scale. ORT's MatMulInteger takes only a scalar activation zero point, so the rows are
# symmetric: uint8 around a fixed 128 (ORT's u8 x s8 kernels; s8 x s8 MatMulInteger ran ~8x slower on the x86 host),
# or int8 around 0 when asked. MiniLM on the host (b8 x seq128, one thread): as fast as DynamicQuantizeMatMul
# (0.98-1.02x, shared CPU), mean cosine 0.9927 -> 0.9971 alone, 0.9990 with smoothing (int8-mixed).
_PT = "edgecompress_pt"


def _const(m: onnx.ModelProto, have: set[str], name: str, value: np.ndarray) -> str:
    if name not in have:
        m.graph.initializer.append(numpy_helper.from_array(value, name))
        have.add(name)
    return name


def per_token_int8(model: onnx.ModelProto, nodes: Sequence[str], *, activation_type: str = "uint8",
                   reduce_range: bool = False) -> onnx.ModelProto:
    """A copy where each MatMul(x, W) in `nodes` (constant 2-D W) runs as int8 with one activation scale per token:

        x2 = Reshape(x, [-1, K]);  s = max(|x2|, axis 1) / 127             (GlobalMaxPool over [-1, 1, K])
        q = QuantizeLinear(x2, s, zp, axis=0)                             (per-row scale, fixed zero point)
        y = Reshape(Cast(MatMulInteger(q, W8, zp)) * w_scale * s[:, None], [..., N])

    W8 is symmetric int8 per output channel (7-bit with `reduce_range`). MatMuls sharing an input (Q, K, V) share
    one quantization of it. Standard ONNX (opset >= 15), no contrib ops.
    """
    if activation_type not in ("uint8", "int8"):
        raise PassError(f"unknown activation type '{activation_type}' for per-token int8")
    m = onnx.ModelProto()
    m.CopyFrom(model)
    inits = {t.name: t for t in m.graph.initializer}
    have = set(inits)
    signed = activation_type == "int8"
    opset = _opset(m)
    if opset < 15:
        raise PassError(f"per-token int8 needs ONNX opset 15 or later; the model has {opset}",
                        hint="export with a newer opset, or use per-tensor activations (int8-dynamic)")
    zp = _const(m, have, f"{_PT}_zp_{activation_type}",
                np.array(0, dtype=np.int8) if signed else np.array(128, dtype=np.uint8))
    flat = _const(m, have, f"{_PT}_flat", np.array([-1], dtype=np.int64))
    col = _const(m, have, f"{_PT}_col", np.array([-1, 1], dtype=np.int64))
    inv127 = _const(m, have, f"{_PT}_inv127", np.array(1.0 / 127.0, dtype=np.float32))
    # an all-zero row (padding) still needs a positive scale; its codes are all zp either way
    tiny = _const(m, have, f"{_PT}_tiny", np.array(1e-30, dtype=np.float32))
    wanted = set(nodes)
    rows: dict[str, tuple[str, str, str]] = {}
    weights: dict[str, tuple[str, str, int]] = {}
    new_nodes: list[onnx.NodeProto] = []
    for node in m.graph.node:
        w_init = inits.get(node.input[1]) if node.op_type == "MatMul" and len(node.input) == 2 else None
        if node.name not in wanted or w_init is None or len(w_init.dims) != 2:
            new_nodes.append(node)
            continue
        x, w_name, p = node.input[0], node.input[1], node.name
        k, n = (int(d) for d in w_init.dims)
        if x not in rows:
            t = f"{x}/{_PT}"
            shape2d = _const(m, have, f"{t}_shape2d", np.array([-1, k], dtype=np.int64))
            shape3d = _const(m, have, f"{t}_shape3d", np.array([-1, 1, k], dtype=np.int64))
            new_nodes += [
                helper.make_node("Reshape", [x, shape2d], [f"{t}_x2"], name=f"{t}_x2"),
                # max |row| as GlobalMaxPool over [rows, 1, K]: ReduceMax (opset 18) takes its axes as an input,
                # which ORT's symbolic shape inference does not read, so the int-kernel check lost every shape
                helper.make_node("Reshape", [x, shape3d], [f"{t}_x3"], name=f"{t}_x3"),
                helper.make_node("Abs", [f"{t}_x3"], [f"{t}_abs"], name=f"{t}_abs"),
                helper.make_node("GlobalMaxPool", [f"{t}_abs"], [f"{t}_pool"], name=f"{t}_pool"),
                helper.make_node("Reshape", [f"{t}_pool", col], [f"{t}_amax0"], name=f"{t}_amax0"),
                helper.make_node("Max", [f"{t}_amax0", tiny], [f"{t}_amax"], name=f"{t}_amax"),
                helper.make_node("Mul", [f"{t}_amax", inv127], [f"{t}_s_col"], name=f"{t}_s_col"),
                helper.make_node("Reshape", [f"{t}_s_col", flat], [f"{t}_s"], name=f"{t}_s"),
                helper.make_node("Shape", [f"{t}_s"], [f"{t}_rows"], name=f"{t}_rows"),
                helper.make_node("Expand", [zp, f"{t}_rows"], [f"{t}_zp"], name=f"{t}_zp"),
                helper.make_node("QuantizeLinear", [f"{t}_x2", f"{t}_s", f"{t}_zp"], [f"{t}_q"], axis=0,
                                 name=f"{t}_q"),
                helper.make_node("Shape", [x], [f"{t}_lead"], end=-1, name=f"{t}_lead"),
            ]
            rows[x] = (f"{t}_q", f"{t}_s_col", f"{t}_lead")
        if w_name not in weights:
            q, scale = int8_weight(numpy_helper.to_array(w_init), 1, reduce_range)
            qn = _const(m, have, f"{w_name}__pt_w8", q)
            sn = _const(m, have, f"{w_name}__pt_w8_scale", scale.astype(np.float32))
            weights[w_name] = (qn, sn, n)
        q_in, s_col, lead = rows[x]
        qn, sn, n = weights[w_name]
        n_dim = _const(m, have, f"{_PT}_n{n}", np.array([n], dtype=np.int64))
        new_nodes += [
            helper.make_node("MatMulInteger", [q_in, qn, zp], [f"{p}/{_PT}_acc"], name=f"{p}/{_PT}_mmi"),
            helper.make_node("Cast", [f"{p}/{_PT}_acc"], [f"{p}/{_PT}_f"], to=onnx.TensorProto.FLOAT,
                             name=f"{p}/{_PT}_f"),
            helper.make_node("Mul", [f"{p}/{_PT}_f", sn], [f"{p}/{_PT}_fw"], name=f"{p}/{_PT}_fw"),
            helper.make_node("Mul", [f"{p}/{_PT}_fw", s_col], [f"{p}/{_PT}_y2"], name=f"{p}/{_PT}_y2"),
            helper.make_node("Concat", [lead, n_dim], [f"{p}/{_PT}_shape"], axis=0, name=f"{p}/{_PT}_shape"),
            helper.make_node("Reshape", [f"{p}/{_PT}_y2", f"{p}/{_PT}_shape"], list(node.output), name=p),
        ]
    del m.graph.node[:]
    m.graph.node.extend(new_nodes)
    _drop_unused_initializers(m)
    return m


def row_int8_gather(model: onnx.ModelProto, nodes: Sequence[str]) -> onnx.ModelProto:
    """A copy where each Gather(table, ids) in `nodes` reads an int8 table with one scale per row (per token id):
    Cast(Gather(T8, ids)) * Unsqueeze(Gather(scale, ids), -1). ORT's dynamic quantization gives a table one scale,
    which its rare large rows set for all (MiniLM, simulated: cosine 0.9992 with only the tables quantized, 0.9999
    per row); the scales add 4 bytes a row."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    inits = {t.name: t for t in m.graph.initializer}
    have = set(inits)
    last = _const(m, have, f"{_PT}_axis_last", np.array([-1], dtype=np.int64))
    wanted = set(nodes)
    tables: dict[str, tuple[str, str]] = {}
    new_nodes: list[onnx.NodeProto] = []
    for node in m.graph.node:
        table = inits.get(node.input[0]) if node.op_type == "Gather" else None
        axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
        if node.name not in wanted or table is None or len(table.dims) != 2 or axis != 0:
            new_nodes.append(node)
            continue
        t_name, p = node.input[0], node.name
        if t_name not in tables:
            q, scale = int8_weight(numpy_helper.to_array(table), 0)
            tables[t_name] = (_const(m, have, f"{t_name}__row8", q),
                              _const(m, have, f"{t_name}__row8_scale", scale.astype(np.float32)))
        qn, sn = tables[t_name]
        new_nodes += [
            helper.make_node("Gather", [qn, node.input[1]], [f"{p}/row8_q"], axis=0, name=f"{p}/row8_q"),
            helper.make_node("Gather", [sn, node.input[1]], [f"{p}/row8_s"], axis=0, name=f"{p}/row8_s"),
            helper.make_node("Unsqueeze", [f"{p}/row8_s", last], [f"{p}/row8_s_col"], name=f"{p}/row8_s_col"),
            helper.make_node("Cast", [f"{p}/row8_q"], [f"{p}/row8_f"], to=onnx.TensorProto.FLOAT,
                             name=f"{p}/row8_f"),
            helper.make_node("Mul", [f"{p}/row8_f", f"{p}/row8_s_col"], list(node.output), name=p),
        ]
    del m.graph.node[:]
    m.graph.node.extend(new_nodes)
    _drop_unused_initializers(m)
    return m


def _opset(model: onnx.ModelProto) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


def _drop_unused_initializers(m: onnx.ModelProto) -> None:
    used = {i for n in m.graph.node for i in n.input} | {o.name for o in m.graph.output}
    kept = [t for t in m.graph.initializer if t.name in used]
    del m.graph.initializer[:]
    m.graph.initializer.extend(kept)


# --- static INT8 and int8-mixed ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class StaticInt8Config:
    calibration_method: str = "minmax"
    calibration_samples: int = 256
    per_channel: bool = True
    # the word-embedding Gather is most of a small encoder's bytes
    quantize_embeddings: bool = True
    # keep up to this many of the most sensitive MatMuls at int8 weights / float activations when the int8 model
    # misses the fidelity floor on calibration data (0: never)
    max_keep: int = 8
    # leave this share of the allowed error (1 - floor) unused on calibration data, as held-out texts score a little
    # lower: floor 0.99 -> aim 0.992, floor 0.997 -> aim 0.9976 (a fixed +0.002 would ask 0.997 for 0.999)
    margin: float = 0.2
    # None: the target's cosine_mean floor
    min_cosine: float | None = None
    # calibration batches whose intermediate outputs are held at once (memory bound, see ort_quant.calibrate)
    chunk_batches: int = 2
    # calibration batches that measure the fidelity guard, and (the first of them) each node's sensitivity
    check_batches: int = 6
    sensitivity_batches: int = 4
    # real quantizations at most while searching how many nodes to keep (each is seconds on a small encoder)
    max_builds: int = 4
    # SmoothQuant-style migration of activation outliers into the weights before quantizing (passes/smooth.py);
    # None: off
    smooth_alpha: float | None = None


@dataclass(frozen=True)
class MixedInt8Config(StaticInt8Config):
    # "dynamic": activations quantized at run time (per batch), "static": calibrated ranges
    base: str = "dynamic"
    max_keep: int = 6
    # per-tensor dynamic activations lose most to outlier channels: smoothing them first leaves fewer nodes to keep
    smooth_alpha: float | None = 0.7
    # dynamic base: one activation scale per token (per_token_int8) and per-row embedding tables (row_int8_gather)
    # instead of ORT's one scale per tensor. MiniLM: cosine 0.9946 -> 0.999 with smoothing, at ORT's latency
    per_token: bool = True


def _named(model: onnx.ModelProto) -> onnx.ModelProto:
    """ORT selects nodes by name: a copy with every node named, or the model itself when all are."""
    if all(n.name for n in model.graph.node):
        return model
    m = onnx.ModelProto()
    m.CopyFrom(model)
    ort_quant.name_nodes(m)
    return m


def _floor(cfg: StaticInt8Config, ctx: PassContext) -> tuple[float, str]:
    if cfg.min_cosine is not None:
        return cfg.min_cosine, "config"
    floor = ctx.target.budgets.fidelity.get("cosine_mean")
    return (floor, f"target {ctx.target.name} cosine_mean") if floor is not None else (0.99, "default")


def _node_costs(model: onnx.ModelProto, names: Sequence[str], target: Target) -> dict[str, dict[str, object]]:
    """What keeping a node's activations in float costs: nothing in size (weights stay int8), and its MatMul at the
    float rather than the int8 rate at the target's reference workload (a roofline estimate)."""
    idx = GraphIndex(model)
    tokens = target.workload.batch * target.workload.sequence_length
    out: dict[str, dict[str, object]] = {}
    for node in idx.nodes("MatMul"):
        if node.name in names and idx.is_initializer(node.input[1]):
            k, n = (int(d) for d in idx.initializers[node.input[1]].dims)
            flops = 2.0 * tokens * k * n
            eff = target.estimate.compute_efficiency
            ms = flops * (1 / target.hardware.peak_gflops_fp32 - 1 / target.hardware.peak_gops_int8) / 1e6 / eff
            out[node.name] = {"weight": [k, n], "size_bytes_added": 0,
                              "latency_ms_added_estimated": round(ms, 3)}
    return out


class StaticInt8(Pass):
    """Static INT8 (QDQ): weights per channel, activation ranges calibrated once, settings from the target's ISA.

    Only Linear MatMuls (constant weight) and embedding Gathers are quantized, inputs only, so ORT runs them as
    MatMulIntegerToFloat; attention's activation x activation MatMuls and all other ops stay float. If the result
    misses the fidelity floor on calibration data, the most sensitive MatMuls keep float activations (their
    weights stay int8) until it holds or `max_keep` is reached.
    """

    name = "int8-static"

    def __init__(self, config: StaticInt8Config | None = None) -> None:
        super().__init__(config or StaticInt8Config())

    def _base(self) -> str:
        return "static"

    def run(self, model: onnx.ModelProto, ctx: PassContext) -> PassResult:
        cfg: StaticInt8Config = self.config
        model = _named(model)
        isa = isa_choice(ctx.target)
        base = self._base()
        matmuls = quantizable_nodes(model, gathers=False)
        gathers = [n for n in quantizable_nodes(model) if n not in set(matmuls)] if cfg.quantize_embeddings else []
        report: dict[str, Any] = {"library": "onnxruntime.quantization", "base": base, "isa": isa.describe(),
                                  "per_channel": cfg.per_channel, "weights": "int8 symmetric",
                                  "scope": "inputs of Linear MatMuls (constant weight) and embedding Gathers; "
                                           "attention's activation x activation MatMuls and outputs stay float, "
                                           "so ORT runs each as MatMulIntegerToFloat without requantizing",
                                  "outputs_quantized": False}
        if not matmuls:
            report["skipped"] = "no MatMul with a constant 2-D weight was found to quantize"
            return PassResult(model, report, modified=False)
        if ctx.calibration is None:
            raise PassError(f"{self.name} needs calibration data and none was given",
                            hint="give --calibration FILE")
        calibration, choice = select_samples(ctx.calibration, cfg.calibration_samples, ctx.seed)
        per_token = self._per_token() and _opset(model) >= 15
        if self._per_token() and not per_token:
            report["per_token_skipped"] = f"opset {_opset(model)} lacks Shape(end=...): per-tensor activations"
        if cfg.smooth_alpha is not None:
            model, report["smoothing"] = smooth(model, calibration(), cfg.smooth_alpha, per_token=per_token)
        check = [trim_padding(b) for b in islice(calibration(), cfg.check_batches)]
        producer_inputs = {n.name: n.input[0] for n in model.graph.node if n.name in set(matmuls)}
        ranges: dict[str, tuple[float, float]] | None = None
        if base == "static":
            ranges = ort_quant.calibrate(model, calibration(), sorted(set(producer_inputs.values())),
                                         method=cfg.calibration_method, chunk_batches=cfg.chunk_batches)
            report["calibration"] = {"method": cfg.calibration_method, **choice.describe(),
                                     "tensors": len(ranges), "chunk_batches": cfg.chunk_batches}
        else:
            report["calibration"] = {"method": "none (dynamic activations); samples for sensitivity only",
                                     **choice.describe()}

        report["activations"] = ("per token (symmetric, one scale per row: per_token_int8; uint8 codes around 128 on "
                                 "every ISA, whatever isa.activations says); embedding tables per row"
                                 if per_token else "per tensor")
        if per_token:
            report["library"] = ("edgecompress per_token_int8 / row_int8_gather (standard ONNX ops; ORT runs the "
                                 "products in MatMulInteger)")
            report["scope"] = ("Linear MatMuls (constant weight) and embedding Gathers; attention's activation x "
                               "activation MatMuls stay float")

        def build(keep: Sequence[str]) -> onnx.ModelProto:
            nodes = [n for n in matmuls if n not in set(keep)] + gathers
            if per_token:
                # uint8 codes around 128 on every ISA, as ORT's own dynamic path (DynamicQuantizeLinear) uses: s8 x s8
                # MatMulInteger ran ~8x slower on the x86 host, where Arm targets' fidelity is measured
                q = per_token_int8(model, [n for n in nodes if n not in set(gathers)], activation_type="uint8",
                                   reduce_range=isa.reduce_range)
                q = row_int8_gather(q, gathers)
            elif base == "static":
                assert ranges is not None
                q = ort_quant.quantize_static(model, ranges, nodes=nodes, activation_type=isa.activation_type,
                                              reduce_range=isa.reduce_range, per_channel=cfg.per_channel,
                                              method=cfg.calibration_method)
            else:
                q = ort_quant.quantize_dynamic(model, op_types=("MatMul", "Gather"), per_channel=cfg.per_channel,
                                               reduce_range=isa.reduce_range,
                                               nodes_to_exclude=[n for n in quantizable_nodes(model)
                                                                 if n not in set(nodes)])
            # kept nodes compute in float, where 8-bit weights cannot saturate anything
            return weight_only_int8(q, keep) if keep else q

        floor, floor_source = _floor(cfg, ctx)
        aim = floor + cfg.margin * (1.0 - floor)
        reference = run_first_output(model, check)

        def fidelity(m: onnx.ModelProto) -> float:
            return float(output_cosines(reference, run_first_output(m, check), check).mean())

        keep: list[str] = []
        out = build(keep)
        measured = fidelity(out)
        steps: list[dict[str, Any]] = [{"kept": 0, "cosine_mean": round(measured, 5), "how": "measured"}]
        ranked: list[tuple[str, float]] = []
        if (measured < aim or self._always_rank()) and cfg.max_keep > 0:
            # dynamic base: ranges is None, so the simulation quantizes activations per batch like ORT does
            simulation = Int8Simulation(model, matmuls + gathers, act_ranges=ranges,
                                        act_signed=isa.activation_type == "int8", reduce_range=isa.reduce_range,
                                        per_token=per_token)
            ranked = node_sensitivity(model, ctx, matmuls, batches=check[:cfg.sensitivity_batches],
                                      simulation=simulation)
            limit = min(cfg.max_keep, len(ranked))
            simulated: dict[int, float] = {}

            def sim_cosine(k: int) -> float:
                if k not in simulated:
                    kept = {name for name, _ in ranked[:k]}
                    sim = simulation.outputs([n for n in matmuls if n not in kept] + gathers, check)
                    simulated[k] = float(output_cosines(reference, sim, check).mean())
                    steps.append({"kept": k, "cosine_mean": round(simulated[k], 5), "how": "simulated"})
                return simulated[k]

            # Real builds are the slow part: the float simulation (cheap) proposes how many nodes to keep, shifted
            # by how far it was from the real kernels at the last real build; a real build confirms.
            offset = measured - sim_cosine(0)
            k, builds = 0, 1
            while measured < aim and k < limit and builds < cfg.max_builds:
                k = next((c for c in range(k + 1, limit + 1) if sim_cosine(c) + offset >= aim), limit)
                keep = [name for name, _ in ranked[:k]]
                out = build(keep)
                measured = fidelity(out)
                builds += 1
                steps.append({"kept": k, "cosine_mean": round(measured, 5), "how": "measured"})
                offset = measured - sim_cosine(k)
        costs = _node_costs(model, keep, ctx.target)
        optimized = ort_quant.optimized_op_histogram(out)
        int8_kernels = {op: c for op, c in optimized.items() if op in _INT8_KERNELS}
        report.update({
            "quantized": {"matmul": len(matmuls) - len(keep), "gather": len(gathers)},
            "fidelity_guard": {"floor": floor, "floor_source": floor_source, "aim": round(aim, 5),
                               "measured_on": f"{sum(len(next(iter(b.values()))) for b in check)} calibration "
                                              "samples (not the evaluation texts)",
                               "cosine_mean": round(measured, 5), "met": measured >= floor, "steps": steps},
            "kept_float_activations": [{"node": n, "sensitivity": round(s, 6), **costs.get(n, {})}
                                       for n, s in ranked if n in set(keep)],
            "sensitivity_top": [{"node": n, "score": round(s, 6)} for n, s in ranked[:10]],
            "optimized_graph": {"int8_kernels": int8_kernels,
                                "weight_only_kernels": {op: c for op, c in optimized.items()
                                                        if op in ("MatMulNBits", "GatherBlockQuantized")},
                                "float_matmul_gemm": optimized.get("MatMul", 0) + optimized.get("Gemm", 0)},
        })
        folded = optimized.get("Gemm", 0) - op_histogram(model).get("Gemm", 0)
        if folded > 0:
            # anchors: on 2-D inputs ORT folds a QDQ MatMul + Add into DequantizeLinear -> float Gemm
            report["optimized_graph"]["note"] = (f"{folded} quantized MatMul+Add pairs were folded by ONNX Runtime "
                                                 "into float Gemm (no int8 kernel for them)")
        if measured < floor:
            log.warning("%s: cosine %.4f on calibration data is below the floor %.4f after keeping %d nodes in "
                        "float", self.name, measured, floor, len(keep))
        if sum(int8_kernels.values()) == 0:
            report["skipped"] = "ONNX Runtime fused no quantized node into an int8 kernel"
            return PassResult(out, report, modified=False)
        return PassResult(out, report)

    def _always_rank(self) -> bool:
        return False

    def _per_token(self) -> bool:
        return False


class MixedInt8(StaticInt8):
    """INT8 with per-node sensitivity: every Linear MatMul is ranked by the output error it alone causes, and the
    most sensitive keep float activations (int8 weights, so the size barely moves) until the fidelity floor holds
    on calibration data. Base: dynamic (default) or static activation quantization."""

    name = "int8-mixed"

    def __init__(self, config: MixedInt8Config | None = None) -> None:
        super().__init__(config or MixedInt8Config())
        if self.config.base not in ("dynamic", "static"):
            raise ConfigError(f"unknown int8-mixed base '{self.config.base}'", hint="use dynamic|static")

    def _base(self) -> str:
        return str(self.config.base)

    def _always_rank(self) -> bool:
        return True

    def _per_token(self) -> bool:
        # per-token scales are computed at run time: a calibrated (static) base has one range per tensor
        return bool(self.config.per_token) and self.config.base == "dynamic"


_INT8_KERNELS = ("MatMulIntegerToFloat", "DynamicQuantizeMatMul", "QLinearMatMul", "MatMulInteger", "QGemm",
                 "QAttention", "DynamicQuantizeLSTM")
