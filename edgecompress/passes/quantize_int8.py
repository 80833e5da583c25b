"""INT8 quantization passes built on ONNX Runtime's quantizers: dynamic, static (calibrated, ISA-aware) and mixed
(per-node sensitivity decides which MatMuls keep float activations)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import islice
from typing import Any

import onnx

from edgecompress.calibration import select_samples, trim_padding
from edgecompress.errors import ConfigError, PassError
from edgecompress.graph import GraphIndex, op_histogram
from edgecompress.isa import X86_VNNI, no_dynamic_int8_on_gpu, no_int8_gemm
from edgecompress.passes import ort_quant
from edgecompress.passes.base import (
    ModelInfo,
    Pass,
    PassContext,
    PassResult,
    Skip,
    WeightBytes,
    matmul_only,
    register,
    skips,
)
from edgecompress.passes.int8_graph import (  # noqa: F401  (re-exported: codebook and tests import them here)
    _drop_unused_initializers,
    _opset,
    per_token_int8,
    row_int8_gather,
    weight_only_int8,
)
from edgecompress.passes.options import CALIBRATION_SAMPLES, Option, option, validate_config
from edgecompress.passes.sensitivity import (
    Int8Simulation,
    node_sensitivity,
    output_cosines,
    quantizable_nodes,
    run_first_output,
)
from edgecompress.passes.smooth import smooth
from edgecompress.targets import Target
from edgecompress.tasknames import DECODER_TASK, ENCODER_TASKS

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DynamicInt8Config:
    per_channel: bool = True
    reduce_range: bool = False
    # The word-embedding Gather is most of a small encoder's bytes: quantize it too.
    op_types: tuple[str, ...] = ("MatMul", "Gather")


@register(recipe="int8-dynamic", tasks=ENCODER_TASKS, quantizes=True, order=20,
          description="ONNX Runtime dynamic INT8: per-channel int8 weights (word-embedding Gather included), "
                      "activations quantized at run time",
          weight_bytes=WeightBytes(1.0, 1.0, "int8"), search=({},),
          refusals={DECODER_TASK: "ORT dynamic int8 (per-channel) breaks decoders: perplexity in the millions on "
                                  "SmolLM2"})
class DynamicInt8(Pass[DynamicInt8Config]):
    """Weights to int8 (per output channel), activations quantized on the fly by ORT at run time."""

    name = "int8-dynamic"

    @classmethod
    def refuses(cls, info: ModelInfo | None) -> str | None:
        return matmul_only(info)

    @classmethod
    def requires(cls, target: Target, info: ModelInfo | None) -> str | None:
        return no_dynamic_int8_on_gpu(target) or no_int8_gemm(target)

    def run(self, model: onnx.ModelProto, ctx: PassContext) -> PassResult:
        cfg = self.config
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
            report["skipped"] = skips(Skip("", "no MatMul with a constant weight was found to quantize"))
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
    features, arch = target.hardware.isa, target.hardware.arch
    if arch == "aarch64" or "neon" in features:
        kernels = ("i8mm (smmla)" if "i8mm" in features else "dotprod (sdot)" if "dotprod" in features
                   else "NEON widening")
        return IsaChoice("int8", False, f"Arm {kernels} int8 kernels are signed x signed with 32-bit accumulation: "
                                        "S8S8, full 8-bit range")
    vnni = features & X86_VNNI
    if vnni:
        return IsaChoice("uint8", False, f"x86 with {'/'.join(sorted(vnni))}: U8S8 (ORT's x86 int8 GEMMs take "
                                         "uint8 activations), VNNI accumulates in int32 without saturation")
    return IsaChoice("uint8", True, "x86 without VNNI: U8S8 (ORT's x86 int8 GEMMs take uint8 activations); "
                                    "reduce_range keeps weights to 7 bits so u8 x s8 pair sums cannot saturate "
                                    "the AVX2 int16 accumulation")


# --- static INT8 and int8-mixed ------------------------------------------------------------------------------------
CALIBRATION_METHOD = Option("calibration_method", "int8-static/int8-mixed: how activation ranges are calibrated.",
                            choices=("minmax", "entropy", "percentile"))


@dataclass(frozen=True)
class StaticInt8Config:
    calibration_method: str = option("minmax", CALIBRATION_METHOD)
    calibration_samples: int = option(256, CALIBRATION_SAMPLES)
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

    def __post_init__(self) -> None:
        validate_config(self, "int8")


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


@register(recipe="int8-static", tasks=ENCODER_TASKS, quantizes=True, order=30,
          description="ONNX Runtime static INT8 (QDQ) of the Linear MatMuls and embedding Gathers: per-channel int8 "
                      "weights, calibrated activation ranges (--calibration-method, --calibration-samples), U8S8/S8S8 "
                      "and reduce_range from the target's ISA; the most sensitive MatMuls keep float activations if "
                      "the fidelity floor needs it",
          weight_bytes=WeightBytes(1.0, 1.0, "int8"), search=({},),
          refusals={DECODER_TASK: "static int8 activations are not calibrated for KV-cache decoders here"})
class StaticInt8(Pass[StaticInt8Config]):
    """Static INT8 (QDQ): weights per channel, activation ranges calibrated once, settings from the target's ISA.

    Only Linear MatMuls (constant weight) and embedding Gathers are quantized, inputs only, so ORT runs them as
    MatMulIntegerToFloat; attention's activation x activation MatMuls and all other ops stay float. If the result
    misses the fidelity floor on calibration data, the most sensitive MatMuls keep float activations (their
    weights stay int8) until it holds or `max_keep` is reached.
    """

    name = "int8-static"

    @classmethod
    def requires(cls, target: Target, info: ModelInfo | None) -> str | None:
        return no_int8_gemm(target)

    def _base(self) -> str:
        return "static"

    def run(self, model: onnx.ModelProto, ctx: PassContext) -> PassResult:
        cfg = self.config
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
            report["skipped"] = skips(Skip("", "no MatMul with a constant 2-D weight was found to quantize"))
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
            report["skipped"] = skips(Skip("", "ONNX Runtime fused no quantized node into an int8 kernel"))
            return PassResult(out, report, modified=False)
        return PassResult(out, report)

    def _always_rank(self) -> bool:
        return False

    def _per_token(self) -> bool:
        return False


@register(recipe="int8-mixed", tasks=ENCODER_TASKS, quantizes=True, order=40,
          description="INT8 with per-node sensitivity: activation outliers smoothed into the weights (SmoothQuant, "
                      "alpha 0.7), dynamic int8 with one activation scale per token (standard ops, ORT MatMulInteger) "
                      "and per-row embedding tables; the MatMuls whose quantized activations cost the most fidelity "
                      "keep float activations (int8 weights) until the fidelity floor holds",
          weight_bytes=WeightBytes(1.1, 1.0, "int8"), search=({},),
          refusals={DECODER_TASK: "built on dynamic int8, which breaks decoders (perplexity in the millions on "
                                  "SmolLM2)"})
class MixedInt8(StaticInt8):
    """INT8 with per-node sensitivity: every Linear MatMul is ranked by the output error it alone causes, and the
    most sensitive keep float activations (int8 weights, so the size barely moves) until the fidelity floor holds
    on calibration data. Base: dynamic (default) or static activation quantization."""

    name = "int8-mixed"

    @classmethod
    def refuses(cls, info: ModelInfo | None) -> str | None:
        return matmul_only(info)
    config_class = MixedInt8Config

    @classmethod
    def requires(cls, target: Target, info: ModelInfo | None) -> str | None:
        return no_dynamic_int8_on_gpu(target) or no_int8_gemm(target)

    def __init__(self, config: StaticInt8Config | None = None) -> None:
        super().__init__(config)
        if self._mixed.base not in ("dynamic", "static"):
            raise ConfigError(f"unknown int8-mixed base '{self._mixed.base}'", hint="use dynamic|static")

    @property
    def _mixed(self) -> MixedInt8Config:
        assert isinstance(self.config, MixedInt8Config), "int8-mixed takes a MixedInt8Config"
        return self.config

    def _base(self) -> str:
        return str(self._mixed.base)

    def _always_rank(self) -> bool:
        return True

    def _per_token(self) -> bool:
        # per-token scales are computed at run time: a calibrated (static) base has one range per tensor
        return bool(self._mixed.per_token) and self._mixed.base == "dynamic"


_INT8_KERNELS = ("MatMulIntegerToFloat", "DynamicQuantizeMatMul", "QLinearMatMul", "MatMulInteger", "QGemm",
                 "QAttention", "DynamicQuantizeLSTM")
