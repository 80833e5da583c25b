"""End-to-end builds: real exports through optimum, real ORT sessions, real subprocess profiling."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import ctrl_c_leaves_nothing, sigint_default

import edgecompress
from edgecompress.cli import main
from edgecompress.manifest import Manifest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def minilm_bundle(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict, int]:
    out = tmp_path_factory.mktemp("e2e") / "x"
    r = CliRunner().invoke(main, ["build", "--target", "host", "--recipe", "int8-dynamic", "--out", str(out),
                                  "--json", "--runs", "10"], catch_exceptions=False)
    return out, json.loads(r.stdout), r.exit_code


@pytest.mark.slow
def test_bundled_minilm_builds_and_loads_in_plain_onnxruntime(minilm_bundle) -> None:  # type: ignore[no-untyped-def]
    out, summary, code = minilm_bundle
    assert code == (0 if summary["passed"] else 3)
    assert summary["model"] == "all-MiniLM-L6-v2" and summary["recipe"] == "int8-dynamic"
    for name in ("model.onnx", "manifest.json", "report.md", "config.json", "tokenizer.json"):
        assert (out / name).is_file(), name
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no staging left behind

    import onnxruntime as ort
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(out))
    sess = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    enc = tok(["The bundle loads like any HF ONNX dir."], return_tensors="np")
    feed = {i.name: enc[i.name].astype(np.int64) for i in sess.get_inputs()}
    hidden = sess.run(None, feed)[0]
    assert hidden.shape == (1, enc["input_ids"].shape[1], 384)


@pytest.mark.slow
def test_minilm_manifest_records_everything(minilm_bundle) -> None:  # type: ignore[no-untyped-def]
    out, _summary, _ = minilm_bundle
    m = Manifest.load(out / "manifest.json")
    raw = json.loads((out / "manifest.json").read_text())
    assert m.tool["onnxruntime"] and m.tool["optimum-onnx"] and m.tool["transformers"]
    assert m.source["weights_sha256"]["model.safetensors"] and len(m.target["sha256"]) == 64
    assert m.export["check"]["passed"] and m.export["check"]["max_abs_diff"] < 1e-3
    passes = m.recipe["passes"]
    assert [p["name"] for p in passes] == ["int8-dynamic"]
    assert passes[0]["config"]["per_channel"] is True and "Gather" in passes[0]["config"]["op_types"]
    cos = m.fidelity["metrics"]
    assert 0.97 < cos["cosine_min"] <= cos["cosine_p1"] <= cos["cosine_mean"] <= 1.0
    assert m.fidelity["texts"] >= 150 and m.fidelity["text_source"] == "builtin:evaluation"
    rows = {r.name: r for r in m.budgets}
    assert set(rows) == {"size", "peak_ram", "latency_p90", "load_time", "cosine_mean"}
    assert rows["latency_p90"].source == "measured" and rows["size"].source == "measured"
    assert 15 < m.artifact.size_mb < 30  # int8 weights and embeddings: about a quarter of 90 MB
    from edgecompress.model import sha256_file

    assert m.artifact.sha256 == sha256_file(out / "model.onnx")
    host = m.profile["host"]
    assert host["latency_ms"]["runs"] >= 10 and host["peak_rss_mb"] > host["baseline_rss_mb"] > 0
    assert raw["verdict"]["passed"] == m.passed
    assert "| budget |" in (out / "report.md").read_text()


@pytest.mark.slow
def test_classifier_fp32_on_an_estimated_target(tiny_bert_cls: Path, tmp_path: Path) -> None:
    m = edgecompress.build(tiny_bert_cls, target="raspberry-pi-5", recipe="fp32", out=tmp_path / "b")
    assert m.source["task"] == "text-classification"
    assert m.fidelity["metrics"]["top1_agreement"] == 1.0 and m.fidelity["metrics"]["kl_mean"] < 1e-6
    rows = {r.name: r for r in m.budgets}
    assert rows["latency_p90"].source == "estimated" and rows["peak_ram"].source == "estimated"
    assert "top1_agreement" in rows and "cosine_mean" not in rows
    assert "host" not in m.profile and m.profile["estimate"]["latency_ms"] > 0


@pytest.mark.slow
def test_failed_budget_exits_3_and_still_writes(tiny_bert: Path, tmp_path: Path) -> None:
    tight = tmp_path / "tight.toml"
    tight.write_text((REPO / "targets" / "host.toml").read_text().replace('name = "host"', 'name = "tight"')
                     .replace("max_size_mb = 100", "max_size_mb = 0.01"))
    out = tmp_path / "b"
    r = CliRunner().invoke(main, ["build", str(tiny_bert), "--target", str(tight), "--out", str(out),
                                  "--runs", "5"], catch_exceptions=False)
    assert r.exit_code == 3, r.output
    assert "budget failed" in r.stdout and "size" in r.stdout
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["verdict"]["passed"] is False
    assert manifest["verdict"]["failed"][0].startswith("size ")


@pytest.mark.slow
def test_ctrl_c_leaves_no_partial_out(tiny_bert: Path, tmp_path: Path) -> None:
    out = tmp_path / "parent" / "b"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "edgecompress.cli", "build", str(tiny_bert), "--target", "host",
                             "--out", str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            preexec_fn=sigint_default)
    deadline = time.time() + 120
    # wait until the build has started writing its staging dir, then interrupt it
    while time.time() < deadline and proc.poll() is None:
        if out.parent.exists() and any(p.name.startswith(".b.partial-") for p in out.parent.iterdir()):
            break
        time.sleep(0.05)
    assert proc.poll() is None, proc.communicate()
    ctrl_c_leaves_nothing(proc, out)
