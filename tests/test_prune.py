"""Structured pruning: exactness at ratio 0, graph consistency after head/FFN pruning, recovery, errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import matmul_model, run_onnx
from onnx import numpy_helper

from edgecompress.errors import PassError
from edgecompress.graph import GraphIndex
from edgecompress.passes.base import Batch, ModelInfo, PassContext
from edgecompress.passes.prune import PruneConfig, StructuredPrune, find_attention, find_ffn
from edgecompress.recipes import RecipeOptions, make_recipe
from edgecompress.targets import load_target


def _ctx(batches: list[Batch]) -> PassContext:
    return PassContext(target=load_target("host"), info=ModelInfo("test", "Test", "feature-extraction"),
                       calibration=lambda: iter(batches))


def _text_batches(model: onnx.ModelProto, n: int, batch: int, seq: int, seed: int) -> list[Batch]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        ids = rng.integers(1000, 30000, size=(batch, seq), dtype=np.int64)
        mask = np.ones((batch, seq), dtype=np.int64)
        mask[0, seq // 2:] = 0  # padding, as real calibration batches have
        feeds = {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}
        out.append({i.name: feeds[i.name] for i in model.graph.input})
    return out


@pytest.fixture(scope="module")
def tiny_bert_onnx(tiny_bert: Path, tmp_path_factory: pytest.TempPathFactory) -> onnx.ModelProto:
    from edgecompress import export

    info = export.inspect_model(tiny_bert)
    path = export.export_onnx(tiny_bert, info, tmp_path_factory.mktemp("tiny-bert-onnx")).onnx_path
    return onnx.load(path)


def _matmul_weight_params(model: onnx.ModelProto) -> int:
    idx = GraphIndex(model)
    return sum(int(np.prod(idx.initializers[n.input[1]].dims)) for n in idx.nodes("MatMul")
               if idx.is_initializer(n.input[1]))


def test_optimum_bert_export_patterns_are_found(tiny_bert_onnx: onnx.ModelProto) -> None:
    idx = GraphIndex(tiny_bert_onnx)
    ffn, _ = find_ffn(idx)
    heads, _ = find_attention(idx)
    assert [(b.units, b.unit_size) for b in ffn] == [(64, 1), (64, 1)]
    assert [(b.units, b.unit_size, len(b.producers)) for b in heads] == [(4, 8, 3), (4, 8, 3)]
    # three head-split Reshapes and the head-merge Reshape per layer carry the head count
    assert all(len(b.fixes) == 4 for b in heads)


def test_ratio_zero_gives_an_identical_model(tiny_bert_onnx: onnx.ModelProto) -> None:
    batches = _text_batches(tiny_bert_onnx, 2, 4, 16, seed=0)
    result = StructuredPrune(PruneConfig()).run(tiny_bert_onnx, _ctx(batches))
    assert not result.modified
    assert result.model.SerializeToString() == tiny_bert_onnx.SerializeToString()
    # heads at 0 while FFNs are pruned: every attention weight and output is untouched
    pruned = StructuredPrune(PruneConfig(ffn_ratio=0.25, head_ratio=0.0)).run(tiny_bert_onnx, _ctx(batches)).model
    before = {t.name: numpy_helper.to_array(t) for t in tiny_bert_onnx.graph.initializer}
    after = {t.name: numpy_helper.to_array(t) for t in pruned.graph.initializer}
    for b in find_attention(GraphIndex(tiny_bert_onnx))[0]:
        for name in [p.weight for p in b.producers] + [b.consumer.weight]:
            assert np.array_equal(before[name], after[name])
    feed = _text_batches(tiny_bert_onnx, 1, 3, 9, seed=5)[0]
    same = run_onnx(result.model, feed)
    ref = run_onnx(tiny_bert_onnx, feed)
    assert all(np.array_equal(a, b) for a, b in zip(same, ref, strict=True))


def test_head_pruning_keeps_every_shape_consistent(tiny_bert_onnx: onnx.ModelProto) -> None:
    batches = _text_batches(tiny_bert_onnx, 4, 4, 16, seed=1)
    result = StructuredPrune(PruneConfig(head_ratio=0.5, recovery="refit")).run(tiny_bert_onnx, _ctx(batches))
    out = result.model
    onnx.checker.check_model(out, full_check=True)
    assert result.report["heads_removed"] == 4
    assert [layer["kept"] for layer in result.report["layers"]] == [2, 2]
    for b in find_attention(GraphIndex(out))[0]:
        assert b.units == 2 and b.unit_size == 8  # the graph itself now says 2 heads of 8
        idx = GraphIndex(out)
        assert all(idx.initializers[p.weight].dims == [32, 16] for p in b.producers)
        assert idx.initializers[b.consumer.weight].dims == [16, 32]
    # shape inference agrees: the head-split tensors have 2 heads
    shapes = {vi.name: [d.dim_value or d.dim_param for d in vi.type.tensor_type.shape.dim]
              for vi in out.graph.value_info}
    split = [n.output[0] for n in out.graph.node if n.op_type == "Reshape" and len(shapes.get(n.output[0], [])) == 4]
    assert split and all(shapes[t][2] == 2 for t in split)
    # runs at a batch/sequence the calibration never used
    feed = _text_batches(tiny_bert_onnx, 1, 3, 11, seed=2)[0]
    (got, *_), (ref, *_) = run_onnx(out, feed), run_onnx(tiny_bert_onnx, feed)
    assert got.shape == ref.shape and np.all(np.isfinite(got))
    assert result.report["flops_removed_share"] > 0


def test_ffn_and_head_pruning_report_matches_the_graph(tiny_bert_onnx: onnx.ModelProto) -> None:
    batches = _text_batches(tiny_bert_onnx, 4, 4, 16, seed=3)
    for schedule in ("uniform", "adaptive"):
        cfg = PruneConfig(ffn_ratio=0.5, head_ratio=0.25, schedule=schedule, recovery="bias")
        result = StructuredPrune(cfg).run(tiny_bert_onnx, _ctx(batches))
        onnx.checker.check_model(result.model, full_check=True)
        r = result.report
        # the export aliases its all-zero biases, so count weights exactly and biases from the report's units
        biases = r["neurons_removed"] + r["heads_removed"] * 8 * 3
        assert r["params_removed"] - biases == _matmul_weight_params(tiny_bert_onnx) - _matmul_weight_params(
            result.model)
        assert r["matmul_flops_before"] - r["matmul_flops_after"] == sum(x["flops_removed"] for x in r["layers"])
        if schedule == "uniform":
            assert r["neurons_removed"] == 64 and r["heads_removed"] == 2
        else:  # probed end-to-end sensitivity of every block, normalised to mean 1
            assert len(r["sensitivity"]) == 4 and abs(np.mean(list(r["sensitivity"].values())) - 1) < 1e-3


def _llama_mlp(d: int = 16, f: int = 64, seed: int = 0) -> onnx.ModelProto:
    """x -> down(SiLU(gate(x)) * up(x)) + x, with no biases: the MLP of a Llama-style decoder layer."""
    rng = np.random.default_rng(seed)
    model = onnx.parser.parse_model(f"""
    <ir_version: 8, opset_import: ["" : 18]>
    mlp (float[B, S, {d}] x) => (float[B, S, {d}] y) {{
        g = MatMul(x, Wg)
        sg = Sigmoid(g)
        act = Mul(g, sg)
        u = MatMul(x, Wu)
        h = Mul(act, u)
        o = MatMul(h, Wd)
        y = Add(o, x)
    }}
    """)
    for name, shape in (("Wg", (d, f)), ("Wu", (d, f)), ("Wd", (f, d))):
        w = (rng.standard_normal(shape) / np.sqrt(shape[0])).astype(np.float32)
        model.graph.initializer.append(numpy_helper.from_array(w, name))
    onnx.checker.check_model(model, full_check=True)
    return model


def _x_batches(n: int, seed: int, d: int = 16) -> list[Batch]:
    rng = np.random.default_rng(seed)
    return [{"x": (rng.standard_normal((4, 32, d)) + 0.5).astype(np.float32)} for _ in range(n)]


def test_llama_gated_mlp_pruning_and_recovery() -> None:
    model = _llama_mlp()
    calib, held_out = _x_batches(8, seed=1), _x_batches(4, seed=2)
    ref = [run_onnx(model, b)[0] for b in held_out]
    errors = {}
    for recovery in ("none", "bias", "refit"):
        result = StructuredPrune(PruneConfig(ffn_ratio=0.5, recovery=recovery)).run(model, _ctx(calib))
        out = result.model
        onnx.checker.check_model(out, full_check=True)
        idx = GraphIndex(out)
        assert idx.initializers["Wg"].dims == [16, 32] and idx.initializers["Wu"].dims == [16, 32]
        assert idx.initializers["Wd"].dims == [32, 16]
        # the gate's SiLU and the gating Mul are untouched; bias/refit needed a bias where there was none
        assert sum(n.op_type == "Add" for n in out.graph.node) == (1 if recovery == "none" else 2)
        got = [run_onnx(out, b)[0] for b in held_out]
        errors[recovery] = sum(float(np.sum((g - r) ** 2)) for g, r in zip(got, ref, strict=True))
    # held-out error: least-squares refit < mean compensation < plain removal
    assert errors["refit"] < errors["bias"] < errors["none"], errors


def test_no_pattern_is_a_one_line_pass_error() -> None:
    with pytest.raises(PassError) as e:
        StructuredPrune(PruneConfig(ffn_ratio=0.3, head_ratio=0.3)).run(matmul_model(), _ctx(_x_batches(1, 0)))
    msg = e.value.one_line()
    assert "\n" not in msg and "FFN" in msg and "attention heads" in msg and "Softmax" in msg


def test_pass_does_not_mutate_its_input() -> None:
    model = _llama_mlp()
    before = model.SerializeToString()
    StructuredPrune(PruneConfig(ffn_ratio=0.25)).run(model, _ctx(_x_batches(2, 0)))
    assert model.SerializeToString() == before


def test_pruning_composes_before_quantization() -> None:
    recipe = make_recipe("int8-dynamic", RecipeOptions(prune_ffn=0.3, prune_heads=0.1, low_rank_energy=0.9))
    assert [p.name for p in recipe.passes] == ["prune", "low-rank", "int8-dynamic"]
    cfg = recipe.passes[0].config
    assert (cfg.ffn_ratio, cfg.head_ratio, cfg.recovery) == (0.3, 0.1, "refit")


def test_pruned_llama_mlp_quantizes(tmp_path: Path) -> None:
    recipe = make_recipe("int8-dynamic", RecipeOptions(prune_ffn=0.5))
    model = _llama_mlp(d=64, f=256)
    ctx = _ctx(_x_batches(2, 0, d=64))
    for p in recipe.passes:
        model = p.run(model, ctx).model
    ops = [n.op_type for n in model.graph.node]
    assert "MatMulInteger" in ops
    (y,) = run_onnx(model, _x_batches(1, 3, d=64)[0])
    assert y.shape == (4, 32, 64) and np.all(np.isfinite(y))

