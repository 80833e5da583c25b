"""Per-layer view of a deployable graph for the report: each weight-bearing node's precision and bits, whether its
activations were kept float and why, and its measured sensitivity, read from the graph and the passes' reports.

Layering: reads an onnx.ModelProto and JSON-able pass reports; imports nothing internal.
"""

from __future__ import annotations

from typing import Any

import onnx

_WEIGHT_OPS = frozenset({"MatMul", "Gemm", "MatMulInteger", "DynamicQuantizeMatMul", "MatMulIntegerToFloat",
                         "MatMulNBits", "Gather", "QLinearMatMul"})
_PASS_THROUGH = frozenset({"DequantizeLinear", "Reshape", "Transpose", "Cast", "Squeeze", "Unsqueeze", "Identity",
                           "Mul"})
_INT_ACTIVATION_OPS = frozenset({"MatMulInteger", "DynamicQuantizeMatMul", "MatMulIntegerToFloat", "QLinearMatMul"})
_BITS: dict[int, int] = {onnx.TensorProto.FLOAT: 32, onnx.TensorProto.FLOAT16: 16, onnx.TensorProto.BFLOAT16: 16,
         onnx.TensorProto.INT8: 8, onnx.TensorProto.UINT8: 8, onnx.TensorProto.INT4: 4, onnx.TensorProto.UINT4: 4}
_NAMES = {32: "fp32", 16: "fp16", 8: "int8", 4: "int4"}


def layer_table(model: onnx.ModelProto, pass_reports: list[dict[str, Any]], limit: int = 400) -> list[dict[str, Any]]:
    """One row per node that reads a constant weight (MatMul family, embedding Gather)."""
    inits = {t.name: t for t in model.graph.initializer}
    producers = {o: n for n in model.graph.node for o in n.output}
    kept, sensitivity = _from_reports(pass_reports)
    rows: list[dict[str, Any]] = []
    for n in model.graph.node:
        if n.op_type not in _WEIGHT_OPS or len(n.input) < 2:
            continue
        w_input = n.input[0] if n.op_type == "Gather" else n.input[1]
        weight, via = _weight_source(w_input, inits, producers)
        if weight is None or (n.op_type != "Gather" and len(weight.dims) < 2):
            continue  # activation x activation (attention scores): no weight, not a layer
        bits = int(next((a.i for a in n.attribute if a.name == "bits"), 0)) or _BITS.get(weight.data_type, 32)
        if "Gather" in via and n.op_type != "Gather":
            precision = f"codebook (indices in {_NAMES.get(bits, f'{bits}-bit')})"
        else:
            precision = _NAMES.get(bits, f"{bits}-bit")
        a = producers.get(n.input[1] if n.op_type == "Gather" else n.input[0])
        int_act = n.op_type in _INT_ACTIVATION_OPS or (a is not None and a.op_type == "DequantizeLinear")
        name = n.name or n.output[0]
        row: dict[str, Any] = {"node": name, "op": n.op_type, "weight": list(weight.dims), "precision": precision,
                               "bits": bits, "activations": "n/a (lookup)" if n.op_type == "Gather"
                               else ("int8" if int_act else "float")}
        if name in kept:
            row["kept_float"] = kept[name]
        if name in sensitivity:
            row["sensitivity"] = sensitivity[name]
        rows.append(row)
        if len(rows) >= limit:
            break
    return rows


def _weight_source(name: str, inits: dict[str, onnx.TensorProto], producers: dict[str, onnx.NodeProto],
                   depth: int = 6) -> tuple[onnx.TensorProto | None, list[str]]:
    """The initializer a weight input comes from through dequantize/reshape chains (and codebook decodes)."""
    via: list[str] = []
    for _ in range(depth):
        if name in inits:
            return inits[name], via
        node = producers.get(name)
        if node is None or not node.input or (node.op_type not in _PASS_THROUGH and node.op_type != "Gather"):
            return None, via
        via.append(node.op_type)
        name = node.input[0]
    return None, via


def _from_reports(reports: list[dict[str, Any]]) -> tuple[dict[str, str], dict[str, float]]:
    """node -> why its activations stayed float; node -> sensitivity, from any pass report that lists nodes."""
    kept: dict[str, str] = {}
    sens: dict[str, float] = {}
    for rep in reports:
        for key, value in rep.items():
            if not isinstance(value, list):
                continue
            for item in value:
                if not isinstance(item, dict) or "node" not in item:
                    continue
                if isinstance(item.get("sensitivity"), (int, float)):
                    sens[str(item["node"])] = float(item["sensitivity"])
                if "kept" in key or "keep" in key:
                    floor = rep.get("fidelity_guard", {}).get("floor") if isinstance(rep.get("fidelity_guard"),
                                                                                      dict) else None
                    kept[str(item["node"])] = ("most sensitive; keeps the fidelity floor"
                                               + (f" {floor}" if floor is not None else ""))
    return kept, sens
