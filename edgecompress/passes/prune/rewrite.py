"""Structured pruning, graph writing: slice the kept units out of each block's weights, biases and shape constants,
and drop what became dead."""

from __future__ import annotations

import logging

import numpy as np
import onnx
from onnx import numpy_helper

from edgecompress.graph import GraphIndex
from edgecompress.passes.prune.patterns import Block, Proj, _const

log = logging.getLogger(__name__)

# ------------------------------------------------------------------------------------------------------- rewriting


class _Writer:
    def __init__(self, model: onnx.ModelProto) -> None:
        self.model = model
        self.inits = {t.name: t for t in model.graph.initializer}
        self.names = {t.name for t in model.graph.initializer} | {o for n in model.graph.node for o in n.output}

    def set(self, name: str, arr: np.ndarray) -> None:
        self.inits[name].CopyFrom(numpy_helper.from_array(np.ascontiguousarray(arr), name))

    def fresh(self, base: str) -> str:
        i = 0
        while f"{base}_{i}" in self.names:
            i += 1
        self.names.add(f"{base}_{i}")
        return f"{base}_{i}"

    def add_init(self, base: str, arr: np.ndarray) -> str:
        name = self.fresh(base)
        t = numpy_helper.from_array(np.ascontiguousarray(arr), name)
        self.model.graph.initializer.append(t)
        self.inits[name] = t
        return name


def _apply_block(wr: _Writer, idx: GraphIndex, b: Block, keep_units: np.ndarray, new_w: np.ndarray) -> None:
    cols = b.columns(keep_units)
    for p in b.producers:
        wr.set(p.weight, idx.array(p.weight)[:, cols])
        if p.bias:
            _set_bias(wr, p, np.asarray(_const(idx, p.bias))[cols])
    wr.set(b.consumer.weight, new_w[:-1].astype(np.float32))
    bias = new_w[-1].astype(np.float32)
    if b.consumer.bias:
        _set_bias(wr, b.consumer, bias)
    elif np.any(bias != 0):
        # no bias before (Llama): the compensation needs one
        name = wr.add_init(f"{b.consumer.weight}_prune_bias", bias)
        mm = b.consumer.matmul
        old = mm.output[0]
        new = wr.fresh(f"{old}_unbiased")
        mm.output[0] = new
        add = onnx.helper.make_node("Add", [new, name], [old], name=wr.fresh(f"{mm.name}_prune_bias_add"))
        pos = next(i for i, n in enumerate(wr.model.graph.node) if n.output and n.output[0] == new) + 1
        wr.model.graph.node.insert(pos, add)
    for fix in b.fixes:
        value = fix.value.copy()
        flat = value.reshape(-1)
        flat[fix.pos] = len(keep_units) * (fix.scale if fix.scale else 1)
        fix.node.input[fix.slot] = wr.add_init(f"{b.key}_pruned_shape", value)


def _drop_dead_constants(model: onnx.ModelProto) -> None:
    """Remove the Constant/Identity nodes and initializers the rewrite orphaned (replaced shapes and biases)."""
    while True:
        used = {i for n in model.graph.node for i in n.input} | {o.name for o in model.graph.output}
        dead = [n for n in model.graph.node if n.op_type in ("Constant", "Identity") and n.output[0] not in used]
        if not dead:
            break
        for n in dead:
            model.graph.node.remove(n)
    for t in [t for t in model.graph.initializer if t.name not in used]:
        model.graph.initializer.remove(t)




def _set_bias(wr: _Writer, p: Proj, value: np.ndarray) -> None:
    assert p.add is not None and p.bias is not None
    slot = list(p.add.input).index(p.bias)
    p.add.input[slot] = wr.add_init(f"{p.weight}_pruned_bias", value.astype(np.float32))
