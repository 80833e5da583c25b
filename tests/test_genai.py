"""The decoder fast path (edgecompress/genai): ORT GenAI's model builder as the exporter, and a bundle that
`onnxruntime_genai.Model(bundle)` and its Generator run as is, checked against PyTorch FP32 on a tiny random Llama
(2 layers, GQA, tied embeddings)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest

from edgecompress.genai import choose_exporter
from edgecompress.genai.bundle import genai_tokenizer

og = pytest.importorskip("onnxruntime_genai")
DECODER = "text-generation-with-past"
PROMPT = [101, 2023, 2003, 1037, 3231, 1997, 1996, 6254]


@pytest.fixture(scope="module")
def short_eval(tmp_path_factory: pytest.TempPathFactory) -> Path:
    src = Path(__file__).resolve().parents[1] / "edgecompress/data/corpus/passages_evaluation.txt"
    path = tmp_path_factory.mktemp("eval") / "eval.txt"
    path.write_text("\n".join(src.read_text(encoding="utf-8").splitlines()[:2]), encoding="utf-8")
    return path


def _build(model: Path, recipe: str, out: Path, short_eval: Path) -> Path:
    from edgecompress.pipeline import BuildOptions, build

    m = build(BuildOptions(model=model, target="phone-arm64", recipe=recipe, out=out, runs=3, eval=short_eval))
    assert m.passed, [r.miss() for r in m.failed_budgets]
    return out


@pytest.fixture(scope="module")
def fp32_bundle(tiny_llama: Path, short_eval: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _build(tiny_llama, "fp32", tmp_path_factory.mktemp("genai-fp32") / "b", short_eval)


@pytest.fixture(scope="module")
def int4_bundle(tiny_llama: Path, short_eval: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _build(tiny_llama, "int4", tmp_path_factory.mktemp("genai-int4") / "b", short_eval)


def _generate(bundle: Path, steps: int) -> tuple[list[int], list[np.ndarray]]:
    """Greedy tokens from ORT GenAI's Generator (shared KV buffer), and the last-position logits the runtime
    computed for the prompt and each token fed back one at a time (append_tokens runs the model)."""
    model = og.Model(str(bundle))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(PROMPT) + steps, do_sample=False)
    gen = og.Generator(model, params)
    gen.append_tokens(PROMPT)
    while not gen.is_done():
        gen.generate_next_token()
    ids = [int(t) for t in gen.get_sequence(0)]
    gen = og.Generator(model, params)
    logits = []
    for chunk in [PROMPT, *([t] for t in ids[len(PROMPT):-1])]:
        gen.append_tokens(chunk)
        logits.append(np.array(gen.get_output("logits"), dtype=np.float32).reshape(-1, 30522)[-1])
    return ids, logits


def _torch_logits(model_dir: Path, ids: list[int]) -> np.ndarray:
    import torch
    from transformers import LlamaForCausalLM

    pt = LlamaForCausalLM.from_pretrained(model_dir).eval()
    with torch.no_grad():
        return pt(torch.tensor([ids])).logits[0].numpy()


def test_fp32_bundle_runs_in_onnxruntime_genai_as_pytorch_does(fp32_bundle: Path, tiny_llama: Path) -> None:
    m = json.loads((fp32_bundle / "manifest.json").read_text())
    assert m["export"]["path"] == "fast" and m["export"]["exporter"] == "onnxruntime_genai.models.builder"
    ops = m["export"]["graph"]["op_types"]
    assert ops["GroupQueryAttention"] == 2 and "Softmax" not in ops  # fused attention, no unfused MatMul/Softmax
    cfg = json.loads((fp32_bundle / "genai_config.json").read_text())
    assert cfg["search"]["max_length"] == 2048 and cfg["search"]["past_present_share_buffer"] is True
    ids, logits = _generate(fp32_bundle, steps=6)
    ref = _torch_logits(tiny_llama, ids)
    for step, got in enumerate(logits):  # every step's logits, from the prefill onwards, match PyTorch's
        np.testing.assert_allclose(got, ref[len(PROMPT) - 1 + step], atol=1e-3)
    greedy = [int(np.argmax(ref[i])) for i in range(len(PROMPT) - 1, len(ids) - 1)]
    assert ids[len(PROMPT):] == greedy


def test_int4_bundle_is_the_graph_that_was_measured(int4_bundle: Path, tiny_llama: Path) -> None:
    m = json.loads((int4_bundle / "manifest.json").read_text())
    assert m["export"]["path"] == "fast"
    rep = m["recipe"]["passes"][0]["report"]
    assert rep["lm_head"]["quantized"] and rep["embedding"]["quantized"] and rep["embedding"]["shared_with_lm_head"]
    graph = onnx.load(str(int4_bundle / "model.onnx"))
    assert {n.op_type for n in graph.graph.node} >= {"MatMulNBits", "GroupQueryAttention"}
    assert not any(n.op_type == "MatMul" and n.input[1].endswith("weight") for n in graph.graph.node)
    ids, logits = _generate(int4_bundle, steps=4)
    ref = _torch_logits(tiny_llama, ids)
    # the GenAI runtime runs the bundle's int4 graph: its logits are FP32's within 4-bit error, not bit-exact
    got = np.stack(logits)
    want = ref[len(PROMPT) - 1:len(PROMPT) - 1 + len(logits)]
    err = np.abs(got - want).max()
    assert 0 < err < 0.1 * np.abs(want).max()


def test_exporter_choice_says_why() -> None:
    assert choose_exporter(DECODER, "LlamaForCausalLM", ["decoder-int4"])[0] == "genai"
    assert choose_exporter(DECODER, "LlamaForCausalLM", [])[0] == "genai"
    path, why = choose_exporter(DECODER, "LlamaForCausalLM", ["prune", "decoder-int4"])
    assert path == "optimum" and "prune" in why
    path, why = choose_exporter(DECODER, "GPT2LMHeadModel", ["decoder-int4"])
    assert path == "optimum" and "GPT2LMHeadModel" in why
    assert choose_exporter("feature-extraction", "BertModel", [])[0] == "optimum"


def test_exporter_can_be_forced_to_optimum(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EDGECOMPRESS_DECODER_EXPORTER", "optimum")
    assert choose_exporter(DECODER, "LlamaForCausalLM", ["decoder-int4"]) == \
        ("optimum", "EDGECOMPRESS_DECODER_EXPORTER=optimum")


def test_tokenizer_decoder_fixed_for_genai_only_when_byte_level(tmp_path: Path) -> None:
    seq = {"type": "Sequence", "decoders": [{"type": "ByteFallback"}, {"type": "Fuse"},
                                            {"type": "Replace", "pattern": {"String": "▁"}, "content": " "},
                                            {"type": "ByteLevel", "add_prefix_space": True}]}
    tok = {"model": {"type": "BPE"}, "pre_tokenizer": {"type": "ByteLevel"}, "decoder": seq}
    (tmp_path / "tokenizer.json").write_text(json.dumps(tok))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"add_bos_token": True}))
    (tmp_path / "chat_template.jinja").write_text("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    changes = genai_tokenizer(tmp_path)
    assert json.loads((tmp_path / "tokenizer.json").read_text())["decoder"] == {"type": "ByteLevel",
                                                                               "add_prefix_space": True}
    assert json.loads((tmp_path / "tokenizer_config.json").read_text())["chat_template"].startswith("{% for")
    assert set(changes) == {"decoder", "chat_template"}
    # a SentencePiece-style tokenizer (no byte-level pre-tokenizer) is left alone
    tok["pre_tokenizer"] = {"type": "Metaspace"}
    (tmp_path / "tokenizer.json").write_text(json.dumps(tok))
    assert genai_tokenizer(tmp_path) == {}
