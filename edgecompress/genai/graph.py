"""The ORT GenAI builder's graph, made readable by edgecompress's decoder passes.

The builder ties a shared embedding the other way round from optimum: lm_head's MatMul owns the initializer
([hidden, vocab]) and the embedding Gather reads Transpose(that). The decoder passes (passes/decoder.py) recognise
optimum's layout, Gather(embed, input_ids) with lm_head = MatMul(x, Transpose(embed)), and quantize it once (the
Gather decodes lm_head's blocks). `optimum_tied_layout` rewrites the first layout into the second: the same
weights, exactly (a transpose), so the passes can be used by import, unchanged.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

EMBED_NAME = "model.embed_tokens.weight"


def optimum_tied_layout(model: onnx.ModelProto) -> tuple[onnx.ModelProto, dict[str, Any]]:
    """Gather(Transpose(W), input_ids) + MatMul(x, W) -> Gather(E, input_ids) + MatMul(x, Transpose(E)), E = W.T.

    Returns the model unchanged (and says why) when the graph does not tie its embedding that way."""
    inits = {i.name: i for i in model.graph.initializer}
    producers = {o: n for n in model.graph.node for o in n.output}
    gather = next((n for n in model.graph.node if n.op_type == "Gather" and len(n.input) == 2
                   and n.input[1] == "input_ids"), None)
    if gather is None:
        return model, {"rewritten": False, "why": "no Gather reads input_ids"}
    if gather.input[0] in inits:
        return model, {"rewritten": False, "why": "the embedding Gather reads its own initializer (untied)"}
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
    embed = numpy_helper.from_array(np.ascontiguousarray(w.T), EMBED_NAME)
    transposed = f"{EMBED_NAME}.T"
    for node in out.graph.node:
        if node.op_type == "Transpose" and list(node.input) == [w_name]:
            node.input[0] = EMBED_NAME  # Transpose(E) = W: it now feeds lm_head
            del node.output[:]
            node.output.append(transposed)
        elif node.op_type == "Gather" and node.output[0] == gather.output[0]:
            node.input[0] = EMBED_NAME
        elif node.op_type == "MatMul" and node.output[0] == heads[0].output[0]:
            node.input[1] = transposed
    kept = [i for i in out.graph.initializer if i.name != w_name]
    del out.graph.initializer[:]
    out.graph.initializer.extend([embed, *kept])
    # the Transpose must run before lm_head: it sits where the Gather read it, which is earlier; keep order sorted
    nodes = list(out.graph.node)
    t_idx = next(i for i, n in enumerate(nodes) if n.op_type == "Transpose" and n.output[0] == transposed)
    g_idx = next(i for i, n in enumerate(nodes) if n.op_type == "Gather" and n.output[0] == gather.output[0])
    if t_idx > g_idx:
        nodes.insert(g_idx, nodes.pop(t_idx))
    del out.graph.node[:]
    out.graph.node.extend(nodes)
    return out, {"rewritten": True, "embedding": EMBED_NAME, "from": w_name}


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


__all__ = ["EMBED_NAME", "has_node", "helper", "optimum_tied_layout"]
