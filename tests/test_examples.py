"""Every example in examples/ runs as a user would run it (a subprocess, its documented command line).

The semantic search example runs on the real MiniLM bundle; the chat loop on a tiny decoder bundle (the SmolLM2
bundle works the same and takes minutes to build); the sweep on a Dask LocalCluster with a tiny model.
"""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO

EXAMPLES = REPO / "examples"
ENV = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
DOCS = ["The cat sleeps on the warm windowsill all afternoon.",
        "Quarterly revenue grew by twelve percent on strong exports.",
        "To reset the router, hold the button on its back for ten seconds.",
        "The recipe needs two eggs, flour and a pinch of salt.",
        "Our dog loves chasing the ball in the park.",
        "The train to Lyon leaves from platform four at noon."]


def _run(args: list[str], **kw) -> subprocess.CompletedProcess[str]:  # type: ignore[no-untyped-def]
    return subprocess.run(args, capture_output=True, text=True, env={**ENV, **kw.pop("env", {})}, timeout=900, **kw)


def test_every_example_is_tested() -> None:
    tested = {"semantic_search.py", "chat.py", "targets/rk3588-board.toml", "ci_gate.sh", "dask_sweep.py"}
    present = {p.relative_to(EXAMPLES).as_posix() for p in EXAMPLES.rglob("*") if p.is_file()
               and "__pycache__" not in p.parts}
    assert present == tested


@pytest.mark.slow
def test_semantic_search_with_the_bundle_only(minilm_phone_bundle: Path, tmp_path: Path) -> None:
    corpus = tmp_path / "docs.txt"
    corpus.write_text("\n".join(DOCS) + "\n", encoding="utf-8")
    r = _run([sys.executable, str(EXAMPLES / "semantic_search.py"), str(minilm_phone_bundle), str(corpus),
              "how do I restart my wifi box?", "--top", "2"])
    assert r.returncode == 0, r.stderr
    top = [line.split("\t") for line in r.stdout.strip().splitlines()]
    assert len(top) == 2 and top[0][1] == DOCS[2], r.stdout
    assert 0 < float(top[1][0]) < float(top[0][0]) <= 1.0
    # the same on the ORT Mobile file, and without torch in the process
    probe = ("import runpy, sys; sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__'); "
             "assert 'torch' not in sys.modules, 'torch was imported'")
    r = _run([sys.executable, "-c", probe, str(EXAMPLES / "semantic_search.py"), str(minilm_phone_bundle),
              str(corpus), "pets at home", "--top", "2", "--model", "model.ort"])
    assert r.returncode == 0, r.stderr
    assert {line.split("\t")[1] for line in r.stdout.strip().splitlines()} == {DOCS[0], DOCS[4]}


@pytest.mark.slow
def test_semantic_search_vectors_are_sentence_transformers(minilm_phone_bundle: Path) -> None:
    """The example's own pooling reads the bundle's modules: its vectors are SentenceTransformer's."""
    sys.path.insert(0, str(EXAMPLES))
    try:
        from semantic_search import Embedder
    finally:
        sys.path.remove(str(EXAMPLES))
    from sentence_transformers import SentenceTransformer

    ours = Embedder(minilm_phone_bundle)(DOCS)
    theirs = SentenceTransformer(str(minilm_phone_bundle), backend="onnx").encode(DOCS)
    np.testing.assert_allclose(ours, theirs, atol=1e-5)


@pytest.mark.slow
def test_chat_loop_on_a_decoder_bundle(chat_llama: Path, chat_llama_bundle: Path) -> None:
    r = _run([sys.executable, str(EXAMPLES / "chat.py"), str(chat_llama_bundle), "--max-new-tokens", "5"],
             input="hello there\nand again\n\n")
    assert r.returncode == 0, r.stderr
    replies = [line.removeprefix("bot> ") for line in r.stdout.splitlines() if line.startswith("bot> ")]
    assert len(replies) == 2
    # greedy decoding with the KV cache gives what PyTorch's generate gives on the source model
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(chat_llama))
    ids = tok.apply_chat_template([{"role": "user", "content": "hello there"}], add_generation_prompt=True,
                                  return_tensors="pt")
    with torch.inference_mode():
        out = AutoModelForCausalLM.from_pretrained(str(chat_llama)).generate(ids, max_new_tokens=5, do_sample=False,
                                                                            eos_token_id=102)
    assert replies[0] == tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()


@pytest.mark.slow
def test_custom_target_toml(tiny_bert: Path, tmp_path: Path) -> None:
    toml = EXAMPLES / "targets" / "rk3588-board.toml"
    r = _run([sys.executable, "-m", "edgecompress.cli", "targets", "show", str(toml)])
    assert r.returncode == 0 and "rk3588-board" in r.stdout, r.stderr
    out = tmp_path / "b"
    r = _run([sys.executable, "-m", "edgecompress.cli", "build", str(tiny_bert), "--target", str(toml), "--out",
              str(out), "--recipe", "int8-dynamic", "--json"])
    assert r.returncode == 0, r.stderr
    import json

    m = json.loads((out / "manifest.json").read_text())
    assert m["target"]["name"] == "rk3588-board" and m["kernels"]["source"] in ("modelled", "emulated")


@pytest.mark.slow
def test_ci_gate_fails_the_pipeline_on_exit_code_3(tiny_bert: Path, tmp_path: Path) -> None:
    gate = [str(EXAMPLES / "ci_gate.sh"), str(tiny_bert), "--target", "host", "--recipe", "fp32", "--runs", "3"]
    env = {"EDGECOMPRESS": f"{sys.executable} -m edgecompress.cli"}
    ok = _run([*gate, "--out", str(tmp_path / "ok")], env=env)
    assert ok.returncode == 0 and "within every budget" in ok.stdout, ok.stderr
    tight = _run([*gate, "--out", str(tmp_path / "tight"), "--max-size-mb", "0.01"], env=env)
    assert tight.returncode == 3, tight.stderr
    assert "ci-gate: FAILED" in tight.stderr and "size" in tight.stderr.split("FAILED", 1)[1]
    assert (tmp_path / "tight" / "report.html").is_file()  # the bundle is still there to read
    bad = _run([*gate, "--out", str(tmp_path / "bad"), "--codebook-bits", "9"], env=env)
    assert bad.returncode == 2 and "did not complete (exit 2)" in bad.stderr


@pytest.mark.slow
def test_dask_sweep_on_a_local_cluster(tiny_bert: Path, tmp_path: Path) -> None:
    out = tmp_path / "sweep"
    r = _run([sys.executable, str(EXAMPLES / "dask_sweep.py"), "--models", str(tiny_bert), "--targets",
              "host,raspberry-pi-5", "--recipes", "fp32", "--out", str(out), "--local-workers", "2", "--runs", "3"])
    assert r.returncode == 0, r.stderr[-2000:]
    with (out / "results.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert sorted(row["target"] for row in rows) == ["host", "raspberry-pi-5"]
    assert all(row["status"] == "built" for row in rows)
    assert "host" in r.stdout  # summary.md printed
