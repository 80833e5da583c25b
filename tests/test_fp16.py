from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import matmul_model, run_onnx
from test_quantize_int4 import _pooled_cosine, _texts

from edgecompress.passes.base import ModelInfo, PassContext, skip_text
from edgecompress.passes.fp16 import Fp16, Fp16Config
from edgecompress.targets import load_target

F32, F16 = onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16


def _ctx(target: str = "host") -> PassContext:
    return PassContext(target=load_target(target), info=ModelInfo("test", "Test", "feature-extraction"))


def _mlp() -> onnx.ModelProto:
    """MatMul + bias + Softmax: a float op ORT's converter keeps in fp16 and one it may block."""
    rng = np.random.default_rng(0)
    model = onnx.parser.parse_model("""
    <ir_version: 8, opset_import: ["" : 18]>
    g (float[4, 64] X) => (float[4, 32] Y) {
        H = MatMul(X, W)
        A = Add(H, B)
        R = Relu(A)
        Y = Softmax<axis = -1>(R)
    }
    """)
    model.graph.initializer.extend([
        onnx.numpy_helper.from_array((rng.standard_normal((64, 32)) * 0.1).astype(np.float32), "W"),
        onnx.numpy_helper.from_array(rng.standard_normal(32).astype(np.float32), "B"),
    ])
    onnx.checker.check_model(model, full_check=True)
    return model


def test_fp16_converts_weights_keeps_fp32_io_and_stays_close() -> None:
    model = _mlp()
    result = Fp16().run(model, _ctx("server-gpu"))
    out = result.model
    assert {t.data_type for t in out.graph.initializer} == {F16}
    # callers keep feeding and reading fp32
    assert out.graph.input[0].type.tensor_type.elem_type == F32
    assert out.graph.output[0].type.tensor_type.elem_type == F32
    assert "Cast" in {n.op_type for n in out.graph.node}
    onnx.checker.check_model(out, full_check=True)
    x = np.random.default_rng(1).standard_normal((4, 64)).astype(np.float32)
    ref = run_onnx(model, {"X": x})[0]
    got = run_onnx(out, {"X": x})[0]
    # fp16 has an 11-bit significand: ~1e-3 relative per value, softmax outputs in [0, 1]
    np.testing.assert_allclose(got, ref, atol=2e-3, rtol=1e-2)
    assert result.report["initializers_to_fp16"] == 2 and result.report["initializers_left_fp32"] == 0
    assert result.report["weights_mb"]["after_fp16"] == pytest.approx(result.report["weights_mb"]["before"] / 2,
                                                                      abs=1e-3)
    assert result.report["target_has_fp16_arithmetic"].startswith("yes")


def test_fp16_on_a_cpu_without_fp16_says_so() -> None:
    result = Fp16().run(matmul_model(), _ctx("host"))
    assert result.report["target_has_fp16_arithmetic"].startswith("no")


def test_fp16_block_list_keeps_ops_in_fp32() -> None:
    model = _mlp()
    result = Fp16(Fp16Config(op_block_list=("MatMul",))).run(model, _ctx())
    # the blocked MatMul reads its weight in fp32; the bias (Add) went to fp16
    types = {t.name: t.data_type for t in result.model.graph.initializer}
    assert types["W"] == F32 and types["B"] == F16
    onnx.checker.check_model(result.model, full_check=True)


def test_fp16_reports_when_there_is_nothing_to_convert() -> None:
    model = onnx.parser.parse_model("""
    <ir_version: 8, opset_import: ["" : 18]>
    g (float[2, 4] X) => (float[2, 4] Y) { Y = Relu(X) }
    """)
    result = Fp16().run(model, _ctx())
    assert not result.modified and "no float32 weights" in skip_text(result.report)


def test_pass_does_not_mutate_its_input() -> None:
    model = _mlp()
    before = model.SerializeToString()
    Fp16().run(model, _ctx())
    assert model.SerializeToString() == before


@pytest.mark.slow
def test_fp16_on_minilm_halves_size_and_is_lossless(minilm_fp32: Path) -> None:
    model = onnx.load(str(minilm_fp32))
    result = Fp16().run(model, _ctx("server-gpu"))
    size_mb = len(result.model.SerializeToString()) / 1e6
    assert 44.0 < size_mb < 46.5, size_mb  # anchors: 45.3 MB from 90.4
    onnx.checker.check_model(result.model, full_check=True)
    cos = _pooled_cosine(minilm_fp32, result.model, _texts())
    assert cos > 0.9999, cos  # anchors: 1.0000
