from __future__ import annotations

import numpy as np
import onnx
import pytest
from conftest import matmul_model, run_onnx

from edgecompress.graph import op_histogram
from edgecompress.passes.base import ModelInfo, PassContext
from edgecompress.passes.quantize_int8 import DynamicInt8
from edgecompress.targets import load_target


@pytest.fixture
def ctx() -> PassContext:
    return PassContext(target=load_target("host"), info=ModelInfo("test", "Test", "feature-extraction"))


def test_dynamic_int8_uses_integer_matmul_and_stays_close(ctx: PassContext) -> None:
    model = matmul_model(m=8, k=128, n=64)
    result = DynamicInt8().run(model, ctx)
    ops = op_histogram(result.model)
    assert ops.get("MatMulInteger") == 1 and ops.get("DynamicQuantizeLinear") == 1 and "MatMul" not in ops
    onnx.checker.check_model(result.model, full_check=True)
    x = np.random.default_rng(1).standard_normal((8, 128)).astype(np.float32)
    ref = run_onnx(model, {"X": x})[0]
    got = run_onnx(result.model, {"X": x})[0]
    # int8 weights and activations: relative error of a 128-long dot product stays within a few percent
    rel = np.linalg.norm(got - ref) / np.linalg.norm(ref)
    assert rel < 0.03, rel
    assert result.report["per_channel"] is True and result.report["quantized_ops"]["MatMulInteger"] == 1


def test_dynamic_int8_reports_when_nothing_to_quantize(ctx: PassContext) -> None:
    model = onnx.parser.parse_model("""
    <ir_version: 8, opset_import: ["" : 18]>
    g (float[2, 4] X) => (float[2, 4] Y) { Y = Relu(X) }
    """)
    result = DynamicInt8().run(model, ctx)
    assert not result.modified and "no MatMul" in result.report["skipped"]


def test_pass_does_not_mutate_its_input(ctx: PassContext) -> None:
    model = matmul_model()
    before = model.SerializeToString()
    DynamicInt8().run(model, ctx)
    assert model.SerializeToString() == before
