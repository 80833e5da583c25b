"""A documented model of which MatMul patterns ONNX Runtime's CPU provider runs in integer kernels, per CPU family.

Used for the kernel share of a target that is not at hand and not emulated (labelled `modelled`). The kernel a QDQ
MatMul gets is decided when ORT optimizes the graph at load time, and the rule differs by build:

- `QDQIsInt8Allowed()` (onnxruntime/core/optimizer/qdq_transformer/selectors_actions/
  qdq_selector_action_transformer.h) is true only in Arm builds (MLAS_TARGET_ARM_ANY). So on aarch64 every
  DQ(Q(x)) x DQ(int8 weight) MatMul becomes MatMulIntegerToFloat (float output) or QLinearMatMul, with int8 or
  uint8 activations alike; on x86 only uint8-activation pairs are guaranteed to fuse, and int8 (S8S8) pairs stay a
  float MatMul behind DequantizeLinear unless a later fusion catches them (on this host 7 of MiniLM's 28 did).
  Emulated aarch64 ORT 1.32 fused all 28 int8-static MatMuls of MiniLM into MatMulIntegerToFloat (issue 13).
- A float-activation MatMul whose weight is DQ(constant int8/int4) becomes MatMulNBits (DQMatMulToMatMulNBits) on
  both families: weight-only, dequantized inside the kernel.
- Ops already integer in the file (MatMulInteger, DynamicQuantizeMatMul, MatMulIntegerToFloat, QLinearMatMul,
  MatMulNBits) run in MLAS integer kernels on both families. dotprod/i8mm change their speed, not whether they run.

The ISA features a target names (targets/*.toml `hardware.isa`, `hardware.arch`) pick the rule set; GPU providers
are not modelled. Layering: profiling; imports onnx and profiling.cost only.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import onnx

from edgecompress.profiling.cost import INT8_MATMUL_OPS, LOWBIT_MATMUL_OPS, MATMUL_OPS, node_costs

_INT8 = (onnx.TensorProto.INT8, onnx.TensorProto.UINT8)
_LOWBIT = (*_INT8, onnx.TensorProto.INT4, onnx.TensorProto.UINT4)


@dataclass(frozen=True)
class FusionRules:
    """What ORT's CPU provider fuses on one CPU family."""

    family: str
    s8_activations: bool  # DQ(Q(x, int8)) x DQ(W) -> MatMulIntegerToFloat
    u8_activations: bool = True
    weight_only: bool = True  # float x DQ(W int8/int4) -> MatMulNBits
    source: str = ""


ARM = FusionRules("aarch64", s8_activations=True,
                  source="ORT Arm builds: QDQIsInt8Allowed() is true (MLAS_TARGET_ARM_ANY), so S8S8 and U8S8 QDQ "
                         "MatMuls fuse into MatMulIntegerToFloat")
X86 = FusionRules("x86_64", s8_activations=False,
                  source="ORT x86 builds: QDQIsInt8Allowed() is false, so only U8 activations are sure to fuse; "
                         "S8S8 QDQ MatMuls may stay float behind DequantizeLinear (a lower bound)")


def rules_for(arch: str, isa: frozenset[str] | set[str] | tuple[str, ...] = ()) -> FusionRules:
    """The rule set for a target's CPU (`isa` is accepted for the record: no ISA flag changes a fusion today)."""
    return ARM if arch == "aarch64" else X86


@dataclass
class ModelledShare:
    matmul_flops: float
    integer_flops: float
    by_op: dict[str, dict[str, float]] = field(default_factory=dict)  # predicted op -> {"nodes", "gflops"}

    @property
    def share(self) -> float:
        return self.integer_flops / self.matmul_flops if self.matmul_flops else 0.0


def _elem_type(name: str, producers: dict[str, onnx.NodeProto], inits: dict[str, onnx.TensorProto]) -> int | None:
    """Element type of a DequantizeLinear's quantized input: its initializer's, or the zero point's of the
    QuantizeLinear that made it (uint8 when Q has no zero point, as ONNX defines)."""
    if name in inits:
        return inits[name].data_type
    q = producers.get(name)
    if q is None or q.op_type != "QuantizeLinear":
        return None
    if len(q.input) > 2 and q.input[2] in inits:
        return inits[q.input[2]].data_type
    return onnx.TensorProto.UINT8


def predicted_op(node: onnx.NodeProto, producers: dict[str, onnx.NodeProto], inits: dict[str, onnx.TensorProto],
                 rules: FusionRules) -> str:
    """The op ORT's CPU provider would run this MatMul-family node as, on that CPU family."""
    if node.op_type in ("Conv", "Gemm") and len(node.input) >= 2:
        return _qdq_conv_gemm(node, producers, inits, rules)
    if node.op_type in INT8_MATMUL_OPS | LOWBIT_MATMUL_OPS or node.op_type != "MatMul" or len(node.input) < 2:
        return node.op_type
    a, b = (producers.get(i) for i in node.input[:2])
    b_dq = b is not None and b.op_type == "DequantizeLinear" and b.input[0] in inits \
        and inits[b.input[0]].data_type in _LOWBIT
    if not b_dq:
        return "MatMul"
    if a is not None and a.op_type == "DequantizeLinear":
        a_type = _elem_type(a.input[0], producers, inits)
        if a_type == onnx.TensorProto.INT8 and rules.s8_activations:
            return "MatMulIntegerToFloat"
        if a_type == onnx.TensorProto.UINT8 and rules.u8_activations:
            return "MatMulIntegerToFloat"
        return "MatMul"  # left behind DequantizeLinear: fp32
    return "MatMulNBits" if rules.weight_only else "MatMul"


def _qdq_conv_gemm(node: onnx.NodeProto, producers: dict[str, onnx.NodeProto], inits: dict[str, onnx.TensorProto],
                   rules: FusionRules) -> str:
    """A QDQ Conv/Gemm (DQ(Q(x)) and DQ(int8 weight) in, Q out) fuses into QLinearConv/QGemm in ORT's QDQ
    transformer (ConvNodeGroupSelector, GemmNodeGroupSelector): with uint8 activations on every CPU family, with
    int8 only where QDQIsInt8Allowed() (Arm). Without the Q on its output (or its inputs) it runs in float."""
    a, b = (producers.get(i) for i in node.input[:2])
    if a is None or b is None or a.op_type != "DequantizeLinear" or b.op_type != "DequantizeLinear":
        return node.op_type
    if b.input[0] not in inits or inits[b.input[0]].data_type not in _INT8:
        return node.op_type
    a_type = _elem_type(a.input[0], producers, inits)
    allowed = (a_type == onnx.TensorProto.UINT8 and rules.u8_activations) or \
              (a_type == onnx.TensorProto.INT8 and rules.s8_activations)
    consumers = _consumers(node.output[0], producers)
    quantized_out = bool(consumers) and all(c.op_type == "QuantizeLinear" for c in consumers)
    if not allowed or not (quantized_out or node.op_type == "Gemm"):
        return node.op_type
    return "QLinearConv" if node.op_type == "Conv" else "QGemm"


def _consumers(name: str, producers: dict[str, onnx.NodeProto]) -> list[onnx.NodeProto]:
    seen: dict[int, onnx.NodeProto] = {}
    for n in producers.values():
        if name in n.input:
            seen[id(n)] = n
    return list(seen.values())


def modelled_share(model: onnx.ModelProto, dims: dict[str, int], rules: FusionRules) -> ModelledShare:
    """MatMul-family FLOPs of the deployable (unoptimized) graph, by the kernel `rules` predict for each node."""
    producers = {o: n for n in model.graph.node for o in n.output}
    inits = {t.name: t for t in model.graph.initializer}
    nodes = {n.name or n.output[0]: n for n in model.graph.node}
    total = integer = 0.0
    by_op: dict[str, dict[str, float]] = {}
    for c in node_costs(model, dims):
        if c.op_type not in MATMUL_OPS:
            continue
        op = predicted_op(nodes[c.name], producers, inits, rules) if c.name in nodes else c.op_type
        entry = by_op.setdefault(op, {"nodes": 0, "gflops": 0.0})
        entry["nodes"] += 1
        entry["gflops"] += c.flops / 1e9
        total += c.flops
        if op in INT8_MATMUL_OPS | LOWBIT_MATMUL_OPS:
            integer += c.flops
    return ModelledShare(total, integer, {k: {"nodes": v["nodes"], "gflops": round(v["gflops"], 4)}
                                          for k, v in sorted(by_op.items())})
