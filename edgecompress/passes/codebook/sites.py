"""Finding the codebook sites in ORT's dynamic-quantized graph, their calibration statistics (passes/capture.py),
GPTQ index choice and the mixed-bit allocation under a size budget. Shared by the encoder pass and the decoder
variant (codebook/decoder.py)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import onnx

from edgecompress.graph import GraphIndex
from edgecompress.passes.base import PassContext, Skip
from edgecompress.passes.capture import Capture, token_rows
from edgecompress.passes.codebook.config import _NBINS, CodebookConfig
from edgecompress.passes.codebook.kmeans import Coded, packed_bytes

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------------------------
# finding the weights in ORT's dynamic-quantized graph


@dataclass
class _Site:
    kind: str  # "matmul" | "gather"
    q_name: str  # the int8/uint8 initializer to replace
    scale_name: str
    zp_name: str
    float_weight: np.ndarray  # (rows, channels): MatMul (K, N); Gather table (V, H)
    float_name: str = ""  # its initializer in the float model
    activation: str | None = None  # fp32 graph value feeding the MatMul (for calibration stats)
    dequant_node: str | None = None  # Gather: the DequantizeLinear to make per-axis
    row_weights: np.ndarray | None = None
    hessian: np.ndarray | None = None  # X^T X / n of the MatMul's input over calibration tokens
    coded: dict[int, Coded] = field(default_factory=dict)
    errors: dict[int, float] = field(default_factory=dict)


def _find_sites(fp32: onnx.ModelProto, q: onnx.ModelProto, cfg: CodebookConfig,
                skipped: list[Skip]) -> list[_Site]:
    fidx, qidx = GraphIndex(fp32), GraphIndex(q)
    # activation feeding each fp32 MatMul weight
    act_of = {n.input[1]: n.input[0] for n in fidx.nodes("MatMul") if fidx.is_initializer(n.input[1])}
    sites: list[_Site] = []
    for node in qidx.nodes("MatMulInteger"):
        wq = node.input[1]
        base = wq.removesuffix("_quantized").removesuffix("__pt_w8")  # ORT dynamic | per_token_int8
        if not qidx.is_initializer(wq) or base not in act_of or not fidx.is_initializer(base):
            skipped.append(Skip(wq, "weight is not an initializer of a float MatMul"))
            continue
        w = fidx.array(base).astype(np.float32)
        if w.ndim != 2 or w.size < cfg.min_elements:
            skipped.append(Skip(base, f"{w.size} elements (< {cfg.min_elements}) or not 2-D"))
            continue
        scale = f"{wq}_scale" if wq.endswith("__pt_w8") else f"{base}_scale"
        zp = node.input[3] if len(node.input) > 3 else ""
        if not qidx.is_initializer(scale) or len(qidx.consumers[scale]) != 1:
            skipped.append(Skip(base, "its scale is not a private initializer"))
            continue
        if zp and np.any(qidx.array(zp) != 0):
            skipped.append(Skip(base, "asymmetric weight (non-zero zero point)"))
            continue
        sites.append(_Site("matmul", wq, scale, zp, w, base, activation=act_of[base]))
    # MatMuls that keep float activations (keep_float, or int8-mixed's kept nodes): int8 weight -> DequantizeLinear
    # (per output channel) -> MatMul. The decoded int8 feeds the DequantizeLinear, which ORT does not fold, so the
    # weight stays int8 in memory and b bits on disk. The float weight is found by the MatMul's node name.
    float_matmul = {n.name: n for n in fidx.nodes("MatMul") if n.name and fidx.is_initializer(n.input[1])}
    for node in qidx.nodes("DequantizeLinear"):
        wq, scale = node.input[0], node.input[1]
        users = qidx.consumers[node.output[0]]
        if (not qidx.is_initializer(wq) or not qidx.is_initializer(scale) or len(users) != 1
                or users[0].op_type != "MatMul" or users[0].input[1] != node.output[0]
                or users[0].name not in float_matmul or qidx.array(wq).dtype != np.int8):
            continue
        fnode = float_matmul[users[0].name]
        w = fidx.array(fnode.input[1]).astype(np.float32)
        axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
        zp = node.input[2] if len(node.input) > 2 else ""
        if (w.ndim != 2 or w.size < cfg.min_elements or qidx.array(wq).shape != w.shape or axis not in (1, -1)
                or qidx.array(scale).shape != (w.shape[1],) or len(qidx.consumers[wq]) != 1
                or len(qidx.consumers[scale]) != 1 or (zp and np.any(qidx.array(zp) != 0))):
            skipped.append(Skip(fnode.input[1], "float-activation weight is not a private, symmetric, per-column "
                                                 "int8 initializer"))
            continue
        sites.append(_Site("matmul", wq, scale, zp, w, fnode.input[1], activation=fnode.input[0]))
    for node in qidx.nodes("Gather"):
        table = node.input[0]
        base = table.removesuffix("_quantized")
        if not qidx.is_initializer(table) or not fidx.is_initializer(base):
            continue
        w = fidx.array(base).astype(np.float32)
        deq = [c for c in qidx.consumers[node.output[0]] if c.op_type == "DequantizeLinear"]
        if w.ndim != 2 or w.size < cfg.min_gather_elements:
            skipped.append(Skip(base, f"Gather table of {w.size} elements is left int8 "
                                      f"(< {cfg.min_gather_elements})"))
            continue
        if len(deq) != 1 or len(qidx.consumers[node.output[0]]) != 1 or len(qidx.consumers[table]) != 1:
            skipped.append(Skip(base, "Gather output is not dequantized by one DequantizeLinear"))
            continue
        sites.append(_Site("gather", table, deq[0].input[1], deq[0].input[2] if len(deq[0].input) > 2 else "",
                           w, base, dequant_node=deq[0].name))
    return sites


def _calibration_stats(fp32: onnx.ModelProto, sites: list[_Site], ctx: PassContext, cfg: CodebookConfig) -> int:
    """X^T X / n of each MatMul's input over the calibration tokens (padding excluded)."""
    acts = sorted({s.activation for s in sites if s.activation})
    if not acts or ctx.calibration is None:
        return 0
    capture = Capture(fp32, acts, optimize=False)  # unoptimized: keep the values we read
    gram: dict[str, np.ndarray] = {}
    count: dict[str, int] = {}
    n_batches = 0
    for batch in ctx.calibration():
        if n_batches >= cfg.calibration_batches:
            break
        outs = capture(batch)
        for a in acts:
            x2 = token_rows(outs[a], batch.get("attention_mask")).astype(np.float64)
            gram[a] = gram.get(a, 0) + x2.T @ x2
            count[a] = count.get(a, 0) + x2.shape[0]
        n_batches += 1
    for s in sites:
        if s.activation and s.activation in gram:
            s.hessian = gram[s.activation] / max(count[s.activation], 1)
            # sqrt of the mean square (~ mean |x|): the full mean square let a few outlier channels take over
            # the codebook and measured worse on MiniLM (cosine 0.956 vs 0.964 at 4 bits)
            s.row_weights = np.sqrt(np.diag(s.hessian))
    return n_batches


def _rel_error(site: _Site, coded: Coded) -> float:
    """||X dW|| / ||X W|| over the calibration tokens (via X^T X), else the weight's relative error."""
    dw = coded.dequantized().astype(np.float64) - site.float_weight
    if site.hessian is not None:
        h = site.hessian
        ref = float(np.sum(site.float_weight * (h @ site.float_weight)))
        return float(np.sqrt(max(np.sum(dw * (h @ dw)), 0.0) / max(ref, 1e-30)))
    return float(np.linalg.norm(dw)) / max(float(np.linalg.norm(site.float_weight)), 1e-30)


def gptq_indices(weight: np.ndarray, coded: Coded, hessian: np.ndarray, *, damp: float = 0.01,
                 block: int = 128) -> Coded:
    """Re-choose the indices row by row (inputs by decreasing energy), pushing each row's error onto the rows not
    yet coded through the inverse Hessian (GPTQ, Frantar et al. 2022) with the codebook held fixed."""
    w = np.array(weight, dtype=np.float64)
    rows, channels = w.shape
    amax = np.abs(w).max(axis=0)
    s0 = np.where(amax > 0, amax / 127.0, 1.0)
    values = coded.codebook.astype(np.float64) * coded.scale[None, :].astype(np.float64)  # (k, channels)
    # nearest codebook entry for each int8-grid bin, per channel
    grid = np.arange(-127, 128, dtype=np.float64)
    table = np.empty((_NBINS, channels), dtype=np.int64)
    for a in range(0, channels, 64):
        real = grid[:, None] * s0[None, a:a + 64]
        table[:, a:a + 64] = np.abs(real[:, None, :] - values[None, :, a:a + 64]).argmin(axis=1)
    h = np.array(hessian, dtype=np.float64)
    dead = np.diag(h) <= 0
    h[dead, dead] = 1.0
    w[dead, :] = 0.0
    h += damp * float(np.mean(np.diag(h))) * np.eye(rows)
    perm = np.argsort(-np.diag(h), kind="stable")
    w, h = w[perm], h[perm][:, perm]
    try:
        hinv = np.linalg.cholesky(np.linalg.inv(h)).T
    except np.linalg.LinAlgError:
        return coded  # singular even after damping: keep the k-means assignment
    idx = np.zeros((rows, channels), dtype=np.int64)
    cols = np.arange(channels)
    for b0 in range(0, rows, block):
        b1 = min(b0 + block, rows)
        wb = w[b0:b1].copy()
        err = np.zeros_like(wb)
        hb = hinv[b0:b1, b0:b1]
        for i in range(b1 - b0):
            bins = np.clip(np.rint(wb[i] / s0), -127, 127).astype(np.int64) + 127
            j = table[bins, cols]
            idx[b0 + i] = j
            e = (wb[i] - values[j, cols]) / hb[i, i]
            wb[i + 1:] -= np.outer(hb[i, i + 1:], e)
            err[i] = e
        w[b1:] -= hinv[b0:b1, b1:].T @ err
    out = np.empty_like(idx)
    out[perm] = idx
    return Coded(indices=out, codebook=coded.codebook, scale=coded.scale, bits=coded.bits)


def _site_bytes(site: _Site, bits: int, per_channel: bool) -> int:
    rows, channels = site.float_weight.shape
    return packed_bytes(rows * channels, bits, channels, per_channel)


def allocate_bits(costs: list[dict[int, int]], errors: list[dict[int, float]], floor: int, budget: float) -> list[int]:
    """Greedy: start every tensor at `floor` bits; repeatedly take the upgrade (one tensor to its next bit width)
    with the largest drop in squared relative error per extra byte, while the total stays within `budget` bytes."""
    bits = [floor] * len(costs)
    total = sum(c[floor] for c in costs)
    while True:
        best, best_gain = -1, 0.0
        for i, (c, e) in enumerate(zip(costs, errors, strict=True)):
            nb = bits[i] + 1
            if nb not in c or total - c[bits[i]] + c[nb] > budget:
                continue
            gain = (e[bits[i]] ** 2 - e[nb] ** 2) / max(c[nb] - c[bits[i]], 1)
            if gain > best_gain:
                best, best_gain = i, gain
        if best < 0:
            return bits
        total += costs[best][bits[best] + 1] - costs[best][bits[best]]
        bits[best] += 1
