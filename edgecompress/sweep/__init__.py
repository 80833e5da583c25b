"""`edgecompress sweep`: build models × targets × recipes as independent jobs on an executor.

Each job writes its bundle under the sweep's output dir and returns only its manifest summary. A failed job is a
row with its one-line error; it never stops the others. A job whose bundle already carries the same build key is
skipped, so rerunning a sweep resumes it.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from edgecompress.errors import ConfigError, EdgeCompressError, UsageError
from edgecompress.sweep.executors import Executor, Outcome, make_executor

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class JobSpec:
    model: str | None  # a path, or None for the bundled model
    model_name: str
    target: str
    recipe: str
    out: str
    key: str
    runs: int = 10
    eval: str | None = None
    calibration: str | None = None
    text_column: str | None = None

    @property
    def name(self) -> str:
        return Path(self.out).name


@dataclass
class JobResult:
    job: str
    model: str
    target: str
    recipe: str
    status: str  # built | skipped | failed
    seconds: float = 0.0
    passed: bool | None = None
    error: str = ""
    summary: dict[str, Any] = field(default_factory=dict)

    def row(self) -> dict[str, Any]:
        """A flat row for results.csv."""
        s = self.summary
        budgets = {b["name"]: b for b in s.get("budgets", [])}
        fid = s.get("fidelity", {})
        return {
            "job": self.job, "model": self.model, "target": self.target, "recipe": self.recipe,
            "chosen_recipe": s.get("recipe", ""), "status": self.status, "passed": self.passed,
            "size_mb": s.get("artifact", {}).get("size_mb"),
            "peak_ram_mb": budgets.get("peak_ram", {}).get("value"),
            "peak_ram_source": budgets.get("peak_ram", {}).get("source"),
            "latency_p90_ms": budgets.get("latency_p90", {}).get("value"),
            "latency_source": budgets.get("latency_p90", {}).get("source"),
            # decoders: generation speed and time to first token (empty for encoders)
            "decode_tok_s": budgets.get("decode_tok_s", {}).get("value"),
            "ttft_ms": budgets.get("ttft", {}).get("value"),
            "fidelity_metric": next(iter(fid), None), "fidelity": next(iter(fid.values()), None),
            "failed_budgets": "; ".join(s.get("failed", [])), "seconds": round(self.seconds, 2),
            "error": self.error,
        }


def _options(spec: JobSpec, force: bool, threads: int | None = None) -> Any:
    from edgecompress.pipeline import BuildOptions

    return BuildOptions(model=Path(spec.model) if spec.model else None, target=spec.target, recipe=spec.recipe,
                        out=Path(spec.out), eval=Path(spec.eval) if spec.eval else None,
                        calibration=Path(spec.calibration) if spec.calibration else None,
                        text_column=spec.text_column, force=force, runs=spec.runs, threads=threads)


def run_job(spec: JobSpec) -> dict[str, Any]:
    """Runs on a worker: build one bundle, return its manifest summary (budget failures are not errors)."""
    from edgecompress.api import build_bundle
    from edgecompress.search import NothingFits

    threads = int(os.environ.get("EDGECOMPRESS_JOB_THREADS", "0")) or None
    opts = _options(spec, force=True, threads=threads)
    try:  # auto: keep the closest bundle, a sweep reports what fits and what does not
        manifest = build_bundle(opts, keep_best=spec.recipe == "auto")
    except NothingFits as e:
        if e.manifest is None:
            raise
        manifest = e.manifest
    return job_summary(manifest)


def plan_jobs(models: list[str | None], targets: list[str], recipes: list[str], out: Path, *, runs: int,
              eval_file: Path | None = None, calibration: Path | None = None,
              text_column: str | None = None) -> list[JobSpec]:
    """Validate every combination up front (cheaply) and compute each job's build key."""
    from edgecompress.api import bundle_key
    from edgecompress.pipeline import BuildOptions, resolve_model

    jobs = []
    for model in models:
        model_path, model_name = resolve_model(model)
        for target in targets:
            for recipe in recipes:
                job_out = out / f"{model_name}-{target}-{recipe}"
                spec = JobSpec(model=str(model_path) if model else None, model_name=model_name, target=target,
                               recipe=recipe, out=str(job_out), key="", runs=runs,
                               eval=str(eval_file) if eval_file else None,
                               calibration=str(calibration) if calibration else None, text_column=text_column)
                opts: BuildOptions = _options(spec, force=True)
                try:
                    key = bundle_key(opts)
                except EdgeCompressError as e:
                    key = f"invalid: {e.one_line()}"  # reported as this job's failure, others go on
                jobs.append(JobSpec(**{**asdict(spec), "key": key}))
    return jobs


def _existing(spec: JobSpec) -> dict[str, Any] | None:
    manifest = Path(spec.out) / "manifest.json"
    if not manifest.is_file():
        return None
    try:
        data = json.loads(manifest.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if data.get("build_key") != spec.key:
        return None
    from edgecompress.manifest import Manifest

    return job_summary(Manifest.from_dict(data))


@dataclass
class SweepResult:
    out: str
    executor: str
    results: list[JobResult]
    seconds: float
    files: list[str]

    @property
    def failed(self) -> list[JobResult]:
        return [r for r in self.results if r.status == "failed"]


def sweep(models: list[str | None], targets: list[str], recipes: list[str], out: Path, *,
          executor: str = "local", workers: int | None = None, runs: int = 10, eval_file: Path | None = None,
          calibration: Path | None = None, text_column: str | None = None,
          on_result: Callable[[JobResult], None] | None = None) -> SweepResult:
    from edgecompress.sweep.results import write_results
    from edgecompress.versions import library_versions

    if not models or not targets or not recipes:
        raise UsageError("a sweep needs at least one model, one target and one recipe")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file, not a directory", hint="choose a directory path")
    check_sweep_inputs(models, targets, recipes, executor=executor, workers=workers, runs=runs,
                       eval_file=eval_file, calibration=calibration, text_column=text_column)
    check_sweep_out(out)
    t0 = time.perf_counter()
    jobs = plan_jobs(models, targets, recipes, out, runs=runs, eval_file=eval_file, calibration=calibration,
                     text_column=text_column)
    ex: Executor = make_executor(executor, workers)
    results: list[JobResult] = []

    def record(r: JobResult) -> None:
        results.append(r)
        if on_result:
            on_result(r)

    try:
        if hasattr(ex, "check_versions"):
            v = library_versions()
            ex.check_versions({"edgecompress": v["edgecompress"], "onnxruntime": v["onnxruntime"]})
        out.mkdir(parents=True, exist_ok=True)
        (out / SWEEP_MARKER).touch()
        started: dict[str, float] = {}
        for spec in jobs:
            base = JobResult(spec.name, spec.model_name, spec.target, spec.recipe, status="")
            if spec.key.startswith("invalid: "):
                record(JobResult(**{**asdict(base), "status": "failed", "error": spec.key[len("invalid: "):]}))
                continue
            if (existing := _existing(spec)) is not None:
                record(JobResult(**{**asdict(base), "status": "skipped", "passed": existing["passed"],
                                    "summary": existing}))
                continue
            started[spec.name] = time.perf_counter()
            ex.submit(run_job, spec, tag=spec)
        for outcome in ex.as_completed():
            record(_result(outcome, started))
    finally:
        ex.close()
    results.sort(key=lambda r: (r.model, r.target, r.recipe))
    files = write_results(out, results)
    return SweepResult(str(out), ex.name, results, time.perf_counter() - t0, files)


SWEEP_MARKER = ".edgecompress-sweep"  # written into --out: a sweep resumes there and rewrites its results files


def check_sweep_out(out: Path) -> None:
    """A sweep writes results.csv, summary.md, plots and one bundle per job into --out: only into a new or empty
    directory or one a sweep made (its marker, or results.json from an older version), never over a user's files."""
    if out.is_symlink():
        raise UsageError(f"--out {out} is a symlink", hint="give the directory itself")
    if not out.is_dir() or (out / SWEEP_MARKER).is_file() or (out / "results.json").is_file():
        return
    if any(out.iterdir()):
        raise UsageError(f"--out {out} is a non-empty directory that no sweep wrote",
                         hint="give a new or empty directory, or the --out of an earlier sweep to resume it")


def check_sweep_inputs(models: list[str | None], targets: list[str], recipes: list[str], *, executor: str,
                       workers: int | None, runs: int, eval_file: Path | None, calibration: Path | None,
                       text_column: str | None) -> None:
    """What every job shares, checked once before anything is written: a bad --eval or target is a usage error
    (exit 2), not the same failure repeated in every job."""
    from edgecompress.calibration import load_texts
    from edgecompress.inputs import MAX_RUNS, MAX_THREADS, check_int
    from edgecompress.recipes import RECIPES
    from edgecompress.sweep.executors import check_executor
    from edgecompress.targets import load_target

    check_int("--runs", runs, 1, MAX_RUNS)
    if workers is not None:
        check_int("--workers", workers, 1, MAX_THREADS)
    check_executor(executor)
    for what, items in (("models", [str(m) for m in models]), ("targets", targets), ("recipes", recipes)):
        dup = next((x for i, x in enumerate(items) if x in items[:i]), None)
        if dup is not None:
            raise ConfigError(f"--{what} names '{dup}' twice", hint="give each once")
    for r in recipes:
        if r != "auto" and r not in RECIPES:
            raise ConfigError(f"unknown recipe '{r}'", hint=f"known: {', '.join(RECIPES)}, auto")
    for t in targets:
        load_target(t)
    from edgecompress.llm import SMOLLM2_ALIASES
    from edgecompress.pipeline import BUNDLED_ALIASES

    for m in models:
        if m is not None and m not in BUNDLED_ALIASES + SMOLLM2_ALIASES and not Path(m).exists():
            raise ConfigError(f"model not found: {m}", hint="give a model directory, a .onnx or .gguf file, or "
                                                            "minilm / smollm2")
    for f in (eval_file, calibration):
        if f is not None:
            load_texts(f, text_column)


def job_summary(m: Any) -> dict[str, Any]:
    """What a job returns: the manifest summary, its build key, and for `auto` the search's choice and time."""
    out = {**m.summary(), "build_key": m.build_key}
    if m.search:
        out["search"] = {"chosen": m.search.get("chosen"), "seconds": m.search.get("seconds"),
                         "candidates": [{"candidate": c["candidate"], "status": c["status"]}
                                        for c in m.search.get("candidates", [])]}
    return out


def _result(o: Outcome, started: dict[str, float]) -> JobResult:
    spec: JobSpec = o.tag
    seconds = time.perf_counter() - started.get(spec.name, time.perf_counter())
    if o.error is not None:
        err = o.error.one_line() if isinstance(o.error, EdgeCompressError) else (
            f"{type(o.error).__name__}: {str(o.error).strip().splitlines()[0] if str(o.error).strip() else ''}")
        return JobResult(spec.name, spec.model_name, spec.target, spec.recipe, "failed", seconds, error=err)
    return JobResult(spec.name, spec.model_name, spec.target, spec.recipe, "built", seconds,
                     passed=o.value["passed"], summary=o.value)


def parse_list(text: str, everything: list[str], what: str) -> list[str]:
    if text.strip() == "all":
        return everything
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items:
        raise ConfigError(f"no {what} given", hint=f"a comma-separated list, or all ({', '.join(everything)})")
    return items
