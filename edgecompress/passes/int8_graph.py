"""Int8 graph builders: rewrite chosen MatMuls/Gathers of a float graph into standard-op int8 forms (int8 weights
with float activations, per-token int8 activations on MatMulInteger, per-row int8 embedding tables). Used by the
int8 passes (quantize_int8.py) and the codebooks (codebook.py); no pass logic here.

Layering: imports errors and passes.sensitivity (int8_weight) only.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx
from onnx import helper, numpy_helper

from edgecompress.errors import PassError
from edgecompress.passes.sensitivity import int8_weight


# --- weights to int8, activations left in float -----------------------------------------------------------------
def weight_only_int8(model: onnx.ModelProto, nodes: Sequence[str], reduce_range: bool = False) -> onnx.ModelProto:
    """A copy where each MatMul in `nodes` keeps float activations but reads an int8 weight (per output channel)
    through DequantizeLinear: the file stays int8-sized, the compute stays float (no activation rounding)."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    inits = {t.name: t for t in m.graph.initializer}
    done: dict[str, str] = {}
    new_nodes: list[onnx.NodeProto] = []
    wanted = set(nodes)
    for node in m.graph.node:
        if node.name in wanted and node.op_type == "MatMul" and node.input[1] in inits:
            w_name = node.input[1]
            if w_name not in done:
                q, scale = int8_weight(numpy_helper.to_array(inits[w_name]), 1, reduce_range)
                qn, sn, out = f"{w_name}__w8", f"{w_name}__w8_scale", f"{w_name}__w8_dq"
                m.graph.initializer.extend([numpy_helper.from_array(q, qn), numpy_helper.from_array(scale, sn)])
                new_nodes.append(onnx.helper.make_node("DequantizeLinear", [qn, sn], [out], axis=1,
                                                       name=f"{node.name}__w8_dq"))
                done[w_name] = out
            node.input[1] = done[w_name]
        new_nodes.append(node)
    del m.graph.node[:]
    m.graph.node.extend(new_nodes)
    used = {i for n in m.graph.node for i in n.input}
    kept = [t for t in m.graph.initializer if t.name in used or t.name not in done]
    del m.graph.initializer[:]
    m.graph.initializer.extend(kept)
    return m


# --- per-token activations (standard ops, integer MatMul) -----------------------------------------------------------
# ORT's dynamic path (DynamicQuantizeLinear -> MatMulInteger, fused into DynamicQuantizeMatMul) gives the whole
# [batch * seq, K] activation ONE scale, so one outlier token coarsens every other token's grid. Here each token
# (row) gets its own symmetric scale. ORT's MatMulInteger takes only a scalar activation zero point, so the rows are
# symmetric: uint8 around a fixed 128 (ORT's u8 x s8 kernels; s8 x s8 MatMulInteger ran ~8x slower on the x86 host),
# or int8 around 0 when asked. MiniLM on the host (b8 x seq128, one thread): as fast as DynamicQuantizeMatMul
# (0.98-1.02x, shared CPU), mean cosine 0.9927 -> 0.9971 alone, 0.9990 with smoothing (int8-mixed).
_PT = "edgecompress_pt"


def _const(m: onnx.ModelProto, have: set[str], name: str, value: np.ndarray) -> str:
    if name not in have:
        m.graph.initializer.append(numpy_helper.from_array(value, name))
        have.add(name)
    return name


def per_token_int8(model: onnx.ModelProto, nodes: Sequence[str], *, activation_type: str = "uint8",
                   reduce_range: bool = False) -> onnx.ModelProto:
    """A copy where each MatMul(x, W) in `nodes` (constant 2-D W) runs as int8 with one activation scale per token:

        x2 = Reshape(x, [-1, K]);  s = max(|x2|, axis 1) / 127             (GlobalMaxPool over [-1, 1, K])
        q = QuantizeLinear(x2, s, zp, axis=0)                             (per-row scale, fixed zero point)
        y = Reshape(Cast(MatMulInteger(q, W8, zp)) * w_scale * s[:, None], [..., N])

    W8 is symmetric int8 per output channel (7-bit with `reduce_range`). MatMuls sharing an input (Q, K, V) share
    one quantization of it. Standard ONNX (opset >= 15), no contrib ops.
    """
    if activation_type not in ("uint8", "int8"):
        raise PassError(f"unknown activation type '{activation_type}' for per-token int8")
    m = onnx.ModelProto()
    m.CopyFrom(model)
    inits = {t.name: t for t in m.graph.initializer}
    have = set(inits)
    signed = activation_type == "int8"
    opset = _opset(m)
    if opset < 15:
        raise PassError(f"per-token int8 needs ONNX opset 15 or later; the model has {opset}",
                        hint="export with a newer opset, or use per-tensor activations (int8-dynamic)")
    zp = _const(m, have, f"{_PT}_zp_{activation_type}",
                np.array(0, dtype=np.int8) if signed else np.array(128, dtype=np.uint8))
    flat = _const(m, have, f"{_PT}_flat", np.array([-1], dtype=np.int64))
    col = _const(m, have, f"{_PT}_col", np.array([-1, 1], dtype=np.int64))
    inv127 = _const(m, have, f"{_PT}_inv127", np.array(1.0 / 127.0, dtype=np.float32))
    # an all-zero row (padding) still needs a positive scale; its codes are all zp either way
    tiny = _const(m, have, f"{_PT}_tiny", np.array(1e-30, dtype=np.float32))
    wanted = set(nodes)
    rows: dict[str, tuple[str, str, str]] = {}
    weights: dict[str, tuple[str, str, int]] = {}
    new_nodes: list[onnx.NodeProto] = []
    for node in m.graph.node:
        w_init = inits.get(node.input[1]) if node.op_type == "MatMul" and len(node.input) == 2 else None
        if node.name not in wanted or w_init is None or len(w_init.dims) != 2:
            new_nodes.append(node)
            continue
        x, w_name, p = node.input[0], node.input[1], node.name
        k, n = (int(d) for d in w_init.dims)
        if x not in rows:
            t = f"{x}/{_PT}"
            shape2d = _const(m, have, f"{t}_shape2d", np.array([-1, k], dtype=np.int64))
            shape3d = _const(m, have, f"{t}_shape3d", np.array([-1, 1, k], dtype=np.int64))
            new_nodes += [
                helper.make_node("Reshape", [x, shape2d], [f"{t}_x2"], name=f"{t}_x2"),
                # max |row| as GlobalMaxPool over [rows, 1, K]: ReduceMax (opset 18) takes its axes as an input,
                # which ORT's symbolic shape inference does not read, so the int-kernel check lost every shape
                helper.make_node("Reshape", [x, shape3d], [f"{t}_x3"], name=f"{t}_x3"),
                helper.make_node("Abs", [f"{t}_x3"], [f"{t}_abs"], name=f"{t}_abs"),
                helper.make_node("GlobalMaxPool", [f"{t}_abs"], [f"{t}_pool"], name=f"{t}_pool"),
                helper.make_node("Reshape", [f"{t}_pool", col], [f"{t}_amax0"], name=f"{t}_amax0"),
                helper.make_node("Max", [f"{t}_amax0", tiny], [f"{t}_amax"], name=f"{t}_amax"),
                helper.make_node("Mul", [f"{t}_amax", inv127], [f"{t}_s_col"], name=f"{t}_s_col"),
                helper.make_node("Reshape", [f"{t}_s_col", flat], [f"{t}_s"], name=f"{t}_s"),
                helper.make_node("Shape", [f"{t}_s"], [f"{t}_rows"], name=f"{t}_rows"),
                helper.make_node("Expand", [zp, f"{t}_rows"], [f"{t}_zp"], name=f"{t}_zp"),
                helper.make_node("QuantizeLinear", [f"{t}_x2", f"{t}_s", f"{t}_zp"], [f"{t}_q"], axis=0,
                                 name=f"{t}_q"),
                helper.make_node("Shape", [x], [f"{t}_lead"], end=-1, name=f"{t}_lead"),
            ]
            rows[x] = (f"{t}_q", f"{t}_s_col", f"{t}_lead")
        if w_name not in weights:
            q, scale = int8_weight(numpy_helper.to_array(w_init), 1, reduce_range)
            qn = _const(m, have, f"{w_name}__pt_w8", q)
            sn = _const(m, have, f"{w_name}__pt_w8_scale", scale.astype(np.float32))
            weights[w_name] = (qn, sn, n)
        q_in, s_col, lead = rows[x]
        qn, sn, n = weights[w_name]
        n_dim = _const(m, have, f"{_PT}_n{n}", np.array([n], dtype=np.int64))
        new_nodes += [
            helper.make_node("MatMulInteger", [q_in, qn, zp], [f"{p}/{_PT}_acc"], name=f"{p}/{_PT}_mmi"),
            helper.make_node("Cast", [f"{p}/{_PT}_acc"], [f"{p}/{_PT}_f"], to=onnx.TensorProto.FLOAT,
                             name=f"{p}/{_PT}_f"),
            helper.make_node("Mul", [f"{p}/{_PT}_f", sn], [f"{p}/{_PT}_fw"], name=f"{p}/{_PT}_fw"),
            helper.make_node("Mul", [f"{p}/{_PT}_fw", s_col], [f"{p}/{_PT}_y2"], name=f"{p}/{_PT}_y2"),
            helper.make_node("Concat", [lead, n_dim], [f"{p}/{_PT}_shape"], axis=0, name=f"{p}/{_PT}_shape"),
            helper.make_node("Reshape", [f"{p}/{_PT}_y2", f"{p}/{_PT}_shape"], list(node.output), name=p),
        ]
    del m.graph.node[:]
    m.graph.node.extend(new_nodes)
    _drop_unused_initializers(m)
    return m


def row_int8_gather(model: onnx.ModelProto, nodes: Sequence[str]) -> onnx.ModelProto:
    """A copy where each Gather(table, ids) in `nodes` reads an int8 table with one scale per row (per token id):
    Cast(Gather(T8, ids)) * Unsqueeze(Gather(scale, ids), -1). ORT's dynamic quantization gives a table one scale,
    which its rare large rows set for all (MiniLM, simulated: cosine 0.9992 with only the tables quantized, 0.9999
    per row); the scales add 4 bytes a row."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    inits = {t.name: t for t in m.graph.initializer}
    have = set(inits)
    last = _const(m, have, f"{_PT}_axis_last", np.array([-1], dtype=np.int64))
    wanted = set(nodes)
    tables: dict[str, tuple[str, str]] = {}
    new_nodes: list[onnx.NodeProto] = []
    for node in m.graph.node:
        table = inits.get(node.input[0]) if node.op_type == "Gather" else None
        axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
        if node.name not in wanted or table is None or len(table.dims) != 2 or axis != 0:
            new_nodes.append(node)
            continue
        t_name, p = node.input[0], node.name
        if t_name not in tables:
            q, scale = int8_weight(numpy_helper.to_array(table), 0)
            tables[t_name] = (_const(m, have, f"{t_name}__row8", q),
                              _const(m, have, f"{t_name}__row8_scale", scale.astype(np.float32)))
        qn, sn = tables[t_name]
        new_nodes += [
            helper.make_node("Gather", [qn, node.input[1]], [f"{p}/row8_q"], axis=0, name=f"{p}/row8_q"),
            helper.make_node("Gather", [sn, node.input[1]], [f"{p}/row8_s"], axis=0, name=f"{p}/row8_s"),
            helper.make_node("Unsqueeze", [f"{p}/row8_s", last], [f"{p}/row8_s_col"], name=f"{p}/row8_s_col"),
            helper.make_node("Cast", [f"{p}/row8_q"], [f"{p}/row8_f"], to=onnx.TensorProto.FLOAT,
                             name=f"{p}/row8_f"),
            helper.make_node("Mul", [f"{p}/row8_f", f"{p}/row8_s_col"], list(node.output), name=p),
        ]
    del m.graph.node[:]
    m.graph.node.extend(new_nodes)
    _drop_unused_initializers(m)
    return m


def _opset(model: onnx.ModelProto) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


def _drop_unused_initializers(m: onnx.ModelProto) -> None:
    used = {i for n in m.graph.node for i in n.input} | {o.name for o in m.graph.output}
    kept = [t for t in m.graph.initializer if t.name in used]
    del m.graph.initializer[:]
    m.graph.initializer.extend(kept)
