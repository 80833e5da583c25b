"""Weight-sharing codebooks stored at b bits per weight, decoded to int8 when ONNX Runtime loads the model.

The route (see shared/anchors.md, "A decode subgraph folds at load"):

1. ORT dynamic quantization (per-channel int8 MatMul weights; the word embedding too) gives the integer graph
   DynamicQuantizeLinear -> MatMulInteger -> scale Mul, which ORT fuses and runs with its int8 kernels.
2. Each large int8 weight initializer is replaced by a decode subgraph built from initializers only: b bits a
   weight in byte-aligned fields of 4/2/1 bits (uint8) -> BitShift/BitwiseAnd (-> BitwiseOr) -> Cast int32 ->
   Gather (GatherElements for per-channel codebooks) from a 2^b-entry int8 codebook. The codebook entries are
   k-means centroids of the float weights snapped to the channel's int8 grid, so the decoded tensor is a plain
   int8 weight and its per-channel scale stays the Mul it was (with a new value).
3. ORT constant-folds the decode at session load: the file holds ~b bits a weight, the running graph is the
   int8 one (no decode op is left; tests check the optimized graph). The price is paid at load: ORT holds the
   folded intermediates (~8 bytes a weight at 4 bits) until folding ends, so peak RSS at load is above
   int8-dynamic's (measured in benchmarks/results/compression.md).

Clustering is weighted 1-D k-means per output channel (or per tensor), each input row weighted by the root mean
square of its calibration activation. It runs on a 255-bin histogram of each channel's int8-grid values, which
makes it fast and deterministic (quantile init, plus a second start from the tensor-wide codebook; no random
init). GPTQ then re-chooses the indices with error feedback through the calibration X^T X, codebook fixed.

Mixed bits: `bits` is the floor for every tensor. When the size budget (the config's, else the target's) leaves
room, the tensors whose output error (||X W - X W_b|| / ||X W|| on calibration activations) falls most per byte
get more bits (up to bits + 2), greedily, until the next upgrade would break the budget. A budget that even the
floor cannot meet is a ConfigError.

Float activations (`keep_float`): the MatMuls whose run-time activation quantization costs the most keep float
activations; their decoded int8 weight feeds a DequantizeLinear (not folded by ORT), so they stay b bits on disk
and int8 in memory, and run at the float rate.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from edgecompress.errors import ConfigError, PassError
from edgecompress.graph import GraphIndex, op_histogram
from edgecompress.isa import no_dynamic_int8_on_gpu
from edgecompress.passes import ort_quant
from edgecompress.passes.base import ModelInfo, Pass, PassContext, PassResult, Skip, WeightBytes, register, skips
from edgecompress.passes.capture import Capture, token_rows
from edgecompress.passes.options import Option, option, validate_config
from edgecompress.targets import Target
from edgecompress.tasknames import ENCODER_TASKS

log = logging.getLogger(__name__)

GRANULARITIES = ("tensor", "channel")
BASES = ("per-token", "dynamic")
CODEBOOK_BITS = Option("codebook_bits", "codebook: bits per weight index, 2..8.", int, low=2, high=8)
CODEBOOK_GRANULARITY = Option("codebook_granularity", "codebook: one codebook per tensor or per output channel.",
                              choices=GRANULARITIES)
CODEBOOK_KEEP_FLOAT = Option("codebook_keep_float", "codebook: the N MatMuls most sensitive to activation "
                             "quantization keep float activations (slower).", int, low=0)
CODEBOOK_BASE = Option("codebook_base", "codebook: the int8 graph under it, per-token activation scales or ORT "
                       "dynamic int8.", choices=BASES)
MIN_OPSET = 18  # BitwiseAnd / BitwiseOr
_NBINS = 255  # int8 grid -127..127 (symmetric, as ORT's per-channel weights)
# Bytes a decoded tensor adds beyond its indices and codebook (node protos, small initializers): ~0.6-1.5 KB.
_OVERHEAD_BYTES = 1024
_SLACK_BYTES = 16 * 1024  # the node bytes per tensor are estimated: stay this far under a budget


@dataclass(frozen=True)
class CodebookConfig:
    bits: int = option(4, CODEBOOK_BITS)
    granularity: str = option("channel", CODEBOOK_GRANULARITY)
    # Spend the target's size budget on more bits for the most sensitive tensors (bits stays the floor).
    mixed: bool = True
    # most bits a sensitive tensor may get; None: bits + 2 (at most 8)
    max_bits: int | None = None
    # explicit budget (MB, 1e6 bytes); None: the target's max_size_mb
    max_size_mb: float | None = None
    # MatMul weights smaller than this stay plain int8 (a codebook would not pay for its decode)
    min_elements: int = 4096
    # Gather tables (embeddings) at least this large are coded too: the word embedding, not positions
    min_gather_elements: int = 1 << 20
    calibration_batches: int = 16
    iterations: int = 25
    # error feedback (GPTQ) when choosing indices: +0.012 mean cosine at 4 bits on MiniLM, ~1 s per tensor
    gptq: bool = True
    # The integer graph under the codebooks is ORT dynamic int8, except the `keep_float` MatMuls most sensitive
    # to run-time activation quantization (ranked on calibration data), which keep float activations: their
    # weights are still b bits on disk and int8 in memory, but each runs at the float rate. On MiniLM, 6 of 36
    # lift the int8 graph from cosine 0.9927 to 0.9966 and the mixed-bit codebook at 13.5 MB from 0.9855 to
    # 0.9900 (15 MB: 0.9884 -> 0.9926), at ~1.4x int8-dynamic's b8 latency on the dev host.
    # Not built on int8-mixed's smoothing: that lifts int8 (0.9927 -> 0.9946) but makes the output ~4x more
    # sensitive to a coded embedding (4 bits: -0.009 vs -0.0024), a net loss under a size budget.
    keep_float: int = option(0, CODEBOOK_KEEP_FLOAT)
    # Mixed bits: weigh each tensor's error by its measured effect on the model output (the float model with that
    # tensor alone coded at the floor, on this many calibration batches; 0: per-tensor errors as they are). Per
    # unit of relative error, MiniLM's FFN weights move the output 3-10x more than attention's, so the plain
    # per-tensor error spends the budget on the wrong tensors (13.5 MB: cosine 0.9825 -> 0.9855).
    measure_batches: int = 2
    # calibration batches that rank the MatMuls for keep_float
    sensitivity_batches: int = 4
    # The int8 graph under the codebooks: "dynamic" is ORT's dynamic int8 (one activation scale per tensor);
    # "per-token" quantizes each token's activations with its own scale (passes/quantize_int8.per_token_int8,
    # standard MatMulInteger), which removes most of the run-time activation error (MiniLM: the int8 graph
    # 0.9927 -> 0.9971) at ~1.0-1.05x the speed, so the budget goes to the weights.
    base: str = option("per-token", CODEBOOK_BASE)

    def __post_init__(self) -> None:
        validate_config(self, "codebook")
        if self.max_bits is not None and not self.bits <= self.max_bits <= 8:
            raise ConfigError(f"codebook max_bits must be in [{self.bits}, 8], got {self.max_bits}")

    @property
    def top_bits(self) -> int:
        if not self.mixed:
            return self.bits
        return self.max_bits if self.max_bits is not None else min(8, self.bits + 2)


# ---------------------------------------------------------------------------------------------------------------
# k-means on the int8 grid


@dataclass
class Coded:
    """One tensor's codebook coding. Channels are the columns of `indices` (axis 1)."""

    indices: np.ndarray  # (rows, channels) int, values < 2**bits
    codebook: np.ndarray  # (2**bits, channels) int8 for per-channel, (2**bits, 1) for per-tensor
    scale: np.ndarray  # (channels,) float32: weight = codebook value * scale
    bits: int

    def decoded_int8(self) -> np.ndarray:
        if self.codebook.shape[1] == 1:
            return self.codebook[:, 0][self.indices]
        return np.take_along_axis(self.codebook, self.indices, axis=0)

    def dequantized(self) -> np.ndarray:
        return self.decoded_int8().astype(np.float32) * self.scale[None, :]


def _weighted_lloyd(hist: np.ndarray, sums: np.ndarray, k: int, iterations: int,
                    init: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Weighted 1-D k-means of each row's histogram over bins 0..NBINS-1.

    hist: (rows, NBINS) weight per bin; sums: (rows, NBINS) weight * exact value (bin units) per bin.
    Returns centroids (rows, k) sorted, and the bin -> cluster assignment (rows, NBINS).
    """
    rows = hist.shape[0]
    if init is None:
        # deterministic init: weighted quantiles; Lloyd keeps 1-D clusters contiguous and sorted
        cum = np.cumsum(hist, axis=1)
        total = np.maximum(cum[:, -1:], 1e-30)
        targets = (np.arange(k) + 0.5) / k
        init = np.stack([np.argmax(cum / total >= t, axis=1) for t in targets], axis=1).astype(np.float64)
    cent = np.sort(init, axis=1)
    flat_base = (np.arange(rows) * k)[:, None]
    mark_base = (np.arange(rows) * (_NBINS + 1))[:, None]
    assign = np.zeros((rows, _NBINS), dtype=np.int64)
    for _ in range(iterations):
        bounds = (cent[:, 1:] + cent[:, :-1]) / 2  # bin v joins cluster #(bounds < v)
        first = np.clip(np.floor(bounds).astype(np.int64) + 1, 0, _NBINS)
        marks = np.bincount((mark_base + first).ravel(), minlength=rows * (_NBINS + 1))
        new_assign = np.cumsum(marks.reshape(rows, _NBINS + 1), axis=1)[:, :_NBINS]
        flat = (flat_base + new_assign).ravel()
        w = np.bincount(flat, hist.ravel(), minlength=rows * k).reshape(rows, k)
        s = np.bincount(flat, sums.ravel(), minlength=rows * k).reshape(rows, k)
        cent = np.sort(np.where(w > 0, s / np.maximum(w, 1e-30), cent), axis=1)
        if np.array_equal(new_assign, assign):
            break
        assign = new_assign
    return cent, assign


def _sse(hist: np.ndarray, sums: np.ndarray, cent: np.ndarray, assign: np.ndarray) -> np.ndarray:
    """Weighted squared error per row, each bin at its weighted mean value."""
    mean = sums / np.maximum(hist, 1e-30)
    return np.sum(hist * (mean - np.take_along_axis(cent, assign, axis=1)) ** 2, axis=1)


def kmeans_codebook(weight: np.ndarray, bits: int, *, row_weights: np.ndarray | None = None,
                    per_channel: bool = True, iterations: int = 25) -> Coded:
    """Code a float weight (rows, channels) with 2**bits shared int8 values per channel (or per tensor).

    row_weights (rows,) weigh each row's error (calibration mean square of the matching input); None: uniform.
    """
    w = np.asarray(weight, dtype=np.float64)
    rows, channels = w.shape
    k = 1 << bits
    amax = np.abs(w).max(axis=0)
    s0 = np.where(amax > 0, amax / 127.0, 1.0)
    norm = w / s0[None, :]  # channel values on the int8 grid, in [-127, 127]
    bins = np.clip(np.rint(norm), -127, 127).astype(np.int64) + 127
    if k >= _NBINS:
        # 8 bits hold the whole int8 grid: exactly round-to-nearest int8, one shared identity codebook
        codebook = np.arange(-127, 129).clip(max=127).astype(np.int8)[:, None]
        return Coded(indices=bins, codebook=codebook, scale=s0.astype(np.float32), bits=bits)
    rw = np.ones(rows) if row_weights is None else np.maximum(np.asarray(row_weights, np.float64), 1e-12)
    elem_w = np.broadcast_to(rw[:, None], w.shape)
    hrows = channels if per_channel else 1
    chan = np.broadcast_to(np.arange(channels)[None, :] if per_channel else np.zeros((1, 1), np.int64), w.shape)
    flat = (chan * _NBINS + bins).ravel()
    hist = np.bincount(flat, elem_w.ravel(), minlength=hrows * _NBINS).reshape(hrows, _NBINS)
    sums = np.bincount(flat, (elem_w * (norm + 127)).ravel(), minlength=hrows * _NBINS).reshape(hrows, _NBINS)
    cent, assign = _weighted_lloyd(hist, sums, k, iterations)
    if per_channel and channels > 1:
        # Lloyd on a few hundred values a channel stops in poor local optima; a second start from the
        # tensor-wide codebook often ends lower (4 bits, Gaussian: 0.098 vs 0.112). Keep the better, per channel.
        pooled, _ = _weighted_lloyd(hist.sum(0, keepdims=True), sums.sum(0, keepdims=True), k, iterations)
        cent2, assign2 = _weighted_lloyd(hist, sums, k, iterations, init=np.repeat(pooled, hrows, axis=0))
        better = _sse(hist, sums, cent2, assign2) < _sse(hist, sums, cent, assign)
        cent = np.where(better[:, None], cent2, cent)
        assign = np.where(better[:, None], assign2, assign)
    cent = cent - 127  # back to [-127, 127] grid units
    if per_channel:
        cmax = np.abs(cent).max(axis=1)
        # Stretch each channel's centroids onto the full int8 range: a finer grid for the snap.
        stretch = np.where(cmax > 0, 127.0 / np.maximum(cmax, 1e-30), 1.0)
        codebook = np.clip(np.rint(cent * stretch[:, None]), -127, 127).astype(np.int8).T  # (k, channels)
        scale = (s0 / stretch).astype(np.float32)
        indices = np.take_along_axis(assign.T, bins, axis=0)  # assign.T: (NBINS, channels)
    else:
        cmax = float(np.abs(cent).max())
        stretch_t = 127.0 / cmax if cmax > 0 else 1.0
        codebook = np.clip(np.rint(cent[0] * stretch_t), -127, 127).astype(np.int8)[:, None]
        scale = (s0 / stretch_t).astype(np.float32)
        indices = assign[0][bins]
    return Coded(indices=indices.astype(np.int64), codebook=codebook, scale=scale, bits=bits)


def packed_bytes(n: int, bits: int, channels: int, per_channel: bool) -> int:
    """Bytes a coded tensor adds to the file: packed indices + codebook (+ node overhead)."""
    idx = n if bits == 8 else bits * -(-n // 8)
    book = (1 << bits) * (channels if per_channel and bits < 8 else 1)
    return idx + book + _OVERHEAD_BYTES + 256 * bits


# ---------------------------------------------------------------------------------------------------------------
# bit-plane packing and the ONNX decode subgraph


def field_widths(bits: int) -> list[int]:
    """b bits as byte-aligned fields of 4, 2 and 1 bits (e.g. 6 -> [4, 2]); each field packs 8/w indices a byte."""
    return [w for w in (8, 4, 2, 1) if bits & w]


def pack_fields(indices: np.ndarray, bits: int) -> list[tuple[int, int, np.ndarray]]:
    """Indices -> [(bit offset, width w, bytes (ceil(n/8) * w, 1) uint8)]: field w holds bits offset..offset+w-1
    of each index, 8/w indices a byte, the first index in the lowest bits. n is padded to a multiple of 8."""
    flat = indices.ravel().astype(np.uint16)
    flat = np.pad(flat, (0, -len(flat) % 8))
    out, offset = [], 0
    for w in field_widths(bits):
        part = ((flat >> offset) & ((1 << w) - 1)).astype(np.uint8).reshape(-1, 8 // w)
        packed = np.zeros(part.shape[0], dtype=np.uint8)
        for t in range(8 // w):
            packed |= (part[:, t] << (t * w)).astype(np.uint8)
        out.append((offset, w, packed[:, None]))
        offset += w
    return out


def unpack_fields(fields: list[tuple[int, int, np.ndarray]], n: int) -> np.ndarray:
    """numpy mirror of the ONNX decode (for tests)."""
    acc = None
    for offset, w, packed in fields:
        shifts = np.arange(0, 8, w, dtype=np.uint8)
        vals = ((packed >> shifts) & ((1 << w) - 1)).astype(np.int64).reshape(-1) << offset
        acc = vals if acc is None else acc | vals
    assert acc is not None
    return acc[:n]


def decode_nodes(prefix: str, output: str, coded: Coded) -> tuple[list[onnx.NodeProto], list[TensorProto]]:
    """Nodes + initializers computing `output` (int8, the shape of coded.indices) from packed indices.

    ORT keeps each folded intermediate until its constant folding ends, so the decode is kept lean in bytes:
    a 4-bit tensor of n weights passes through ~8n bytes (shift, mask, reshape, int32 cast, gather).
    """
    rows, channels = coded.indices.shape
    n = rows * channels
    inits: list[TensorProto] = []
    nodes: list[onnx.NodeProto] = []

    def init(name: str, arr: np.ndarray) -> str:
        inits.append(numpy_helper.from_array(arr, f"{prefix}{name}"))
        return f"{prefix}{name}"

    def node(op: str, inputs: list[str], out: str, **attrs: Any) -> str:
        nodes.append(helper.make_node(op, inputs, [out], name=f"{prefix}{out}", **attrs))
        return out

    shape = init("shape", np.array([rows, channels], dtype=np.int64))
    if coded.bits == 8:
        shaped = init("idx_u8", coded.indices.astype(np.uint8))
    else:
        acc = ""
        for offset, w, packed in pack_fields(coded.indices, coded.bits):
            f = f"{prefix}f{offset}"
            x = node("BitShift", [init(f"field{offset}", packed),
                                  init(f"shifts{offset}", np.arange(0, 8, w, dtype=np.uint8))], f"{f}_shr",
                     direction="RIGHT")
            x = node("BitwiseAnd", [x, init(f"mask{offset}", np.array((1 << w) - 1, dtype=np.uint8))], f"{f}_and")
            if offset:
                x = node("BitShift", [x, init(f"offset{offset}", np.array(offset, dtype=np.uint8))], f"{f}_shl",
                         direction="LEFT")
            # fields differ in shape ((m*w, 8/w)): reshape before combining, straight to the weight's shape
            # when no padding needs trimming (each folded Reshape is one more n-byte copy at load)
            x = node("Reshape", [x, shape if n % 8 == 0 else init(f"flat{offset}", np.array([-1], np.int64))],
                     f"{f}_shaped")
            acc = x if not acc else node("BitwiseOr", [acc, x], f"{f}_or")
        if n % 8:
            acc = node("Slice", [acc, init("start", np.array([0], dtype=np.int64)),
                                 init("end", np.array([n], dtype=np.int64))], f"{prefix}trim")
            acc = node("Reshape", [acc, shape], f"{prefix}shaped")
        shaped = acc
    idx32 = node("Cast", [shaped], f"{prefix}idx", to=TensorProto.INT32)  # Gather* wants int32/int64 indices
    if coded.codebook.shape[1] == 1:
        node("Gather", [init("codebook", coded.codebook[:, 0]), idx32], output, axis=0)
    else:
        node("GatherElements", [init("codebook", coded.codebook), idx32], output, axis=0)
    return nodes, inits


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


# ---------------------------------------------------------------------------------------------------------------
# the pass


def codebook_weight_bytes(knobs: Mapping[str, Any]) -> WeightBytes:
    bits = float(knobs.get("codebook_bits", CodebookConfig.bits))  # bits/8 on disk, int8 resident
    return WeightBytes(bits / 8, bits / 8, "int8", resident=1.0)


@register(recipe="codebook", tasks=ENCODER_TASKS, quantizes=True, order=60,
          description="weight-sharing codebooks: int8 (per-token activation scales, --codebook-base) whose weights "
                      "(word embedding included) are stored as --codebook-bits indices into per-channel "
                      "(--codebook-granularity) int8 codebooks and decoded to int8 at load; tensors sensitive on "
                      "calibration data get more bits while the size budget allows",
          weight_bytes=codebook_weight_bytes,
          # 6 sensitive MatMuls keep float activations: MiniLM at 15 MB, cosine 0.9926 (0.9884 without), ~1.4x slower
          search=({"codebook_bits": 6}, {"codebook_bits": 4}, {"codebook_bits": 4, "codebook_keep_float": 6},
                  {"codebook_bits": 3}))
class Codebook(Pass[CodebookConfig]):
    """ORT dynamic int8, then each large int8 weight replaced by a b-bit codebook decode that ORT folds at load."""

    name = "codebook"

    @classmethod
    def requires(cls, target: Target, info: ModelInfo | None) -> str | None:
        return no_dynamic_int8_on_gpu(target)

    def run(self, model: onnx.ModelProto, ctx: PassContext) -> PassResult:
        cfg = self.config
        per_channel = cfg.granularity == "channel"
        opset = GraphIndex(model).opset
        if opset < MIN_OPSET:
            raise PassError(f"the codebook decode needs ONNX opset >= {MIN_OPSET} (BitwiseAnd); the model has {opset}",
                            hint="export with opset 18 or later, or use --recipe int8-dynamic")
        base_report: dict[str, Any] | None = None
        if cfg.keep_float > 0 and ctx.calibration is not None:
            model, q, base_report = _mixed_base(model, ctx, cfg)
        elif cfg.base == "per-token":
            model, q = _per_token_base(model)
        else:
            q = ort_quant.quantize_dynamic(model, op_types=("MatMul", "Gather"), per_channel=True)
        skipped: list[Skip] = []
        sites = _find_sites(model, q, cfg, skipped)
        base_name = ("onnxruntime.quantization.quantize_dynamic (per-channel int8)" if base_report is None else
                     f"ORT dynamic int8, the {cfg.keep_float} most sensitive MatMuls with float activations")
        if base_report is None and cfg.base == "per-token":
            base_name = ("per-token int8 activations (MatMulInteger, one scale per token), per-channel int8 "
                         "weights; embedding: ORT dynamic int8")
        report: dict[str, Any] = {"base": base_name,
                                  "bits_floor": cfg.bits, "granularity": cfg.granularity, "mixed": cfg.mixed,
                                  "skipped": skips(*skipped)}
        if base_report is not None:
            report["float_activations"] = base_report
        elif cfg.keep_float > 0:
            report["base_note"] = "no calibration data to rank nodes by: dynamic int8 everywhere"
        if not sites:
            report["skipped"] = skips(Skip("", "no int8 MatMul weight or embedding table large enough to code"),
                                      *skipped)
            return PassResult(q, report, modified=False)

        replaced = {s.q_name for s in sites}
        base_bytes = q.ByteSize() - sum(len(i.raw_data) or i.ByteSize() for i in q.graph.initializer
                                        if i.name in replaced)
        budget_mb = cfg.max_size_mb if cfg.max_size_mb is not None else ctx.target.budgets.max_size_mb
        budget = budget_mb * 1e6 if budget_mb else float("inf")
        floor_bytes = base_bytes + sum(_site_bytes(s, cfg.bits, per_channel) for s in sites)
        if floor_bytes > budget:
            raise ConfigError(f"a {budget_mb:g} MB size budget is below what {cfg.bits}-bit codebooks reach "
                              f"({floor_bytes / 1e6:.2f} MB)",
                              hint="raise --max-size-mb or lower --codebook-bits")

        widths = list(range(cfg.bits, cfg.top_bits + 1))
        n_batches = _calibration_stats(model, sites, ctx, cfg)
        for s in sites:
            for b in widths:
                s.coded[b] = kmeans_codebook(s.float_weight, b, row_weights=s.row_weights, per_channel=per_channel,
                                             iterations=cfg.iterations)
                if cfg.gptq and s.hessian is not None and b < 8:
                    # before the allocation: GPTQ helps the wide-input FFN weights most, which changes who is
                    # worth upgrading (cosine 0.982 -> see benchmarks/results/compression.md)
                    s.coded[b] = gptq_indices(s.float_weight, s.coded[b], s.hessian)
                s.errors[b] = _rel_error(s, s.coded[b])
        costs = [{b: _site_bytes(s, b, per_channel) for b in widths} for s in sites]
        bits = [cfg.bits] * len(sites)
        effects: list[float] | None = None
        if len(widths) > 1 and budget < float("inf"):
            # exact bytes of everything but the coded tensors, measured on the floor model
            fixed = _rewrite(q, sites, bits).ByteSize() - sum(c[cfg.bits] for c in costs)
            errors = [s.errors for s in sites]
            if cfg.measure_batches > 0 and ctx.calibration is not None:
                effects = _output_effects(model, sites, cfg, ctx)
                errors = [{b: e * w for b, e in s.errors.items()} for s, w in zip(sites, effects, strict=True)]
                report["allocation"] = (f"per-tensor error x its output effect (measured alone at {cfg.bits} bits "
                                        f"in float on {cfg.measure_batches} calibration batches)")
            bits = allocate_bits(costs, errors, cfg.bits, budget - fixed - _SLACK_BYTES)
        out = _rewrite(q, sites, bits)
        tensors = []
        for i, (s, b) in enumerate(zip(sites, bits, strict=True)):
            err = s.errors[b]
            tensors.append({"tensor": s.float_name, "kind": s.kind,
                            "shape": list(s.float_weight.shape), "bits": b, "rel_error": round(err, 5),
                            "bytes": _site_bytes(s, b, per_channel)})
            if effects is not None:
                tensors[-1]["output_effect"] = round(effects[i], 4)
        hist: dict[str, int] = {}
        for b in bits:
            hist[str(b)] = hist.get(str(b), 0) + 1
        size = out.ByteSize()
        report.update({
            "coded_tensors": len(sites), "bits_histogram": hist,
            "weighted_by": (f"calibration activation root mean square ({n_batches} batches)" if n_batches
                            else "uniform (no calibration data)"),
            "embedding_weights": "uniform over rows",
            "gptq": cfg.gptq and n_batches > 0,
            "budget_mb": None if budget == float("inf") else budget_mb,
            "model_bytes": size, "model_mb": round(size / 1e6, 3),
            "int8_model_mb": round(q.ByteSize() / 1e6, 3),
            "decode": "4/2/1-bit fields -> BitShift/BitwiseAnd/BitwiseOr -> Cast -> Gather(Elements) into int8; "
                      "constant-folded by ONNX Runtime at session load",
            "resident": "int8 weights after load (the decode is folded), as int8-dynamic; the folding's "
                        "intermediates (~8 bytes a weight at 4 bits) raise peak RSS during load",
            "ops_after": {k: v for k, v in op_histogram(out).items()
                          if k in ("MatMulInteger", "DynamicQuantizeLinear", "GatherElements", "BitShift")},
            "tensors": tensors,
        })
        if size > budget:
            raise PassError(f"the coded model is {size / 1e6:.2f} MB, over the {budget_mb:g} MB budget",
                            hint="raise --max-size-mb or lower --codebook-bits")
        return PassResult(out, report)


def _per_token_base(model: onnx.ModelProto) -> tuple[onnx.ModelProto, onnx.ModelProto]:
    """(the float model, with every node named; its int8 graph with per-token activation scales on every MatMul
    with a constant 2-D weight, and ORT's dynamic int8 embedding Gather)."""
    from edgecompress.passes.int8_graph import per_token_int8

    if not all(n.name for n in model.graph.node):  # nodes are chosen by name
        named = onnx.ModelProto()
        named.CopyFrom(model)
        ort_quant.name_nodes(named)
        model = named
    idx = GraphIndex(model)
    matmuls = [n.name for n in idx.nodes("MatMul")
               if idx.is_initializer(n.input[1]) and idx.array(n.input[1]).ndim == 2]
    q = per_token_int8(model, matmuls)
    return model, ort_quant.quantize_dynamic(q, op_types=("Gather",), per_channel=True)


def _mixed_base(model: onnx.ModelProto, ctx: PassContext, cfg: CodebookConfig
                ) -> tuple[onnx.ModelProto, onnx.ModelProto, dict[str, Any]]:
    """(the float model, with every node named; its int8 graph; a report): ORT dynamic int8, except the
    `keep_float` MatMuls whose run-time activation quantization alone costs the most output cosine (ranked in one
    float simulation, passes/sensitivity.py), which keep float activations and read an int8 weight."""
    from itertools import islice

    from edgecompress.passes.int8_graph import weight_only_int8
    from edgecompress.passes.sensitivity import node_sensitivity, quantizable_nodes

    assert ctx.calibration is not None
    if not all(n.name for n in model.graph.node):  # nodes are chosen by name
        named = onnx.ModelProto()
        named.CopyFrom(model)
        ort_quant.name_nodes(named)
        model = named
    matmuls = quantizable_nodes(model, gathers=False)
    batches = list(islice(ctx.calibration(), cfg.sensitivity_batches))
    ranked = node_sensitivity(model, ctx, matmuls, batches=batches) if matmuls and batches else []
    keep = [name for name, _ in ranked[:cfg.keep_float]]
    q = ort_quant.quantize_dynamic(model, op_types=("MatMul", "Gather"), per_channel=True, nodes_to_exclude=keep)
    if keep:
        q = weight_only_int8(q, keep)
    report = {"kept_float_activations": [{"node": n, "sensitivity": round(sc, 6)} for n, sc in ranked[:len(keep)]],
              "ranked_on": f"{len(batches)} calibration batches, dynamic int8 simulated per node"}
    return model, q, report


def _output_effects(model: onnx.ModelProto, sites: list[_Site], cfg: CodebookConfig, ctx: PassContext
                    ) -> list[float]:
    """Per site: sqrt(output loss) / relative error with that tensor alone coded at the floor, in the float model
    (activations exact, so only the weight's coding counts); loss = 1 - mean output cosine on calibration batches.
    Squared, the error times this factor estimates the loss the tensor adds at any width."""
    from itertools import islice

    from edgecompress.passes.sensitivity import output_cosines, run_first_output

    assert ctx.calibration is not None
    batches = list(islice(ctx.calibration(), cfg.measure_batches))
    if not batches:
        return [1.0] * len(sites)
    reference = run_first_output(model, batches, optimize=False)
    work = onnx.ModelProto()
    work.CopyFrom(model)
    inits = {i.name: i for i in work.graph.initializer}
    out = []
    for s in sites:
        init = inits.get(s.float_name)
        if init is None:
            out.append(1.0)
            continue
        saved = TensorProto()
        saved.CopyFrom(init)  # swapped in place and back: one copy of the model, not one per tensor
        init.CopyFrom(numpy_helper.from_array(s.coded[cfg.bits].dequantized().astype(np.float32), s.float_name))
        got = run_first_output(work, batches, optimize=False)
        init.CopyFrom(saved)
        loss = max(float(1.0 - output_cosines(reference, got, batches).mean()), 1e-12)
        out.append(float(np.sqrt(loss)) / max(s.errors[cfg.bits], 1e-12))
    return out


def _rewrite(q: onnx.ModelProto, sites: list[_Site], bits: list[int]) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(q)
    g = out.graph
    by_name = {s.q_name: (s, b) for s, b in zip(sites, bits, strict=True)}
    scales = {s.scale_name: s for s in sites}
    zps = {s.zp_name: s for s in sites if s.kind == "gather"}
    keep = []
    for init in g.initializer:
        if init.name in by_name:
            continue
        site = scales.get(init.name)
        if site is not None:
            sc = site.coded[by_name[site.q_name][1]].scale
            init.CopyFrom(numpy_helper.from_array(sc.astype(np.float32), init.name))
        site = zps.get(init.name)
        if site is not None:  # the embedding goes from per-tensor uint8 to per-column symmetric int8
            init.CopyFrom(numpy_helper.from_array(np.zeros(site.float_weight.shape[1], np.int8), init.name))
        keep.append(init)
    del g.initializer[:]
    g.initializer.extend(keep)
    new_nodes: list[onnx.NodeProto] = []
    new_inits: list[TensorProto] = []
    for i, (s, b) in enumerate(zip(sites, bits, strict=True)):
        nodes, inits = decode_nodes(f"codebook{i}/", s.q_name, s.coded[b])
        new_nodes += nodes
        new_inits += inits
    deq = {s.dequant_node for s in sites if s.dequant_node}
    for node in g.node:
        if node.name in deq:
            for a in list(node.attribute):
                if a.name == "axis":
                    node.attribute.remove(a)
            node.attribute.append(helper.make_attribute("axis", -1))
    # decode nodes first: they depend on initializers only, and the graph stays topologically sorted
    nodes_all = [*new_nodes, *g.node]
    del g.node[:]
    g.node.extend(nodes_all)
    g.initializer.extend(new_inits)
    for vi in list(g.value_info):
        if vi.name in by_name:
            g.value_info.remove(vi)
    return out
