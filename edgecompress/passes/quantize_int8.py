"""INT8 quantization passes built on ONNX Runtime's quantizers."""

from __future__ import annotations

from dataclasses import dataclass

import onnx

from edgecompress.graph import op_histogram
from edgecompress.passes import ort_quant
from edgecompress.passes.base import Pass, PassContext, PassResult


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
