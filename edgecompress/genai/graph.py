"""The ORT GenAI builder's graph, made readable by edgecompress's decoder passes.

The builder ties a shared embedding through the graph: lm_head's MatMul owns the initializer W ([hidden, vocab])
and the embedding Gather reads Transpose(W), which ORT folds at load into a second, transposed copy in RAM. optimum
writes the same two tensors as initializers (lm_head's W and the embedding E = W.T), and the decoder passes
(passes/lm_head.py) recognise that layout as tied ("copy") and quantize it once (the Gather decodes lm_head's
blocks). `optimum_tied_layout` writes the builder's graph that way: the same weights, exactly, and what the file
holds is what ORT holds in RAM, so the passes and the memory estimate read it as they read optimum's export.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

EMBED_NAME = "model.embed_tokens.weight"
LAYOUT = "embedding and lm_head as two initializers (optimum's tied 'copy' layout)"


def optimum_tied_layout(model: onnx.ModelProto) -> tuple[onnx.ModelProto, dict[str, Any]]:
    """Gather(Transpose(W), input_ids) with lm_head = MatMul(x, W) -> Gather(E, input_ids), E = W.T an initializer.

    Returns the model unchanged (and says why) when the graph does not tie its embedding that way."""
    inits = {i.name: i for i in model.graph.initializer}
    producers = {o: n for n in model.graph.node for o in n.output}
    gather = next((n for n in model.graph.node if n.op_type == "Gather" and len(n.input) == 2
                   and n.input[1] == "input_ids"), None)
    if gather is None:
        return model, {"rewritten": False, "why": "no Gather reads input_ids"}
    if gather.input[0] in inits:
        return model, {"rewritten": False, "why": "the embedding Gather reads its own initializer already"}
    tr = producers.get(gather.input[0])
    if tr is None or tr.op_type != "Transpose" or tr.input[0] not in inits:
        return model, {"rewritten": False, "why": "the embedding is not a Transpose of an initializer"}
    w_name = tr.input[0]
    heads = [n for n in model.graph.node if n.op_type == "MatMul" and len(n.input) == 2 and n.input[1] == w_name]
    if len(heads) != 1 or "logits" not in heads[0].output:
        return model, {"rewritten": False, "why": f"{w_name} is not read by the MatMul that makes logits"}
    out = onnx.ModelProto()
    out.CopyFrom(model)
    w = numpy_helper.to_array(inits[w_name])
    transposed = tr.output[0]
    nodes = [n for n in out.graph.node if not (n.op_type == "Transpose" and list(n.output) == [transposed])]
    for node in nodes:
        if node.op_type == "Gather" and node.output[0] == gather.output[0]:
            node.input[0] = EMBED_NAME
    if any(transposed in n.input for n in nodes):
        return model, {"rewritten": False, "why": "the transposed weight has other readers"}
    del out.graph.node[:]
    out.graph.node.extend(nodes)
    out.graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(w.T), EMBED_NAME))
    return out, {"rewritten": True, "embedding": EMBED_NAME, "lm_head": w_name, "layout": LAYOUT}


def static_kv_head_dim(model: onnx.ModelProto, head_size: int) -> int:
    """Give the KV cache inputs/outputs a static head dim (the builder leaves it symbolic, `kv_cache_dim`).

    edgecompress's fidelity and profiler read the cache shape (kv heads, head dim) from the graph's inputs, as they
    do for optimum's export; ORT GenAI sizes the cache from genai_config's head_size, which is the same number.
    Returns how many dims were set (in place)."""
    changed = 0
    for vi in [*model.graph.input, *model.graph.output]:
        if vi.name.startswith(("past_key_values.", "present.")):
            dims = vi.type.tensor_type.shape.dim
            if len(dims) == 4 and not dims[3].HasField("dim_value"):
                dims[3].Clear()
                dims[3].dim_value = head_size
                changed += 1
    return changed


def has_node(model: onnx.ModelProto, op_type: str) -> bool:
    return any(n.op_type == op_type for n in model.graph.node)


__all__ = ["EMBED_NAME", "LAYOUT", "has_node", "optimum_tied_layout", "static_kv_head_dim"]
