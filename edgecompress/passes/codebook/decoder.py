"""Codebooks for decoders (the codebook recipe's decoder variant): per-channel codebooks decoded at load into the
8-bit weight of MatMulNBits (never dynamic int8 activations). The k-means, GPTQ index choice and mixed bits are
codebook.py's; lm_head untying is lm_head.py's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from edgecompress import isa
from edgecompress.errors import ConfigError, PassError
from edgecompress.passes.base import Pass, PassContext, PassResult, Skip, register, skip_text, skips
from edgecompress.passes.codebook import CODEBOOK_BITS, CODEBOOK_GRANULARITY, codebook_weight_bytes
from edgecompress.passes.lm_head import LmHead, _inits, find_lm_head, untie_lm_head, word_embedding
from edgecompress.passes.options import BLOCK_SIZE, option, validate_config
from edgecompress.tasknames import DECODER_TASK


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
    bits: int = option(4, CODEBOOK_BITS)
    granularity: str = option("channel", CODEBOOK_GRANULARITY)
    # spend the size budget (max_size_mb, else the target's) on more bits for the most sensitive tensors
    mixed: bool = True
    max_size_mb: float | None = None
    # MatMulNBits blocks: the activation quantization granularity at accuracy_level 4
    block_size: int = option(32, BLOCK_SIZE)
    accuracy_level: int | None = None  # None: 4, refused on a target without an int8 dot product
    untie: bool = True
    min_elements: int = 4096
    calibration_batches: int = 16
    iterations: int = 25
    gptq: bool = True

    def __post_init__(self) -> None:
        validate_config(self, "decoder-codebook")


@dataclass
class _CodedSite:
    node: str  # the MatMul's output (names may be empty)
    weight: str
    w: np.ndarray  # (K, N) float32: channels are N (for the embedding: its transpose, (dim, vocab))
    kind: str  # "matmul" | "lm_head" | "embedding"
    kernel: bool  # MatMulNBits bits=8 (else a float MatMul)


# Decoders: codebooks decoded at load into MatMulNBits' 8-bit weights (never dynamic int8 activations).
@register(recipe="codebook", tasks=(DECODER_TASK,), quantizes=True, order=61, weight_bytes=codebook_weight_bytes)
class DecoderCodebook(Pass[DecoderCodebookConfig]):
    """Untie lm_head, then each large MatMul weight (lm_head included) and the word embedding -> per-channel
    codebooks at b bits, decoded at load into MatMulNBits' 8-bit weight (or a float weight without int8 dot)."""

    name = "decoder-codebook"

    def _codebook_config(self) -> Any:
        from edgecompress.passes.codebook import CodebookConfig

        cfg: DecoderCodebookConfig = self.config
        return CodebookConfig(bits=cfg.bits, granularity=cfg.granularity, mixed=cfg.mixed,
                              max_size_mb=cfg.max_size_mb, min_elements=cfg.min_elements,
                              calibration_batches=cfg.calibration_batches, iterations=cfg.iterations, gptq=cfg.gptq)

    def run(self, model: onnx.ModelProto, ctx: PassContext) -> PassResult:
        from edgecompress.passes import codebook as cb

        cfg = self.config
        ccfg = self._codebook_config()  # validates bits and granularity
        per_channel = cfg.granularity == "channel"
        if cfg.accuracy_level is not None:
            level, why = cfg.accuracy_level, "set in the recipe"
        else:
            level, why = isa.accuracy_level_for(ctx.target.hardware.isa, ctx.target.name)
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
        skipped: list[Skip] = []
        for node in model.graph.node:
            if node.op_type != "MatMul" or node.input[1] not in inits:
                continue
            w = numpy_helper.to_array(inits[node.input[1]])
            if w.ndim != 2 or w.dtype != np.float32 or w.size < cfg.min_elements or uses[node.input[1]] != 1:
                skipped.append(Skip(node.name or node.output[0],
                                    f"weight {w.dtype} {list(w.shape)}: not a private 2-D float32 matrix of "
                                    f">= {cfg.min_elements} elements"))
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
                            hint=f"skipped: {skip_text({'skipped': skips(*skipped[:2])})}")

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
            "skipped": skips(*skipped),
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
