from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import matmul_model, run_onnx

from edgecompress.errors import PassError
from edgecompress.graph import op_histogram
from edgecompress.passes.base import ModelInfo, PassContext, skip_text
from edgecompress.passes.quantize_int8 import (
    DynamicInt8,
    MixedInt8,
    MixedInt8Config,
    per_token_int8,
    row_int8_gather,
)
from edgecompress.passes.sensitivity import int8_weight
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
    assert not result.modified and "no MatMul" in skip_text(result.report)


def test_pass_does_not_mutate_its_input(ctx: PassContext) -> None:
    model = matmul_model()
    before = model.SerializeToString()
    DynamicInt8().run(model, ctx)
    assert model.SerializeToString() == before


# --- per-token activations and per-row embedding tables (int8-mixed's dynamic base) --------------------------------
def _shared_input_model(k: int = 64, n: int = 32, opset: int = 18, seed: int = 0) -> onnx.ModelProto:
    """[batch, seq, K] X read by two Linear MatMuls (like Q/K/V), one with a bias; nodes named."""
    rng = np.random.default_rng(seed)
    model = onnx.parser.parse_model(f"""
    <ir_version: 8, opset_import: ["" : {opset}]>
    g (float[B, S, {k}] X) => (float[B, S, {n}] Y, float[B, S, {n}] Z) {{
        h = MatMul (X, W1)
        Y = Add (h, C)
        Z = MatMul (X, W2)
    }}
    """)
    for node, name in zip(model.graph.node, ("q", "q_bias", "k"), strict=True):
        node.name = name
    for name, arr in (("W1", rng.standard_normal((k, n)) / 8), ("W2", rng.standard_normal((k, n)) / 8),
                      ("C", rng.standard_normal(n))):
        model.graph.initializer.append(onnx.numpy_helper.from_array(np.asarray(arr, np.float32), name))
    return model


def _per_token_reference(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """The integer arithmetic per_token_int8 asks of ONNX Runtime, in numpy (float64)."""
    s = np.maximum(np.abs(x).max(axis=-1, keepdims=True).astype(np.float64) / 127.0, 1e-30)
    q = np.clip(np.rint(x / s), -127, 127)
    wq, ws = int8_weight(w, 1)
    return (q @ wq.astype(np.float64)) * ws.astype(np.float64) * s


@pytest.mark.parametrize(("activation_type", "opset"), [("uint8", 18), ("int8", 18), ("uint8", 17)])
def test_per_token_int8_runs_integer_matmuls_with_a_scale_per_token(activation_type: str, opset: int) -> None:
    model = _shared_input_model(opset=opset)
    out = per_token_int8(model, ["q", "k"], activation_type=activation_type)
    onnx.checker.check_model(out, full_check=True)
    ops = op_histogram(out)
    # the shared input is quantized once; no float MatMul and no per-tensor DynamicQuantizeLinear left
    assert ops.get("MatMulInteger") == 2 and ops.get("QuantizeLinear") == 1
    assert "MatMul" not in ops and "DynamicQuantizeLinear" not in ops
    x = np.random.default_rng(1).standard_normal((2, 5, 64)).astype(np.float32)
    x[1, 3] *= 50.0  # an outlier token: per-token scales keep it from coarsening the other rows
    y, z = run_onnx(out, {"X": x})
    w = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    # ORT's int32 accumulation and float scaling against the same arithmetic in float64 (a rounding tie may flip one
    # code in a row: far below this tolerance, which is 1e-4 of the output's scale)
    for got, want in ((y, _per_token_reference(x, w["W1"]) + w["C"]), (z, _per_token_reference(x, w["W2"]))):
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-4 * np.abs(want).max())
    ref_z = run_onnx(model, {"X": x})[1]
    assert np.linalg.norm(z - ref_z) / np.linalg.norm(ref_z) < 0.01


def test_per_token_beats_ort_per_tensor_on_an_outlier_token(ctx: PassContext) -> None:
    model = _shared_input_model()
    x = np.random.default_rng(2).standard_normal((4, 16, 64)).astype(np.float32)
    x[0, 0] *= 100.0
    ref = run_onnx(model, {"X": x})[1]

    def err(m: onnx.ModelProto) -> float:
        got = run_onnx(m, {"X": x})[1]
        rows = np.ones(ref.shape[:2], bool)
        rows[0, 0] = False  # judged on the ordinary tokens, whose grid the outlier coarsens per tensor
        return float(np.linalg.norm(got[rows] - ref[rows]) / np.linalg.norm(ref[rows]))

    per_tensor = err(DynamicInt8().run(model, ctx).model)
    per_token = err(per_token_int8(model, ["q", "k"]))
    assert per_token < per_tensor / 5, (per_token, per_tensor)


def test_per_token_int8_keeps_zero_rows_finite_and_zero() -> None:
    model = _shared_input_model()
    x = np.random.default_rng(3).standard_normal((1, 4, 64)).astype(np.float32)
    x[0, 2] = 0.0  # padding-like row: its scale would be 0 without the floor
    y, z = run_onnx(per_token_int8(model, ["q", "k"]), {"X": x})
    assert np.isfinite(y).all() and np.isfinite(z).all()
    np.testing.assert_array_equal(z[0, 2], 0.0)


def test_per_token_int8_refuses_an_old_opset() -> None:
    model = _shared_input_model(opset=13)
    with pytest.raises(PassError, match="opset 15"):
        per_token_int8(model, ["q"])


def test_per_token_pattern_counts_as_integer_kernels(tmp_path: Path) -> None:
    from edgecompress.model import save_model
    from edgecompress.profiling.kernels import inspect_kernels

    out = per_token_int8(_shared_input_model(), ["q", "k"])
    save_model(out, tmp_path / "m.onnx")
    # batch 1 as well: ORT's symbolic shape inference, which sizes the MatMuls, once lost every shape on this pattern
    for batch in (1, 2):
        rep = inspect_kernels(tmp_path / "m.onnx", tmp_path / "diag", ["CPUExecutionProvider"],
                              {"B": batch, "S": 8}, quantizing=True, reference=out)
        assert rep["integer_matmul_flops_share"] == 1.0 and "MatMulInteger" in rep["integer_kernels"]


def test_row_int8_gather_keeps_each_row_within_half_its_step() -> None:
    rng = np.random.default_rng(4)
    table = (rng.standard_normal((50, 16)) * np.logspace(-3, 3, 50)[:, None]).astype(np.float32)
    model = onnx.parser.parse_model("""
    <ir_version: 8, opset_import: ["" : 18]>
    g (int64[B, S] ids) => (float[B, S, 16] E) { E = Gather (T, ids) }
    """)
    model.graph.node[0].name = "emb"
    model.graph.initializer.append(onnx.numpy_helper.from_array(table, "T"))
    out = row_int8_gather(model, ["emb"])
    onnx.checker.check_model(out, full_check=True)
    assert [t.data_type for t in out.graph.initializer if t.name.startswith("T")] == [
        onnx.TensorProto.INT8, onnx.TensorProto.FLOAT]  # the int8 table and its 50 row scales; no float table
    ids = rng.integers(0, 50, size=(3, 7)).astype(np.int64)
    got = run_onnx(out, {"ids": ids})[0]
    step = np.abs(table).max(axis=1) / 127.0
    assert np.all(np.abs(got - table[ids]) <= step[ids][..., None] / 2 * (1 + 1e-5))
    # a single scale for the table would flatten the small rows to zero
    assert np.abs(got[ids == int(np.argmin(step))]).max(initial=1.0) > 0


def test_mixed_int8_defaults_to_per_token_activations() -> None:
    from test_quantize_static import _ctx, _mlp

    model = _mlp(outlier=30.0)
    result = MixedInt8(MixedInt8Config(calibration_samples=32)).run(model, _ctx())
    onnx.checker.check_model(result.model, full_check=True)
    ops = op_histogram(result.model)
    assert ops.get("MatMulInteger") == 2 and "DynamicQuantizeLinear" not in ops
    rep = result.report
    assert rep["activations"].startswith("per token") and rep["optimized_graph"]["int8_kernels"]["MatMulInteger"] == 2
    # the fidelity guard aims at a share of the allowed error: floor 0.99 -> 0.992
    assert rep["fidelity_guard"]["aim"] == pytest.approx(0.992)
    old = MixedInt8(MixedInt8Config(calibration_samples=32, per_token=False)).run(model, _ctx())
    assert "DynamicQuantizeLinear" in op_histogram(old.model) and old.report["activations"] == "per tensor"


@pytest.mark.slow
def test_int8_mixed_on_minilm_reaches_0997(minilm_fp32: Path) -> None:
    """Issue 3's target for int8-mixed: mean cosine >= 0.997 at <= 24 MB, every Linear MatMul in MatMulInteger."""
    from conftest import minilm_context, minilm_cosines

    from edgecompress.recipes import RecipeOptions, make_recipe

    model = onnx.load(str(minilm_fp32))
    ctx = minilm_context(minilm_fp32)
    (pass_,) = make_recipe("int8-mixed", RecipeOptions(calibration_samples=64)).passes
    assert isinstance(pass_, MixedInt8)
    # the recipe's pass held to 0.997, with a lighter guard (CI time)
    pass_ = MixedInt8(replace(pass_.config, min_cosine=0.997, check_batches=4, sensitivity_batches=2))
    result = pass_.run(model, ctx)
    onnx.checker.check_model(result.model, full_check=True)
    rep = result.report
    # 6 layers x (Q, K, V, O, FFN up, FFN down), none kept in float: per-token scales alone hold the floor
    assert rep["optimized_graph"]["int8_kernels"].get("MatMulInteger", 0) == 36 and not rep["kept_float_activations"]
    assert result.model.ByteSize() < 24e6

    cos = minilm_cosines(minilm_fp32, result.model)
    assert cos.mean() >= 0.997, cos.mean()
