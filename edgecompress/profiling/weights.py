"""What a model's weights take in memory once ONNX Runtime has loaded it, not what the file takes.

A codebook artifact stores b-bit indices plus a decode subgraph built from initializers only; ORT constant-folds
that subgraph when the session loads, so the weights sit in RAM at their decoded width (int8), and while folding
ORT holds the intermediates (unpacked fields, int32 indices) too: measured at 2-3x int8-dynamic's peak RSS on
MiniLM and 2.3 GB for a SmolLM2 decoder codebook (benchmarks/results/compression.md). Estimating memory from the
file's bytes would say the opposite. This walks the constant-foldable nodes (every input an initializer or another
foldable node's output), infers their output shapes on a graph of those nodes alone, and returns:

- resident: the initializers and folded tensors the running graph reads, after folding;
- load_peak: every initializer plus every folded tensor, all held at once (the pessimistic reading of ORT's
  folding, which the measurements above match within their noise).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper

from edgecompress.profiling.cost import DTYPE_BYTES

# ops ORT never constant-folds (non-deterministic or with side effects), even from constant inputs
_NOT_FOLDED = frozenset({"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial",
                         "Bernoulli", "If", "Loop", "Scan"})
_SMALL = 4096  # initializers up to this many elements stay data in the shape-inference graph (shapes, axes)


@dataclass(frozen=True)
class WeightMemory:
    file_bytes: float  # the initializers as stored
    resident_bytes: float  # what the running graph reads after ORT's constant folding
    load_peak_bytes: float  # initializers + every folded tensor, held together while the session loads
    folded_nodes: int

    @property
    def folds(self) -> bool:
        return self.folded_nodes > 0


def _bytes(shape: tuple[int, ...] | list[int], elem_type: int) -> float:
    return float(np.prod(shape, dtype=np.float64)) * DTYPE_BYTES.get(elem_type, 4) if shape is not None else 0.0


def weight_memory(model: onnx.ModelProto) -> WeightMemory:
    g = model.graph
    inits = {i.name: i for i in g.initializer}
    init_bytes = {n: _bytes(tuple(i.dims), i.data_type) for n, i in inits.items()}
    const: set[str] = set(inits)
    foldable: list[onnx.NodeProto] = []
    for node in g.node:  # graph order is topological
        if node.op_type in _NOT_FOLDED or not node.input:
            if node.op_type == "Constant":
                const.update(o for o in node.output if o)
            continue
        if all((not i) or i in const for i in node.input):
            foldable.append(node)
            const.update(o for o in node.output if o)
    file_bytes = sum(init_bytes.values())
    if not foldable:
        return WeightMemory(file_bytes, file_bytes, file_bytes, 0)

    folded_out = {o for n in foldable for o in n.output if o}
    sizes = _folded_sizes(model, foldable, inits)
    # what the non-foldable nodes (and the graph outputs) read: that is what stays after folding
    read = {i for n in g.node if n not in foldable for i in n.input if i} | {o.name for o in g.output}
    resident = sum(b for n, b in init_bytes.items() if n in read) + sum(sizes.get(o, 0.0) for o in folded_out
                                                                         if o in read)
    load_peak = file_bytes + sum(sizes.get(o, 0.0) for o in folded_out)
    return WeightMemory(file_bytes, resident, load_peak, len(foldable))


def _folded_sizes(model: onnx.ModelProto, nodes: list[onnx.NodeProto], inits: dict[str, onnx.TensorProto]
                  ) -> dict[str, float]:
    """Output bytes of the foldable nodes, from shape inference on a graph of those nodes alone (the large
    initializers as typed inputs, so no weight data is copied)."""
    used = {i for n in nodes for i in n.input if i}
    small = [inits[n] for n in sorted(used) if n in inits and int(np.prod(inits[n].dims)) <= _SMALL]
    small_names = {t.name for t in small}
    inputs = [helper.make_tensor_value_info(n, inits[n].data_type, list(inits[n].dims))
              for n in sorted(used) if n in inits and n not in small_names]
    outs = [o for n in nodes for o in n.output if o]
    graph = helper.make_graph(list(nodes), "folded", inputs,
                              [helper.make_empty_tensor_value_info(o) for o in outs], initializer=small)
    m = helper.make_model(graph, opset_imports=list(model.opset_import), ir_version=model.ir_version)
    try:
        inferred = onnx.shape_inference.infer_shapes(m, data_prop=True)
    except Exception:  # an op ONNX cannot infer: count what it could not size as 0 (and say so via the caller)
        return {}
    sizes: dict[str, float] = {}
    for vi in [*inferred.graph.value_info, *inferred.graph.output]:
        t = vi.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else -1 for d in t.shape.dim]
        if t.HasField("shape") and all(d >= 0 for d in dims):
            sizes[vi.name] = _bytes(tuple(dims), t.elem_type)
    return sizes
