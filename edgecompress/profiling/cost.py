"""Per-node cost of an ONNX graph at a concrete workload: FLOPs, bytes moved and the precision it runs at.

Shapes come from ONNX Runtime's symbolic shape inference with concrete input dims (it knows the contrib ops such
as MatMulNBits and DynamicQuantizeMatMul); ONNX's own inference is the fallback. Used by the roofline estimate.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from edgecompress.graph import GraphIndex, value_shapes, with_concrete_inputs

log = logging.getLogger(__name__)

INT8_MATMUL_OPS = frozenset({"MatMulInteger", "QLinearMatMul", "MatMulIntegerToFloat", "DynamicQuantizeMatMul",
                             "QGemm", "ConvInteger", "QLinearConv", "QAttention"})
LOWBIT_MATMUL_OPS = frozenset({"MatMulNBits"})
FLOAT_MATMUL_OPS = frozenset({"MatMul", "Gemm", "FusedMatMul", "Conv", "FusedConv", "Attention"})
MATMUL_OPS = INT8_MATMUL_OPS | LOWBIT_MATMUL_OPS | FLOAT_MATMUL_OPS

# Rough FLOPs per output element for the memory-bound ops that matter in transformers.
_ELEMENTWISE_FLOPS = {"Softmax": 5, "LayerNormalization": 8, "SkipLayerNormalization": 9, "Erf": 8, "Gelu": 10,
                      "FastGelu": 10, "BiasGelu": 11, "Tanh": 6, "Sigmoid": 4, "Exp": 4, "Pow": 2, "Sqrt": 2,
                      "ReduceMean": 1, "SimplifiedLayerNormalization": 6, "SkipSimplifiedLayerNormalization": 7}
_FREE_OPS = frozenset({"Constant", "Shape", "Reshape", "Unsqueeze", "Squeeze", "Identity", "Flatten",
                       "ConstantOfShape", "Size"})

DTYPE_BYTES: dict[int, float] = {onnx.TensorProto.FLOAT: 4, onnx.TensorProto.FLOAT16: 2, onnx.TensorProto.BFLOAT16: 2,
                onnx.TensorProto.INT8: 1, onnx.TensorProto.UINT8: 1, onnx.TensorProto.INT32: 4,
                onnx.TensorProto.INT64: 8, onnx.TensorProto.DOUBLE: 8, onnx.TensorProto.BOOL: 1,
                onnx.TensorProto.INT4: 0.5, onnx.TensorProto.UINT4: 0.5}


@dataclass(frozen=True)
class NodeCost:
    name: str
    op_type: str
    precision: str  # "fp32" | "fp16" | "int8" | "int4"
    flops: float
    bytes: float  # activations in and out plus the weights it reads
    weight_bytes: float
    is_matmul: bool


@functools.cache
def _symbolic_shape_inference() -> Any:
    """ORT's SymbolicShapeInference, loaded from its file: the onnxruntime.tools package imports torch (seconds)."""
    import importlib.util

    import onnxruntime

    path = Path(onnxruntime.__file__).parent / "tools" / "symbolic_shape_infer.py"
    spec = importlib.util.spec_from_file_location("_edgecompress_ort_symbolic_shape_infer", path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.SymbolicShapeInference


def _infer_symbolic(m: onnx.ModelProto) -> onnx.ModelProto:
    """SymbolicShapeInference.infer_shapes without its failure path, which saves sym_shape_infer_temp.onnx (and an
    external-data file) into the working directory, the user's (seen on MobileNetV2): the same steps, then raise."""
    sym = _symbolic_shape_inference()(2**31 - 1, True, True, 0)  # int_max, auto_merge, guess_output_rank, verbose
    sym._preprocess(m)
    complete = False
    while sym.run_:
        complete = sym._infer_impl()
    sym._update_output_from_vi()
    if not complete:
        raise RuntimeError("incomplete symbolic shape inference")
    return sym.out_mp_  # type: ignore[no-any-return]


def concrete_shapes(model: onnx.ModelProto, dims: dict[str, int]) -> tuple[dict[str, tuple[int, ...] | None],
                                                                             dict[str, int]]:
    """(value name -> shape, value name -> elem type) with the symbolic input dims set to numbers."""
    m = with_concrete_inputs(model, dims)
    inferred: onnx.ModelProto | None = None
    try:
        inferred = _infer_symbolic(m)
    except Exception as e:  # it raises on graphs it does not know; ONNX's inference is the fallback
        log.debug("symbolic shape inference failed (%s); using onnx.shape_inference", e)
    if inferred is None:
        shapes = value_shapes(m)
        inferred = onnx.shape_inference.infer_shapes(m)
    else:
        shapes = {}
        for vi in [*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output]:
            dims_ = [d.dim_value if d.HasField("dim_value") else -1 for d in vi.type.tensor_type.shape.dim]
            shapes[vi.name] = None if any(d < 0 for d in dims_) else tuple(dims_)
        for init in inferred.graph.initializer:
            shapes[init.name] = tuple(init.dims)
    types = {vi.name: vi.type.tensor_type.elem_type
             for vi in [*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output]}
    types.update({i.name: i.data_type for i in inferred.graph.initializer})
    return shapes, types


def numel(shape: tuple[int, ...] | None) -> int:
    return int(np.prod(shape)) if shape is not None else 0


def _attr(node: onnx.NodeProto, name: str, default: int = 0) -> int:
    for a in node.attribute:
        if a.name == name:
            return a.i
    return default


def node_costs(model: onnx.ModelProto, dims: dict[str, int]) -> list[NodeCost]:
    shapes, types = concrete_shapes(model, dims)
    idx = GraphIndex(model)

    def nbytes(name: str) -> float:
        return numel(shapes.get(name)) * DTYPE_BYTES.get(types.get(name, onnx.TensorProto.FLOAT), 4)

    costs = []
    for node in model.graph.node:
        if node.op_type in _FREE_OPS:
            continue
        out_shape = shapes.get(node.output[0]) if node.output else None
        weights = [i for i in node.input if i and idx.is_initializer(i)]
        weight_bytes = sum(nbytes(w) for w in weights)
        act_bytes = sum(nbytes(i) for i in node.input if i and i not in weights) + sum(
            nbytes(o) for o in node.output if o)
        precision = _precision(node, idx, types)
        flops = _flops(node, shapes, out_shape)
        costs.append(NodeCost(node.name or node.output[0], node.op_type, precision, flops,
                              act_bytes + weight_bytes, weight_bytes, node.op_type in MATMUL_OPS))
    return costs


def _precision(node: onnx.NodeProto, idx: GraphIndex, types: dict[str, int]) -> str:
    if node.op_type in LOWBIT_MATMUL_OPS:
        # accuracy_level 4 quantizes activations to int8 and runs int8 dot products; otherwise fp32 compute
        return "int8" if _attr(node, "accuracy_level") == 4 else "int4"
    if node.op_type in INT8_MATMUL_OPS:
        return "int8"
    if node.op_type in ("MatMul", "Gemm"):
        feeders = [idx.producer.get(i) for i in node.input[:2]]
        if all(f is not None and f.op_type == "DequantizeLinear" for f in feeders):
            return "int8"  # QDQ pair that ORT turns into QLinearMatMul
    in_type = types.get(node.input[0]) if node.input else None
    return "fp16" if in_type == onnx.TensorProto.FLOAT16 else "fp32"


def _flops(node: onnx.NodeProto, shapes: dict[str, tuple[int, ...] | None],
           out_shape: tuple[int, ...] | None) -> float:
    op = node.op_type
    if out_shape is None:
        return 0.0
    out = numel(out_shape)
    if op in MATMUL_OPS - {"Conv", "FusedConv", "ConvInteger", "QLinearConv", "Attention", "QAttention"}:
        if op == "MatMulNBits":
            k = _attr(node, "K")
        elif op == "QLinearMatMul":
            a = shapes.get(node.input[0])
            k = a[-1] if a else 0
        else:
            a = shapes.get(node.input[0])
            k = a[-1] if a else 0
            if op in ("Gemm", "QGemm") and _attr(node, "transA"):
                k = a[0] if a else 0
        return 2.0 * out * k
    if op in ("Conv", "FusedConv", "ConvInteger", "QLinearConv"):
        w_index = 3 if op == "QLinearConv" else 1
        w = shapes.get(node.input[w_index])
        return 2.0 * out * (int(np.prod(w[1:])) if w else 0)
    return float(out * _ELEMENTWISE_FLOPS.get(op, 1))
