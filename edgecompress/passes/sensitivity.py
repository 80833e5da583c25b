"""Per-node sensitivity: how much quantizing one node, alone, moves the model's output.

Any pass that trades precision node by node (int8-mixed, codebooks) can reuse it: give `node_sensitivity` a function
that lowers the precision of some nodes of a model, and it returns the candidates ranked most sensitive first.
The default lowering simulates INT8 in float ("fake quantization": QuantizeLinear -> DequantizeLinear on the
activation, rounded weights), so a score measures the numerics, not one CPU's kernels.

Layering: imports passes.base and the standard libraries only; never profiling.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from itertools import islice
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

from edgecompress.errors import PassError
from edgecompress.passes.base import Batch, PassContext

log = logging.getLogger(__name__)

# model, node names -> a copy of the model with those nodes at lower precision
LowerNodes = Callable[[onnx.ModelProto, Sequence[str]], onnx.ModelProto]


def quantizable_nodes(model: onnx.ModelProto, *, gathers: bool = True) -> list[str]:
    """Nodes with a constant 2-D weight: MatMul(x, W) (Linear layers; not attention's activation x activation
    MatMuls) and, with `gathers`, Gather(table, ids) (embeddings). Unnamed nodes cannot be addressed: skipped."""
    inits = {t.name: t for t in model.graph.initializer}
    out = []
    for n in model.graph.node:
        if not n.name:
            continue
        linear = n.op_type == "MatMul" and len(n.input) == 2 and len(inits.get(n.input[1], _EMPTY).dims) == 2
        table = gathers and n.op_type == "Gather" and len(inits.get(n.input[0], _EMPTY).dims) == 2
        if linear or table:
            out.append(n.name)
    return out


_EMPTY = onnx.TensorProto()


def run_first_output(model: onnx.ModelProto, batches: Iterable[Batch], *, optimize: bool = True) -> list[np.ndarray]:
    """The model's first output on each batch (onnxruntime CPU). Without `optimize`, ops run as written (no fusion
    into integer kernels), which is what a float simulation of quantization needs."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if not optimize:
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    try:
        sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise PassError(f"onnxruntime cannot load a quantized variant: {first}") from e
    names = [i.name for i in sess.get_inputs()]
    out_name = sess.get_outputs()[0].name
    return [sess.run([out_name], {k: b[k] for k in names})[0] for b in batches]


def output_cosines(reference: Sequence[np.ndarray], candidate: Sequence[np.ndarray],
                   batches: Sequence[Batch]) -> np.ndarray:
    """Per-sample cosine between two models' outputs: of mask-weighted mean-pooled vectors for [batch, seq, hidden]
    outputs with an attention mask (what embedding users compare), else of the flattened output."""
    cos = []
    for ref, got, batch in zip(reference, candidate, batches, strict=True):
        r, g = ref.astype(np.float64), got.astype(np.float64)
        mask = batch.get("attention_mask")
        if r.ndim == 3 and mask is not None and mask.shape == r.shape[:2]:
            w = mask[..., None].astype(np.float64)
            r, g = (r * w).sum(1), (g * w).sum(1)
        r, g = r.reshape(r.shape[0], -1), g.reshape(g.shape[0], -1)
        num = (r * g).sum(1)
        nr, ng = np.linalg.norm(r, axis=1), np.linalg.norm(g, axis=1)
        den = nr * ng
        # two zero vectors agree; a zero against a non-zero one does not
        cos.append(np.where(den > 0, num / np.where(den > 0, den, 1.0), np.where((nr == 0) & (ng == 0), 1.0, 0.0)))
    return np.concatenate(cos) if cos else np.zeros(0)


def node_sensitivity(
    model: onnx.ModelProto,
    ctx: PassContext,
    candidates: Sequence[str],
    lower: LowerNodes | None = None,
    *,
    batches: Sequence[Batch] | None = None,
    max_batches: int = 4,
    simulation: Int8Simulation | None = None,
) -> list[tuple[str, float]]:
    """Rank `candidates` by the output error each causes when it alone is lowered. Score = 1 - mean per-sample
    output cosine vs the unmodified model on calibration data; higher = more sensitive.

    `lower` builds one model per candidate (any precision change, e.g. a codebook); without it, INT8 is simulated
    in one gated session (`simulation`, by default dynamic INT8 of the candidates), which is much faster.
    Returns [(node_name, score)], most sensitive first (ties by name, so the order is stable).
    """
    if batches is None:
        if ctx.calibration is None:
            raise PassError("sensitivity analysis needs calibration data and the context has none")
        batches = list(islice(ctx.calibration(), max_batches))
    if not batches:
        raise PassError("sensitivity analysis got no calibration batches")
    reference = run_first_output(model, batches, optimize=False)
    scores = []
    if lower is None:
        sim = simulation or Int8Simulation(model, candidates)
        for name in candidates:
            scores.append((name, float(1.0 - output_cosines(reference, sim.outputs([name], batches), batches).mean())))
    else:
        for name in candidates:
            got = run_first_output(lower(model, [name]), batches, optimize=False)
            scores.append((name, float(1.0 - output_cosines(reference, got, batches).mean())))
    for name, score in scores:
        log.debug("sensitivity %s: %.3g", name, score)
    return sorted(scores, key=lambda s: (-s[1], s[0]))


# --- INT8 simulated in float -------------------------------------------------------------------------------------
def int8_weight(w: np.ndarray, axis: int | None, reduce_range: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 (zero point 0) of a weight: per slice along `axis` (None: one scale for the tensor).

    Returns (q, scale) with w ~= q * scale. With `reduce_range` q spans [-64, 64] (7 bits), as ORT's reduce_range,
    which keeps u8 x s8 pair sums inside int16 on x86 CPUs without VNNI.
    """
    qmax = 64.0 if reduce_range else 127.0
    reduce_axes = tuple(i for i in range(w.ndim) if i != axis) if axis is not None else None
    absmax = np.max(np.abs(w), axis=reduce_axes, keepdims=True).astype(np.float64)
    scale = np.where(absmax > 0, absmax / qmax, 1.0)
    q = np.clip(np.rint(w / scale), -qmax, qmax).astype(np.int8)
    return q, scale.astype(np.float32).reshape(-1) if axis is not None else scale.astype(np.float32).reshape(())


def activation_qparams(low: float, high: float, signed: bool) -> tuple[float, int]:
    """(scale, zero point) of an activation range as ORT computes them: the range always includes 0; uint8 is
    asymmetric over [0, 255], int8 symmetric over [-127, 127]."""
    low, high = min(low, 0.0), max(high, 0.0)
    if signed:
        absmax = max(-low, high)
        return (absmax / 127.0 if absmax > 0 else 1.0), 0
    scale = (high - low) / 255.0 if high > low else 1.0
    return scale, int(np.clip(np.rint(-low / scale), 0, 255))


def fake_quantize_int8(
    model: onnx.ModelProto,
    nodes: Sequence[str],
    *,
    act_ranges: dict[str, tuple[float, float]] | None = None,
    act_signed: bool = False,
    reduce_range: bool = False,
    per_token: bool = False,
) -> onnx.ModelProto:
    """A float copy of `model` in which `nodes` compute as INT8 would: MatMul weights rounded per output channel,
    Gather tables per tensor, and each MatMul's activation input passed through Quantize -> Dequantize, with a
    static range from `act_ranges` (tensor -> (low, high)) or, without one, a dynamic per-batch uint8 range
    (DynamicQuantizeLinear, as ORT's dynamic quantization). With `per_token`, as quantize_int8.per_token_int8 and
    row_int8_gather do it: a symmetric scale per token (last-axis row) of each activation, per row of each table."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    inits = {t.name: t for t in m.graph.initializer}
    opset = next((o.version for o in m.opset_import if o.domain in ("", "ai.onnx")), 0)
    wanted = set(nodes)
    new_nodes: list[onnx.NodeProto] = []
    for i, node in enumerate(m.graph.node):
        if node.name not in wanted:
            new_nodes.append(node)
            continue
        # MatMul [K, N]: per output column; Conv [O, I/g, kh, kw]: per output channel; Gather: per tensor (or row)
        widx, axis = {"MatMul": (1, 1), "Conv": (1, 0)}.get(node.op_type, (0, 0 if per_token else None))
        w = numpy_helper.to_array(inits[node.input[widx]])
        q, scale = int8_weight(w, axis, reduce_range)
        shaped = scale if axis is None else scale.reshape([-1 if d == axis else 1 for d in range(w.ndim)])
        dq = (q.astype(np.float32) * shaped).astype(w.dtype)
        fq_name = f"{node.input[widx]}__fq{i}"
        m.graph.initializer.append(numpy_helper.from_array(dq, fq_name))
        node.input[widx] = fq_name
        if node.op_type in ("MatMul", "Conv"):
            x = node.input[0]
            xq, xd = f"{x}__q{i}", f"{x}__dq{i}"
            if per_token:
                # round(x / s) * s with s = max|row| / 127: the codes per_token_int8 feeds its MatMulInteger
                names = {k: f"{x}__pt{k}{i}" for k in ("abs", "amax", "s", "r", "axes", "inv127", "tiny")}
                m.graph.initializer.extend([
                    numpy_helper.from_array(np.array([-1], dtype=np.int64), names["axes"]),
                    numpy_helper.from_array(np.array(1.0 / 127.0, dtype=np.float32), names["inv127"]),
                    numpy_helper.from_array(np.array(1e-30, dtype=np.float32), names["tiny"])])
                # ReduceMax takes its axes as an input from opset 18, as an attribute before
                amax = (helper.make_node("ReduceMax", [names["abs"], names["axes"]], [names["amax"]], keepdims=1,
                                         name=f"{node.name}__pt_amax") if opset >= 18 else
                        helper.make_node("ReduceMax", [names["abs"]], [names["amax"]], axes=[-1], keepdims=1,
                                         name=f"{node.name}__pt_amax"))
                new_nodes += [
                    helper.make_node("Abs", [x], [names["abs"]], name=f"{node.name}__pt_abs"),
                    amax,
                    helper.make_node("Mul", [names["amax"], names["inv127"]], [f"{names['s']}0"],
                                     name=f"{node.name}__pt_s0"),
                    helper.make_node("Max", [f"{names['s']}0", names["tiny"]], [names["s"]],
                                     name=f"{node.name}__pt_s"),
                    helper.make_node("Div", [x, names["s"]], [f"{names['r']}0"], name=f"{node.name}__pt_div"),
                    helper.make_node("Round", [f"{names['r']}0"], [names["r"]], name=f"{node.name}__pt_round"),
                    helper.make_node("Mul", [names["r"], names["s"]], [xd], name=f"{node.name}__dq")]
            elif act_ranges is not None and x in act_ranges:
                s, zp = activation_qparams(*act_ranges[x], signed=act_signed)
                ps, pz = f"{x}__s{i}", f"{x}__zp{i}"
                m.graph.initializer.extend([
                    numpy_helper.from_array(np.array(s, dtype=np.float32), ps),
                    numpy_helper.from_array(np.array(zp, dtype=np.int8 if act_signed else np.uint8), pz)])
                new_nodes.append(helper.make_node("QuantizeLinear", [x, ps, pz], [xq], name=f"{node.name}__q"))
                new_nodes.append(helper.make_node("DequantizeLinear", [xq, ps, pz], [xd], name=f"{node.name}__dq"))
            else:
                sn, zn = f"{x}__s{i}", f"{x}__zp{i}"
                new_nodes.append(helper.make_node("DynamicQuantizeLinear", [x], [xq, sn, zn], name=f"{node.name}__q"))
                new_nodes.append(helper.make_node("DequantizeLinear", [xq, sn, zn], [xd], name=f"{node.name}__dq"))
            node.input[0] = xd
        new_nodes.append(node)
    del m.graph.node[:]
    m.graph.node.extend(new_nodes)
    return m


GATES = "edgecompress_int8_gates"


class Int8Simulation:
    """One float session in which any subset of `nodes` computes as INT8, chosen per run.

    Each node gets a gate g (a graph input): its weight is W + g * (int8(W) - W) and its activation
    x + g * (int8(x) - x), so g = 1 is `fake_quantize_int8` of that node and g = 0 leaves it exact. One session
    answers every "what if these nodes were quantized" question, instead of one model and session per question.
    """

    def __init__(self, model: onnx.ModelProto, nodes: Sequence[str], *,
                 act_ranges: dict[str, tuple[float, float]] | None = None, act_signed: bool = False,
                 reduce_range: bool = False, per_token: bool = False) -> None:
        self.nodes = list(nodes)
        fq = fake_quantize_int8(model, self.nodes, act_ranges=act_ranges, act_signed=act_signed,
                                reduce_range=reduce_range, per_token=per_token)
        self.model = _gate(model, fq, self.nodes)
        self._session: Any = None

    def outputs(self, quantized: Iterable[str], batches: Sequence[Batch]) -> list[np.ndarray]:
        import onnxruntime as ort

        if self._session is None:
            opts = ort.SessionOptions()
            opts.log_severity_level = 3
            opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
            self._session = ort.InferenceSession(self.model.SerializeToString(), opts,
                                                 providers=["CPUExecutionProvider"])
        sess = self._session
        on = set(quantized)
        unknown = on - set(self.nodes)
        if unknown:
            raise PassError(f"not a simulated node: {sorted(unknown)[0]}")
        gates = np.array([1.0 if n in on else 0.0 for n in self.nodes], dtype=np.float32)
        names = [i.name for i in sess.get_inputs() if i.name != GATES]
        out_name = sess.get_outputs()[0].name
        return [sess.run([out_name], {**{k: b[k] for k in names}, GATES: gates})[0] for b in batches]


def _gate(model: onnx.ModelProto, fq: onnx.ModelProto, nodes: Sequence[str]) -> onnx.ModelProto:
    """Blend `model` and its fake-quantized twin `fq` per node: the twin's rewired inputs become gated mixes."""
    m = onnx.ModelProto()
    m.CopyFrom(fq)
    original = {n.name: n for n in model.graph.node}
    index = {name: i for i, name in enumerate(nodes)}
    m.graph.input.append(helper.make_tensor_value_info(GATES, onnx.TensorProto.FLOAT, [len(nodes)]))
    new_nodes: list[onnx.NodeProto] = []
    for node in m.graph.node:
        if node.name in index:
            i = index[node.name]
            g = f"{GATES}_{i}"
            m.graph.initializer.append(numpy_helper.from_array(np.array(i, dtype=np.int64), f"{g}_idx"))
            new_nodes.append(helper.make_node("Gather", [GATES, f"{g}_idx"], [g], name=f"{node.name}__gate"))
            for pos, (exact, lowered) in enumerate(zip(original[node.name].input, list(node.input), strict=True)):
                if exact == lowered:
                    continue
                d, gd, mixed = f"{g}_{pos}_d", f"{g}_{pos}_gd", f"{g}_{pos}_mix"
                new_nodes.append(helper.make_node("Sub", [lowered, exact], [d], name=f"{node.name}__d{pos}"))
                new_nodes.append(helper.make_node("Mul", [d, g], [gd], name=f"{node.name}__gd{pos}"))
                new_nodes.append(helper.make_node("Add", [exact, gd], [mixed], name=f"{node.name}__mix{pos}"))
                node.input[pos] = mixed
        new_nodes.append(node)
    del m.graph.node[:]
    m.graph.node.extend(new_nodes)
    return m
