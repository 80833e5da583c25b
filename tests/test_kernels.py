"""The proof that a build runs quantized: ORT's optimized graph and the integer-kernel share of MatMul FLOPs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import matmul_model
from onnx import numpy_helper

from edgecompress.errors import PassError
from edgecompress.passes import ort_quant
from edgecompress.profiling.kernels import inspect_kernels, kernel_share


def _save(model: onnx.ModelProto, d: Path) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    onnx.save(model, d / "model.onnx")
    return d / "model.onnx"


def _qdq_matmul_add() -> onnx.ModelProto:
    """A hand-made QDQ MatMul + Add: ORT folds it into DequantizeLinear -> float Gemm (no integer kernel)."""
    rng = np.random.default_rng(0)
    model = onnx.parser.parse_model("""
    <ir_version: 8, opset_import: ["" : 18]>
    g (float[8, 64] X) => (float[8, 32] Y) {
        Xq = QuantizeLinear(X, xs, xz)
        Xd = DequantizeLinear(Xq, xs, xz)
        Wd = DequantizeLinear(Wq, ws, wz)
        H = MatMul(Xd, Wd)
        Y = Add(H, B)
    }
    """)
    model.graph.initializer.extend([
        numpy_helper.from_array(np.array(0.05, np.float32), "xs"),
        numpy_helper.from_array(np.array(0, np.uint8), "xz"),
        numpy_helper.from_array(rng.integers(-127, 127, (64, 32)).astype(np.int8), "Wq"),
        numpy_helper.from_array(np.array(0.01, np.float32), "ws"),
        numpy_helper.from_array(np.array(0, np.int8), "wz"),
        numpy_helper.from_array(rng.standard_normal(32).astype(np.float32), "B"),
    ])
    onnx.checker.check_model(model, full_check=True)
    return model


def test_dynamic_int8_model_runs_integer_kernels(tmp_path: Path) -> None:
    model = ort_quant.quantize_dynamic(matmul_model(m=8, k=128, n=64, bias=True))
    report = inspect_kernels(_save(model, tmp_path / "b"), tmp_path / "b" / "diagnostics",
                             ["CPUExecutionProvider"], {}, quantizing=True, reference=model)
    # one MatMul, all of it in an integer kernel: 2 * 8 * 64 * 128 FLOPs
    assert report["integer_matmul_flops_share"] == 1.0
    assert report["matmul_gflops"] == pytest.approx(2 * 8 * 64 * 128 / 1e9, abs=1e-4)
    assert set(report["integer_kernels"]) <= {"MatMulIntegerToFloat", "DynamicQuantizeMatMul", "MatMulInteger"}
    saved = tmp_path / "b" / "diagnostics" / "optimized-cpu.onnx"
    assert report["optimized_graph"] == "diagnostics/optimized-cpu.onnx" and saved.is_file()
    assert any(n.op_type in report["integer_kernels"] for n in onnx.load(str(saved)).graph.node)


def test_fp32_model_has_zero_share_and_is_fine_when_not_quantizing(tmp_path: Path) -> None:
    model = matmul_model(m=8, k=128, n=64)
    report = inspect_kernels(_save(model, tmp_path), tmp_path / "diagnostics", ["CPUExecutionProvider"], {},
                             quantizing=False, reference=model)
    assert report["integer_matmul_flops_share"] == 0.0 and report["integer_kernels"] == []
    assert report["by_op"] == {"MatMul": {"nodes": 1, "gflops": pytest.approx(2 * 8 * 64 * 128 / 1e9, abs=1e-4)}}


def test_quantizing_recipe_folded_back_to_float_is_an_error(tmp_path: Path) -> None:
    model = _qdq_matmul_add()
    with pytest.raises(PassError, match="no MatMul in an integer or 4-bit kernel"):
        inspect_kernels(_save(model, tmp_path), tmp_path / "diagnostics", ["CPUExecutionProvider"], {},
                        quantizing=True, reference=model)
    # the optimized graph really is float: the Gemm the QDQ pair was folded into
    ops = {n.op_type for n in onnx.load(str(tmp_path / "diagnostics" / "optimized-cpu.onnx")).graph.node}
    assert "Gemm" in ops and not ops & {"QLinearMatMul", "MatMulIntegerToFloat", "QGemm"}


def test_provider_not_on_this_host_is_reported(tmp_path: Path) -> None:
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("CUDA is available here")
    model = ort_quant.quantize_weight_only(matmul_model(m=8, k=128, n=64))
    report = inspect_kernels(_save(model, tmp_path), tmp_path / "diagnostics",
                             ["CUDAExecutionProvider", "CPUExecutionProvider"], {}, quantizing=True, reference=model)
    assert report["providers_not_available_here"] == ["CUDAExecutionProvider"]
    assert report["providers"] == ["CPUExecutionProvider"] and "not available on this host" in report["note"]
    assert report["integer_kernels"] == ["MatMulNBits"] and report["integer_matmul_flops_share"] == 1.0


def test_share_counts_flops_not_nodes() -> None:
    """Two MatMuls of different sizes, only the big one quantized: the share is its FLOPs' share."""
    model = onnx.parser.parse_model("""
    <ir_version: 8, opset_import: ["" : 18]>
    g (float[4, 256] X) => (float[4, 16] Y) {
        H = MatMul(X, W1)
        Y = MatMul(H, W2)
    }
    """)
    rng = np.random.default_rng(0)
    model.graph.initializer.extend([numpy_helper.from_array(rng.standard_normal((256, 64)).astype(np.float32), "W1"),
                                    numpy_helper.from_array(rng.standard_normal((64, 16)).astype(np.float32), "W2")])
    q = ort_quant.quantize_weight_only(model)  # both have K >= 32 and become MatMulNBits
    mixed = onnx.ModelProto()
    mixed.CopyFrom(q)
    # put the small one back to float to get a mixed graph
    small = next(n for n in mixed.graph.node if n.op_type == "MatMulNBits" and n.output[0] == "Y")
    mixed.graph.node.remove(small)
    mixed.graph.node.append(onnx.helper.make_node("MatMul", ["H", "W2"], ["Y"]))
    mixed.graph.initializer.append(model.graph.initializer[1])
    share = kernel_share(mixed, {})
    big, little = 2 * 4 * 64 * 256, 2 * 4 * 16 * 64
    assert share.share == pytest.approx(big / (big + little))
    assert share.by_op["MatMul"]["nodes"] == 1 and share.by_op["MatMulNBits"]["nodes"] == 1


@pytest.mark.slow
def test_build_saves_the_optimized_graph_and_reports_the_share(tiny_bert: Path, tmp_path: Path) -> None:
    import edgecompress
    from edgecompress.manifest import Manifest

    out = tmp_path / "b"
    m = edgecompress.build(tiny_bert, target="raspberry-pi-5", recipe="int4", out=out)
    k = m.kernels
    # hidden 32 at sequence 128: attention scores (activation x activation, float) cost as much as the Linears
    assert k["integer_kernels"] == ["MatMulNBits"] and k["integer_matmul_flops_share"] == pytest.approx(0.5, abs=0.02)
    assert (out / "diagnostics" / "optimized-cpu.onnx").is_file()
    assert Manifest.load(out / "manifest.json").kernels == k
    assert "## Kernels: does it run quantized?" in (out / "report.md").read_text()
    # the deployable model is model.onnx alone: the diagnostic graph is not counted in its size
    assert m.artifact.size_bytes == (out / "model.onnx").stat().st_size

    fp32 = edgecompress.build(tiny_bert, target="raspberry-pi-5", recipe="fp32", out=tmp_path / "f")
    assert fp32.kernels["integer_matmul_flops_share"] == 0.0 and fp32.kernels["matmul_gflops"] > 0


def test_fp16_matmuls_are_counted_as_fp16_until_ort_casts_them(tmp_path: Path) -> None:
    from edgecompress.passes import ort_quant

    model = ort_quant.convert_float16(matmul_model(m=8, k=128, n=64))
    assert kernel_share(model, {}).fp16_flops == kernel_share(model, {}).matmul_flops > 0
    onnx.save(model, str(tmp_path / "m.onnx"))
    report = inspect_kernels(tmp_path / "m.onnx", tmp_path / "d", ["CPUExecutionProvider"], {}, quantizing=False,
                             reference=model)
    # this host's CPU EP may or may not have an fp16 MatMul: either way every FLOP is accounted for
    assert 0.0 <= report["fp16_matmul_flops_share"] <= 1.0 and report["integer_matmul_flops_share"] == 0.0
    assert report["matmul_gflops"] == pytest.approx(2 * 8 * 64 * 128 / 1e9, abs=1e-4)
