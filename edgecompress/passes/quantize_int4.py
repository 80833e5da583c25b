"""INT4 weight-only blockwise quantization with ONNX Runtime's MatMulNBits.

MatMul weights become 4-bit blocks along K (one scale and zero point per block) run by the MatMulNBits kernel; the
word-embedding Gather becomes GatherBlockQuantized (4-bit along the hidden axis), which is most of a small encoder's
bytes. Activations stay float: on CPUs with an int8 dot-product instruction, accuracy_level 4 lets the kernel
quantize activations to int8 and use it; elsewhere the kernel dequantizes blocks and computes in fp32.

Methods: rtn (ORT's round-to-nearest) and hqq (ORT's half-quadratic) need no data; gptq is implemented here (ORT's
is a no-op, see below) and fits each block to calibration activations.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import onnx

from edgecompress import isa
from edgecompress.errors import PassError
from edgecompress.graph import GraphIndex, op_histogram
from edgecompress.passes import ort_quant
from edgecompress.passes.base import (
    Batch,
    Pass,
    PassContext,
    PassResult,
    Skip,
    TaskTraits,
    WeightBytes,
    register,
    skips,
)
from edgecompress.passes.capture import Capture, token_rows
from edgecompress.passes.options import BLOCK_SIZE, CALIBRATION_SAMPLES, Option, option, validate_config
from edgecompress.targets import Target
from edgecompress.tasknames import ENCODER_TASKS

# ISA flags with an int8 dot product that MatMulNBits uses at accuracy_level 4: the one list, in isa.py
INT8_DOT_ISA = isa.INT8_DOT


INT4_METHOD = Option("int4_method", "int4: how blocks are quantized.", choices=("rtn", "hqq", "gptq"))


@dataclass(frozen=True)
class Int4Config:
    block_size: int = option(32, BLOCK_SIZE)
    method: str = option("rtn", INT4_METHOD)
    symmetric: bool = False  # asymmetric: a 4-bit zero point per block, ~1.5% more bytes, better fit
    quantize_gather: bool = True
    # GPTQ only: at most this many calibration samples feed the Hessians (one forward pass per batch); 0 = all
    calibration_samples: int = option(0, CALIBRATION_SAMPLES)

    def __post_init__(self) -> None:
        if self.calibration_samples:  # 0 means all here
            validate_config(self, "int4")
        else:
            validate_config(replace(self, calibration_samples=1), "int4")


def accuracy_level_for(target: Target) -> tuple[int, str]:
    """MatMulNBits accuracy_level for a target, and why (isa.accuracy_level_for)."""
    return isa.accuracy_level_for(target.hardware.isa, target.name)


def _calibration(ctx: PassContext, samples: int) -> list[Batch]:
    if ctx.calibration is None:
        raise PassError("--int4-method gptq needs calibration data and this build has none",
                        hint="use --int4-method rtn or hqq")
    batches: list[Batch] = []
    n = 0
    for batch in ctx.calibration():
        if samples and n >= samples:
            break
        batches.append(batch)
        n += len(next(iter(batch.values())))
    if not batches:
        raise PassError("--int4-method gptq found no calibration batches", hint="give --calibration FILE")
    return batches


@register(recipe="int4", tasks=ENCODER_TASKS, quantizes=True, order=50,
          description="4-bit weight-only blockwise (ONNX Runtime MatMulNBits; word-embedding Gather included), "
                      "float activations; --block-size, --int4-method rtn|hqq|gptq",
          weight_bytes=WeightBytes(0.5 + 2 / 32, 0.5 + 2 / 32, "int4"),
          # gptq on MiniLM: 14.67 MB at cosine 0.9885 (plain RTN: 0.972)
          search=({}, {"int4_method": "gptq"}))
class Int4WeightOnly(Pass[Int4Config]):
    """MatMul -> MatMulNBits, word-embedding Gather -> GatherBlockQuantized, 4 bits per weight."""

    name = "int4"

    @classmethod
    def configure(cls, values: Mapping[str, Any], task: TaskTraits) -> Int4Config:
        d = Int4Config()
        method = values.get("int4_method", d.method)
        # calibration only matters to GPTQ: keep it out of the others' cache keys
        samples = values.get("calibration_samples", CALIBRATION_SAMPLES.default) if method == "gptq" else 0
        return Int4Config(block_size=values.get("block_size", d.block_size), method=method,
                          calibration_samples=samples)

    def run(self, model: onnx.ModelProto, ctx: PassContext) -> PassResult:
        cfg = self.config
        idx = GraphIndex(model)
        matmuls = idx.nodes("MatMul")
        with_weight = [n for n in matmuls if len(n.input) > 1 and idx.is_initializer(n.input[1])]
        if not with_weight:
            what = "no MatMul" if not matmuls else "no MatMul with a constant weight"
            raise PassError(f"int4 needs a MatMul with a constant weight and this model has {what}",
                            hint="4-bit weight-only quantization applies to Linear layers; try --recipe fp16")
        level, level_why = accuracy_level_for(ctx.target)
        op_types = ("MatMul", "Gather") if cfg.quantize_gather else ("MatMul",)
        if cfg.method == "gptq" and cfg.symmetric:
            raise PassError("GPTQ here fits asymmetric blocks only", hint="leave symmetric off")
        calibration = _calibration(ctx, cfg.calibration_samples) if cfg.method == "gptq" else None
        if calibration is not None:
            out, _ = gptq_model(model, calibration, cfg.block_size)
            if cfg.quantize_gather:
                out = ort_quant.quantize_weight_only(out, method="rtn", block_size=cfg.block_size,
                                                     op_types=("Gather",))
        else:
            out = ort_quant.quantize_weight_only(model, method=cfg.method, block_size=cfg.block_size,
                                                 symmetric=cfg.symmetric, op_types=op_types)
        if level:  # set here rather than in each ORT algorithm (HQQ ignores it)
            for node in out.graph.node:
                if node.op_type == "MatMulNBits":
                    kept = [a for a in node.attribute if a.name != "accuracy_level"]
                    del node.attribute[:]
                    node.attribute.extend([*kept, onnx.helper.make_attribute("accuracy_level", level)])
        before, after = op_histogram(model), op_histogram(out)
        nbits = after.get("com.microsoft.MatMulNBits", 0)
        gathers = after.get("com.microsoft.GatherBlockQuantized", 0)
        report: dict[str, Any] = {
            "library": ("edgecompress GPTQ (ORT's is a no-op in 1.32) + onnxruntime MatMulNBits layout"
                        if cfg.method == "gptq" else "onnxruntime.quantization.matmul_nbits_quantizer"),
            "method": cfg.method,
            "bits": 4,
            "block_size": cfg.block_size,
            "symmetric": cfg.symmetric,
            "accuracy_level": level,
            "accuracy_level_why": level_why,
            "ops_before": {k: before.get(k, 0) for k in ("MatMul", "Gather")},
            "quantized_ops": {"MatMulNBits": nbits, "GatherBlockQuantized": gathers},
            "matmuls_left_float": {
                "count": after.get("MatMul", 0),
                "why": "activation x activation (attention scores), or a weight that is not an initializer",
            },
        }
        if cfg.method in ("hqq", "gptq") and gathers:
            report["gather_method"] = f"rtn ({cfg.method} quantizes MatMul only)"
        if calibration is not None:
            report["calibration_batches"] = len(calibration)
        if cfg.quantize_gather and not gathers:
            report["skipped"] = skips(Skip("Gather", "no Gather with a constant table (no word embedding) was found"))
        if nbits == 0:
            raise PassError("int4 quantization converted no MatMul to MatMulNBits",
                            hint="its weights may not be 2-D constants; try --recipe int8-dynamic")
        return PassResult(out, report)


# --- GPTQ --------------------------------------------------------------------------------------------------------
# ORT 1.32's GPTQ (a vendored neural-compressor) is a no-op: with weights laid out [K, N] it propagates the rounding
# error along a column of the *upper*-triangular inverse-Hessian factor (Hinv[i:, i]) instead of its row, so only
# the diagonal is used and the result is bit-identical to round-to-nearest (tests/test_quantize_int4.py shows it).
# So GPTQ is done here: Hessians from one ORT run per calibration batch (all MatMul inputs as extra outputs, padding
# tokens masked out), the GPTQ update with one group per block (scale and zero point fitted to the updated weights
# at each block's start, as in the paper's grouped variant), packed in MatMulNBits' layout.
def _weight_matmuls(model: onnx.ModelProto) -> list[tuple[onnx.NodeProto, np.ndarray]]:
    idx = GraphIndex(model)
    out = []
    for node in idx.nodes("MatMul"):
        if len(node.input) > 1 and idx.is_initializer(node.input[1]):
            w = idx.array(node.input[1])
            if w.ndim == 2 and w.dtype == np.float32:
                out.append((node, w))
    return out


def hessians(model: onnx.ModelProto, names: list[str], batches: list[Batch]) -> dict[str, np.ndarray]:
    """H = X^T X / rows for each activation in `names` (rows = real tokens; padding masked where shapes allow)."""
    capture = Capture(model, names, purpose="collect GPTQ Hessians")
    acc: dict[str, np.ndarray] = {}
    rows: dict[str, int] = {}
    for batch in batches:
        values = capture(batch)
        for name in names:
            x = token_rows(values[name], batch.get("attention_mask")).astype(np.float32)
            acc[name] = acc.get(name, 0) + (x.T @ x).astype(np.float64)  # fp32 GEMM per batch, fp64 running sum
            rows[name] = rows.get(name, 0) + len(x)
    return {n: acc[n] / max(rows[n], 1) for n in acc}


def _asym_params(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-column scale and zero point of a block as MatMulNBits' asymmetric RTN fits them (range includes 0)."""
    lo = np.minimum(w.min(axis=0), 0.0)
    hi = np.maximum(w.max(axis=0), 0.0)
    scale = (hi - lo) / 15.0
    safe = np.where(scale == 0, 1.0, scale)
    zp = np.where(scale == 0, 8.0, np.clip(np.round(-lo / safe), 0, 15))
    return scale, zp


def gptq(w: np.ndarray, h: np.ndarray, block_size: int, percdamp: float = 0.01
         ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """GPTQ of W [K, N] (y = x @ W) under Hessian H [K, K]. Returns (codes uint8 [Kpad, N] in 0..15,
    scales float32 [k_blocks, N], zero points uint8 [k_blocks, N]); K is padded to whole blocks with zeros."""
    k, n = w.shape
    k_blocks = -(-k // block_size)
    kp = k_blocks * block_size
    W = np.zeros((kp, n), np.float64)  # the paper's names
    W[:k] = w
    H = np.eye(kp, dtype=np.float64)  # padded rows: unit curvature, no coupling
    H[:k, :k] = h
    dead = np.diag(H) == 0
    H[dead, dead] = 1.0
    W[dead] = 0.0
    H[np.diag_indices(kp)] += percdamp * np.mean(np.diag(H))
    U = np.linalg.cholesky(np.linalg.inv(H)).T  # upper factor: its row i drives the update after column i
    codes = np.zeros((kp, n), np.uint8)
    scales = np.zeros((k_blocks, n), np.float64)
    zps = np.zeros((k_blocks, n), np.uint8)
    for b in range(k_blocks):
        g0, g1 = b * block_size, (b + 1) * block_size
        scale, zp = _asym_params(W[g0:g1])
        safe = np.where(scale == 0, 1.0, scale)
        scales[b], zps[b] = scale, zp
        err = np.zeros((g1 - g0, n))
        for i in range(g0, g1):
            q = np.clip(np.round(W[i] / safe) + zp, 0, 15)
            codes[i] = q
            e = (W[i] - (q - zp) * scale) / U[i, i]
            W[i + 1:g1] -= np.outer(U[i, i + 1:g1], e)
            err[i - g0] = e
        W[g1:] -= U[g0:g1, g1:].T @ err
    codes[k:] = 0  # padding, as ORT writes it (the kernel never reads it)
    return codes, scales.astype(np.float32), zps


def pack_matmul_nbits(codes: np.ndarray, scales: np.ndarray, zps: np.ndarray, block_size: int
                      ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """MatMulNBits' layout: B [N, k_blocks, block_size/2] (low nibble first), scales [N, k_blocks],
    zero points [N, ceil(k_blocks/2)] (low nibble = even block)."""
    kp, n = codes.shape
    k_blocks = kp // block_size
    c = codes.T.reshape(n, k_blocks, block_size // 2, 2)
    packed = (c[..., 0] | (c[..., 1] << 4)).astype(np.uint8)
    z = zps.T
    if k_blocks % 2:
        z = np.concatenate([z, np.full((n, 1), 8, np.uint8)], axis=1)
    z = z.reshape(n, -1, 2)
    return packed, np.ascontiguousarray(scales.T), (z[..., 0] | (z[..., 1] << 4)).astype(np.uint8)


def gptq_model(model: onnx.ModelProto, batches: list[Batch], block_size: int) -> tuple[onnx.ModelProto, int]:
    """Every MatMul with a 2-D float32 constant weight -> MatMulNBits, by GPTQ. Returns (model, count)."""
    targets = _weight_matmuls(model)
    hs = hessians(model, sorted({node.input[0] for node, _ in targets}), batches)
    out = onnx.ModelProto()
    out.CopyFrom(model)
    by_output = {node.output[0]: node for node, _ in targets}
    weights = {node.output[0]: w for node, w in targets}
    new_nodes: list[onnx.NodeProto] = []
    replaced = 0
    for node in out.graph.node:
        if node.op_type != "MatMul" or node.output[0] not in by_output:
            new_nodes.append(node)
            continue
        w = weights[node.output[0]]
        codes, scales, zps = gptq(w, hs[node.input[0]], block_size)
        packed, sc, zp = pack_matmul_nbits(codes, scales, zps, block_size)
        base = f"{node.input[1]}_{replaced}_gptq"
        out.graph.initializer.extend([onnx.numpy_helper.from_array(packed, base + "_Q4"),
                                      onnx.numpy_helper.from_array(sc, base + "_scales"),
                                      onnx.numpy_helper.from_array(zp, base + "_zero_points")])
        new_nodes.append(onnx.helper.make_node(
            "MatMulNBits", [node.input[0], base + "_Q4", base + "_scales", base + "_zero_points"], [node.output[0]],
            name=(node.name or node.output[0]) + "_Q4", domain="com.microsoft",
            K=w.shape[0], N=w.shape[1], bits=4, block_size=block_size))
        replaced += 1
    del out.graph.node[:]
    out.graph.node.extend(new_nodes)
    # drop the float weights nothing reads any more
    read = {i for n in out.graph.node for i in n.input} | {o.name for o in out.graph.output}
    keep = [t for t in out.graph.initializer if t.name in read]
    del out.graph.initializer[:]
    out.graph.initializer.extend(keep)
    if not any(o.domain == "com.microsoft" for o in out.opset_import):
        out.opset_import.append(onnx.helper.make_opsetid("com.microsoft", 1))
    return out, replaced
