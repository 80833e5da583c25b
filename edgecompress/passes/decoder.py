"""Decoder-specific weight passes: untie a tied lm_head, and 4-bit quantization that keeps a source's 4-bit grid.

Tied embeddings: the exported lm_head is MatMul(x, Transpose(embed)) (or, when the exporter folded the transpose,
a second initializer equal to embed.T). ORT's 4-bit quantizer only takes MatMuls whose weight is an initializer,
so a tied lm_head stays float32 (113 MB for SmolLM2). `untie_lm_head` gives lm_head its own initializer so that
both it and the embedding Gather can be quantized.

Grid-aware 4-bit: a GGUF Q4_1 model dequantized to float32 has, per block of 32 weights along K, exactly
w = d*q + m with q in 0..15 and d, m float16. Per block we recover m (the block minimum) and d ((max-min)/15
rounded to float16, kept only if it reproduces the block exactly), so requantizing loses nothing. MatMulNBits
computes scale*(q - zp) with an integer zero point, which cannot hold an arbitrary float offset m; the offset
goes into a small side term instead: y = MatMulNBits(x; q, d, zp=0) + (x @ S) @ M, where S [K, K/32] sums each
block of x and M [K/32, N] holds the offsets (float16 on disk). Blocks that are not on such a grid (an ordinary
float model) get a min/max affine 4-bit fit (float offset) refined by a few least-squares rounds. An lm_head
already on an 8-bit grid (a Q8_0 GGUF embedding) keeps it: MatMulNBits bits=8, exact.
The embedding Gather becomes a Gather of packed 4-bit rows plus the same affine decode (standard ONNX ops).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from edgecompress.errors import ConfigError, PassError
from edgecompress.passes.base import Pass, PassContext, PassResult

# ISA flags whose int8 dot products MatMulNBits uses at accuracy_level 4 (activations quantized per block to int8).
INT8_DOT_ISA = frozenset({"avx2", "avx512_vnni", "avx_vnni", "dotprod", "i8mm"})


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


# --- 4-bit affine blocks ---------------------------------------------------------------------------------------
def affine_4bit(w_blocks: np.ndarray, refine: int = 4) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Blocks (..., block) -> (codes uint8 0..15, scale d, offset m, on_grid) with w ~= d*q + m per block.

    m is the block minimum; d = (max - min)/15, rounded to float16 where that reproduces the block exactly (a
    Q4_1 source), else kept in float32 and refined by `refine` least-squares rounds. Constant blocks get d = 1.
    """
    w = w_blocks.astype(np.float32)
    lo, hi = w.min(axis=-1), w.max(axis=-1)
    d = (hi - lo) / np.float32(15)
    d = np.where(d > 0, d, np.float32(1)).astype(np.float32)
    d16 = d.astype(np.float16).astype(np.float32)
    q16 = np.clip(np.rint((w - lo[..., None]) / d16[..., None]), 0, 15)
    err = np.abs(q16 * d16[..., None] + lo[..., None] - w).max(axis=-1)
    on_grid = err <= 1e-6 * np.maximum(np.abs(w).max(axis=-1), 1e-30)
    d = np.where(on_grid, d16, d).astype(np.float32)
    m = lo.astype(np.float32)
    q = np.clip(np.rint((w - m[..., None]) / d[..., None]), 0, 15)
    # Off the grid, min/max is not the best affine fit: alternate a least-squares (d, m) for the codes with
    # re-rounding the codes, keeping each block's fit only while its squared error falls. On-grid blocks are exact.
    off = ~on_grid
    if refine and off.any():
        wo, qo, do, mo = w[off], q[off], d[off], m[off]
        best = ((qo * do[:, None] + mo[:, None] - wo) ** 2).sum(-1)
        for _ in range(refine):
            qm, wm = qo.mean(-1), wo.mean(-1)
            var = ((qo - qm[:, None]) ** 2).sum(-1)
            d_new = np.where(var > 0, ((qo - qm[:, None]) * (wo - wm[:, None])).sum(-1) / np.maximum(var, 1e-30),
                             do)
            d_new = np.where(d_new > 0, d_new, do).astype(np.float32)
            m_new = (wm - d_new * qm).astype(np.float32)
            q_new = np.clip(np.rint((wo - m_new[:, None]) / d_new[:, None]), 0, 15)
            err = ((q_new * d_new[:, None] + m_new[:, None] - wo) ** 2).sum(-1)
            better = err < best
            do, mo, best = np.where(better, d_new, do), np.where(better, m_new, mo), np.minimum(err, best)
            qo = np.where(better[:, None], q_new, qo)
        q[off], d[off], m[off] = qo, do, mo
    return q.astype(np.uint8), d, m, on_grid


def symmetric_8bit_grid(w_blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray, bool]:
    """Blocks on a GGUF Q8_0 grid (w = d*q, q in -127..127, d float16) -> (codes q+128 uint8, d, all on grid)."""
    w = w_blocks.astype(np.float32)
    amax = np.abs(w).max(axis=-1)
    d = (amax / np.float32(127)).astype(np.float16).astype(np.float32)
    d = np.where(d > 0, d, np.float32(1)).astype(np.float32)
    q = np.clip(np.rint(w / d[..., None]), -127, 127)
    exact = bool((np.abs(q * d[..., None] - w).max(axis=-1) <= 1e-6 * np.maximum(amax, 1e-30)).all())
    return (q + 128).astype(np.uint8), d, exact


def pack_nibbles(q: np.ndarray) -> np.ndarray:
    """(..., 2n) codes 0..15 -> (..., n) bytes, element 2j in the low nibble (MatMulNBits' order)."""
    return (q[..., 0::2] | (q[..., 1::2] << 4)).astype(np.uint8)


@dataclass(frozen=True)
class DecoderInt4Config:
    block_size: int = 32
    # MatMulNBits accuracy_level: None = from the target's ISA (4 with an int8 dot product, else 0)
    accuracy_level: int | None = None
    quantize_lm_head: bool = True
    quantize_embedding: bool = True
    untie: bool = True
    # MatMulNBits scales stored float16 + a Cast ORT folds at load: ~8% smaller file, but measured slower decode
    # (the kernel no longer sees constant scales when it prepacks), so off by default
    fp16_scales: bool = False
    # a tied embedding quantized once: the Gather decodes rows of lm_head's weight (the same blocks)
    share_tied: bool = True
    # an lm_head already on an 8-bit grid (GGUF Q8_0 embedding) keeps it: MatMulNBits bits=8, exact
    keep_8bit_head: bool = True


class DecoderInt4(Pass):
    """Untie lm_head, then every MatMul with a constant weight -> grid-aware 4-bit MatMulNBits (+ offset term),
    and the word-embedding Gather -> packed 4-bit rows with an affine decode."""

    name = "decoder-int4"

    def __init__(self, config: DecoderInt4Config | None = None) -> None:
        super().__init__(config or DecoderInt4Config())

    def run(self, model: onnx.ModelProto, ctx: PassContext) -> PassResult:
        cfg: DecoderInt4Config = self.config
        level, why = self._accuracy_level(ctx)
        head = find_lm_head(model)
        untie_report: dict[str, Any] = {"untied": False, "why": "untie off"}
        if cfg.untie:
            model, untie_report = untie_lm_head(model)
        out = onnx.ModelProto()
        out.CopyFrom(model)
        inits = _inits(out)
        consumers: dict[str, int] = {}
        for n in out.graph.node:
            for i in n.input:
                consumers[i] = consumers.get(i, 0) + 1
        new_nodes: list[onnx.NodeProto] = []
        new_inits: list[onnx.TensorProto] = []
        drop: set[str] = set()
        block_sums: dict[str, str] = {}  # x -> x @ S, shared by the MatMuls that read the same x
        sum_mats: dict[int, str] = {}  # K -> S's name
        skipped: list[dict[str, str]] = []
        converted, grid_blocks, all_blocks = 0, 0, 0
        lm_head_quantized = False
        head_base: str | None = None
        head_bits = 4
        bs = cfg.block_size
        for original in out.graph.node:
            node = onnx.NodeProto()
            node.CopyFrom(original)  # the graph's node list is rebuilt below
            w_name = node.input[1] if node.op_type == "MatMul" and len(node.input) == 2 else None
            init = inits.get(w_name) if w_name else None
            if node.op_type != "MatMul" or init is None:
                new_nodes.append(node)
                continue
            is_head = head is not None and node.output[0] == head.output
            w = numpy_helper.to_array(init)
            why_not = self._why_not(w, bs, is_head and not cfg.quantize_lm_head)
            if why_not:
                skipped.append({"node": node.name, "why": why_not})
                new_nodes.append(node)
                continue
            k, n = w.shape
            base = (node.name or w_name or "matmul").strip("/").replace("/", "_")
            if is_head and cfg.keep_8bit_head:
                q8, d8, exact8 = symmetric_8bit_grid(w.T.reshape(n, k // bs, bs))
                if exact8:  # no offset term: 8-bit MatMulNBits' default zero point is 128
                    new_inits += [numpy_helper.from_array(q8, f"{base}.q8"),
                                  numpy_helper.from_array(d8.reshape(-1), f"{base}.scales")]
                    new_nodes.append(helper.make_node(
                        "MatMulNBits", [node.input[0], f"{base}.q8", f"{base}.scales"], [node.output[0]],
                        name=f"{base}/MatMulNBits8", domain="com.microsoft", K=k, N=n, bits=8, block_size=bs,
                        accuracy_level=level))
                    converted += 1
                    lm_head_quantized, head_base, head_bits = True, base, 8
                    if consumers.get(w_name or "", 0) <= 1:
                        drop.add(w_name or "")
                    continue
            q, d, m, on_grid = affine_4bit(w.T.reshape(n, k // bs, bs))
            grid_blocks += int(on_grid.sum())
            all_blocks += on_grid.size
            x = node.input[0]
            if k not in sum_mats:
                s = np.kron(np.eye(k // bs, dtype=np.float32), np.ones((bs, 1), dtype=np.float32))
                sum_mats[k] = f"decoder_int4.block_sum_{k}"
                new_inits.append(numpy_helper.from_array(s, sum_mats[k]))
            if x not in block_sums:
                block_sums[x] = f"{base}.block_sums"
                new_nodes.append(helper.make_node("MatMul", [x, sum_mats[k]], [block_sums[x]],
                                                  name=f"{base}/BlockSum"))
            new_inits += [
                numpy_helper.from_array(pack_nibbles(q), f"{base}.q4"),
                numpy_helper.from_array(d.reshape(-1).astype(np.float16 if cfg.fp16_scales else np.float32),
                                        f"{base}.scales_f16" if cfg.fp16_scales else f"{base}.scales"),
                numpy_helper.from_array(np.zeros(n * ((k // bs + 1) // 2), dtype=np.uint8), f"{base}.zero_points"),
                numpy_helper.from_array(m.T.astype(np.float16), f"{base}.offsets_f16"),
            ]
            if cfg.fp16_scales:  # Q4_1 scales are float16 already: exact
                new_nodes.append(helper.make_node("Cast", [f"{base}.scales_f16"], [f"{base}.scales"],
                                                  name=f"{base}/CastScales", to=TensorProto.FLOAT))
            new_nodes += [
                helper.make_node("MatMulNBits", [x, f"{base}.q4", f"{base}.scales", f"{base}.zero_points"],
                                 [f"{base}.nbits_out"], name=f"{base}/MatMulNBits", domain="com.microsoft",
                                 K=k, N=n, bits=4, block_size=bs, accuracy_level=level),
                helper.make_node("Cast", [f"{base}.offsets_f16"], [f"{base}.offsets"], name=f"{base}/CastOffsets",
                                 to=TensorProto.FLOAT),
                helper.make_node("MatMul", [block_sums[x], f"{base}.offsets"], [f"{base}.offset_out"],
                                 name=f"{base}/Offset"),
                helper.make_node("Add", [f"{base}.nbits_out", f"{base}.offset_out"], [node.output[0]],
                                 name=f"{base}/AddOffset"),
            ]
            converted += 1
            if is_head:
                lm_head_quantized, head_base, head_bits = True, base, 4
            if consumers.get(w_name or "", 0) <= 1:
                drop.add(w_name or "")
        shared = head_base if cfg.share_tied and head is not None and head.tied != "no" else None
        emb_report = self._embedding(out, new_nodes, new_inits, drop, consumers, shared, head_bits) \
            if cfg.quantize_embedding else {"quantized": False, "why": "off"}
        if converted == 0:
            raise PassError("decoder int4 converted no MatMul",
                            hint=f"nothing had a 2-D float weight with K divisible by {bs}: {skipped[:2]}")
        del out.graph.node[:]
        out.graph.node.extend(new_nodes)
        kept = [i for i in out.graph.initializer if i.name not in drop]
        del out.graph.initializer[:]
        out.graph.initializer.extend([*kept, *new_inits])
        if not any(o.domain == "com.microsoft" for o in out.opset_import):
            out.opset_import.append(helper.make_opsetid("com.microsoft", 1))
        report = {
            "matmuls_quantized": converted, "block_size": bs, "accuracy_level": level, "accuracy_level_why": why,
            "grid_blocks": grid_blocks, "blocks": all_blocks,
            "grid_share": round(grid_blocks / all_blocks, 6) if all_blocks else 0.0,
            "grid_note": "blocks whose float weights were already on a 4-bit grid (e.g. GGUF Q4_1) and were kept "
                         "exactly; the rest got min/max round-to-nearest refined by least squares",
            "lm_head": {**untie_report, "quantized": lm_head_quantized,
                        "bits": head_bits if lm_head_quantized else None},
            "embedding": emb_report,
            "skipped": skipped,
        }
        return PassResult(out, report)

    def _accuracy_level(self, ctx: PassContext) -> tuple[int, str]:
        cfg: DecoderInt4Config = self.config
        if cfg.accuracy_level is not None:
            return cfg.accuracy_level, "set in the recipe"
        isa = ctx.target.hardware.isa & INT8_DOT_ISA
        if isa:
            return 4, f"int8 activations per block: the target has {', '.join(sorted(isa))}"
        return 0, "no int8 dot product on the target: float compute"

    @staticmethod
    def _why_not(w: np.ndarray, bs: int, head_off: bool) -> str:
        if head_off:
            return "lm_head quantization is off"
        if w.ndim != 2 or w.dtype != np.float32:
            return f"weight is {w.dtype} {w.shape}, not a 2-D float32 matrix"
        if w.shape[0] % bs:
            return f"K={w.shape[0]} is not a multiple of the block size {bs}"
        return ""

    def _embedding(self, model: onnx.ModelProto, nodes: list[onnx.NodeProto], inits: list[onnx.TensorProto],
                   drop: set[str], consumers: dict[str, int], shared: str | None,
                   shared_bits: int = 4) -> dict[str, Any]:
        """Gather(E, ids) -> affine decode of Gather(packed 4-bit E, ids); E stays if something else reads it."""
        bs = self.config.block_size
        gather = word_embedding(model)
        if gather is None:
            return {"quantized": False, "why": "no Gather reads input_ids from a 2-D initializer"}
        e = numpy_helper.to_array(_inits(model)[gather.input[0]])
        v, dim = e.shape
        if e.dtype != np.float32 or dim % bs:
            return {"quantized": False, "why": f"embedding {e.dtype} dim {dim} not a multiple of {bs}"}
        b = gather.name.strip("/").replace("/", "_") or "embedding"
        ids, out = gather.input[1], gather.output[0]
        decode: list[onnx.NodeProto] = []
        if shared is not None and shared_bits == 8:  # rows of the 8-bit lm_head: (q - 128) * d per block
            inits += [numpy_helper.from_array(np.array([v, dim // bs], dtype=np.int64), f"{b}.table_shape"),
                      numpy_helper.from_array(np.array([0, 0, dim // bs, bs], dtype=np.int64), f"{b}.blocks_shape"),
                      numpy_helper.from_array(np.array([0, 0, dim], dtype=np.int64), f"{b}.row_shape"),
                      numpy_helper.from_array(np.array(128.0, dtype=np.float32), f"{b}.zero"),
                      numpy_helper.from_array(np.array([-1], dtype=np.int64), f"{b}.last_axis")]
            decode += [
                helper.make_node("Reshape", [f"{shared}.scales", f"{b}.table_shape"], [f"{b}.shared_scales"],
                                 name=f"{b}/SharedScales"),
                helper.make_node("Gather", [f"{shared}.q8", ids], [f"{b}.rows"], name=f"{b}/GatherCodes"),
                helper.make_node("Cast", [f"{b}.rows"], [f"{b}.codes_f"], name=f"{b}/CastCodes",
                                 to=TensorProto.FLOAT),
                helper.make_node("Reshape", [f"{b}.codes_f", f"{b}.blocks_shape"], [f"{b}.codes"],
                                 name=f"{b}/Blocks"),
                helper.make_node("Sub", [f"{b}.codes", f"{b}.zero"], [f"{b}.centred"], name=f"{b}/ZeroPoint"),
                helper.make_node("Gather", [f"{b}.shared_scales", ids], [f"{b}.s"], name=f"{b}/GatherScales"),
                helper.make_node("Unsqueeze", [f"{b}.s", f"{b}.last_axis"], [f"{b}.s1"], name=f"{b}/ScaleAxis"),
                helper.make_node("Mul", [f"{b}.centred", f"{b}.s1"], [f"{b}.blocks"], name=f"{b}/Scale"),
                helper.make_node("Reshape", [f"{b}.blocks", f"{b}.row_shape"], [out], name=f"{b}/Rows"),
            ]
            i = next(i for i, n in enumerate(nodes) if n.op_type == "Gather" and list(n.output) == [out])
            nodes[i:i + 1] = decode
            if consumers.get(gather.input[0], 0) <= 1:
                drop.add(gather.input[0])
            return {"quantized": True, "bits": 8, "rows": int(v), "dim": int(dim), "shared_with_lm_head": True,
                    "layout": "lm_head's 8-bit blocks (the source's Q8_0 grid), gathered by row and decoded"}
        if shared is None:
            q, d, m, on_grid = affine_4bit(e.reshape(v, dim // bs, bs))
            grid = round(float(on_grid.mean()), 6)
            inits += [numpy_helper.from_array(pack_nibbles(q.reshape(v, dim)), f"{b}.q4"),
                      numpy_helper.from_array(d.astype(np.float16), f"{b}.scales_f16"),
                      numpy_helper.from_array(m.astype(np.float16), f"{b}.offsets_f16")]
            packed, scales, offsets = f"{b}.q4", f"{b}.scales_f16", f"{b}.offsets_f16"
        else:
            # lm_head's blocks (along K = hidden, per vocab row) are the embedding's row blocks: read those
            grid = None
            inits.append(numpy_helper.from_array(np.array([v, dim // bs], dtype=np.int64), f"{b}.table_shape"))
            scale_name = f"{shared}.scales" if any(i.name == f"{shared}.scales" for i in inits) \
                else f"{shared}.scales_f16"
            packed, scales, offsets = f"{shared}.q4", f"{b}.shared_scales", f"{b}.shared_offsets"
            decode += [
                helper.make_node("Reshape", [scale_name, f"{b}.table_shape"], [scales], name=f"{b}/SharedScales"),
                helper.make_node("Transpose", [f"{shared}.offsets_f16"], [offsets], name=f"{b}/SharedOffsets",
                                 perm=[1, 0]),
            ]
        inits += [numpy_helper.from_array(np.array(15, dtype=np.uint8), f"{b}.mask"),
                  numpy_helper.from_array(np.array(4, dtype=np.uint8), f"{b}.shift"),
                  numpy_helper.from_array(np.array([0, 0, dim // bs, bs], dtype=np.int64), f"{b}.blocks_shape"),
                  numpy_helper.from_array(np.array([0, 0, dim], dtype=np.int64), f"{b}.row_shape"),
                  numpy_helper.from_array(np.array([-1], dtype=np.int64), f"{b}.last_axis")]
        decode += [
            helper.make_node("Gather", [packed, ids], [f"{b}.rows"], name=f"{b}/GatherPacked"),
            helper.make_node("BitwiseAnd", [f"{b}.rows", f"{b}.mask"], [f"{b}.lo"], name=f"{b}/Low"),
            helper.make_node("BitShift", [f"{b}.rows", f"{b}.shift"], [f"{b}.hi"], name=f"{b}/High",
                             direction="RIGHT"),
            helper.make_node("Unsqueeze", [f"{b}.lo", f"{b}.last_axis"], [f"{b}.lo1"], name=f"{b}/LowAxis"),
            helper.make_node("Unsqueeze", [f"{b}.hi", f"{b}.last_axis"], [f"{b}.hi1"], name=f"{b}/HighAxis"),
            helper.make_node("Concat", [f"{b}.lo1", f"{b}.hi1"], [f"{b}.pairs"], name=f"{b}/Interleave", axis=-1),
            helper.make_node("Cast", [f"{b}.pairs"], [f"{b}.codes_f"], name=f"{b}/CastCodes", to=TensorProto.FLOAT),
            helper.make_node("Reshape", [f"{b}.codes_f", f"{b}.blocks_shape"], [f"{b}.codes"], name=f"{b}/Blocks"),
            helper.make_node("Gather", [scales, ids], [f"{b}.s16"], name=f"{b}/GatherScales"),
            helper.make_node("Gather", [offsets, ids], [f"{b}.m16"], name=f"{b}/GatherOffsets"),
            helper.make_node("Cast", [f"{b}.s16"], [f"{b}.s"], name=f"{b}/CastScales", to=TensorProto.FLOAT),
            helper.make_node("Cast", [f"{b}.m16"], [f"{b}.m"], name=f"{b}/CastOffsets", to=TensorProto.FLOAT),
            helper.make_node("Unsqueeze", [f"{b}.s", f"{b}.last_axis"], [f"{b}.s1"], name=f"{b}/ScaleAxis"),
            helper.make_node("Unsqueeze", [f"{b}.m", f"{b}.last_axis"], [f"{b}.m1"], name=f"{b}/OffsetAxis"),
            helper.make_node("Mul", [f"{b}.codes", f"{b}.s1"], [f"{b}.scaled"], name=f"{b}/Scale"),
            helper.make_node("Add", [f"{b}.scaled", f"{b}.m1"], [f"{b}.blocks"], name=f"{b}/Offset"),
            helper.make_node("Reshape", [f"{b}.blocks", f"{b}.row_shape"], [out], name=f"{b}/Rows"),
        ]
        i = next(i for i, n in enumerate(nodes) if n.op_type == "Gather" and list(n.output) == [out])
        nodes[i:i + 1] = decode
        if consumers.get(gather.input[0], 0) <= 1:
            drop.add(gather.input[0])
        return {"quantized": True, "rows": int(v), "dim": int(dim), "grid_share": grid,
                "shared_with_lm_head": shared is not None,
                "layout": ("lm_head's 4-bit blocks, gathered by row and decoded" if shared else
                           "packed 4-bit rows, float16 scale and offset per block, decoded after the Gather")}


# --- codebooks for decoders ------------------------------------------------------------------------------------
# The encoder codebook recipe (passes/codebook.py) decodes into ORT dynamic int8, whose per-tensor activation
# quantization breaks decoders (perplexity in the millions on SmolLM2). Here the same per-channel k-means codebooks
# (and GPTQ index choice, and mixed bits under the size budget) decode into the weight of a weight-only kernel:
# MatMulNBits bits=8 with activations quantized per block of block_size (int4's accuracy_level 4). The decode
# folds at load into its uint8 weight, so the file holds b bits a weight and RAM holds 8 (measured on this host: a
# folded decode feeding MatMulNBits is prepacked like a plain initializer, and runs as fast). ORT's 8-bit
# MatMulNBits at accuracy_level 0 (float compute) runs ~20x slower than a float MatMul here, so a target without
# an int8 dot product is refused. A weight whose K is not a multiple of block_size decodes into a float32 weight
# for a float MatMul instead (b bits on disk, fp32 in RAM), reported per tensor.
# A b-bit non-uniform codebook cannot feed 4-bit MatMulNBits: that kernel needs scale * (q - zp), a uniform grid.
@dataclass(frozen=True)
class DecoderCodebookConfig:
    bits: int = 4
    granularity: str = "channel"
    # spend the size budget (max_size_mb, else the target's) on more bits for the most sensitive tensors
    mixed: bool = True
    max_size_mb: float | None = None
    block_size: int = 32  # MatMulNBits blocks: the activation quantization granularity at accuracy_level 4
    accuracy_level: int | None = None  # None: 4, refused on a target without an int8 dot product
    untie: bool = True
    min_elements: int = 4096
    calibration_batches: int = 16
    iterations: int = 25
    gptq: bool = True


def accuracy_level_for(target_isa: frozenset[str] | set[str]) -> tuple[int, str]:
    isa = set(target_isa) & INT8_DOT_ISA
    if isa:
        return 4, f"int8 activations per block: the target has {', '.join(sorted(isa))}"
    return 0, "no int8 dot product on the target: float compute"


@dataclass
class _CodedSite:
    node: str  # the MatMul's output (names may be empty)
    weight: str
    w: np.ndarray  # (K, N) float32: channels are N (for the embedding: its transpose, (dim, vocab))
    kind: str  # "matmul" | "lm_head" | "embedding"
    kernel: bool  # MatMulNBits bits=8 (else a float MatMul)


class DecoderCodebook(Pass):
    """Untie lm_head, then each large MatMul weight (lm_head included) and the word embedding -> per-channel
    codebooks at b bits, decoded at load into MatMulNBits' 8-bit weight (or a float weight without int8 dot)."""

    name = "decoder-codebook"

    def __init__(self, config: DecoderCodebookConfig | None = None) -> None:
        super().__init__(config or DecoderCodebookConfig())

    def _codebook_config(self) -> Any:
        from edgecompress.passes.codebook import CodebookConfig

        cfg: DecoderCodebookConfig = self.config
        return CodebookConfig(bits=cfg.bits, granularity=cfg.granularity, mixed=cfg.mixed,
                              max_size_mb=cfg.max_size_mb, min_elements=cfg.min_elements,
                              calibration_batches=cfg.calibration_batches, iterations=cfg.iterations, gptq=cfg.gptq)

    def run(self, model: onnx.ModelProto, ctx: PassContext) -> PassResult:
        from edgecompress.passes import codebook as cb

        cfg: DecoderCodebookConfig = self.config
        ccfg = self._codebook_config()  # validates bits and granularity
        per_channel = cfg.granularity == "channel"
        if cfg.accuracy_level is not None:
            level, why = cfg.accuracy_level, "set in the recipe"
        else:
            level, why = accuracy_level_for(ctx.target.hardware.isa)
            if level == 0:  # 8-bit MatMulNBits in float runs ~20x slower than a float MatMul (measured here)
                raise ConfigError(f"codebooks on a decoder need an int8 dot product, which target "
                                  f"{ctx.target.name} lacks (ISA {', '.join(sorted(ctx.target.hardware.isa))})",
                                  hint="use --recipe int4 on this target")
        opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
        if opset < cb.MIN_OPSET:
            raise PassError(f"the codebook decode needs ONNX opset >= {cb.MIN_OPSET} (BitwiseAnd); the model has "
                            f"{opset}", hint="re-export with opset 18 or later, or use --recipe int4")
        untie_report: dict[str, Any] = {"untied": False, "why": "untie off"}
        if cfg.untie:
            model, untie_report = untie_lm_head(model)
        head = find_lm_head(model)
        inits = _inits(model)
        uses: dict[str, int] = {}
        for n in model.graph.node:
            for i in n.input:
                uses[i] = uses.get(i, 0) + 1
        sites: list[_CodedSite] = []
        skipped: list[dict[str, str]] = []
        for node in model.graph.node:
            if node.op_type != "MatMul" or node.input[1] not in inits:
                continue
            w = numpy_helper.to_array(inits[node.input[1]])
            if w.ndim != 2 or w.dtype != np.float32 or w.size < cfg.min_elements or uses[node.input[1]] != 1:
                skipped.append({"node": node.name or node.output[0],
                                "why": f"weight {w.dtype} {list(w.shape)}: not a private 2-D float32 matrix of "
                                       f">= {cfg.min_elements} elements"})
                continue
            is_head = head is not None and node.output[0] == head.output
            sites.append(_CodedSite(node.output[0], node.input[1], w, "lm_head" if is_head else "matmul",
                                    kernel=w.shape[0] % cfg.block_size == 0))
        gather = word_embedding(model)
        # a tied embedding reads lm_head's decoded rows (one codebook for both)
        shared = head is not None and head.tied != "no" and any(s.kind == "lm_head" for s in sites)
        emb_report: dict[str, Any] = {"coded": False, "why": "no Gather reads input_ids from a 2-D initializer"}
        if gather is not None and not shared:
            e = numpy_helper.to_array(inits[gather.input[0]])
            if e.dtype == np.float32 and e.size >= ccfg.min_gather_elements:
                sites.append(_CodedSite(gather.output[0], gather.input[0], np.ascontiguousarray(e.T), "embedding",
                                        kernel=False))
            else:
                emb_report = {"coded": False, "why": f"{e.dtype} table of {e.size} elements stays float "
                                                     f"(< {ccfg.min_gather_elements})"}
        if not any(s.kind != "embedding" for s in sites):
            raise PassError("decoder codebook found no MatMul with a large float weight to code",
                            hint=f"skipped: {skipped[:2]}")

        # calibration X^T X per MatMul input: weighted k-means and GPTQ (the encoder pass's statistics)
        stat_sites = [cb._Site("matmul", s.weight, "", "", s.w, activation=self._activation(model, s))
                      for s in sites]
        n_batches = cb._calibration_stats(model, [s for s in stat_sites if s.activation], ctx, ccfg)
        widths = list(range(cfg.bits, ccfg.top_bits + 1))
        for st in stat_sites:
            for b in widths:
                st.coded[b] = cb.kmeans_codebook(st.float_weight, b, row_weights=st.row_weights,
                                                 per_channel=per_channel, iterations=cfg.iterations)
                if cfg.gptq and st.hessian is not None and b < 8:
                    st.coded[b] = cb.gptq_indices(st.float_weight, st.coded[b], st.hessian)
                st.coded[b].indices = st.coded[b].indices.astype(np.uint8)  # int64 x 3 widths: GBs on SmolLM2
                st.errors[b] = cb._rel_error(st, st.coded[b])
        costs = [{b: self._bytes(s, b, per_channel) for b in widths} for s in sites]
        budget_mb = cfg.max_size_mb if cfg.max_size_mb is not None else ctx.target.budgets.max_size_mb
        budget = budget_mb * 1e6 if budget_mb else float("inf")
        bits = [cfg.bits] * len(sites)
        floor = self._rewrite(model, sites, [st.coded[b] for st, b in zip(stat_sites, bits, strict=True)],
                              head, gather, shared, level)
        floor_bytes = floor.ByteSize()
        if floor_bytes > budget:
            raise ConfigError(f"a {budget_mb:g} MB size budget is below what {cfg.bits}-bit codebooks reach "
                              f"({floor_bytes / 1e6:.2f} MB)", hint="raise --max-size-mb or lower --codebook-bits")
        out = floor
        if len(widths) > 1 and budget < float("inf"):
            fixed = floor_bytes - sum(c[cfg.bits] for c in costs)
            bits = cb.allocate_bits(costs, [st.errors for st in stat_sites], cfg.bits,
                                    budget - fixed - cb._SLACK_BYTES)
            out = self._rewrite(model, sites, [st.coded[b] for st, b in zip(stat_sites, bits, strict=True)],
                                head, gather, shared, level)
        hist: dict[str, int] = {}
        for b in bits:
            hist[str(b)] = hist.get(str(b), 0) + 1
        resident = sum(s.w.size * (1 if s.kernel else 4) for s in sites if s.kind != "embedding")
        resident += sum(s.w.size for s in sites if s.kind == "embedding")  # uint8 rows gathered and decoded
        if shared:
            hs = next(s for s in sites if s.kind == "lm_head")
            resident += hs.w.size  # the Gather keeps the decoded uint8 rows beside the kernel's prepacked copy
            emb_report = {"coded": True, "shared_with_lm_head": True,
                          "layout": "lm_head's decoded uint8 rows, gathered by token and scaled per row"}
        elif any(s.kind == "embedding" for s in sites):
            emb_report = {"coded": True, "shared_with_lm_head": False,
                          "layout": "per-row codebook decoded at load to uint8 rows, gathered and scaled per row"}
        size = out.ByteSize()
        kernel_sites = sum(1 for s in sites if s.kernel)
        report: dict[str, Any] = {
            "bits_floor": cfg.bits, "granularity": cfg.granularity, "mixed": cfg.mixed,
            "budget_mb": None if budget == float("inf") else budget_mb,
            "accuracy_level": level, "accuracy_level_why": why,
            "kernel": ("MatMulNBits bits=8 (weights decoded at load to uint8, activations int8 per block)"
                       if kernel_sites else "float MatMul (weights decoded at load to float32)"),
            "matmuls_kernel": kernel_sites,
            "matmuls_float": sum(1 for s in sites if not s.kernel and s.kind != "embedding"),
            "coded_tensors": len(sites), "bits_histogram": hist,
            "weighted_by": (f"calibration activation root mean square ({n_batches} batches)" if n_batches
                            else "uniform (no calibration data)"),
            "gptq": cfg.gptq and n_batches > 0,
            "model_bytes": size, "model_mb": round(size / 1e6, 3),
            "resident_weight_mb": round(resident / 1e6, 3),
            "resident_note": ("the file holds b-bit indices; after ORT folds the decode at load the weights are "
                              "uint8 (MatMulNBits) or float32 (float MatMul) in RAM, and the load briefly holds "
                              "the folding's intermediates"),
            "lm_head": {**untie_report, "coded": any(s.kind == "lm_head" for s in sites),
                        "kernel": next((s.kernel for s in sites if s.kind == "lm_head"), None)},
            "embedding": emb_report,
            "tensors": [{"tensor": s.weight, "kind": s.kind, "shape": list(s.w.shape), "bits": b,
                         "kernel": "MatMulNBits8" if s.kernel else ("Gather" if s.kind == "embedding" else "MatMul"),
                         "rel_error": round(st.errors[b], 5)}
                        for s, st, b in zip(sites, stat_sites, bits, strict=True)],
            "skipped": skipped,
        }
        if size > budget:
            raise PassError(f"the coded model is {size / 1e6:.2f} MB, over the {budget_mb:g} MB budget",
                            hint="raise --max-size-mb or lower --codebook-bits")
        return PassResult(out, report)

    @staticmethod
    def _activation(model: onnx.ModelProto, s: _CodedSite) -> str | None:
        if s.kind == "embedding":
            return None
        return next(n.input[0] for n in model.graph.node if n.op_type == "MatMul" and n.output[0] == s.node)

    @staticmethod
    def _bytes(s: _CodedSite, bits: int, per_channel: bool) -> int:
        from edgecompress.passes.codebook import packed_bytes

        k, n = s.w.shape
        return packed_bytes(k * n, bits, n, per_channel) + 4 * n  # + one float32 scale per channel

    def _rewrite(self, model: onnx.ModelProto, sites: list[_CodedSite], coded: list[Any],
                 head: LmHead | None, gather: onnx.NodeProto | None, shared: bool, level: int) -> onnx.ModelProto:
        cfg: DecoderCodebookConfig = self.config
        bs = cfg.block_size
        out = onnx.ModelProto()
        out.CopyFrom(model)
        g = out.graph
        replaced = {s.weight for s in sites} | ({gather.input[0]} if gather is not None else set())
        decode: list[onnx.NodeProto] = []
        new_inits: list[onnx.TensorProto] = []
        swap: dict[str, list[onnx.NodeProto]] = {}  # node output -> nodes replacing that node
        rows_of: dict[str, tuple[str, str]] = {}  # kind -> (uint8 rows [N, K], per-row scale [N, 1])
        for i, (s, c) in enumerate(zip(sites, coded, strict=True)):
            p = f"decoder_codebook{i}/"
            k, n = s.w.shape
            rows, scale = _decode_rows(p, c, decode, new_inits)
            rows_of[s.kind if s.kind != "matmul" else s.node] = (rows, scale)
            if s.kind == "embedding":
                continue
            mm = next(nd for nd in g.node if nd.op_type == "MatMul" and nd.output[0] == s.node)
            if s.kernel:
                new_inits += [numpy_helper.from_array(np.array([n, k // bs, bs], np.int64), f"{p}b_shape"),
                              numpy_helper.from_array(np.array([n, k // bs], np.int64), f"{p}s_shape"),
                              numpy_helper.from_array(np.array([-1], np.int64), f"{p}flat")]
                decode += [helper.make_node("Reshape", [rows, f"{p}b_shape"], [f"{p}B"], name=f"{p}B"),
                           helper.make_node("Expand", [scale, f"{p}s_shape"], [f"{p}S2"], name=f"{p}S2"),
                           helper.make_node("Reshape", [f"{p}S2", f"{p}flat"], [f"{p}S"], name=f"{p}S")]
                swap[s.node] = [helper.make_node(
                    "MatMulNBits", [mm.input[0], f"{p}B", f"{p}S"], [s.node], name=f"{p}MatMulNBits8",
                    domain="com.microsoft", K=k, N=n, bits=8, block_size=bs, accuracy_level=level)]
            else:
                w_t = _float_rows(p, rows, scale, decode, new_inits)
                decode.append(helper.make_node("Transpose", [w_t], [f"{p}W"], name=f"{p}W", perm=[1, 0]))
                swap[s.node] = [helper.make_node("MatMul", [mm.input[0], f"{p}W"], [s.node], name=mm.name)]
        if gather is not None and ("embedding" in rows_of or (shared and "lm_head" in rows_of)):
            rows, scale = rows_of["embedding" if "embedding" in rows_of else "lm_head"]
            swap[gather.output[0]] = _gather_rows(gather, rows, scale, new_inits)
        nodes: list[onnx.NodeProto] = list(decode)  # initializer-only: they go first, the graph stays sorted
        for nd in g.node:
            key = nd.output[0] if nd.output else ""
            if key in swap and (nd.op_type in ("MatMul", "Gather")):
                nodes += swap.pop(key)
            else:
                nodes.append(nd)
        still_read = {i for nd in nodes for i in nd.input}
        keep = [t for t in g.initializer if t.name not in replaced or t.name in still_read]
        del g.node[:]
        g.node.extend(nodes)
        del g.initializer[:]
        g.initializer.extend([*keep, *new_inits])
        if any(s.kernel for s in sites) and not any(o.domain == "com.microsoft" for o in out.opset_import):
            out.opset_import.append(helper.make_opsetid("com.microsoft", 1))
        return out


def _decode_rows(p: str, coded: Any, nodes: list[onnx.NodeProto], inits: list[onnx.TensorProto]
                 ) -> tuple[str, str]:
    """Packed indices -> (uint8 rows [N, K] = int8 codebook value + 128, float32 scale [N, 1]); all folded at load.

    The indices are stored transposed (row = output channel), so the folded tensor is MatMulNBits' B layout and
    a row of the embedding table: one decode serves both."""
    from edgecompress.passes.codebook import pack_fields

    idx = np.ascontiguousarray(coded.indices.T)  # (N, K)
    n, k = idx.shape
    book = (coded.codebook.astype(np.int16) + 128).astype(np.uint8)  # (2^b, N) or (2^b, 1)

    def init(name: str, arr: np.ndarray) -> str:
        inits.append(numpy_helper.from_array(arr, f"{p}{name}"))
        return f"{p}{name}"

    def node(op: str, inputs: list[str], out: str, **attrs: Any) -> str:
        nodes.append(helper.make_node(op, inputs, [f"{p}{out}"], name=f"{p}{out}", **attrs))
        return f"{p}{out}"

    scale = init("scale", coded.scale.astype(np.float32).reshape(n, 1))
    shape = init("shape", np.array([n, k], dtype=np.int64))
    if coded.bits == 8:  # the whole int8 grid: the indices are the weight (the identity codebook)
        return init("rows_u8", book[:, 0][idx]), scale
    acc = ""
    for offset, w, packed in pack_fields(idx, coded.bits):
        shifts = init(f"shifts{offset}", np.arange(0, 8, w, dtype=np.uint8))
        x = node("BitShift", [init(f"field{offset}", packed), shifts], f"f{offset}_shr", direction="RIGHT")
        x = node("BitwiseAnd", [x, init(f"mask{offset}", np.array((1 << w) - 1, np.uint8))], f"f{offset}_and")
        if offset:
            x = node("BitShift", [x, init(f"offset{offset}", np.array(offset, np.uint8))], f"f{offset}_shl",
                     direction="LEFT")
        x = node("Reshape", [x, init(f"flat{offset}", np.array([-1], np.int64))], f"f{offset}_flat")
        acc = x if not acc else node("BitwiseOr", [acc, x], f"f{offset}_or")
    if (n * k) % 8:
        acc = node("Slice", [acc, init("start", np.array([0], np.int64)), init("end", np.array([n * k], np.int64))],
                   "trim")
    idx32 = node("Cast", [node("Reshape", [acc, shape], "idx")], "idx32", to=TensorProto.INT32)
    if book.shape[1] == 1:
        return node("Gather", [init("codebook", book[:, 0]), idx32], "rows_u8", axis=0), scale
    return node("GatherElements", [init("codebook", np.ascontiguousarray(book.T)), idx32], "rows_u8", axis=1), scale


def _float_rows(p: str, rows: str, scale: str, nodes: list[onnx.NodeProto], inits: list[onnx.TensorProto]) -> str:
    """uint8 rows -> float32 (rows - 128) * scale, [N, K]."""
    inits.append(numpy_helper.from_array(np.array(128.0, np.float32), f"{p}zero"))
    nodes += [helper.make_node("Cast", [rows], [f"{p}rows_f"], name=f"{p}rows_f", to=TensorProto.FLOAT),
              helper.make_node("Sub", [f"{p}rows_f", f"{p}zero"], [f"{p}centred"], name=f"{p}centred"),
              helper.make_node("Mul", [f"{p}centred", scale], [f"{p}Wt"], name=f"{p}Wt")]
    return f"{p}Wt"


def _gather_rows(gather: onnx.NodeProto, rows: str, scale: str, inits: list[onnx.TensorProto]
                 ) -> list[onnx.NodeProto]:
    """Gather(E, ids) -> (Gather(uint8 rows, ids) - 128) * Gather(scale, ids): the table stays uint8 in RAM."""
    b = (gather.name.strip("/").replace("/", "_") or "embedding") + "/codebook"
    ids, out = gather.input[1], gather.output[0]
    inits += [numpy_helper.from_array(np.array(128.0, np.float32), f"{b}.zero")]
    return [
        helper.make_node("Gather", [rows, ids], [f"{b}.rows"], name=f"{b}/GatherRows"),
        helper.make_node("Cast", [f"{b}.rows"], [f"{b}.rows_f"], name=f"{b}/Cast", to=TensorProto.FLOAT),
        helper.make_node("Sub", [f"{b}.rows_f", f"{b}.zero"], [f"{b}.centred"], name=f"{b}/ZeroPoint"),
        helper.make_node("Gather", [scale, ids], [f"{b}.s"], name=f"{b}/GatherScales"),  # [.., 1]: broadcasts
        helper.make_node("Mul", [f"{b}.centred", f"{b}.s"], [out], name=f"{b}/Scale"),
    ]
