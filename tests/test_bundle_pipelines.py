"""A bundle loads AS IS in the clients an app developer already uses, and behaves like the source model there.

Real clients only: sentence-transformers with its ONNX backend, optimum's ORTModel classes, transformers' tokenizer
(chat template) and GenerationConfig, onnxruntime on the ORT-format file.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import bundled_model_dir

import edgecompress
from edgecompress.calibration import builtin_texts
from edgecompress.errors import OutputError, PassError
from edgecompress.manifest import Manifest

LONG_TEXT = " ".join(["The quick brown fox jumps over the lazy dog near the river bank."] * 40)  # > 256 tokens


def _floor(m: Manifest) -> float:
    return next(r.limit for r in m.budgets if r.name == "cosine_mean")


@pytest.mark.slow
def test_sentence_transformers_onnx_backend_matches_pytorch(minilm_phone_bundle: Path) -> None:
    from sentence_transformers import SentenceTransformer

    bundle = minilm_phone_bundle
    m = Manifest.load(bundle / "manifest.json")
    st = m.bundle["sentence_transformers"]
    assert st["modules"] == ["Transformer", "Pooling", "Normalize"] and st["max_seq_length"] == 256
    assert st["pooling"] == ["mean_tokens"] and st["normalize"] is True
    for name in ("modules.json", "sentence_bert_config.json", "1_Pooling/config.json"):
        assert (bundle / name).is_file(), name
    assert (bundle / "2_Normalize").is_dir()

    onnx_st = SentenceTransformer(str(bundle), backend="onnx")  # no model_kwargs: the layout is enough
    torch_st = SentenceTransformer(str(bundled_model_dir()), device="cpu")
    assert type(onnx_st[0].auto_model).__name__ == "ORTModelForFeatureExtraction"
    assert Path(onnx_st[0].auto_model.model_path).name == "model.onnx"
    assert onnx_st.max_seq_length == torch_st.max_seq_length == 256
    texts = [*builtin_texts("evaluation").texts[:96], LONG_TEXT]
    a = onnx_st.encode(texts, batch_size=32)
    b = torch_st.encode(texts, batch_size=32)
    np.testing.assert_allclose(np.linalg.norm(a, axis=1), 1.0, atol=1e-5)  # Normalize ran
    cos = (a * b).sum(axis=1)
    assert cos.mean() >= _floor(m), cos.mean()
    assert cos[-1] > 0.98  # the 256-token cut is the same on both sides (512 would change the pooled vector)


@pytest.mark.slow
def test_optimum_ortmodel_loads_the_bundle_as_is(minilm_phone_bundle: Path) -> None:
    import onnxruntime as ort
    from optimum.onnxruntime import ORTModelForFeatureExtraction
    from transformers import AutoTokenizer

    bundle = minilm_phone_bundle
    model = ORTModelForFeatureExtraction.from_pretrained(str(bundle))
    tok = AutoTokenizer.from_pretrained(str(bundle))
    enc = tok(["a bundle is a model dir"], return_tensors="np")
    got = model(**enc).last_hidden_state
    sess = ort.InferenceSession(str(bundle / "model.onnx"), providers=["CPUExecutionProvider"])
    want = sess.run(["last_hidden_state"], {i.name: enc[i.name] for i in sess.get_inputs()})[0]
    np.testing.assert_array_equal(np.asarray(got), want)


@pytest.mark.slow
def test_ort_mobile_package_loads_and_matches(minilm_phone_bundle: Path) -> None:
    import onnxruntime as ort

    from edgecompress.evaluate import pool
    from edgecompress.export import load_tokenizer

    bundle = minilm_phone_bundle
    m = Manifest.load(bundle / "manifest.json")
    pkg = m.bundle["ort_mobile"]
    ort_file = bundle / "model.ort"
    assert ort_file.is_file() and pkg["size_bytes"] == ort_file.stat().st_size
    # the size budget counts what the app ships: model.ort
    size = next(r for r in m.budgets if r.name == "size")
    assert size.value == pytest.approx(ort_file.stat().st_size / 1e6) and size.source == "measured (model.ort)"
    config = (bundle / pkg["required_operators_and_types"]).read_text()
    assert "com.microsoft;1;" in config and "MatMulIntegerToFloat" in config  # Arm fused the S8S8 MatMuls
    assert "MatMulIntegerToFloat" in pkg["operators"]["com.microsoft"]
    # ORT's own checkers for the providers the target names (NNAPI); XNNPACK and QNN have none
    nnapi = pkg["providers"]["NNAPI"]
    assert nnapi["assessed"] and 0 < nnapi["supported_nodes"] < nnapi["nodes"]
    assert sum(nnapi["cpu_fallback_nodes"].values()) == nnapi["nodes"] - nnapi["supported_nodes"]
    assert pkg["providers"]["QNN"]["assessed"] is False
    assert pkg["providers"]["XNNPACK"]["com_microsoft_nodes"]["MatMulIntegerToFloat"] == 28
    assert "NNAPI" in (bundle / pkg["usability_report"]).read_text()
    assert pkg["check"]["max_abs_diff_vs_optimized_onnx"] == 0.0

    # the .ort runs in plain onnxruntime and gives the model's embeddings
    tok = load_tokenizer(bundle)
    texts = list(builtin_texts("evaluation").texts[:32])
    enc = tok(texts, padding=True, truncation=True, max_length=128, return_tensors="np")
    outs = []
    for path in (ort_file, bundle / "model.onnx"):
        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        feed = {i.name: enc[i.name].astype(np.int64) for i in sess.get_inputs()}
        outs.append(pool("feature-extraction", sess.run(["last_hidden_state"], feed)[0], feed))
    cos = (outs[0] * outs[1]).sum(axis=1)
    assert cos.min() > 0.99, cos.min()


@pytest.mark.slow
def test_kernel_share_is_the_targets_and_keeps_the_hosts(minilm_phone_bundle: Path) -> None:
    """phone-arm64's figure is Arm's (modelled without the emulator), the host's sits beside it, labelled."""
    k = Manifest.load(minilm_phone_bundle / "manifest.json").kernels
    assert k["target"] == "phone-arm64" and k["source"] in ("modelled", "emulated")
    assert k["by_op"]["MatMulIntegerToFloat"]["nodes"] == 28 and k["integer_matmul_flops_share"] > 0.9
    assert "this host" in k["host"]["machine"] and k["host"]["optimized_graph"].startswith("diagnostics/")


@pytest.mark.slow
def test_the_documented_arm_model_agrees_with_orts_optimizer(minilm_phone_bundle: Path, tmp_path: Path) -> None:
    """ORT's converter for Arm (session.qdqisint8allowed=1, as convert_onnx_models_to_ort --target_platform arm)
    fuses exactly the MatMuls profiling/fusion.py predicts for aarch64."""
    import onnxruntime as ort

    from edgecompress.profiling.fusion import ARM, modelled_share

    model = onnx.load(str(minilm_phone_bundle / "model.onnx"))
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.add_session_config_entry("session.qdqisint8allowed", "1")
    so.optimized_model_filepath = str(tmp_path / "arm.onnx")
    ort.InferenceSession(str(minilm_phone_bundle / "model.onnx"), so, providers=["CPUExecutionProvider"])
    fused = onnx.load(str(tmp_path / "arm.onnx"), load_external_data=False)
    counts = {op: sum(n.op_type == op for n in fused.graph.node) for op in ("MatMulIntegerToFloat", "MatMulNBits")}
    predicted = modelled_share(model, {"batch_size": 1, "sequence_length": 128}, ARM).by_op
    assert counts == {op: predicted[op]["nodes"] for op in counts}, (counts, predicted)


def test_a_quantizing_recipe_with_no_integer_kernel_on_the_target_fails(tmp_path: Path) -> None:
    from conftest import matmul_model

    from edgecompress.model import save_model
    from edgecompress.profiling.kernels import inspect_kernels
    from edgecompress.targets import load_target

    save_model(matmul_model(), tmp_path / "m.onnx")
    with pytest.raises(PassError, match=r"raspberry-pi-5.*modelled"):
        inspect_kernels(tmp_path / "m.onnx", tmp_path / "d", ["CPUExecutionProvider"], {}, quantizing=True,
                        target=load_target("raspberry-pi-5"))


# ------------------------------------------------------------------------------------------------- decoders

@pytest.mark.slow
def test_decoder_bundle_carries_chat_template_and_generation_config(chat_llama: Path, chat_llama_bundle: Path
                                                                    ) -> None:
    from optimum.onnxruntime import ORTModelForCausalLM
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    out = chat_llama_bundle
    messages = [{"role": "user", "content": "hello there"}]
    src_tok, tok = AutoTokenizer.from_pretrained(str(chat_llama)), AutoTokenizer.from_pretrained(str(out))
    prompt = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert prompt == src_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|im_start|>assistant\n")
    gen = GenerationConfig.from_pretrained(str(out))
    assert gen.to_dict() == GenerationConfig.from_pretrained(str(chat_llama)).to_dict()
    assert json.loads((out / "manifest.json").read_text())["bundle"]["files"].count("generation_config.json") == 1

    # optimum's ORTModelForCausalLM generates from the bundle what PyTorch generates from the source (greedy)
    ids = tok(prompt, return_tensors="pt").input_ids
    onnx_lm = ORTModelForCausalLM.from_pretrained(str(out))
    torch_lm = AutoModelForCausalLM.from_pretrained(str(chat_llama))
    a = onnx_lm.generate(ids, max_new_tokens=6, do_sample=False)
    b = torch_lm.generate(ids, max_new_tokens=6, do_sample=False)
    assert a.tolist() == b.tolist()


def test_api_errors_name_api_arguments(tiny_bert: Path, tmp_path: Path) -> None:
    out = tmp_path / "exists"
    out.mkdir()
    with pytest.raises(OutputError) as e:
        edgecompress.build(tiny_bert, target="host", out=out)
    assert "force=True" in e.value.one_line() and "--force" not in e.value.one_line()
    assert "--out" not in e.value.one_line()


# ----------------------------------------------------------------- under Arm emulation (make test-arm, after setup)

@pytest.mark.arm
def test_emulated_kernel_share_is_arms_own_and_matches_the_model(tiny_bert: Path, tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    from test_emulate import USER_EMULATOR_DIR

    from edgecompress.profiling import emulate
    from edgecompress.profiling.fusion import ARM, modelled_share

    if emulate.Emulator(USER_EMULATOR_DIR).ready() is None or os.geteuid() != 0:
        pytest.skip("run `edgecompress emulator setup` as root first (make test-arm does)")
    monkeypatch.setenv("EDGECOMPRESS_EMULATOR_DIR", str(USER_EMULATOR_DIR))
    m = edgecompress.build(tiny_bert, target="raspberry-pi-5", recipe="int8-static", out=tmp_path / "b", runs=2)
    k = m.kernels
    assert k["source"] == "emulated" and k["optimized_graph"] == "diagnostics/optimized-cpu-aarch64.onnx"
    model = onnx.load(str(tmp_path / "b" / "model.onnx"))
    predicted = modelled_share(model, k["workload"], ARM).by_op
    assert {op: v["nodes"] for op, v in k["by_op"].items()} == {op: v["nodes"] for op, v in predicted.items()}


def test_sentence_transformers_files_are_copied_faithfully_and_safely(tmp_path: Path) -> None:
    """An old-style repo keeps its Transformer in 0_Transformer/: the bundle points it at its root, where model.onnx
    is; a module path that leaves the model dir is dropped, never followed."""
    from edgecompress.bundle_files import copy_bundle_files

    src, stage = tmp_path / "src", tmp_path / "stage"
    (src / "0_Transformer").mkdir(parents=True)
    (src / "1_Pooling").mkdir()
    stage.mkdir()
    (src / "0_Transformer" / "sentence_bert_config.json").write_text('{"max_seq_length": 128}')
    (src / "1_Pooling" / "config.json").write_text('{"pooling_mode_cls_token": true}')
    (tmp_path / "secret").mkdir()
    (tmp_path / "secret" / "key").write_text("x")
    (src / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "0_Transformer", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "../secret", "type": "sentence_transformers.models.Dense"},
        {"idx": 3, "name": "3", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}]))
    out = copy_bundle_files(tmp_path / "no-export", src, stage)
    modules = json.loads((stage / "modules.json").read_text())
    assert [m["path"] for m in modules] == ["", "1_Pooling", "2_Normalize"]
    assert json.loads((stage / "sentence_bert_config.json").read_text()) == {"max_seq_length": 128}
    assert (stage / "2_Normalize").is_dir() and not (stage / "secret").exists()
    assert out["sentence_transformers"] == {"modules": ["Transformer", "Pooling", "Normalize"],
                                            "max_seq_length": 128, "pooling": ["cls_token"], "normalize": True}
    assert not copy_bundle_files(tmp_path / "no-export", tmp_path / "secret", stage).get("sentence_transformers")


def test_emulated_figure_is_read_from_the_graph_the_emulator_saved(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """The plumbing of the emulated path, with this host's runner standing in for qemu at the transport boundary
    (the real aarch64 run is the `arm` test above): the target's figure comes from the graph the run saved."""
    import subprocess
    import sys

    from conftest import matmul_model

    from edgecompress.model import save_model
    from edgecompress.profiling import emulate
    from edgecompress.profiling.kernels import inspect_kernels
    from edgecompress.targets import load_target

    calls: list[str] = []

    def fake_run(files: list[Path], batches: list, cpu: str, *, optimized_to: Path, **_: object) -> tuple:
        calls.append(cpu)
        spec = tmp_path / "spec.json"
        np.savez(tmp_path / "in.npz")
        spec.write_text(json.dumps({"mode": "fidelity", "model": str(files[0]), "batches": str(tmp_path / "in.npz"),
                                    "n_batches": len(batches), "outputs": str(tmp_path / "out.npz"), "threads": 1,
                                    "optimized_model_path": str(optimized_to)}))
        subprocess.run([sys.executable, str(emulate.RUNNER), str(spec)], check=True, capture_output=True)
        return {"ok": True}, [], {}

    monkeypatch.setattr(emulate.Emulator, "ready", lambda self: {"machine": "aarch64"})
    monkeypatch.setattr(emulate, "run_in_emulator", fake_run)
    save_model(matmul_model(), tmp_path / "m.onnx")
    k = inspect_kernels(tmp_path / "m.onnx", tmp_path / "d", ["CPUExecutionProvider"], {}, quantizing=False,
                        target=load_target("raspberry-pi-5"))
    assert calls == ["cortex-a76"] and k["source"] == "emulated" and k["qemu_cpu"] == "cortex-a76"
    assert (tmp_path / "d" / "optimized-cpu-aarch64.onnx").is_file()
    assert k["by_op"] == {"MatMul": {"nodes": 1, "gflops": k["by_op"]["MatMul"]["gflops"]}} and k["host"]["by_op"]
    monkeypatch.setenv("EDGECOMPRESS_NO_EMULATION", "1")  # opt out: the documented model
    k = inspect_kernels(tmp_path / "m.onnx", tmp_path / "e", ["CPUExecutionProvider"], {}, quantizing=False,
                        target=load_target("raspberry-pi-5"))
    assert k["source"] == "modelled" and calls == ["cortex-a76"]


def test_package_option_in_target_files_is_validated(tmp_path: Path) -> None:
    from conftest import REPO

    from edgecompress.errors import ConfigError
    from edgecompress.targets import load_target

    assert load_target("phone-arm64").runtime.package == "ort-mobile"
    assert load_target("raspberry-pi-5").runtime.package is None
    bad = tmp_path / "phone-arm64.toml"
    bad.write_text((REPO / "targets" / "phone-arm64.toml").read_text().replace('package = "ort-mobile"',
                                                                                 'package = "apk"'))
    with pytest.raises(ConfigError, match=r"runtime\.package"):
        load_target(bad)


@pytest.mark.slow
def test_package_none_skips_the_phone_default(tiny_bert: Path, tmp_path: Path) -> None:
    from click.testing import CliRunner

    from edgecompress.cli import main

    out = tmp_path / "b"
    r = CliRunner().invoke(main, ["build", str(tiny_bert), "--target", "phone-arm64", "--recipe", "fp32", "--out",
                                  str(out), "--package", "none", "--runs", "2"], catch_exceptions=False)
    assert r.exit_code in (0, 3), r.output
    assert not (out / "model.ort").exists() and "ort_mobile" not in Manifest.load(out / "manifest.json").bundle
    r = CliRunner().invoke(main, ["build", str(tiny_bert), "--target", "host", "--package", "apk"])
    assert r.exit_code == 2 and "apk" in r.output
