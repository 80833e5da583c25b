"""Static INT8 (QDQ) for image models, with a preset per model family (`int8-static` for image tasks).

- transformer (ViT, DeiT, ...): the text encoders' recipe (quantize_int8.StaticInt8): only the inputs of the Linear
  MatMuls are quantized, so LayerNorm, GELU, Softmax, the residual Adds and attention's activation x activation
  MatMuls stay float. The anchors' ViT int8 fell from 81.4 to 0 top-1 with residual Adds quantized (78.5 with them
  in float): this preset never quantizes them.
- conv (MobileNet, EfficientNet, ResNet, ...): ORT's full QDQ, outputs included, so consecutive convolutions chain
  as QLinearConv in int8; weights symmetric int8 per output channel. Activations are asymmetric uint8 on every
  target: ReLU/ReLU6 outputs are non-negative (a symmetric int8 range wastes half its codes on them), and U8S8
  QLinearConv has integer kernels on x86 (VNNI, AVX2) and Arm alike. Then, against the fidelity floor on
  calibration images, the convolutions whose quantized input and weight move the logits most (measured one at a
  time in a float simulation: the first conv and depthwise layers, typically) stay float, most sensitive first.
"""

from __future__ import annotations

import logging
from itertools import islice
from typing import Any

import numpy as np
import onnx

from edgecompress.calibration import select_samples
from edgecompress.errors import PassError
from edgecompress.passes import ort_quant
from edgecompress.passes.base import PassContext, PassResult, Skip, WeightBytes, register, skips
from edgecompress.passes.quantize_int8 import StaticInt8, _floor, _named, isa_choice
from edgecompress.passes.sensitivity import Int8Simulation, node_sensitivity, output_cosines, run_first_output
from edgecompress.tasknames import VISION_TASKS

log = logging.getLogger(__name__)

PRESETS = {
    "transformer": "Linear MatMuls' inputs int8 (MatMulIntegerToFloat); LayerNorm, GELU, Softmax, residual Adds, "
                   "attention's activation x activation MatMuls and the patch-embedding Conv float",
    "conv": "every op ORT can quantize in QDQ (Conv, Gemm, Add, pooling; outputs too, so convolutions chain in "
            "int8), uint8 activations, int8 per-channel weights; the most sensitive convolutions float if the "
            "fidelity floor needs it",
}
INT8_CONV_KERNELS = ("QLinearConv", "ConvInteger", "QGemm", "QLinearMatMul", "MatMulIntegerToFloat",
                     "QLinearAdd", "QLinearGlobalAveragePool", "QLinearMul")


@register(recipe="int8-static", tasks=VISION_TASKS, quantizes=True, order=31,
          description="static INT8 (QDQ) with a preset per model family (image models: transformer / conv)",
          weight_bytes=WeightBytes(1.0, 1.0, "int8"), search=({},))
class VisionStaticInt8(StaticInt8):
    """int8-static for image models: the family preset (module docstring), then the fidelity guard."""

    name = "int8-static"

    def run(self, model: onnx.ModelProto, ctx: PassContext) -> PassResult:
        family = ctx.info.family or "conv"
        if family == "transformer":
            result = super().run(model, ctx)
            result.report["preset"] = {"family": family, "what": PRESETS[family]}
            return result
        return self._run_conv(model, ctx)

    def _run_conv(self, model: onnx.ModelProto, ctx: PassContext) -> PassResult:
        cfg = self.config
        model = _named(ort_quant.preprocess(model))
        isa = isa_choice(ctx.target)
        inits = {t.name for t in model.graph.initializer}
        convs = [n.name for n in model.graph.node if n.op_type == "Conv" and len(n.input) > 1 and n.input[1] in inits]
        report: dict[str, Any] = {
            "library": "onnxruntime.quantization (quant_pre_process, then QDQ of every quantizable op)",
            "base": "static",
            "preset": {"family": "conv", "what": PRESETS["conv"]},
            "isa": {"activations": "uint8 (asymmetric)", "weights": "int8 symmetric", "reduce_range": isa.reduce_range,
                    "reason": "ReLU/ReLU6 outputs are non-negative: asymmetric uint8 keeps all 256 codes for them; "
                              "U8S8 QLinearConv runs in integer kernels on x86 and Arm"
                              + ("; 7-bit weights: x86 without VNNI" if isa.reduce_range else "")},
            "per_channel": cfg.per_channel, "outputs_quantized": True}
        if not convs:
            report["skipped"] = skips(Skip("", "no Conv with a constant weight was found to quantize"))
            return PassResult(model, report, modified=False)
        if ctx.calibration is None:
            raise PassError(f"{self.name} needs calibration data and none was given",
                            hint="give --calibration DIR (images)")
        calibration, choice = select_samples(ctx.calibration, cfg.calibration_samples, ctx.seed)
        tensors = sorted({o for n in model.graph.node for o in n.output} | {i.name for i in model.graph.input})
        ranges = ort_quant.calibrate(model, calibration(), tensors, method=cfg.calibration_method,
                                     chunk_batches=cfg.chunk_batches)
        report["calibration"] = {"method": cfg.calibration_method, **choice.describe(), "tensors": len(ranges),
                                 "chunk_batches": cfg.chunk_batches}

        full = ort_quant.quantize_qdq_all(model, ranges, activation_type="uint8", reduce_range=isa.reduce_range,
                                          per_channel=cfg.per_channel, method=cfg.calibration_method)

        def build(keep: list[str]) -> onnx.ModelProto:
            # ORT's own nodes_to_exclude made EfficientNet-Lite0 worse, not better (cosine 0.984 -> 0.840 keeping
            # one depthwise conv): kept convolutions are unwrapped in the full QDQ graph instead (float_convs)
            return float_convs(full, model, keep) if keep else full

        check = list(islice(calibration(), cfg.check_batches))
        reference = run_first_output(model, check)
        ref_top1 = np.concatenate([r.reshape(r.shape[0], -1).argmax(-1) for r in reference])

        def measure(m: onnx.ModelProto) -> tuple[float, float]:
            got = run_first_output(m, check)
            top1 = np.concatenate([g.reshape(g.shape[0], -1).argmax(-1) for g in got])
            return float(output_cosines(reference, got, check).mean()), float((top1 == ref_top1).mean())

        floor, floor_source = _floor(cfg, ctx)
        aim = floor + cfg.margin * (1.0 - floor)
        # top-1 agreement on a few dozen calibration images is reported, not aimed at: its misses are near-ties of
        # FP32's own top two (EfficientNet-Lite0: the 2 of 100 held-out images int8 flipped had FP32 margins of 0.04
        # and 0.06), and keeping convolutions in float did not remove them (all 16 depthwise float: 0.97)
        def short(cos: float, top1: float) -> bool:
            return cos < aim

        keep: list[str] = []
        out = build(keep)
        measured, agree = measure(out)
        steps: list[dict[str, Any]] = [{"kept": 0, "cosine_mean": round(measured, 5), "top1_agreement": agree,
                                        "how": "measured"}]
        ranked: list[tuple[str, float]] = []
        if short(measured, agree) and cfg.max_keep > 0:
            simulation = Int8Simulation(model, convs, act_ranges=ranges, act_signed=False,
                                        reduce_range=isa.reduce_range)
            ranked = node_sensitivity(model, ctx, convs, batches=check[:cfg.sensitivity_batches],
                                      simulation=simulation)
            k, builds = 0, 1
            limit = min(cfg.max_keep, len(ranked))
            while short(measured, agree) and k < limit and builds < cfg.max_builds:
                k = min(limit, max(1, 2 * k))  # 1, 2, 4, 8 most sensitive: each real build costs seconds
                keep = [name for name, _ in ranked[:k]]
                out = build(keep)
                measured, agree = measure(out)
                builds += 1
                steps.append({"kept": k, "cosine_mean": round(measured, 5), "top1_agreement": agree,
                              "how": "measured"})
        first_conv = convs[0]
        groups = {n.name: next((a.i for a in n.attribute if a.name == "group"), 1) for n in model.graph.node}
        optimized = ort_quant.optimized_op_histogram(out)
        int8_kernels = {op: c for op, c in optimized.items() if op in INT8_CONV_KERNELS}
        report.update({
            "quantized": {"conv": len(convs) - len(keep)},
            "fidelity_guard": {"floor": floor, "floor_source": floor_source, "aim": round(aim, 5),
                               "metric": "cosine of the logits to FP32's", "top1_agreement": agree,
                               "measured_on": f"{sum(len(next(iter(b.values()))) for b in check)} calibration "
                                              "images (not the evaluation images)",
                               "cosine_mean": round(measured, 5),
                               "met": measured >= floor, "steps": steps},
            "kept_float": [{"node": n, "sensitivity": round(s, 6),
                            "kind": "first conv" if n == first_conv else "depthwise" if groups.get(n, 1) > 1
                            else "conv"} for n, s in ranked if n in set(keep)],
            "sensitivity_top": [{"node": n, "score": round(s, 6)} for n, s in ranked[:10]],
            "optimized_graph": {"int8_kernels": int8_kernels, "float_conv": optimized.get("Conv", 0)
                                + optimized.get("FusedConv", 0)},
        })
        if measured < floor:
            log.warning("%s: cosine %.4f on calibration images is below the floor %.4f after keeping %d "
                        "convolutions in float", self.name, measured, floor, len(keep))
        if sum(int8_kernels.values()) == 0:
            report["skipped"] = skips(Skip("", "ONNX Runtime fused no quantized node into an int8 kernel"))
            return PassResult(out, report, modified=False)
        return PassResult(out, report)


def float_convs(qdq: onnx.ModelProto, fp32: onnx.ModelProto, names: list[str]) -> onnx.ModelProto:
    """A copy of the QDQ model in which the Conv nodes `names` read their float weight and, where the graph still
    holds it, their float input (the tensor before its QuantizeLinear), so ORT runs them as float Conv; their outputs
    stay quantized for the next node. That is what the sensitivity simulation measured (a node's input and weight
    quantized or not), but for inputs ORT's quantizer clipped by dropping a ReLU6 (those stay 8-bit)."""
    m = onnx.ModelProto()
    m.CopyFrom(qdq)
    producers = {o: n for n in m.graph.node for o in n.output}
    float_weights = {n.name: n.input[1] for n in fp32.graph.node if n.name in set(names)}
    float_inputs = {n.name: n.input[0] for n in fp32.graph.node if n.name in set(names)}
    fp32_inits = {t.name: t for t in fp32.graph.initializer}
    fp32_producers = {o: n for n in fp32.graph.node for o in n.output}
    for node in m.graph.node:
        if node.op_type != "Conv" or node.name not in set(names):
            continue
        dq = producers.get(node.input[0])
        q = producers.get(dq.input[0]) if dq is not None and dq.op_type == "DequantizeLinear" else None
        # ORT's quantizer drops a Relu/Clip whose range the Q after it enforces (the conv before it then writes the
        # clip's output name): that tensor lacks the clip, so the conv keeps its quantized input
        if q is not None and q.op_type == "QuantizeLinear" and q.input[0] == float_inputs.get(node.name) \
                and _op(producers, q.input[0]) == _op(fp32_producers, q.input[0]):
            node.input[0] = q.input[0]
        w = fp32_inits.get(float_weights.get(node.name, ""))
        if w is not None:
            kept = onnx.TensorProto()
            kept.CopyFrom(w)
            kept.name = f"{w.name}__float"
            m.graph.initializer.append(kept)
            node.input[1] = kept.name
    _drop_dead(m)
    return m


def _op(producers: dict[str, onnx.NodeProto], name: str) -> str:
    node = producers.get(name)
    return node.op_type if node is not None else ""


def _drop_dead(m: onnx.ModelProto) -> None:
    """Remove nodes whose outputs nothing reads (the unwrapped Q/DQ pairs), then unused initializers."""
    outputs = {o.name for o in m.graph.output}
    while True:
        used = {i for n in m.graph.node for i in n.input} | outputs
        dead = [n for n in m.graph.node if not any(o in used for o in n.output)]
        if not dead:
            break
        for n in dead:
            m.graph.node.remove(n)
    used = {i for n in m.graph.node for i in n.input}
    keep = [t for t in m.graph.initializer if t.name in used]
    del m.graph.initializer[:]
    m.graph.initializer.extend(keep)
