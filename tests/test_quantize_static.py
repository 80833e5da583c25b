"""Static INT8 and int8-mixed: quantize/dequantize helpers, the pass on tiny graphs, ISA choices, and MiniLM."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import matmul_model, pinned_target, run_onnx
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from edgecompress.errors import DataError, PassError
from edgecompress.graph import op_histogram
from edgecompress.passes.base import Batch, ModelInfo, PassContext, skip_text
from edgecompress.passes.quantize_int8 import (
    MixedInt8,
    MixedInt8Config,
    StaticInt8,
    StaticInt8Config,
    isa_choice,
    weight_only_int8,
)
from edgecompress.passes.sensitivity import activation_qparams, int8_weight
from edgecompress.targets import load_target

floats = st.floats(-1e3, 1e3, allow_nan=False, allow_infinity=False, width=32)


@settings(max_examples=60, deadline=None)
@given(w=hnp.arrays(np.float32, hnp.array_shapes(min_dims=2, max_dims=2, max_side=12), elements=floats),
       reduce_range=st.booleans(), per_channel=st.booleans())
def test_int8_weight_round_trip_within_half_a_step(w: np.ndarray, reduce_range: bool, per_channel: bool) -> None:
    q, scale = int8_weight(w, 1 if per_channel else None, reduce_range)
    assert q.dtype == np.int8 and np.abs(q.astype(np.int32)).max(initial=0) <= (64 if reduce_range else 127)
    s = scale.reshape(1, -1) if per_channel else scale
    err = np.abs(q.astype(np.float64) * s - w)
    assert np.all(err <= np.broadcast_to(s, w.shape) / 2 * (1 + 1e-5) + 1e-30)


@settings(max_examples=60, deadline=None)
@given(lo=floats, span=st.floats(1e-3, 1e3), signed=st.booleans(), data=st.data())
def test_activation_round_trip_within_half_a_step(lo: float, span: float, signed: bool, data: st.DataObject) -> None:
    hi = lo + span
    scale, zp = activation_qparams(lo, hi, signed)
    x = np.array(data.draw(st.lists(st.floats(lo, hi), min_size=1, max_size=20)), dtype=np.float64)
    qmin, qmax = (-127, 127) if signed else (0, 255)
    q = np.clip(np.rint(x / scale) + zp, qmin, qmax)
    assert np.all(np.abs((q - zp) * scale - x) <= scale / 2 * (1 + 1e-6))


def _mlp(seed: int = 0, outlier: float = 1.0) -> onnx.ModelProto:
    """X -> Linear(64x128)+b -> Relu -> *gain (one channel x outlier) -> Linear(128x32) -> Y, nodes named.

    3-D like a transformer's [batch, seq, hidden]: on a 2-D input ORT folds QDQ MatMul+Add into a float Gemm."""
    rng = np.random.default_rng(seed)
    model = onnx.parser.parse_model("""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[N, 4, 64] X) => (float[N, 4, 32] Y) {
        h = MatMul (X, W1)
        hb = Add (h, B1)
        r = Relu (hb)
        s = Mul (r, G)
        Y = MatMul (s, W2)
    }
    """)
    for node, name in zip(model.graph.node, ("fc1", "fc1_bias", "act", "gain", "fc2"), strict=True):
        node.name = name
    gain = np.ones(128, np.float32)
    gain[7] = outlier
    for name, arr in (("W1", rng.standard_normal((64, 128)) / 8), ("B1", rng.standard_normal(128) / 8),
                      ("G", gain), ("W2", rng.standard_normal((128, 32)) / 11)):
        model.graph.initializer.append(onnx.numpy_helper.from_array(np.asarray(arr, np.float32), name))
    onnx.checker.check_model(model, full_check=True)
    return model


def _ctx(target: str = "host", batches: int = 6, rows: int = 8, seed: int = 0) -> PassContext:
    def calibration() -> Iterator[Batch]:
        rng = np.random.default_rng(seed)
        for _ in range(batches):
            yield {"X": rng.standard_normal((rows, 4, 64)).astype(np.float32)}

    t = pinned_target() if target == "host" else load_target(target)
    return PassContext(target=t, info=ModelInfo("test", "Test", "feature-extraction"),
                       calibration=calibration)


def _rel_err(model: onnx.ModelProto, out: onnx.ModelProto) -> float:
    x = np.random.default_rng(123).standard_normal((16, 4, 64)).astype(np.float32)
    ref, got = run_onnx(model, {"X": x})[0], run_onnx(out, {"X": x})[0]
    return float(np.linalg.norm(got - ref) / np.linalg.norm(ref))


def test_static_pass_inserts_qdq_and_stays_close() -> None:
    model = _mlp()
    before = model.SerializeToString()
    result = StaticInt8(StaticInt8Config(calibration_samples=32, max_keep=0)).run(model, _ctx())
    assert model.SerializeToString() == before  # pure
    ops = op_histogram(result.model)
    assert ops.get("QuantizeLinear", 0) >= 2 and ops.get("DequantizeLinear", 0) >= 4
    onnx.checker.check_model(result.model, full_check=True)
    # calibrated on the distribution it is tested on: int8 activations and weights keep a 64/128-long dot product
    # within a few percent
    assert _rel_err(model, result.model) < 0.03
    rep = result.report
    assert rep["quantized"] == {"matmul": 2, "gather": 0}
    assert rep["optimized_graph"]["int8_kernels"].get("MatMulIntegerToFloat") == 2
    assert rep["calibration"]["used"] == 32 and rep["calibration"]["tensors"] == 2
    assert rep["isa"]["activations"] == "uint8" and rep["isa"]["reduce_range"] is True


@pytest.mark.parametrize("method", ["entropy", "percentile"])
def test_histogram_calibrators_run_streamed(method: str) -> None:
    result = StaticInt8(StaticInt8Config(calibration_method=method, calibration_samples=48, max_keep=0,
                                         chunk_batches=1)).run(_mlp(), _ctx())
    assert result.report["calibration"]["method"] == method
    assert _rel_err(_mlp(), result.model) < 0.05


def test_fidelity_guard_keeps_the_sensitive_node_in_float() -> None:
    # a 1000x outlier channel feeding fc2 ruins its per-tensor activation scale; fc1's input is benign
    model = _mlp(outlier=1000.0)
    result = StaticInt8(StaticInt8Config(calibration_samples=48, min_cosine=0.9995, margin=0.0)).run(model, _ctx())
    rep = result.report
    kept = [k["node"] for k in rep["kept_float_activations"]]
    assert rep["sensitivity_top"][0]["node"] == "fc2" and kept[:1] == ["fc2"]
    assert rep["fidelity_guard"]["steps"][0]["cosine_mean"] < rep["fidelity_guard"]["cosine_mean"]
    onnx.checker.check_model(result.model, full_check=True)
    # fc2 now reads an int8 weight through DequantizeLinear and a float activation
    fc2 = next(n for n in result.model.graph.node if n.name == "fc2")
    producers = {o: n for n in result.model.graph.node for o in n.output}
    assert producers[fc2.input[1]].op_type == "DequantizeLinear"
    assert producers.get(fc2.input[0]) is None or producers[fc2.input[0]].op_type != "DequantizeLinear"


def test_mixed_dynamic_base_reports_ranking_and_costs() -> None:
    result = MixedInt8(MixedInt8Config(calibration_samples=32, min_cosine=0.9995, margin=0.0)).run(
        _mlp(outlier=1000.0), _ctx())
    rep = result.report
    assert rep["base"] == "dynamic" and {s["node"] for s in rep["sensitivity_top"]} == {"fc1", "fc2"}
    for kept in rep["kept_float_activations"]:
        assert kept["size_bytes_added"] == 0 and kept["latency_ms_added_estimated"] > 0
    assert rep["optimized_graph"]["int8_kernels"]


def test_weight_only_int8_is_close_and_int8_sized() -> None:
    model = matmul_model(m=8, k=128, n=64)
    model.graph.node[0].name = "mm"
    out = weight_only_int8(model, ["mm"])
    onnx.checker.check_model(out, full_check=True)
    w8 = [t for t in out.graph.initializer if t.data_type == onnx.TensorProto.INT8]
    assert len(w8) == 1 and not [t for t in out.graph.initializer if t.name == "W"]
    assert _rel_err_mm(model, out) < 0.01


def _rel_err_mm(model: onnx.ModelProto, out: onnx.ModelProto) -> float:
    x = np.random.default_rng(5).standard_normal((8, 128)).astype(np.float32)
    ref, got = run_onnx(model, {"X": x})[0], run_onnx(out, {"X": x})[0]
    return float(np.linalg.norm(got - ref) / np.linalg.norm(ref))


@pytest.mark.parametrize(
    ("target", "activations", "reduce_range", "needle"),
    [
        ("host-avx2", "uint8", True, "without VNNI"),
        ("host-vnni", "uint8", False, "VNNI"),
        ("server-gpu", "uint8", False, "avx512_vnni"),
        ("raspberry-pi-5", "int8", False, "dotprod"),
        ("phone-arm64", "int8", False, "i8mm"),
        ("raspberry-pi-4", "int8", False, "NEON"),
    ],
)
def test_isa_choice_per_target(target: str, activations: str, reduce_range: bool, needle: str) -> None:
    pinned = {"host-avx2": pinned_target(), "host-vnni": pinned_target(isa=("avx2", "fma", "avx512", "avx512_vnni"))}
    choice = isa_choice(pinned[target] if target in pinned else load_target(target))
    assert (choice.activation_type, choice.reduce_range, choice.weight_type) == (activations, reduce_range, "int8")
    assert needle in choice.reason


def test_static_pass_records_the_target_choice() -> None:
    rep = StaticInt8(StaticInt8Config(calibration_samples=16, max_keep=0)).run(_mlp(), _ctx("raspberry-pi-5")).report
    assert rep["isa"]["activations"] == "int8" and rep["isa"]["reduce_range"] is False


def test_fewer_texts_than_a_batch_is_a_data_error() -> None:
    with pytest.raises(DataError) as e:
        StaticInt8().run(_mlp(), _ctx(batches=1, rows=5))
    assert "fewer than one batch of 8" in e.value.one_line() and "\n" not in e.value.one_line()


def test_no_calibration_is_a_pass_error() -> None:
    ctx = _ctx()
    ctx.calibration = None
    with pytest.raises(PassError, match="needs calibration"):
        StaticInt8().run(_mlp(), ctx)


def test_nothing_to_quantize_is_reported() -> None:
    model = onnx.parser.parse_model("""
    <ir_version: 8, opset_import: ["" : 18]>
    g (float[2, 4] X) => (float[2, 4] Y) { Y = Relu(X) }
    """)
    result = StaticInt8().run(model, _ctx())
    assert not result.modified and "no MatMul" in skip_text(result.report)


@pytest.mark.slow
def test_int8_static_on_minilm_holds_cosine(minilm_fp32: Path) -> None:
    from conftest import minilm_context, minilm_cosines

    from edgecompress.recipes import RecipeOptions, make_recipe

    model = onnx.load(str(minilm_fp32))
    ctx = minilm_context(minilm_fp32)
    (pass_,) = make_recipe("int8-static", RecipeOptions(calibration_samples=64)).passes
    assert isinstance(pass_, StaticInt8)
    # the recipe's pass with a lighter guard (CI time): fewer batches to measure sensitivity and fidelity on
    pass_ = StaticInt8(replace(pass_.config, check_batches=4, sensitivity_batches=2))
    result = pass_.run(model, ctx)
    onnx.checker.check_model(result.model, full_check=True)
    assert result.report["optimized_graph"]["int8_kernels"].get("MatMulIntegerToFloat", 0) >= 24
    assert result.model.ByteSize() < 30e6  # int8 weights (the FP32 file is ~90 MB)

    cos = minilm_cosines(minilm_fp32, result.model)
    assert cos.mean() >= 0.99, cos.mean()


@pytest.mark.slow
def test_cli_builds_int8_static_and_mixed_end_to_end(tiny_bert: Path, tmp_path: Path) -> None:
    import json

    from click.testing import CliRunner

    from edgecompress.cli import main

    for recipe in ("int8-static", "int8-mixed"):
        out = tmp_path / recipe
        r = CliRunner().invoke(main, ["build", str(tiny_bert), "--target", "host", "--recipe", recipe, "--out",
                                      str(out), "--runs", "2", "--calibration-samples", "64", "--json"])
        assert r.exit_code in (0, 3), r.output  # a random-weight BERT may miss a budget; the build itself works
        manifest = json.loads((out / "manifest.json").read_text())
        (record,) = manifest["recipe"]["passes"]
        rep = record["report"]
        assert record["name"] == recipe and rep["calibration"]["used"] == 64
        # the host's flags come from /proc/cpuinfo: 7-bit weights only without VNNI
        assert rep["isa"]["reduce_range"] is isa_choice(load_target("host")).reduce_range
        assert sum(rep["optimized_graph"]["int8_kernels"].values()) > 0
        assert json.loads(r.stdout)  # stdout holds only the JSON summary (the calibrators' prints are kept off it)


def test_cli_calibration_file_smaller_than_a_batch_exits_2(tiny_bert: Path, tmp_path: Path) -> None:
    from click.testing import CliRunner

    from edgecompress.cli import main

    cal = tmp_path / "few.txt"
    cal.write_text("one text\nanother text\na third\n")
    out = tmp_path / "out"
    r = CliRunner().invoke(main, ["build", str(tiny_bert), "--target", "host", "--recipe", "int8-static", "--out",
                                  str(out), "--calibration", str(cal), "--runs", "2"])
    assert r.exit_code == 2
    assert "calibration data has 3 texts, fewer than one batch of 8" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and not out.exists()


def test_float_gemm_fold_is_reported() -> None:
    """anchors.md: on a 2-D input ORT folds QDQ MatMul + Add into DequantizeLinear -> float Gemm; the report says so."""
    model = matmul_model(m=8, k=64, n=32, bias=True)
    rng = np.random.default_rng(0)
    ctx = _ctx()
    ctx.calibration = lambda: iter([{"X": rng.standard_normal((8, 64)).astype(np.float32)} for _ in range(4)])
    rep = StaticInt8(StaticInt8Config(calibration_samples=32, max_keep=0)).run(model, ctx).report
    assert "folded by ONNX Runtime into float Gemm" in rep["optimized_graph"]["note"]
