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

The package, split by job: config.py (knobs, config), kmeans.py, packing.py (indices and the decode graph),
sites.py (finding weights, statistics, GPTQ, bit allocation), decoder.py (the codebook recipe's decoder variant);
this module holds the pass.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from edgecompress.errors import ConfigError, PassError
from edgecompress.graph import GraphIndex, op_histogram
from edgecompress.isa import no_dynamic_int8_on_gpu
from edgecompress.passes import ort_quant
from edgecompress.passes.base import (
    ModelInfo,
    Pass,
    PassContext,
    PassResult,
    Skip,
    WeightBytes,
    matmul_only,
    register,
    skips,
)
from edgecompress.passes.codebook.config import (
    _SLACK_BYTES,
    BASES,
    CODEBOOK_BASE,
    CODEBOOK_BITS,
    CODEBOOK_GRANULARITY,
    CODEBOOK_KEEP_FLOAT,
    GRANULARITIES,
    MIN_OPSET,
    CodebookConfig,
)
from edgecompress.passes.codebook.kmeans import Coded, kmeans_codebook, packed_bytes
from edgecompress.passes.codebook.packing import decode_nodes, field_widths, pack_fields, unpack_fields
from edgecompress.passes.codebook.sites import (
    _calibration_stats,
    _find_sites,
    _rel_error,
    _Site,
    _site_bytes,
    allocate_bits,
    gptq_indices,
)
from edgecompress.targets import Target
from edgecompress.tasknames import ENCODER_TASKS

log = logging.getLogger(__name__)


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
    def refuses(cls, info: ModelInfo | None) -> str | None:
        return matmul_only(info)

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


# what the decoder variant (codebook/decoder.py), benchmarks and tests read from the package
__all__ = ["BASES", "CODEBOOK_BASE", "CODEBOOK_BITS", "CODEBOOK_GRANULARITY", "CODEBOOK_KEEP_FLOAT", "GRANULARITIES",
           "MIN_OPSET", "_SLACK_BYTES", "Codebook", "CodebookConfig", "Coded", "_Site", "_calibration_stats",
           "_rel_error", "allocate_bits", "codebook_weight_bytes", "decode_nodes", "field_widths", "gptq_indices",
           "kmeans_codebook", "pack_fields", "packed_bytes", "unpack_fields"]
