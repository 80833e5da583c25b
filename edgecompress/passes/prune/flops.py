"""Structured pruning, FLOP counting: the MatMul FLOPs of a graph per sequence, and what one unit of a block costs
(reported with every prune, and the adaptive schedule's exchange rate between heads and neurons)."""

from __future__ import annotations

import onnx

from edgecompress.graph import GraphIndex
from edgecompress.passes.prune.patterns import Block, _dims, find_attention


def matmul_flops(model: onnx.ModelProto, seq: int, attention: bool = True) -> int:
    """MatMul FLOPs of one sequence of `seq` tokens (batch 1): every MatMul by a weight, 2*K*N per row (a row per
    token when the input has a sequence axis), plus the QK^T and softmax*V products of recognised attention.
    Counted from the graph's own weights, so it is exact before and after pruning (ONNX shape inference cannot
    resolve optimum's attention shapes)."""
    idx = GraphIndex(model)
    ranks: dict[str, int] = {}
    try:
        g = onnx.shape_inference.infer_shapes(model).graph
        ranks = {vi.name: len(vi.type.tensor_type.shape.dim) for vi in [*g.input, *g.value_info]
                 if vi.type.tensor_type.HasField("shape")}
    except Exception:  # without ranks every weight MatMul counts a row per token
        pass
    total = 0
    for n in idx.nodes("MatMul"):
        if idx.is_initializer(n.input[1]) and len(idx.initializers[n.input[1]].dims) == 2:
            k, m = idx.initializers[n.input[1]].dims
            rows = seq if ranks.get(n.input[0], 3) >= 3 else 1
            total += 2 * rows * int(k) * int(m)
    for b in find_attention(idx)[0] if attention else []:
        total += 2 * 2 * seq * seq * b.hidden
    return total


def _unit_macs(idx: GraphIndex, b: Block, seq: int) -> int:
    """Multiply-adds per token that one unit (neuron or head) of `b` costs."""
    macs = b.unit_size * (sum(_dims(idx, p)[0] for p in b.producers) + _dims(idx, b.consumer)[1])
    if b.kind == "heads":
        macs += 2 * b.unit_size * seq  # QK^T and softmax @ V shrink with the heads
    return macs
