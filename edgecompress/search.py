"""`build --recipe auto`: find the recipe that fits a target's budgets, and say why the others did not.

1. Candidates: every applicable recipe and a grid of its options (codebook bits, pruning ratios, compositions);
   those that cannot help on the target (fp16 without fp16 arithmetic, int8 on providers without int8 kernels,
   CPU-only kernels on a GPU target) are left out with the reason.
2. Cheap predictions first: size, resident memory and roofline latency predicted from the FP32 graph at each
   candidate's weight precision; a candidate predicted to miss a budget by a clear margin is rejected unbuilt.
3. The rest are built (sharing the cached export and reference) and measured like any build.
4. The choice: the candidate within every budget with the best fidelity; ties go to the smaller, then the faster.
5. Every candidate, with its figures and why it was rejected or not chosen, goes into the manifest and report.

The grid, the predictions' weight bytes and the exclusions are read from the pass registry (passes/base.register:
`search`, `weight_bytes`, `requires`), never listed here. Layering: a client of pipeline (one recipe's build);
api.build_bundle dispatches `--recipe auto` here; pipeline never imports this module.
"""

from __future__ import annotations

import logging
import shutil
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import onnx

from edgecompress import steps
from edgecompress.bundle import StagedDir
from edgecompress.cache import Cache
from edgecompress.errors import BuildInterrupted, EdgeCompressError, UsageError
from edgecompress.manifest import Manifest
from edgecompress.passes.base import ModelInfo, WeightBytes
from edgecompress.pipeline import build, build_key, plan
from edgecompress.profiling.workload import Workload
from edgecompress.progress import NullProgress, Progress
from edgecompress.recipes import RECIPES, RecipeOptions, make_recipe
from edgecompress.targets import Target
from edgecompress.taskspec import METRICS, PRIMARY_METRIC

log = logging.getLogger(__name__)

# A prediction must miss a budget by this factor before a candidate is rejected unbuilt: predictions are rough.
PREDICTION_MARGIN = 1.25
# The share of a pruned model's fidelity gap (1 - figure) that distillation closes in its default time, measured:
# benchmarks/results/pruning_distill.md, 0.9617 -> 0.9704 at 25.8% of FLOPs (23%), 0.9505 -> 0.9606 at 25.2% (20%).
# A pruned candidate that misses only fidelity floors is distilled when the floor is within this reach.
DISTILL_REACH = 0.25


@dataclass(frozen=True)
class Candidate:
    recipe: str
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        opts = ",".join(f"{k.replace('_', '-')}={v}" for k, v in sorted(self.options.items()))
        return f"{self.recipe}[{opts}]" if opts else self.recipe


def grid() -> tuple[Candidate, ...]:
    """(recipe, knobs) to try, in order, from the registry: each recipe's declared search values (recipes in
    their registered order), then each structural pass's values composed with the recipes it names."""
    from edgecompress.recipes import RECIPES, structural_classes

    out = [Candidate(spec.name, dict(knobs)) for spec in RECIPES.values() for knobs in spec.search]
    for cls in structural_classes():
        reg = cls.registration
        assert reg is not None
        out += [Candidate(recipe, {**knobs, **own}) for own in reg.search for recipe, knobs in reg.compose
                if recipe in RECIPES]
    return tuple(out)


def candidates(task: str, target: Target, max_candidates: int | None = None, info: ModelInfo | None = None
               ) -> tuple[list[Candidate], list[dict[str, str]]]:
    """(candidates to consider, excluded ones with the reason)."""
    keep: list[Candidate] = []
    excluded: list[dict[str, str]] = []
    for c in grid():
        spec = RECIPES[c.recipe]
        if task not in spec.tasks:
            why = spec.refusals.get(task)  # the recipe's own reason
            excluded.append({"candidate": c.name,
                             "reason": f"does not apply to {task} models" + (f": {why}" if why else "")})
            continue
        if (why := spec.requires(target, info)) is not None:
            excluded.append({"candidate": c.name, "reason": why})
            continue
        try:
            make_recipe(c.recipe, RecipeOptions(**c.options), task=task)
        except EdgeCompressError as e:
            excluded.append({"candidate": c.name, "reason": e.one_line()})
            continue
        keep.append(c)
    if max_candidates is not None and len(keep) > max_candidates:
        for c in keep[max_candidates:]:
            excluded.append({"candidate": c.name, "reason": f"beyond --max-candidates {max_candidates}"})
        keep = keep[:max_candidates]
    return keep, excluded


@dataclass
class Prediction:
    size_mb: float
    resident_mb: float
    latency_ms: float | None
    # decoders: the bandwidth-bound decode and compute-bound prefill estimate (profiling/decoder.py)
    decode_tok_s: float | None = None
    ttft_ms: float | None = None


def _weight_params(model: onnx.ModelProto) -> tuple[int, int, int]:
    """(MatMul/Gemm weight params, Gather table params, other initializer params)."""
    inits = {i.name: i for i in model.graph.initializer}

    def n(name: str) -> int:
        size = 1
        for d in inits[name].dims:
            size *= d
        return size

    mm = {i for node in model.graph.node if node.op_type in ("MatMul", "Gemm") for i in node.input[1:2] if i in inits}
    ga = {node.input[0] for node in model.graph.node if node.op_type == "Gather" and node.input[0] in inits}
    total = sum(n(i) for i in inits)
    mm_n, ga_n = sum(n(i) for i in mm), sum(n(i) for i in ga - mm)
    return mm_n, ga_n, total - mm_n - ga_n


def predict(c: Candidate, fp32: onnx.ModelProto, target: Target, workload: Workload) -> Prediction:
    """Size, memory and latency before building, from the candidate's weight bytes on the task's workload."""
    mm, ga, other = _weight_params(fp32)
    keep = 1.0 - 0.5 * float(c.options.get("prune_ffn", 0.0))  # FFN is about half of a transformer's matmuls
    wb = RECIPES[c.recipe].bytes_for(c.options) if c.recipe in RECIPES else None
    wb = wb or WeightBytes(4.0, 4.0, "fp32")
    precision = wb.precision
    if wb.resident is not None:  # codebooks: one rate on disk, another once decoded at load
        disk = (mm * keep + ga) * wb.matmul + other * 4
        resident = (mm * keep + ga) * wb.resident + other * 4
    else:
        disk = resident = mm * keep * wb.matmul + ga * wb.gather + other * 4
    from edgecompress.profiling import predict_from_weights
    from edgecompress.profiling.cost import NodeCost, node_costs

    def costs() -> list[NodeCost]:  # the FP32 graph's costs at the candidate's weight precision and pruning
        return [NodeCost(nc.name, nc.op_type, precision if nc.is_matmul and nc.weight_bytes else nc.precision,
                         nc.flops * (keep if nc.is_matmul and nc.weight_bytes else 1.0), nc.bytes, nc.weight_bytes,
                         nc.is_matmul) for nc in node_costs(fp32, workload.dims)]

    p = predict_from_weights(workload, target, resident_bytes=resident, params=mm * keep + ga + other,
                             forward_costs=costs)
    return Prediction(disk / 1e6, p.resident_mb, p.latency_ms, p.decode_tok_s, p.ttft_ms)


def _predicted_misses(p: Prediction, target: Target) -> list[tuple[str, float]]:
    """(text, value/limit) for each budget the prediction misses by more than the margin."""
    b = target.budgets
    checks = [(p.size_mb, b.max_size_mb, "size", "MB"), (p.resident_mb, b.max_peak_ram_mb, "peak RAM", "MB")]
    if p.latency_ms is not None and not target.host:  # the host is measured, never predicted
        checks.append((p.latency_ms, b.max_latency_p90_ms, "p90", "ms"))
    if p.ttft_ms is not None and b.max_ttft_ms is not None and not target.host:
        checks.append((p.ttft_ms, b.max_ttft_ms, "time to first token", "ms"))
    misses = [(f"predicted {name} {value:.3g} {unit} > {limit:g} {unit} budget", value / limit)
              for value, limit, name, unit in checks if value > limit * PREDICTION_MARGIN]
    if p.decode_tok_s is not None and b.min_decode_tok_s is not None and not target.host \
            and p.decode_tok_s * PREDICTION_MARGIN < b.min_decode_tok_s:  # a floor
        misses.append((f"predicted decode {p.decode_tok_s:.3g} tok/s < {b.min_decode_tok_s:g} tok/s budget",
                       b.min_decode_tok_s / p.decode_tok_s))
    return misses


# A metric's tie-breaker before size: decoders with equal perplexity ratios go by next-token agreement.
SECONDARY_METRIC = {"perplexity_ratio": "next_token_top1"}


def _rank_key(m: Manifest, metric: str) -> tuple[float, float, float, float]:
    """Sort key: best fidelity first (to 4 decimals: closer is a tie), then the secondary metric if the primary
    has one, then smaller, then faster."""

    def best_first(name: str) -> float:
        value = m.fidelity["metrics"].get(name)
        if value is None:
            return 0.0
        return -round(value if METRICS[name].higher_is_better else -value, 4)

    second = SECONDARY_METRIC.get(metric)
    latency = next((r.value for r in m.budgets if r.name == "latency_p90" and r.value is not None), float("inf"))
    return (best_first(metric), best_first(second) if second else 0.0, m.artifact.size_bytes, latency)


def _closeness(m: Manifest) -> tuple[int, float]:
    """How near a failing candidate came: fewer failed budgets, then the smallest relative miss."""
    misses = []
    for r in m.failed_budgets:
        if r.value is None or r.limit == 0:
            misses.append(float("inf"))
        else:
            misses.append(abs(r.value - r.limit) / abs(r.limit))
    return (len(misses), max(misses, default=0.0))


def auto_key(opts: Any, max_candidates: int | None = None) -> str:
    """The build key of an auto search: the inputs plus the candidates it would consider."""
    base = plan(replace(opts, recipe="fp32", force=True))
    cands, excluded = candidates(base.info.task, base.target, max_candidates)
    return build_key(base, opts, recipe={"name": "auto", "candidates": [c.name for c in cands],
                                         "excluded": excluded, "margin": PREDICTION_MARGIN})


def build_auto(opts: Any, progress: Progress | None = None, *, max_candidates: int | None = None,
               time_budget_s: float | None = None, keep_best: bool = False) -> Manifest:
    """Search, build the winner into opts.out; raises NothingFits (exit 3) when no candidate meets every budget."""
    progress = progress or NullProgress()
    t_start = time.perf_counter()
    base = plan(replace(opts, recipe="fp32"))  # validates model, target, texts and --out before any work
    key = auto_key(opts, max_candidates)
    target, info = base.target, base.info
    metric = PRIMARY_METRIC[info.task]
    cands, excluded = candidates(info.task, target, max_candidates, info)
    if not cands:
        raise UsageError(f"no recipe can run on {target.name} for this model",
                         hint="; ".join(f"{e['candidate']}: {e['reason']}" for e in excluded) or None)

    cache = Cache(enabled=opts.cache)
    records: list[dict[str, Any]] = [{"candidate": e["candidate"], "status": "excluded", "reason": e["reason"]}
                                     for e in excluded]
    built: list[tuple[Candidate, Manifest]] = []
    try:
        with StagedDir(base.out, opts.force) as stage:
            exported = steps.run_export(cache, base.model_dir, info, stage.path / "_work" / "export", progress)
            fp32 = onnx.load(str(exported.result.onnx_path))
            from edgecompress.tasks import TaskInputs, make_task, workload_for

            workload = workload_for(make_task(info, TaskInputs(base.model_dir, exported.result.onnx_path.parent,
                                                               [i.name for i in fp32.graph.input], base.eval_texts,
                                                               base.calibration_texts)), target)
            todo, rejected = [], []
            for c in cands:
                pred = predict(c, fp32, target, workload)
                rec = {"candidate": c.name, "recipe": c.recipe, "options": c.options, "prediction": asdict(pred)}
                if misses := _predicted_misses(pred, target):
                    rejected.append((max(m[1] for m in misses), c, rec, "; ".join(m[0] for m in misses)))
                else:
                    todo.append((c, rec))
            del fp32
            rejected.sort(key=lambda r: r[0])
            # --keep-best with nothing predicted to fit: build the nearest misses, in order, until one builds
            fallback = not todo and bool(rejected) and keep_best
            if fallback:
                todo = [(c, {**rec, "note": f"built despite the prediction (--keep-best): {why}"})
                        for _, c, rec, why in rejected]
                rejected = []
            if not todo and rejected:
                _, c, _, why = rejected[0]
                raise NothingFits(target.name, c.name, why)
            records += [{**rec, "status": "rejected before building", "reason": why} for _, _, rec, why in rejected]
            for c, rec in todo:
                if fallback and built:  # one bundle to keep is enough
                    records.append({**rec, "status": "rejected before building", "reason": rec["note"]})
                    continue
                if time_budget_s is not None and time.perf_counter() - t_start > time_budget_s:
                    records.append({**rec, "status": "not built", "reason": f"--time-budget {time_budget_s:g} s spent"})
                    continue
                cand_out = stage.path / "_candidates" / c.name.replace("/", "_")
                t_cand = time.perf_counter()
                try:
                    with progress.step(f"candidate {c.name}"):
                        m = build(replace(opts, recipe=c.recipe, out=cand_out, force=True,
                                          recipe_options=RecipeOptions(**c.options)))
                except BuildInterrupted:
                    raise
                except EdgeCompressError as e:
                    records.append({**rec, "status": "failed", "reason": e.one_line()})
                    continue
                built.append((c, m))
                records.append({**rec, "status": "built", "passed": m.passed, "fidelity": m.fidelity["metrics"],
                                "size_mb": m.artifact.size_mb, "seconds": round(time.perf_counter() - t_cand, 1),
                                "budgets": [r.as_dict() for r in m.budgets],
                                "reason": "" if m.passed else "; ".join(r.miss() for r in m.failed_budgets)})
            # second round, only when nothing fits: distil the pruned candidates that missed only fidelity
            if not any(m.passed for _, m in built):
                for c, m in list(built):
                    d, why = distill_retry(c, m.failed_budgets)
                    rec = next(r for r in records if r["candidate"] == c.name)
                    if why and d is None:
                        rec["distill"] = why
                    if d is None:
                        continue
                    drec = {"candidate": d.name, "recipe": d.recipe, "options": d.options, "round": "distillation",
                            "why_tried": why}
                    if time_budget_s is not None and time.perf_counter() - t_start > time_budget_s:
                        records.append({**drec, "status": "not built",
                                        "reason": f"--time-budget {time_budget_s:g} s spent"})
                        continue
                    t_cand = time.perf_counter()
                    try:
                        with progress.step(f"candidate {d.name} (distillation)"):
                            dm = build(replace(opts, recipe=d.recipe, force=True,
                                               out=stage.path / "_candidates" / d.name.replace("/", "_"),
                                               recipe_options=RecipeOptions(**d.options)))
                    except BuildInterrupted:
                        raise
                    except EdgeCompressError as e:
                        records.append({**drec, "status": "failed", "reason": e.one_line(),
                                        "seconds": round(time.perf_counter() - t_cand, 1)})
                        continue
                    built.append((d, dm))
                    records.append({**drec, "status": "built", "passed": dm.passed,
                                    "fidelity": dm.fidelity["metrics"], "size_mb": dm.artifact.size_mb,
                                    "budgets": [r.as_dict() for r in dm.budgets],
                                    "seconds": round(time.perf_counter() - t_cand, 1),
                                    "reason": "" if dm.passed else "; ".join(r.miss() for r in dm.failed_budgets)})
            fitting = sorted((bm for bm in built if bm[1].passed), key=lambda bm: _rank_key(bm[1], metric))
            if fitting:
                chosen, why = fitting[0], f"meets every budget with the best {metric}"
            elif built:
                chosen = min(built, key=lambda bm: (_closeness(bm[1]), _rank_key(bm[1], metric)))
                why = "closest to the budgets (nothing fits)"
            else:
                raise UsageError("no candidate could be built",
                                 hint="; ".join(f"{r['candidate']}: {r['reason']}" for r in records)[:500])
            for r in records:
                if r["status"] == "built":
                    if r["candidate"] == chosen[0].name:
                        r["chosen"], r["why"] = True, why
                    elif r["passed"]:
                        r["why"] = f"fits, but ranks lower on {metric} / size / latency"
            search = {"metric": metric, "chosen": chosen[0].name, "why": why,
                      "candidates": records, "seconds": round(time.perf_counter() - t_start, 1),
                      "max_candidates": max_candidates, "time_budget_s": time_budget_s,
                      "prediction_margin": PREDICTION_MARGIN}
            manifest = chosen[1]
            manifest.build_key = key
            if not manifest.passed and not keep_best:
                raise NothingFits(target.name, chosen[0].name, _misses(manifest), manifest, search)
            _promote(stage.path, chosen[0], manifest, search, base.out)
            manifest.search = search
            stage.commit()
    except KeyboardInterrupt:
        raise BuildInterrupted("interrupted: nothing was written") from None
    if not manifest.passed:
        raise NothingFits(target.name, chosen[0].name, _misses(manifest), manifest, search, written=True)
    return manifest


def distill_retry(c: Candidate, failed: list[Any]) -> tuple[Candidate | None, str]:
    """(the distilled variant of a built, pruned candidate, why) when it missed only fidelity floors and each floor
    is within distillation's measured reach; (None, why not) otherwise ("" when distillation does not apply)."""
    if not (c.options.get("prune_ffn") or c.options.get("prune_heads")) or c.options.get("prune_recovery") == "distill":
        return None, ""
    if not failed or any(r.name not in METRICS or r.comparison != ">=" or r.value is None for r in failed):
        return None, ""  # a size, memory or latency miss: more training does not change those
    need = max((r.limit - r.value) / max(1.0 - r.value, 1e-9) for r in failed)
    if need > DISTILL_REACH:
        return None, (f"distillation not tried: the floor needs {need:.0%} of the fidelity gap closed; distillation "
                      f"closes about {DISTILL_REACH:.0%} (benchmarks/results/pruning_distill.md)")
    return (Candidate(c.recipe, {**c.options, "prune_recovery": "distill"}),
            f"{c.name} missed only fidelity, by {need:.0%} of its gap: within distillation's reach")


def _misses(m: Manifest) -> str:
    return "; ".join(r.miss() for r in m.failed_budgets)


def _promote(stage: Path, chosen: Candidate, manifest: Manifest, search: dict[str, Any], out: Path) -> None:
    """Move the chosen candidate's bundle to the stage root and rewrite its manifest/report with the search."""
    from edgecompress.report import render_html, render_markdown

    src = stage / "_candidates" / chosen.name.replace("/", "_")
    for f in src.iterdir():
        shutil.move(str(f), stage / f.name)
    shutil.rmtree(stage / "_candidates", ignore_errors=True)
    shutil.rmtree(stage / "_work", ignore_errors=True)
    manifest.search = search
    manifest.bundle_dir = str(out.absolute())
    manifest.recipe = {**manifest.recipe, "searched": True}
    (stage / "manifest.json").write_text(manifest.to_json(), encoding="utf-8")
    (stage / "report.md").write_text(render_markdown(manifest), encoding="utf-8")
    (stage / "report.html").write_text(render_html(manifest), encoding="utf-8")  # now with the Pareto plot


class NothingFits(EdgeCompressError):
    """No candidate met every budget: exit 3, naming the closest and what it misses by."""

    exit_code = 3

    def __init__(self, target: str, closest: str, misses: str, manifest: Manifest | None = None,
                 search: dict[str, Any] | None = None, written: bool = False) -> None:
        super().__init__(f"no recipe fits {target}: the closest is {closest}: {misses}",
                         hint=("the closest bundle was written (--keep-best)" if written
                               else "pass --keep-best to write the closest bundle anyway"))
        self.args_ = (target, closest, misses, manifest, search, written)
        self.manifest = manifest
        self.search = search
        self.written = written

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), self.args_)
