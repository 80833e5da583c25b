"""Bit-plane packing of codebook indices and the standard-ONNX decode subgraph ORT folds at load."""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from edgecompress.passes.codebook.kmeans import Coded

log = logging.getLogger(__name__)


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
