"""Export a decoder with ORT GenAI's model builder (fp32), as edgecompress's passes and runtime checks read it."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from edgecompress import taskspec
from edgecompress.errors import ExportError

# Verified end to end here (export parity, int4 pass, the GenAI runtime's greedy output). The builder supports
# more (Qwen2, Mistral, Phi-3, Gemma): they take optimum's export until they are tested the same way.
FAST_PATH_ARCHITECTURES = ("LlamaForCausalLM",)
# Passes that work on the builder's graph; any other pass in the recipe (prune, low-rank, codebook) pattern-matches
# optimum's graph, so such a recipe takes optimum's export.
FAST_PATH_PASSES = frozenset({"decoder-int4"})
GENAI_EXTRA_HINT = 'pip install "edgecompress[genai]"'
# EDGECOMPRESS_DECODER_EXPORTER=optimum forces the fallback (benchmarks compare both graphs)
ENV = "EDGECOMPRESS_DECODER_EXPORTER"
# gate and up projections as one MatMul (+ Split): one 4-bit kernel and one offset term instead of two
BUILDER_OPTIONS = ("fuse_mlp_gate_up=true",)


def genai_version() -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("onnxruntime-genai")
    except PackageNotFoundError:
        return None


def choose_exporter(task: str, architecture: str, pass_names: list[str]) -> tuple[str, str]:
    """("genai" | "optimum", why) for a build."""
    spec = taskspec.spec(task)
    if spec is None or not spec.genai:  # the task's adapter says whether ORT GenAI applies (causal LMs)
        return "optimum", "not a decoder"
    forced = os.environ.get(ENV, "").strip().lower()
    if forced == "optimum":
        return "optimum", f"{ENV}=optimum"
    if architecture not in FAST_PATH_ARCHITECTURES:
        return "optimum", (f"{architecture} is not on the fast path (verified: {', '.join(FAST_PATH_ARCHITECTURES)})")
    other = [p for p in pass_names if p not in FAST_PATH_PASSES]
    if other:
        return "optimum", f"pass {other[0]} works on optimum's graph only"
    if importlib.util.find_spec("onnxruntime_genai") is None:
        return "optimum", f"onnxruntime-genai is not installed ({GENAI_EXTRA_HINT})"
    return "genai", "fused graph from ORT GenAI's model builder"


def export_genai(model_dir: Path, out_dir: Path) -> dict[str, Any]:
    """The builder's fp32 graph in out_dir/model.onnx (one file), with config, tokenizer and genai_config.json.

    Returns what the export step records: opset, seconds, what was adjusted and why."""
    import onnx

    from edgecompress.genai.graph import optimum_tied_layout, static_kv_head_dim
    from edgecompress.model import save_model

    t0 = time.perf_counter()
    out_dir.mkdir(parents=True, exist_ok=True)
    raw = out_dir / ".builder"
    cmd = [sys.executable, "-m", "edgecompress.genai._builder_main", "-i", str(model_dir), "-o", str(raw),
           "-p", "fp32", "-e", "cpu", "-c", str(out_dir / ".builder-cache"),
           "--extra_options", "hf_token=false", *BUILDER_OPTIONS]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    log = out_dir / ".builder.log"
    with log.open("w") as fh:
        rc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, check=False).returncode
    if rc != 0 or not (raw / "model.onnx").is_file():
        lines = [ln for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
        raise ExportError(f"ORT GenAI's model builder failed on {model_dir}: {lines[-1] if lines else rc}",
                          hint=f"{ENV}=optimum exports with optimum instead")
    model = onnx.load(str(raw / "model.onnx"))  # and its external data
    genai_config = json.loads((raw / "genai_config.json").read_text())
    head_size = int(genai_config["model"]["decoder"]["head_size"])
    model, tied = optimum_tied_layout(model)
    static = static_kv_head_dim(model, head_size)
    save_model(model, out_dir / "model.onnx")
    for f in raw.iterdir():
        if f.is_file() and not f.name.startswith("model.onnx"):
            shutil.copy2(f, out_dir / f.name)
    for name in ("config.json", "generation_config.json"):  # the bundle's decoder profile reads config.json
        if (model_dir / name).is_file():
            shutil.copy2(model_dir / name, out_dir / name)
    from edgecompress.genai.bundle import genai_tokenizer

    tokenizer = genai_tokenizer(out_dir)
    shutil.rmtree(raw, ignore_errors=True)
    shutil.rmtree(out_dir / ".builder-cache", ignore_errors=True)
    log.unlink(missing_ok=True)
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    ops: dict[str, int] = {}
    for n in model.graph.node:
        ops[n.op_type] = ops.get(n.op_type, 0) + 1
    return {"opset": opset, "seconds": time.perf_counter() - t0, "builder": f"onnxruntime-genai {genai_version()}",
            "builder_options": ["precision=fp32", *BUILDER_OPTIONS], "nodes": len(model.graph.node),
            "op_types": dict(sorted(ops.items(), key=lambda kv: -kv[1])), "tied_embedding": tied,
            "kv_head_dim_static": static, "tokenizer": tokenizer}
