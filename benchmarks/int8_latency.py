"""Benchmark: int8-mixed (per-token activation scales) against ORT dynamic int8 per-channel, latency only.

The quantization benchmark measures every recipe in 7 rounds; its int8-mixed vs ORT ratio moves by ~±5% between
rows on this shared 2-core machine. This one measures just the two (and the codebook at 13.5 MB, which runs on the
same per-token int8 graph) in many interleaved rounds, b1 and b8 at seq 128 on one thread, and reports the median
and quartiles of the per-round ratio.

    python benchmarks/int8_latency.py [--rounds 31]
Writes benchmarks/results/int8_latency.json and benchmarks/results/int8_latency.md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quantization import RESULTS, latency_rounds


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=31)
    args = ap.parse_args()

    from onnxruntime.quantization import QuantType, quantize_dynamic

    import edgecompress
    from edgecompress.export import export_onnx, inspect_model
    from edgecompress.pipeline import bundled_model_path

    with tempfile.TemporaryDirectory(prefix="bench-int8-lat-") as tmp_:
        tmp = Path(tmp_)
        os.environ["EDGECOMPRESS_CACHE_DIR"] = str(tmp / "cache")
        model_dir = bundled_model_path()
        fp32 = export_onnx(model_dir, inspect_model(model_dir), tmp / "fp32").onnx_path
        quantize_dynamic(fp32, tmp / "ort-dyn-pc.onnx", weight_type=QuantType.QInt8, per_channel=True)
        paths = {"ORT dynamic int8, per-channel": tmp / "ort-dyn-pc.onnx"}
        for name, recipe, budgets in (("edgecompress int8-mixed", "int8-mixed", {}),
                                      ("edgecompress codebook --max-size-mb 13.5", "codebook", {"max_size_mb": 13.5})):
            from edgecompress.pipeline import BuildOptions, build

            build(BuildOptions(model=model_dir, target="host", recipe=recipe, out=tmp / recipe, runs=3,
                               budgets=budgets))
            paths[name] = tmp / recipe / "model.onnx"
        result: dict = {"rounds": args.rounds, "seq": 128, "threads": 1, "version": edgecompress.__version__,
                        "load_average_at_start": os.getloadavg(), "batches": {}}
        base = "ORT dynamic int8, per-channel"
        for batch in (1, 8):
            samples = latency_rounds(paths, args.rounds, batch, runs_per_round=5 if batch == 1 else 3)
            rows = {}
            for name, ms in samples.items():
                ratio = np.asarray(ms) / np.asarray(samples[base])
                rows[name] = {"median_ms": float(np.median(ms)), "ratio_median": float(np.median(ratio)),
                              "ratio_q1": float(np.percentile(ratio, 25)), "ratio_q3": float(np.percentile(ratio, 75))}
            result["batches"][f"b{batch}"] = rows
        result["load_average_at_end"] = os.getloadavg()
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "int8_latency.json").write_text(json.dumps(result, indent=1) + "\n")
    md = render(result)
    (RESULTS / "int8_latency.md").write_text(md)
    print(md)
    return 0


def render(r: dict) -> str:
    lines = ["# int8-mixed latency vs ORT dynamic int8 per-channel (bundled MiniLM)", "",
             f"`python benchmarks/int8_latency.py`: seq 128, one thread, {r['rounds']} interleaved rounds; the ratio "
             "is taken per round (same load for both), then its median and quartiles. Load average at start / end: "
             f"{r['load_average_at_start'][0]:.1f} / {r['load_average_at_end'][0]:.1f} on 2 cores.", "",
             "| variant | batch | median ms | ratio to ORT dyn pc, median | quartiles |", "|---|---|---|---|---|"]
    for b, rows in r["batches"].items():
        for name, x in rows.items():
            lines.append(f"| {name} | {b} | {x['median_ms']:.1f} | {x['ratio_median']:.3f} | "
                         f"{x['ratio_q1']:.3f}–{x['ratio_q3']:.3f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
