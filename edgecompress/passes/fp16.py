"""FP16: weights and compute in float16 with ONNX Runtime's transformer converter, inputs and outputs kept fp32.

For GPU targets (and CPUs with fp16 arithmetic): on a CPU without it, ORT runs most fp16 ops through casts and the
model only gets smaller, not faster. ORT's converter keeps a block list of ops that must stay fp32 and inserts the
casts around them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx

from edgecompress.graph import op_histogram
from edgecompress.isa import no_fp16_arithmetic
from edgecompress.passes import ort_quant
from edgecompress.passes.base import ModelInfo, Pass, PassContext, PassResult, Skip, WeightBytes, register, skips
from edgecompress.targets import Target
from edgecompress.tasknames import DECODER_TASK, ENCODER_TASKS

_FLOAT, _HALF = onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16


@dataclass(frozen=True)
class Fp16Config:
    # fp32 in and out: callers and tokenizers feed the same arrays as to the FP32 model
    keep_io_types: bool = True
    # op types left in fp32; None = ORT's default block list (its converter knows which ops lack fp16 kernels)
    op_block_list: tuple[str, ...] | None = None


def _weights_bytes(model: onnx.ModelProto, dtype: int) -> tuple[int, int]:
    inits = [t for t in model.graph.initializer if t.data_type == dtype]
    return len(inits), sum(int(np.prod(t.dims)) * (4 if dtype == _FLOAT else 2) for t in inits)


def _topological_sort(model: onnx.ModelProto) -> None:
    """ORT's converter appends the input casts after their consumers; ORT sorts at load, the ONNX checker refuses."""
    graph = model.graph
    ready = {i.name for i in graph.input} | {t.name for t in graph.initializer} | {""}
    pending = list(graph.node)
    ordered: list[onnx.NodeProto] = []
    while pending:
        rest = []
        for node in pending:
            if all(i in ready for i in node.input):
                ordered.append(node)
                ready.update(node.output)
            else:
                rest.append(node)
        if len(rest) == len(pending):  # unresolvable (a cycle): leave the rest in its order for the checker
            ordered.extend(rest)
            break
        pending = rest
    del graph.node[:]
    graph.node.extend(ordered)


@register(recipe="fp16", tasks=ENCODER_TASKS, order=10,
          description="FP16 weights and compute (ONNX Runtime's transformer float16 converter), fp32 inputs and "
                      "outputs; for GPUs and CPUs with fp16 arithmetic",
          weight_bytes=WeightBytes(2.0, 2.0, "fp16"), search=({},),
          refusals={DECODER_TASK: "the float16 converter is not validated on KV-cache decoders yet"})
class Fp16(Pass[Fp16Config]):
    """Float initializers and activations to float16; fp32 I/O."""

    name = "fp16"

    @classmethod
    def requires(cls, target: Target, info: ModelInfo | None) -> str | None:
        return no_fp16_arithmetic(target)

    def run(self, model: onnx.ModelProto, ctx: PassContext) -> PassResult:
        cfg = self.config
        n_float, float_bytes = _weights_bytes(model, _FLOAT)
        report: dict[str, object] = {"library": "onnxruntime.transformers.float16.convert_float_to_float16",
                                     "keep_io_types": cfg.keep_io_types,
                                     "op_block_list": list(cfg.op_block_list) if cfg.op_block_list is not None
                                     else "onnxruntime default"}
        if n_float == 0:
            report["skipped"] = skips(Skip("", "the model has no float32 weights to convert"))
            return PassResult(model, report, modified=False)
        out = ort_quant.convert_float16(model, keep_io_types=cfg.keep_io_types, op_block_list=cfg.op_block_list)
        _topological_sort(out)
        n_left, _ = _weights_bytes(out, _FLOAT)
        n_half, half_bytes = _weights_bytes(out, _HALF)
        before, after = op_histogram(model), op_histogram(out)
        report.update({
            "initializers_to_fp16": n_half,
            "initializers_left_fp32": n_left,
            "weights_mb": {"before": round(float_bytes / 1e6, 3), "after_fp16": round(half_bytes / 1e6, 3)},
            "casts_added": after.get("Cast", 0) - before.get("Cast", 0),
            "target_has_fp16_arithmetic": _fp16_note(ctx),
        })
        return PassResult(out, report)


def _fp16_note(ctx: PassContext) -> str:
    hw = ctx.target.hardware
    if any(p in ("CUDAExecutionProvider", "TensorrtExecutionProvider") for p in ctx.target.runtime.providers):
        return "yes (GPU execution provider)"
    if "fp16" in hw.isa:
        return "yes (fp16 in the target's ISA)"
    return "no: fp16 weights halve the file but compute runs in fp32 through casts"
