"""The cacheable steps of a build: export, reference outputs, and the recipe's passes.

Each step's output is stored in the content-addressed cache (cache.py) under a key chained from its inputs, so a
second build of the same model (another target, another recipe sharing a prefix of passes) skips the work, and any
change to an input (weights, config, versions, calibration data, pass config, target facts) misses the cache.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import onnx

from edgecompress import export
from edgecompress.cache import Cache, digest
from edgecompress.errors import PassError
from edgecompress.model import load_model, save_model, sha256_file
from edgecompress.passes.base import ModelInfo, PassContext, skip_text
from edgecompress.progress import Progress
from edgecompress.recipes import Recipe
from edgecompress.tasks import TaskAdapter
from edgecompress.versions import cache_versions


def source_fingerprint(model_path: Path) -> dict[str, str]:
    """sha256 of every file that defines the source model (weights, config, tokenizer)."""
    if model_path.is_file():
        return {p.name: sha256_file(p) for p in export.weight_files(model_path)}
    return {str(p.relative_to(model_path)): sha256_file(p) for p in sorted(model_path.rglob("*"))
            if p.is_file() and not any(part.startswith(".") for part in p.relative_to(model_path).parts)}


@dataclass
class ExportStep:
    result: export.ExportResult
    key: str
    cached: bool


def run_export(cache: Cache, model_path: Path, info: ModelInfo, scratch: Path, progress: Progress,
               exporter: str = "optimum") -> ExportStep:
    """exporter: "optimum", or "genai" for the decoder fast path (edgecompress/genai: ORT GenAI's model builder)."""
    spec: dict[str, Any] = {"step": "export", "source": source_fingerprint(model_path), "task": info.task,
                            "versions": cache_versions()}
    if exporter == "genai":
        from edgecompress.genai.export import BUILDER_OPTIONS, genai_version
        from edgecompress.genai.graph import LAYOUT

        spec["exporter"] = {"name": "genai", "onnxruntime-genai": genai_version(), "options": list(BUILDER_OPTIONS),
                            "layout": LAYOUT}
    key = digest(spec)

    def fill(d: Path) -> None:
        details: dict[str, Any] = {}
        if exporter == "genai":
            from edgecompress import genai

            details = genai.export_genai(model_path, d)
            opset, seconds, output_name = details.pop("opset"), details.pop("seconds"), "logits"
        else:
            res = export.export_onnx(model_path, info, d)
            opset, seconds, output_name = res.opset, res.seconds, res.output_name
            if res.onnx_path.name != "model.onnx":  # a multi-file export (Whisper): its first component
                details["model_file"] = res.onnx_path.name
        (d / "export.json").write_text(json.dumps({"task": info.task, "opset": opset, "seconds": seconds,
                                                   "output_name": output_name, "exporter": exporter,
                                                   "details": details}))

    label = "export (ORT GenAI model builder: fused decoder graph)" if exporter == "genai" else "export (optimum)"
    with progress.step(label):
        entry, hit = cache.materialize("export", key, fill, scratch)
    meta = json.loads((entry / "export.json").read_text())
    model_file = meta.get("details", {}).get("model_file", "model.onnx")
    res = export.ExportResult(onnx_path=entry / model_file, task=meta["task"], opset=meta["opset"],
                              seconds=meta["seconds"], output_name=meta["output_name"],
                              files=sorted(p.name for p in entry.iterdir() if not p.name.startswith(".")),
                              exporter=meta.get("exporter", "optimum"), details=meta.get("details", {}))
    return ExportStep(res, key, hit)


def run_reference(cache: Cache, task: TaskAdapter, exp: ExportStep, scratch: Path,
                  progress: Progress) -> tuple[export.ExportCheck, bool]:
    key = digest({"step": "reference", "export": exp.key, "inputs": task.reference_id(), "versions": cache_versions()})

    def fill(d: Path) -> None:
        check = task.check_export(exp.result.onnx_path, progress)
        task.save_reference(d)
        (d / "check.json").write_text(json.dumps(asdict(check)))

    entry, hit = cache.materialize("reference", key, fill, scratch)
    if hit:
        task.load_reference(entry)
    return export.ExportCheck(**json.loads((entry / "check.json").read_text())), hit


def run_recipe(cache: Cache, recipe: Recipe, model: onnx.ModelProto, input_key: str, ctx: PassContext,
               scratch: Path, progress: Progress) -> tuple[onnx.ModelProto, list[dict[str, Any]], str]:
    """Apply the recipe's passes in order. Returns the model, one record per pass, and the chain's cache key."""
    records: list[dict[str, Any]] = []
    key = input_key
    for i, ps in enumerate(recipe.passes):
        key = digest({"step": "pass", "input": key, "pass": ps.describe(), "context": ps.cache_context(ctx),
                      "versions": cache_versions()})
        current = model

        def fill(d: Path, ps: Any = ps, current: onnx.ModelProto = current) -> None:
            t0 = time.perf_counter()
            result = ps.run(current, ctx)
            seconds = time.perf_counter() - t0
            save_model(result.model, d / "model.onnx")
            (d / "result.json").write_text(json.dumps({"report": result.report, "modified": result.modified,
                                                       "seconds": round(seconds, 3)}, default=str))

        with progress.step(f"pass {ps.name}"):
            entry, hit = cache.materialize("pass", key, fill, scratch / f"pass-{i}")
        res = json.loads((entry / "result.json").read_text())
        records.append({**ps.describe(), "report": res["report"], "modified": res["modified"],
                        "seconds": res["seconds"], "cached": hit})
        if recipe.quantizing and not res["modified"]:
            raise PassError(f"pass {ps.name} changed nothing: {skip_text(res['report']) or 'no reason given'}",
                            hint="this recipe does not apply to this model; try --recipe fp32")
        model = load_model(entry / "model.onnx")
    return model, records, key
