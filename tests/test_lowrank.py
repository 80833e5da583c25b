"""Low-rank factorization: SVD at full rank reproduces the layer, rank from energy, skip where it saves nothing."""

from __future__ import annotations

import re

import numpy as np
import onnx
import pytest
from conftest import matmul_model, run_onnx
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import numpy_helper

from edgecompress.graph import op_histogram
from edgecompress.passes.base import ModelInfo, PassContext
from edgecompress.passes.lowrank import LowRank, LowRankConfig, rank_for_energy, svd_factors
from edgecompress.recipes import RecipeOptions, make_recipe
from edgecompress.targets import load_target


@pytest.fixture
def ctx() -> PassContext:
    return PassContext(target=load_target("host"), info=ModelInfo("test", "Test", "feature-extraction"))


@settings(max_examples=25, deadline=None)
@given(k=st.integers(1, 48), n=st.integers(1, 48), seed=st.integers(0, 2**16))
def test_svd_at_full_rank_reproduces_the_weight(k: int, n: int, seed: int) -> None:
    w = np.random.default_rng(seed).standard_normal((k, n)).astype(np.float32)
    a, b = svd_factors(w, min(k, n))
    assert a.shape == (k, min(k, n)) and b.shape == (min(k, n), n)
    assert np.max(np.abs(a @ b - w)) < 1e-4 * max(1.0, float(np.abs(w).max()))


def test_rank_for_energy() -> None:
    s = np.array([2.0, 1.0, 0.0])
    assert rank_for_energy(s, 0.8) == 1  # 4 / 5 of the energy is in the first value
    assert rank_for_energy(s, 0.81) == 2
    assert rank_for_energy(s, 1.0) == 2  # zero singular values are never needed
    assert rank_for_energy(np.ones(4), 1.0) == 4


def _low_rank_model(k: int = 96, n: int = 64, rank: int = 4, seed: int = 0) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    model = matmul_model(m=8, k=k, n=n, seed=seed, bias=True)
    w = (rng.standard_normal((k, rank)) @ rng.standard_normal((rank, n))).astype(np.float32)
    model.graph.initializer[0].CopyFrom(numpy_helper.from_array(w, "W"))
    return model


def test_full_energy_reproduces_the_layer(ctx: PassContext) -> None:
    model = _low_rank_model()
    result = LowRank(LowRankConfig(energy=1.0)).run(model, ctx)
    assert result.modified
    (layer,) = result.report["layers"]
    assert layer["rank"] == 4 and layer["shape"] == [96, 64] and layer["params_after"] == 4 * (96 + 64)
    onnx.checker.check_model(result.model, full_check=True)
    assert op_histogram(result.model)["MatMul"] == 2 and "W" not in {t.name for t in result.model.graph.initializer}
    x = np.random.default_rng(1).standard_normal((8, 96)).astype(np.float32)
    ref, got = run_onnx(model, {"X": x})[0], run_onnx(result.model, {"X": x})[0]
    assert np.max(np.abs(got - ref)) < 1e-3 * np.abs(ref).max()


def test_energy_threshold_truncates(ctx: PassContext) -> None:
    rng = np.random.default_rng(2)
    u, _ = np.linalg.qr(rng.standard_normal((96, 96)))
    v, _ = np.linalg.qr(rng.standard_normal((64, 64)))
    s = 0.7 ** np.arange(64)  # energy decays geometrically: rank for 0.95 is known
    w = (u[:, :64] * s) @ v.T
    model = matmul_model(m=4, k=96, n=64)
    model.graph.initializer[0].CopyFrom(numpy_helper.from_array(w.astype(np.float32), "W"))
    result = LowRank(LowRankConfig(energy=0.95)).run(model, ctx)
    (layer,) = result.report["layers"]
    assert layer["rank"] == rank_for_energy(s, 0.95) and layer["energy_kept"] >= 0.95
    x = rng.standard_normal((4, 96)).astype(np.float32)
    ref, got = run_onnx(model, {"X": x})[0], run_onnx(result.model, {"X": x})[0]
    assert np.linalg.norm(got - ref) / np.linalg.norm(ref) < 0.35  # ~sqrt(1 - 0.95) of the weight's energy


def test_skips_where_factoring_saves_nothing(ctx: PassContext) -> None:
    model = matmul_model(m=4, k=64, n=64)  # a random square matrix needs most of its rank
    result = LowRank(LowRankConfig(energy=0.95)).run(model, ctx)
    assert not result.modified and result.model is model
    whole, (skip,) = ([s for s in result.report["skipped"] if not s["site"]],
                      [s for s in result.report["skipped"] if s["site"]])
    assert "saves nothing" in skip["reason"] and "cheaper" in whole[0]["reason"]
    rank = re.search(r"rank (\d+) ", skip["reason"])
    assert rank is not None and int(rank.group(1)) * 128 >= 64 * 64


def test_low_rank_composes_before_int8(ctx: PassContext) -> None:
    recipe = make_recipe("int8-dynamic", RecipeOptions(low_rank_energy=0.99))
    assert [p.name for p in recipe.passes] == ["low-rank", "int8-dynamic"]
    model = _low_rank_model(k=128, n=96, rank=8)
    for p in recipe.passes:
        model = p.run(model, ctx).model
    assert op_histogram(model).get("MatMulInteger") == 2
