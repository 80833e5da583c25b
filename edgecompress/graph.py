"""A read-only index over an ONNX graph: producers, consumers, initializers as numpy, concrete shapes.

Passes use it to find patterns by structure rather than by node names. Layering: imports nothing internal.
"""

from __future__ import annotations

from collections import defaultdict
from functools import cached_property

import numpy as np
import onnx
from onnx import numpy_helper


class GraphIndex:
    def __init__(self, model: onnx.ModelProto) -> None:
        self.model = model
        self.graph = model.graph
        self.producer: dict[str, onnx.NodeProto] = {}
        self.consumers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
        for node in self.graph.node:
            for out in node.output:
                if out:
                    self.producer[out] = node
            for inp in node.input:
                if inp:
                    self.consumers[inp].append(node)
        self.initializers: dict[str, onnx.TensorProto] = {t.name: t for t in self.graph.initializer}
        self.graph_inputs = [i.name for i in self.graph.input if i.name not in self.initializers]
        self.graph_outputs = [o.name for o in self.graph.output]

    def array(self, name: str) -> np.ndarray:
        return numpy_helper.to_array(self.initializers[name])

    def is_initializer(self, name: str) -> bool:
        return name in self.initializers

    def constant_value(self, name: str) -> np.ndarray | None:
        """Value of an initializer or of a Constant node's output, else None."""
        if name in self.initializers:
            return self.array(name)
        node = self.producer.get(name)
        if node is not None and node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value":
                    return numpy_helper.to_array(attr.t)
        return None

    def nodes(self, *op_types: str) -> list[onnx.NodeProto]:
        return [n for n in self.graph.node if not op_types or n.op_type in op_types]

    @cached_property
    def opset(self) -> int:
        for imp in self.model.opset_import:
            if imp.domain in ("", "ai.onnx"):
                return imp.version
        return 0


def op_histogram(model: onnx.ModelProto) -> dict[str, int]:
    hist: dict[str, int] = defaultdict(int)
    for n in model.graph.node:
        hist[f"{n.domain}.{n.op_type}" if n.domain not in ("", "ai.onnx") else n.op_type] += 1
    return dict(sorted(hist.items()))


def with_concrete_inputs(model: onnx.ModelProto, dims: dict[str, int]) -> onnx.ModelProto:
    """A copy whose symbolic input dims (e.g. batch_size, sequence_length) are set to numbers."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    for inp in m.graph.input:
        for d in inp.type.tensor_type.shape.dim:
            if d.HasField("dim_param") and d.dim_param in dims:
                d.dim_value = dims[d.dim_param]
    return m


def value_shapes(model: onnx.ModelProto) -> dict[str, tuple[int, ...] | None]:
    """Shapes of every value after ONNX shape inference (None where unknown or not fully concrete)."""
    inferred = onnx.shape_inference.infer_shapes(model, data_prop=True)
    out: dict[str, tuple[int, ...] | None] = {}
    g = inferred.graph
    for vi in [*g.input, *g.value_info, *g.output]:
        t = vi.type.tensor_type
        if not t.HasField("shape"):
            out[vi.name] = None
            continue
        dims = [d.dim_value if d.HasField("dim_value") else -1 for d in t.shape.dim]
        out[vi.name] = None if any(d < 0 for d in dims) else tuple(dims)
    for init in g.initializer:
        out[init.name] = tuple(init.dims)
    return out
