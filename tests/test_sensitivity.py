"""Per-node sensitivity: the ranking finds the node that quantization hurts, and the gated simulation is exact."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx
import pytest
from test_quantize_static import _ctx, _mlp

from edgecompress.errors import PassError
from edgecompress.passes.sensitivity import (
    Int8Simulation,
    fake_quantize_int8,
    node_sensitivity,
    output_cosines,
    quantizable_nodes,
    run_first_output,
)


def _batches(n: int = 2) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(3)
    return [{"X": rng.standard_normal((8, 4, 64)).astype(np.float32)} for _ in range(n)]


def test_quantizable_nodes_are_constant_weight_matmuls_and_tables() -> None:
    model = _mlp()
    assert quantizable_nodes(model) == ["fc1", "fc2"]
    gather = onnx.parser.parse_model("""
    <ir_version: 8, opset_import: ["" : 18]>
    g (int64[2, 3] ids, float[2, 3, 4] a) => (float[2, 3, 4] y, float[2, 3, 3] s) {
        y = Gather (T, ids)
        s = MatMul (a, at)
        at = Transpose <perm = [0, 2, 1]> (a)
    }
    """)
    for i, node in enumerate(gather.graph.node):
        node.name = f"n{i}"
    gather.graph.initializer.append(onnx.numpy_helper.from_array(np.ones((10, 4), np.float32), "T"))
    # the activation x activation MatMul (attention scores) is not a candidate
    assert quantizable_nodes(gather) == ["n0"] and quantizable_nodes(gather, gathers=False) == []


def test_ranking_puts_the_outlier_fed_node_first() -> None:
    ranked = node_sensitivity(_mlp(outlier=1000.0), _ctx(), ["fc1", "fc2"])
    assert [n for n, _ in ranked] == ["fc2", "fc1"]
    assert ranked[0][1] > 10 * ranked[1][1] >= 0


def test_custom_lowering_is_supported() -> None:
    """What a codebook pass would pass in: any per-node precision change; zeroing fc1 destroys the output."""

    def zero_weight(model: onnx.ModelProto, nodes: Sequence[str]) -> onnx.ModelProto:
        m = onnx.ModelProto()
        m.CopyFrom(model)
        weights = {n.input[1] for n in m.graph.node if n.name in nodes}
        for t in m.graph.initializer:
            if t.name in weights:
                t.CopyFrom(onnx.numpy_helper.from_array(np.zeros(tuple(t.dims), np.float32), t.name))
        return m

    ranked = dict(node_sensitivity(_mlp(), _ctx(), ["fc1", "fc2"], zero_weight, batches=_batches()))
    assert ranked["fc2"] == pytest.approx(1.0) and ranked["fc1"] > 0.05


@pytest.mark.parametrize(("ranges", "per_token"), [(None, False), ({"X": (-4.0, 4.0), "s": (0.0, 6.0)}, False),
                                                   (None, True)])
def test_gated_simulation_matches_the_fake_quantized_model(ranges: dict[str, tuple[float, float]] | None,
                                                           per_token: bool) -> None:
    model, batches = _mlp(), _batches()
    sim = Int8Simulation(model, ["fc1", "fc2"], act_ranges=ranges, per_token=per_token)
    exact = run_first_output(model, batches, optimize=False)
    for subset in ([], ["fc1"], ["fc2"], ["fc1", "fc2"]):
        want = run_first_output(fake_quantize_int8(model, subset, act_ranges=ranges, per_token=per_token), batches,
                                optimize=False)
        got = sim.outputs(subset, batches)
        for w, g in zip(want, got, strict=True):
            np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)
    off = sim.outputs([], batches)
    for e, g in zip(exact, off, strict=True):
        np.testing.assert_allclose(g, e, rtol=1e-6, atol=1e-6)
    with pytest.raises(PassError, match="not a simulated node"):
        sim.outputs(["nope"], batches)


def test_output_cosines_pool_over_the_attention_mask() -> None:
    rng = np.random.default_rng(0)
    ref = rng.standard_normal((2, 5, 3))
    got = ref.copy()
    got[:, 3:] = -got[:, 3:]  # differs only at padded positions
    batch = {"attention_mask": np.array([[1, 1, 1, 0, 0]] * 2)}
    np.testing.assert_allclose(output_cosines([ref], [got], [batch]), [1.0, 1.0])
    assert output_cosines([ref], [got], [{}]).min() < 0.99  # without a mask every position counts


def test_sensitivity_needs_calibration() -> None:
    ctx = _ctx()
    ctx.calibration = None
    with pytest.raises(PassError, match="needs calibration"):
        node_sensitivity(_mlp(), ctx, ["fc1"])


@pytest.mark.parametrize("opset", [17, 18])
def test_per_token_simulation_matches_the_integer_kernels(opset: int) -> None:
    """The float simulation that ranks nodes for int8-mixed predicts what per_token_int8 runs in MatMulInteger."""
    from edgecompress.passes.quantize_int8 import per_token_int8

    model = _mlp(outlier=30.0)
    model.opset_import[0].version = opset
    batches = _batches()
    batches[0]["X"][0, 1] *= 40.0  # an outlier token
    want = run_first_output(fake_quantize_int8(model, ["fc1", "fc2"], per_token=True), batches, optimize=False)
    got = run_first_output(per_token_int8(model, ["fc1", "fc2"]), batches)
    exact = run_first_output(model, batches)
    for w, g, e in zip(want, got, exact, strict=True):
        # same codes and scales; only the float summation order differs (far below the int8 error itself)
        assert np.abs(g - w).max() < 1e-3 * np.abs(w).max() < np.abs(e - w).max()


def test_per_token_simulation_quantizes_tables_per_row() -> None:
    model = onnx.parser.parse_model("""
    <ir_version: 8, opset_import: ["" : 18]>
    g (int64[2, 3] ids) => (float[2, 3, 4] y) { y = Gather (T, ids) }
    """)
    model.graph.node[0].name = "emb"
    table = np.array([[1e-3, -2e-3, 3e-3, 0.0], [100.0, -50.0, 25.0, 1.0]] * 5, np.float32)
    model.graph.initializer.append(onnx.numpy_helper.from_array(table, "T"))
    ids = {"ids": np.array([[0, 1, 2], [3, 4, 5]], np.int64)}
    per_row = run_first_output(fake_quantize_int8(model, ["emb"], per_token=True), [ids], optimize=False)[0]
    per_tensor = run_first_output(fake_quantize_int8(model, ["emb"]), [ids], optimize=False)[0]
    small = table[ids["ids"]][..., 0] == np.float32(1e-3)
    assert np.allclose(per_row[small], table[0], rtol=0.01) and not per_tensor[small].any()
