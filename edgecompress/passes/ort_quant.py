"""The one boundary to ONNX Runtime's quantization tooling. Its quirks (seen on ORT 1.32) live here:

- its quantizers read and write file paths, so we round-trip through a private temporary directory;
- dynamic quantization of some graphs fails with "Unable to find data type for weight_name=..." unless
  `DefaultTensorType` is set to FLOAT;
- it logs a "consider pre-processing" warning on every call, which says nothing about the result: silenced.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Sequence
from contextlib import contextmanager
from pathlib import Path

import onnx

from edgecompress.errors import PassError


@contextmanager
def _quiet_root_logger():
    # ORT's quantizers log through the root logger; keep the user's terminal for what matters.
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


def quantize_dynamic(
    model: onnx.ModelProto,
    *,
    op_types: Sequence[str] = ("MatMul", "Gather"),
    per_channel: bool = True,
    reduce_range: bool = False,
    nodes_to_exclude: Sequence[str] = (),
) -> onnx.ModelProto:
    """ORT dynamic quantization (int8 weights, activations quantized at run time) of an in-memory model."""
    from onnxruntime.quantization import QuantType
    from onnxruntime.quantization import quantize_dynamic as ort_quantize_dynamic

    with tempfile.TemporaryDirectory(prefix="edgecompress-q-") as tmp, _quiet_root_logger():
        out = Path(tmp) / "quantized.onnx"
        try:
            ort_quantize_dynamic(
                model,
                out,
                op_types_to_quantize=list(op_types),
                per_channel=per_channel,
                reduce_range=reduce_range,
                weight_type=QuantType.QInt8,
                nodes_to_exclude=list(nodes_to_exclude),
                extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT},
            )
        except Exception as e:  # ORT raises bare Exceptions/ValueErrors with long texts
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise PassError(f"ONNX Runtime dynamic quantization failed: {first}") from e
        return onnx.load(str(out))
