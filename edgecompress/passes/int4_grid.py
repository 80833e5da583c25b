"""Grid-aware 4-bit weights for decoders (the int4 recipe's decoder variant): keeps a source's 4-bit grid exactly.

A GGUF Q4_1 model dequantized to float32 has, per block of 32 weights along K, exactly w = d*q + m with q in 0..15
and d, m float16. Per block we recover m (the block minimum) and d ((max-min)/15 rounded to float16, kept only if it
reproduces the block exactly), so requantizing loses nothing. MatMulNBits computes scale*(q - zp) with an integer
zero point, which cannot hold an arbitrary float offset m; the offset goes into a small side term instead:
y = MatMulNBits(x; q, d, zp=0) + (x @ S) @ M, where S [K, K/32] sums each block of x and M [K/32, N] holds the
offsets (float16 on disk). Blocks that are not on such a grid (an ordinary float model) get a min/max affine 4-bit fit
(float offset) refined by a few least-squares rounds. An lm_head already on an 8-bit grid (a Q8_0 GGUF embedding)
keeps it: MatMulNBits bits=8, exact. The embedding Gather becomes a Gather of packed 4-bit rows plus the same affine
decode (standard ONNX ops).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from edgecompress import isa
from edgecompress.errors import PassError
from edgecompress.passes.base import Pass, PassContext, PassResult, Skip, WeightBytes, register, skip_text, skips
from edgecompress.passes.lm_head import _inits, find_lm_head, untie_lm_head, word_embedding
from edgecompress.passes.options import BLOCK_SIZE, option, validate_config
from edgecompress.tasknames import DECODER_TASK


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
    block_size: int = option(32, BLOCK_SIZE)
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

    def __post_init__(self) -> None:
        validate_config(self, "decoder-int4")


# Decoders: untie lm_head, then grid-aware 4-bit (exact on GGUF Q4_1 weights) incl. lm_head and embedding.
@register(recipe="int4", tasks=(DECODER_TASK,), quantizes=True, order=51,
          weight_bytes=WeightBytes(0.5 + 2 / 32, 0.5 + 2 / 32, "int4"))
class DecoderInt4(Pass[DecoderInt4Config]):
    """Untie lm_head, then every MatMul with a constant weight -> grid-aware 4-bit MatMulNBits (+ offset term),
    and the word-embedding Gather -> packed 4-bit rows with an affine decode."""

    name = "decoder-int4"

    def run(self, model: onnx.ModelProto, ctx: PassContext) -> PassResult:
        cfg = self.config
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
        skipped: list[Skip] = []
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
                skipped.append(Skip(node.name, why_not))
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
                            hint=f"nothing had a 2-D float weight with K divisible by {bs}: "
                                 f"{skip_text({'skipped': skips(*skipped[:2])})}")
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
            "skipped": skips(*skipped),
        }
        return PassResult(out, report)

    def _accuracy_level(self, ctx: PassContext) -> tuple[int, str]:
        cfg: DecoderInt4Config = self.config
        if cfg.accuracy_level is not None:
            return cfg.accuracy_level, "set in the recipe"
        return isa.accuracy_level_for(ctx.target.hardware.isa, ctx.target.name)

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
