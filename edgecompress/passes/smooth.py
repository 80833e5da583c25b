"""Activation smoothing (SmoothQuant-style) before dynamic or static int8.

ORT quantizes a MatMul's activations with one scale per tensor, so a few outlier channels (BERT's LayerNorm outputs
have some) waste most of the int8 range. Smoothing divides each input channel j by s_j and multiplies row j of the
weight by s_j: X W == (X / s)(s W) exactly in float, but the activation becomes flatter and the weight takes the
outliers, where per-channel weight quantization absorbs them. s_j = amax(X_j)^alpha / amax(W_j)^(1 - alpha), with
amax over calibration tokens (padding excluded) and over every MatMul that reads X (Q, K and V share one input).
Each input gets the alpha whose simulated int8 error is lowest on a calibration sample, or no smoothing.

The division is one Mul per distinct input, inserted in the graph (a residual path may read the same tensor, so it
cannot be folded into the producing LayerNorm). A graph transform on onnx.ModelProto only; no ORT quantization here.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

from edgecompress.passes.base import Batch
from edgecompress.passes.capture import Capture, token_rows

# s is clipped so that neither side's range collapses on a channel that is (nearly) zero in calibration
_S_MIN, _S_MAX = 1e-3, 1e3


def _linear_groups(model: onnx.ModelProto) -> dict[str, list[onnx.NodeProto]]:
    """Activation tensor -> the MatMuls that multiply it by a constant 2-D weight."""
    inits = {i.name: i for i in model.graph.initializer}
    groups: dict[str, list[onnx.NodeProto]] = {}
    for n in model.graph.node:
        if n.op_type == "MatMul" and n.input[1] in inits and len(inits[n.input[1]].dims) == 2:
            groups.setdefault(n.input[0], []).append(n)
    return groups


def activation_stats(model: onnx.ModelProto, names: list[str], batches: Iterable[Batch], keep_rows: int = 256
                     ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Per-channel max |x| of the named tensors over calibration batches (tokens under attention_mask only), and
    the first `keep_rows` token rows of each (a bounded sample for judging the quantization error)."""
    capture = Capture(model, names, purpose="measure activation outliers")
    amax: dict[str, np.ndarray] = {}
    rows: dict[str, list[np.ndarray]] = {n: [] for n in names}
    for batch in batches:
        outs = capture(batch)
        for name in names:
            flat = token_rows(outs[name], batch.get("attention_mask"))
            m = np.abs(flat).max(axis=0)
            amax[name] = m if name not in amax else np.maximum(amax[name], m)
            if sum(len(r) for r in rows[name]) < keep_rows:
                rows[name].append(flat[:keep_rows])
    return amax, {n: np.concatenate(r)[:keep_rows] for n, r in rows.items() if r}


def _int8_error(x: np.ndarray, ws: list[np.ndarray], scale: np.ndarray | None, per_token: bool = False) -> float:
    """Relative output error of x @ w with x quantized like ORT's dynamic path (uint8, one scale per tensor) or,
    with `per_token`, like quantize_int8.per_token_int8 (symmetric, one scale per row), and w per output channel
    (int8 symmetric), after dividing x's channels by `scale` (None: as is)."""
    xs = x if scale is None else x / scale
    if per_token:
        row = np.maximum(np.abs(xs).max(axis=1, keepdims=True) / 127, 1e-30)
        xq = np.round(xs / row) * row
    else:
        lo, hi = min(float(xs.min()), 0.0), max(float(xs.max()), 0.0)
        step = (hi - lo) / 255 or 1.0
        zero = np.round(-lo / step)
        xq = (np.clip(np.round(xs / step) + zero, 0, 255) - zero) * step
    err, ref_norm = 0.0, 0.0
    for w in ws:
        wsm = w if scale is None else w * scale[:, None]
        col = np.abs(wsm).max(axis=0) / 127
        col[col == 0] = 1.0
        wq = np.round(wsm / col) * col
        ref = x @ w
        err += float(np.linalg.norm(xq @ wq - ref) ** 2)
        ref_norm += float(np.linalg.norm(ref) ** 2)
    return (err / ref_norm) ** 0.5 if ref_norm else 0.0


def smooth(model: onnx.ModelProto, batches: Iterable[Batch], alpha: float,
           alphas: tuple[float, ...] = (0.5,), *, per_token: bool = False) -> tuple[onnx.ModelProto, dict[str, Any]]:
    """A copy of `model` with its Linear MatMul inputs smoothed; numerically the same model in float.

    Each input takes the alpha (from `alphas`, plus `alpha`) whose simulated int8 error on a calibration sample is
    lowest, or no smoothing at all when that is lower still: an extreme outlier moved into the weights can cost
    the weights more than it saves the activations. The activations' error is simulated as the int8 path will
    quantize them: one scale per tensor, or per token with `per_token`.
    """
    groups = _linear_groups(model)
    if not groups:
        return model, {"alpha": alpha, "smoothed_inputs": 0, "skipped": "no MatMul with a constant 2-D weight"}
    amax, samples = activation_stats(model, sorted(groups), batches)
    # a weight read by MatMuls of two different inputs cannot take both inputs' scales: leave those inputs alone
    readers: dict[str, set[str]] = {}
    for x, consumers in groups.items():
        for c in consumers:
            readers.setdefault(c.input[1], set()).add(x)
    groups = {x: cs for x, cs in groups.items() if all(len(readers[c.input[1]]) == 1 for c in cs)}
    out = onnx.ModelProto()
    out.CopyFrom(model)
    inits = {i.name: i for i in out.graph.initializer}
    producers = {o: i for i, n in enumerate(out.graph.node) for o in n.output}
    new_nodes: dict[int, list[onnx.NodeProto]] = {}
    spread_before, spread_after = [], []
    chosen: dict[str, float | None] = {}
    for x, consumers in groups.items():
        weight_names = sorted({c.input[1] for c in consumers})
        weights = {w: numpy_helper.to_array(inits[w]) for w in weight_names}
        w_amax = np.max([np.abs(w).max(axis=1) for w in weights.values()], axis=0)
        a = np.clip(amax[x].astype(np.float64), 1e-8, None)

        def scale_for(al: float, a: np.ndarray = a, w_amax: np.ndarray = w_amax) -> np.ndarray:
            return np.clip(a ** al / np.clip(w_amax, 1e-8, None) ** (1 - al), _S_MIN, _S_MAX)

        sample, ws = samples[x].astype(np.float64), [w.astype(np.float64) for w in weights.values()]
        tried = {al: _int8_error(sample, ws, scale_for(al), per_token) for al in sorted({alpha, *alphas})}
        best = min(tried, key=lambda k: tried[k])
        if tried[best] >= _int8_error(sample, ws, None, per_token):
            chosen[x] = None
            continue
        chosen[x] = best
        scale = scale_for(best)
        spread_before.append(float(a.max() / np.median(a)))
        spread_after.append(float((a / scale).max() / np.median(a / scale)))
        inv_name, xs = f"{x}/smooth_inv_scale", f"{x}/smoothed"
        out.graph.initializer.append(numpy_helper.from_array((1.0 / scale).astype(np.float32), inv_name))
        mul = helper.make_node("Mul", [x, inv_name], [xs], name=f"{x}/smooth")
        # the Mul goes right after its producer (or first, for a graph input) to keep the graph sorted
        new_nodes.setdefault(producers.get(x, -1), []).append(mul)
        for w_name, w in weights.items():
            inits[w_name].CopyFrom(numpy_helper.from_array((w * scale[:, None]).astype(w.dtype), w_name))
        for node in out.graph.node:
            if node.op_type == "MatMul" and node.input[0] == x and node.input[1] in weights:
                node.input[0] = xs
    ordered = list(new_nodes.get(-1, []))
    for i, node in enumerate(out.graph.node):
        ordered.append(node)
        ordered.extend(new_nodes.get(i, []))
    del out.graph.node[:]
    out.graph.node.extend(ordered)
    smoothed = [x for x, al in chosen.items() if al is not None]
    report = {"alpha": alpha, "alphas_tried": sorted({alpha, *alphas}), "smoothed_inputs": len(smoothed),
              "error_simulated": "per token" if per_token else "per tensor",
              "left_as_is": len(chosen) - len(smoothed),
              "alpha_chosen": {str(al): sum(1 for v in chosen.values() if v == al)
                               for al in sorted({v for v in chosen.values() if v is not None})},
              "matmuls": sum(len(groups[x]) for x in smoothed),
              "activation_outlier_ratio": {"before_median": round(float(np.median(spread_before)), 2)
                                           if spread_before else None,
                                           "after_median": round(float(np.median(spread_after)), 2)
                                           if spread_after else None},
              "how": "x / s into the MatMul, s into the weight's rows (SmoothQuant); exact in float"}
    return out, report
