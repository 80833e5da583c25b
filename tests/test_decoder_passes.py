"""Codebooks and gated-MLP pruning applied to decoders: the decoder codebook pass (MatMulNBits 8-bit weights decoded
at load), refusals, and pruning that keeps a pruned down_proj's K on the decoder kernels' block."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from edgecompress.errors import ConfigError
from edgecompress.graph import GraphIndex
from edgecompress.passes.base import Batch, ModelInfo, PassContext
from edgecompress.passes.codebook.decoder import DecoderCodebook, DecoderCodebookConfig
from edgecompress.passes.prune import PruneConfig, StructuredPrune
from edgecompress.recipes import RecipeOptions, make_recipe
from edgecompress.targets import load_target
from tests.conftest import run_onnx

DECODER = "text-generation-with-past"
INFO = ModelInfo("llama", "LlamaForCausalLM", DECODER)


def _decoder_graph(v: int = 96, h: int = 64, f: int = 128, seed: int = 0) -> onnx.ModelProto:
    """ids -> Gather(E) -> gated MLP (+ residual) -> MatMul(x, Transpose(E)) -> logits: a tied one-layer decoder."""
    rng = np.random.default_rng(seed)
    model = onnx.parser.parse_model(f"""
    <ir_version: 8, opset_import: ["" : 18]>
    g (int64[1, seq] input_ids) => (float[1, seq, {v}] logits) {{
        x = Gather(E, input_ids)
        gt = MatMul(x, Wg)
        sg = Sigmoid(gt)
        act = Mul(gt, sg)
        up = MatMul(x, Wu)
        hid = Mul(act, up)
        dn = MatMul(hid, Wd)
        y = Add(dn, x)
        ET = Transpose<perm=[1, 0]>(E)
        logits = MatMul(y, ET)
    }}
    """)
    for name, shape in (("E", (v, h)), ("Wg", (h, f)), ("Wu", (h, f)), ("Wd", (f, h))):
        w = (rng.standard_normal(shape) / np.sqrt(shape[-1] if name == "E" else shape[0])).astype(np.float32)
        model.graph.initializer.append(numpy_helper.from_array(w, name))
    onnx.checker.check_model(model, full_check=True)
    return model


def _id_batches(n: int, seed: int, v: int = 96, seq: int = 48) -> list[Batch]:
    rng = np.random.default_rng(seed)
    return [{"input_ids": rng.integers(0, v, (1, seq), dtype=np.int64)} for _ in range(n)]


def _ctx(target: str = "phone-arm64", batches: list[Batch] | None = None) -> PassContext:
    cal = batches if batches is not None else _id_batches(4, 1)
    return PassContext(target=load_target(target), info=INFO, calibration=lambda: iter(cal))


def _rel_err(model: onnx.ModelProto, out: onnx.ModelProto, batches: list[Batch]) -> float:
    errs = []
    for b in batches:
        ref, got = run_onnx(model, b)[0], run_onnx(out, b)[0]
        errs.append(float(np.linalg.norm(got - ref) / np.linalg.norm(ref)))
    return max(errs)


def _optimized_ops(model: onnx.ModelProto, tmp: Path) -> list[str]:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.optimized_model_filepath = str(tmp / "opt.onnx")
    ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return [n.op_type for n in onnx.load(str(tmp / "opt.onnx")).graph.node]


@pytest.mark.parametrize("bits", [3, 4, 8])
def test_decoder_codebook_decodes_into_8bit_matmulnbits(bits: int, tmp_path: Path) -> None:
    model = _decoder_graph()
    cfg = DecoderCodebookConfig(bits=bits, mixed=False, min_elements=1024, accuracy_level=0)
    result = DecoderCodebook(cfg).run(model, _ctx())
    out, rep = result.model, result.report
    onnx.checker.check_model(out, full_check=True)
    nbits = [n for n in out.graph.node if n.op_type == "MatMulNBits"]
    assert len(nbits) == 4  # gate, up, down and the untied lm_head
    assert all(next(a.i for a in n.attribute if a.name == "bits") == 8 for n in nbits)
    assert not {"E", "Wg", "Wu", "Wd"} & {i.name for i in out.graph.initializer}  # float weights gone
    assert "Transpose" not in [n.op_type for n in out.graph.node if not n.name.startswith("decoder_codebook")]
    assert rep["lm_head"]["untied"] is True and rep["lm_head"]["coded"] is True
    assert rep["embedding"]["shared_with_lm_head"] is True and rep["bits_histogram"] == {str(bits): 4}
    assert rep["matmuls_kernel"] == 4 and rep["gptq"] is True
    # ORT folds the whole decode at load: only the kernels and the embedding's row decode run
    ops = _optimized_ops(out, tmp_path)
    assert ops.count("MatMulNBits") == 4 and not {"BitShift", "BitwiseAnd", "GatherElements", "Expand"} & set(ops)
    # accuracy_level 0: float compute, so the only error is the codebook's; it shrinks with the bits
    err = _rel_err(model, out, _id_batches(3, 7))
    assert err < {3: 0.25, 4: 0.12, 8: 0.01}[bits], err
    if bits < 8:
        idx_bytes = sum(i.ByteSize() for i in out.graph.initializer if ".field" in i.name or "field" in i.name)
        n_weights = sum(int(np.prod(numpy_helper.to_array(i).shape)) for i in model.graph.initializer
                        if i.name != "E") + 96 * 64  # E counted once (shared)
        assert idx_bytes <= n_weights * bits / 8 * 1.05 + 4096


def test_decoder_codebook_more_bits_less_error_and_level_4_close() -> None:
    model = _decoder_graph(seed=3)
    held = _id_batches(3, 9)
    errs = {b: _rel_err(model, DecoderCodebook(DecoderCodebookConfig(bits=b, mixed=False, min_elements=1024,
                                                                     accuracy_level=0)).run(model, _ctx()).model,
                        held) for b in (2, 4, 6)}
    assert errs[6] < errs[4] < errs[2], errs
    # the target's own level (4: int8 activations per block) adds only the activation rounding
    lvl4 = DecoderCodebook(DecoderCodebookConfig(bits=4, mixed=False, min_elements=1024)).run(model, _ctx())
    assert lvl4.report["accuracy_level"] == 4
    assert _rel_err(model, lvl4.model, held) < errs[4] + 0.05


def test_decoder_codebook_spends_the_size_budget_on_more_bits() -> None:
    model = _decoder_graph()
    base = DecoderCodebook(DecoderCodebookConfig(bits=3, mixed=False, min_elements=1024)).run(model, _ctx())
    budget = (base.model.ByteSize() + 16 * 1024 + 3000) / 1e6  # past the pass's slack: a few upgrades, not all
    got = DecoderCodebook(DecoderCodebookConfig(bits=3, min_elements=1024, max_size_mb=budget)).run(model, _ctx())
    hist = got.report["bits_histogram"]
    assert hist not in ({"3": 4}, {"5": 4}) and got.model.ByteSize() <= budget * 1e6
    with pytest.raises(ConfigError, match="below what 3-bit codebooks reach"):
        DecoderCodebook(DecoderCodebookConfig(bits=3, min_elements=1024, max_size_mb=0.001)).run(model, _ctx())


def test_decoder_codebook_refuses_a_target_without_int8_dot_product() -> None:
    with pytest.raises(ConfigError, match="int8 dot product") as e:
        DecoderCodebook(DecoderCodebookConfig(min_elements=1024)).run(_decoder_graph(), _ctx("raspberry-pi-4"))
    assert "\n" not in e.value.one_line() and "--recipe int4" in e.value.one_line()


def test_codebook_recipe_for_decoders_and_refusals() -> None:
    assert [p.name for p in make_recipe("codebook", task=DECODER).passes] == ["decoder-codebook"]
    assert [p.name for p in make_recipe("codebook", task="feature-extraction").passes] == ["codebook"]
    for name in ("int8-dynamic", "int8-static", "int8-mixed", "fp16"):
        with pytest.raises(ConfigError, match=r"does not apply to text-generation-with-past models: .+"):
            make_recipe(name, task=DECODER)


# --- pruning the gated MLP of a decoder ------------------------------------------------------------------------
def test_decoder_recipes_align_pruned_mlps_to_the_kernel_block() -> None:
    recipe = make_recipe("int4", RecipeOptions(prune_ffn=0.1, block_size=32), task=DECODER)
    assert [p.name for p in recipe.passes] == ["prune", "decoder-int4"]
    assert recipe.passes[0].config.keep_multiple == 32
    enc = make_recipe("int8-dynamic", RecipeOptions(prune_ffn=0.1))
    assert enc.passes[0].config.keep_multiple == 1  # encoders: any count
    model = _decoder_graph(f=256)
    for ratio, removed in ((0.1, 32), (0.2, 64), (0.3, 64)):  # 256 neurons: kept 224 / 192 / 192 (nearest 32)
        res = StructuredPrune(PruneConfig(ffn_ratio=ratio, keep_multiple=32)).run(model, _ctx())
        assert res.report["neurons_removed"] == removed, (ratio, res.report["layers"])
        assert GraphIndex(res.model).initializers["Wd"].dims[0] % 32 == 0
        onnx.checker.check_model(res.model, full_check=True)
    adaptive = StructuredPrune(PruneConfig(ffn_ratio=0.3, keep_multiple=32, schedule="adaptive")).run(model, _ctx())
    assert GraphIndex(adaptive.model).initializers["Wd"].dims[0] % 32 == 0


def test_decoder_pruning_that_removes_nothing_is_exact() -> None:
    model = _decoder_graph()
    ids = _id_batches(1, 5)[0]
    # 128 neurons, ratio 0.05: 6 to remove, but the kept count rounds to 128 on a 32 block: nothing removed
    res = StructuredPrune(PruneConfig(ffn_ratio=0.05, keep_multiple=32)).run(model, _ctx())
    assert res.modified is False and res.report["neurons_removed"] == 0
    np.testing.assert_array_equal(run_onnx(res.model, ids)[0], run_onnx(model, ids)[0])
    assert make_recipe("int4", RecipeOptions(prune_ffn=0.0), task=DECODER).passes[0].name == "decoder-int4"


def test_pruned_decoder_mlp_then_int4_keeps_every_matmul_4bit() -> None:
    model = _decoder_graph(f=256)
    ctx = _ctx()
    for p in make_recipe("int4", RecipeOptions(prune_ffn=0.2), task=DECODER).passes:
        model = p.run(model, ctx).model
    rep_ops = [n for n in model.graph.node if n.op_type == "MatMulNBits"]
    assert len(rep_ops) == 4  # gate, up, the pruned down (K = 192) and lm_head
    assert not any(n.op_type == "MatMul" and n.input[1] in {i.name for i in model.graph.initializer}
                   and "BlockSum" not in n.name and "Offset" not in n.name for n in model.graph.node)


def test_decoder_codebook_per_tensor_granularity_decodes_with_gather() -> None:
    model = _decoder_graph(seed=4)
    cfg = DecoderCodebookConfig(bits=5, granularity="tensor", mixed=False, min_elements=1024, accuracy_level=0)
    out = DecoderCodebook(cfg).run(model, _ctx()).model
    onnx.checker.check_model(out, full_check=True)
    ops = [n.op_type for n in out.graph.node]
    assert "GatherElements" not in ops and ops.count("MatMulNBits") == 4
    assert _rel_err(model, out, _id_batches(2, 8)) < 0.1
