"""Activation smoothing (passes/smooth.py): exact in float, flatter activations, less int8 error."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx
from conftest import run_onnx

from edgecompress.graph import op_histogram
from edgecompress.passes import ort_quant
from edgecompress.passes.smooth import smooth


def _two_heads(seed: int = 0) -> onnx.ModelProto:
    """H = X @ W0; Y1 = H @ W1; Y2 = H @ W2; Y = Y1 + Y2 + H @ W3 with H also read by a residual Add."""
    rng = np.random.default_rng(seed)
    model = onnx.parser.parse_model("""
    <ir_version: 8, opset_import: ["" : 18]>
    g (float[8, 64] X) => (float[8, 64] Y) {
        H = MatMul(X, W0)
        A = MatMul(H, W1)
        B = MatMul(H, W2)
        S = Add(A, B)
        Y = Add(S, H)
    }
    """)
    for name in ("W0", "W1", "W2"):
        model.graph.initializer.append(onnx.numpy_helper.from_array(
            (rng.standard_normal((64, 64)) / 8).astype(np.float32), name))
    onnx.checker.check_model(model, full_check=True)
    return model


def _inputs(seed: int, n: int = 8) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        x = rng.standard_normal((8, 64)).astype(np.float32)
        x[:, 3] *= 60.0  # an outlier channel, as BERT's LayerNorm outputs have
        out.append({"X": x})
    return out


def test_smoothing_is_exact_in_float_and_keeps_the_graph_valid() -> None:
    model = _two_heads()
    smoothed, report = smooth(model, _inputs(1), alpha=0.7)
    onnx.checker.check_model(smoothed, full_check=True)
    assert op_histogram(smoothed)["Mul"] == 2  # one per distinct MatMul input (X, and H shared by W1/W2)
    assert report["smoothed_inputs"] == 2 and report["matmuls"] == 3
    for feed in _inputs(2, 3):
        np.testing.assert_allclose(run_onnx(smoothed, feed)[0], run_onnx(model, feed)[0], rtol=1e-4, atol=1e-4)
    # the residual Add still reads the unsmoothed H
    add = next(n for n in smoothed.graph.node if n.op_type == "Add" and n.output[0] == "Y")
    assert "H" in add.input


def test_smoothing_flattens_outliers_and_cuts_int8_error() -> None:
    model = _two_heads()
    smoothed, report = smooth(model, _inputs(1), alpha=0.7)
    ratio = report["activation_outlier_ratio"]
    assert ratio["after_median"] < ratio["before_median"]

    def int8(m: onnx.ModelProto) -> onnx.ModelProto:
        return ort_quant.quantize_dynamic(m, op_types=("MatMul",))

    assert _int8_error(model, smoothed, int8) < 0.7 * _int8_error(model, model, int8)



def test_per_token_smoothing_is_judged_on_per_token_int8() -> None:
    """With per-token activations (int8-mixed's dynamic base) an outlier channel still sets every row's scale:
    smoothing chosen on the per-token error cuts the error of the integer kernels that will run."""
    from edgecompress.passes.quantize_int8 import per_token_int8

    model = _two_heads()
    for i, node in enumerate(model.graph.node):
        node.name = f"n{i}"
    smoothed, report = smooth(model, _inputs(1), alpha=0.7, per_token=True)
    assert report["error_simulated"] == "per token" and report["smoothed_inputs"] >= 1
    onnx.checker.check_model(smoothed, full_check=True)

    def int8(m: onnx.ModelProto) -> onnx.ModelProto:
        return per_token_int8(m, [n.name for n in m.graph.node if n.op_type == "MatMul"])

    assert _int8_error(model, smoothed, int8) < 0.7 * _int8_error(model, model, int8)


def _int8_error(reference: onnx.ModelProto, model: onnx.ModelProto,
                quantize: Callable[[onnx.ModelProto], onnx.ModelProto]) -> float:
    """Mean relative output error of `quantize(model)` against the float `reference`."""
    q = quantize(model)
    errs = []
    for feed in _inputs(3, 4):
        ref, got = run_onnx(reference, feed)[0], run_onnx(q, feed)[0]
        errs.append(np.linalg.norm(got - ref) / np.linalg.norm(ref))
    return float(np.mean(errs))
