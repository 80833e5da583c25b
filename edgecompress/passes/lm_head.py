"""Tied embeddings: find a decoder's lm_head and give it its own initializer.

The exported lm_head is MatMul(x, Transpose(embed)) (or, when the exporter folded the transpose, a second
initializer equal to embed.T). ORT's 4-bit quantizer only takes MatMuls whose weight is an initializer, so a tied
lm_head stays float32 (113 MB for SmolLM2). `untie_lm_head` gives lm_head its own initializer so that both it and
the embedding Gather can be quantized. Graph surgery only: no pass here (int4_grid.py and codebook/decoder.py use it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper


# --- tied lm_head ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LmHead:
    node: str  # the lm_head MatMul's name
    output: str  # ... and its output (names may be empty: the output identifies it)
    tied: str  # "transpose" (MatMul(x, Transpose(embed))), "copy" (the exporter's folded embed.T), or "no"
    embedding: str | None  # the word-embedding initializer, if found
    weight: str | None  # lm_head's own initializer name, if it has one


def _inits(model: onnx.ModelProto) -> dict[str, onnx.TensorProto]:
    return {i.name: i for i in model.graph.initializer}


def word_embedding(model: onnx.ModelProto) -> onnx.NodeProto | None:
    """The Gather that reads token ids (input_ids) from a 2-D initializer."""
    inits = _inits(model)
    for node in model.graph.node:
        if node.op_type == "Gather" and node.input[0] in inits and node.input[1] == "input_ids" \
                and len(inits[node.input[0]].dims) == 2:
            return node
    return None


def find_lm_head(model: onnx.ModelProto) -> LmHead | None:
    """The MatMul that produces `logits`, and whether it shares the word embedding."""
    producers = {o: n for n in model.graph.node for o in n.output}
    node = producers.get("logits")
    while node is not None and node.op_type != "MatMul" and node.input:  # e.g. a Cast or Reshape after it
        node = producers.get(node.input[0])
    if node is None or node.op_type != "MatMul":
        return None
    inits = _inits(model)
    emb = word_embedding(model)
    emb_name = emb.input[0] if emb is not None else None
    w = node.input[1]
    src = producers.get(w)
    if src is not None and src.op_type == "Transpose" and src.input[0] == emb_name:
        return LmHead(node.name, node.output[0], "transpose", emb_name, None)
    if w in inits and emb_name is not None:
        a, b = inits[w], inits[emb_name]
        if tuple(a.dims) == tuple(reversed(b.dims)) and \
                np.array_equal(numpy_helper.to_array(a), numpy_helper.to_array(b).T):
            return LmHead(node.name, node.output[0], "copy", emb_name, w)
    return LmHead(node.name, node.output[0], "no", emb_name, w if w in inits else None)


def untie_lm_head(model: onnx.ModelProto) -> tuple[onnx.ModelProto, dict[str, Any]]:
    """A copy of the model whose lm_head MatMul reads its own initializer (embed.T), and a report."""
    head = find_lm_head(model)
    if head is None:
        return model, {"lm_head": None, "untied": False, "why": "no MatMul produces 'logits'"}
    report: dict[str, Any] = {"lm_head": head.node or head.output, "tied": head.tied, "untied": False}
    if head.tied != "transpose":
        report["why"] = ("the exporter already gave lm_head its own copy of embed.T" if head.tied == "copy"
                         else "lm_head does not share the word embedding")
        return model, report
    out = onnx.ModelProto()
    out.CopyFrom(model)
    emb = numpy_helper.to_array(_inits(out)[head.embedding or ""])
    name = "lm_head.weight.untied"
    out.graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(emb.T), name))
    mm = next(n for n in out.graph.node if n.op_type == "MatMul" and n.output[0] == head.output)
    transposed = mm.input[1]
    mm.input[1] = name
    if not any(transposed in n.input for n in out.graph.node):  # the Transpose fed only lm_head
        keep = [n for n in out.graph.node if transposed not in n.output]
        del out.graph.node[:]
        out.graph.node.extend(keep)
    report["untied"] = True
    return out, report
