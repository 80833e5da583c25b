"""Benchmark: how far the roofline estimate is from a measurement, on this host, over models x recipes.

For each model x recipe it builds the bundle (target host), then measures latency on this host with one thread
(the runner in a fresh process, rounds interleaved across bundles because this machine is shared and noisy) and
estimates it for the same host with one thread. It reports the error of

- the plain roofline (the target file's efficiency factors), and
- the calibrated roofline: x the per-profile factor (median measured/roofline of that precision profile), where
  each point is predicted with the factor from the OTHER models only (leave-one-model-out), so no point is
  predicted from its own measurement.

Goal: calibrated median |error| <= 25%. The factors from all points are printed for estimate.HOST_CALIBRATION.

    python benchmarks/estimator_error.py [--rounds 3]      # or: make bench-estimate
Writes benchmarks/results/estimator_error.json and benchmarks/results/estimator_error.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

RESULTS = Path(__file__).resolve().parent / "results"
RECIPES = ("fp32", "int8-dynamic", "int4")
TOKENIZER_FILES = ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def random_bert(path: Path, layers: int, hidden: int, heads: int) -> Path:
    """A randomly initialised BERT with the bundled model's tokenizer: real shapes, nothing downloaded."""
    import torch
    from transformers import BertConfig, BertModel

    from edgecompress.pipeline import bundled_model_path

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=30522, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                     intermediate_size=4 * hidden, max_position_embeddings=512)
    BertModel(cfg).save_pretrained(path)
    for name in TOKENIZER_FILES:
        if (bundled_model_path() / name).is_file():
            shutil.copy(bundled_model_path() / name, path / name)
    return path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3, help="interleaved measurement rounds per bundle")
    args = ap.parse_args()

    import edgecompress
    from edgecompress.profiling.estimate import estimate, profile_of
    from edgecompress.profiling.local import profile_local
    from edgecompress.targets import load_target

    host = load_target("host")
    host1 = replace(host, runtime=replace(host.runtime, threads=1))
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-estimate-") as tmp:
        os.environ["EDGECOMPRESS_CACHE_DIR"] = str(Path(tmp) / "cache")
        models: dict[str, Path | None] = {
            "all-MiniLM-L6-v2": None,
            "bert-4L-256 (random init)": random_bert(Path(tmp) / "bert4", 4, 256, 4),
            "bert-2L-512 (random init)": random_bert(Path(tmp) / "bert2", 2, 512, 8),
        }
        points: list[dict[str, Any]] = []
        for mname, mpath in models.items():
            for recipe in RECIPES:
                print(f"build {mname} / {recipe} ...", file=sys.stderr)
                out = Path(tmp) / f"{len(points)}"
                m = edgecompress.build(mpath, target="host", recipe=recipe, out=out, runs=3)
                import onnx

                model = onnx.load(str(out / "model.onnx"))
                dims = dict(m.profile["workload"])
                est = estimate(model, host1, dims)
                points.append({"model": mname, "recipe": recipe, "bundle": str(out), "dims": dims,
                               "profile": profile_of(est.details), "roofline_ms": est.details["roofline_ms"],
                               "p50_rounds": []})
        for r in range(args.rounds):  # interleaved: every bundle once per round
            print(f"measure round {r + 1}/{args.rounds} ...", file=sys.stderr)
            for p in points:
                hp = profile_local(Path(p["bundle"]) / "model.onnx", dims=p["dims"], vocab_size=30522, threads=1,
                                   runs=10, warmup=3, min_seconds=0.5)
                p["p50_rounds"].append(hp.latency_ms.p50)
        for p in points:
            p["measured_ms"] = statistics.median(p["p50_rounds"])
            p["ratio"] = p["measured_ms"] / p["roofline_ms"]
            p["error_roofline"] = (p["roofline_ms"] - p["measured_ms"]) / p["measured_ms"]
            del p["bundle"]

    factors: dict[str, float] = {}
    for prof in sorted({p["profile"] for p in points}):
        factors[prof] = statistics.median(p["ratio"] for p in points if p["profile"] == prof)
    for p in points:
        others = [q["ratio"] for q in points if q["profile"] == p["profile"] and q["model"] != p["model"]]
        k = statistics.median(others) if others else 1.0
        p["loo_factor"] = k
        p["calibrated_ms"] = p["roofline_ms"] * k
        p["error_calibrated"] = (p["calibrated_ms"] - p["measured_ms"]) / p["measured_ms"]

    def summary(key: str) -> dict[str, float]:
        errs = [abs(p[key]) for p in points]
        return {"median_abs_error": statistics.median(errs), "worst_abs_error": max(errs)}

    result = {
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version()},
        "setup": "target host with 1 intra-op thread; measured p50 = median over interleaved rounds of the runner's "
                 "p50 (fresh process, >= 10 runs and 0.5 s per round); estimate = per-node roofline with host.toml's "
                 "efficiency factors; calibrated = x the median measured/roofline of the same precision profile on "
                 "the other models (leave-one-model-out)",
        "rounds": args.rounds,
        "factors_all_points": factors,
        "roofline": summary("error_roofline"),
        "calibrated_loo": summary("error_calibrated"),
        "goal": "calibrated median |error| <= 25%",
        "points": points,
        "seconds": round(time.perf_counter() - t_start, 1),
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "estimator_error.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        "# Estimator error on this host",
        "",
        f"`python benchmarks/estimator_error.py --rounds {args.rounds}` on {result['machine']['platform']}, "
        f"{result['machine']['cpus']} CPUs (shared, noisy). {result['setup']}.",
        "",
        "| model | recipe | profile | measured p50 ms | roofline ms | error | calibrated ms (LOO) | error |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for p in points:
        lines.append(f"| {p['model']} | {p['recipe']} | {p['profile']} | {p['measured_ms']:.2f} | "
                     f"{p['roofline_ms']:.2f} | {p['error_roofline']:+.0%} | {p['calibrated_ms']:.2f} | "
                     f"{p['error_calibrated']:+.0%} |")
    rf, cl = result["roofline"], result["calibrated_loo"]
    lines += [
        "",
        f"- roofline: median |error| {rf['median_abs_error']:.0%}, worst {rf['worst_abs_error']:.0%}",
        f"- calibrated (leave-one-model-out): median |error| {cl['median_abs_error']:.0%}, worst "
        f"{cl['worst_abs_error']:.0%} (goal: median <= 25%)",
        "- factors from all points (measured / roofline): "
        + ", ".join(f"{k} {v:.3f}" for k, v in factors.items()),
        "",
    ]
    (RESULTS / "estimator_error.md").write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
