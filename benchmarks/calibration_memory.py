"""Benchmark: peak memory of static-INT8 calibration on the bundled MiniLM with 1,000 calibration samples.

ORT's calibrators keep every intermediate output of every sample handed to one collect_data call (entropy
calibration of BERT ran out of memory, onnxruntime#10503). edgecompress streams: a seeded choice of samples
(calibration.select_samples), collect_data once per chunk of `chunk` batches, and only the tensors that get
quantized (ort_quant.calibrate). Each method runs in a fresh process so its peak RSS is its own.

    python benchmarks/calibration_memory.py [--samples 1000] [--methods minmax,entropy,percentile] [--chunk 2]
Writes benchmarks/results/calibration_memory.json and .md. Goal: 1,000 samples under 2 GB peak RSS.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
GOAL_MB = 2048


def texts(n: int) -> list[str]:
    """n distinct texts from the built-in calibration corpus: its sentences, then pairs of them joined."""
    from edgecompress.calibration import builtin_texts

    base = list(builtin_texts("calibration").texts)
    out = list(base)
    i = 0
    while len(out) < n:
        out.append(f"{base[i % len(base)]} {base[(i * 7 + 3) % len(base)]}")
        i += 1
    return out[:n]


def child(model_path: str, method: str, samples: int, chunk: int) -> dict:
    """Runs in its own process: calibrate and report this process's peak RSS."""
    import resource

    import onnx

    from edgecompress.calibration import select_samples, tokenize_batches
    from edgecompress.export import load_tokenizer
    from edgecompress.passes import ort_quant
    from edgecompress.passes.sensitivity import quantizable_nodes

    def rss_mb() -> float:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    model = onnx.load(model_path)
    tok = load_tokenizer(Path(model_path).parent)
    names = [i.name for i in model.graph.input]
    corpus = texts(samples)
    source = lambda: tokenize_batches(tok, corpus, names, batch_size=8, pad_to=128)  # noqa: E731
    matmuls = set(quantizable_nodes(model, gathers=False))
    tensors = sorted({n.input[0] for n in model.graph.node if n.name in matmuls})
    baseline = rss_mb()
    t0 = time.perf_counter()
    chosen, choice = select_samples(source, samples, seed=0)
    ranges = ort_quant.calibrate(model, chosen(), tensors, method=method, chunk_batches=chunk)
    return {"method": method, "samples": choice.count, "chunk_batches": chunk, "tensors": len(ranges),
            "seconds": round(time.perf_counter() - t0, 1), "baseline_rss_mb": round(baseline),
            "peak_rss_mb": round(rss_mb()), "within_goal": rss_mb() <= GOAL_MB}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--samples", type=int, default=1000)
    ap.add_argument("--methods", default="minmax,entropy,percentile")
    ap.add_argument("--chunk", type=int, default=2)
    ap.add_argument("--model", help="an exported model.onnx (with tokenizer files beside it); default: export MiniLM")
    ap.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child[0], args.child[1], int(args.child[2]), int(args.child[3]))))
        return
    with tempfile.TemporaryDirectory(prefix="bench-cal-") as tmp:
        model_path = args.model
        if model_path is None:
            from edgecompress import export
            from edgecompress.pipeline import bundled_model_path

            info = export.inspect_model(bundled_model_path())
            model_path = str(export.export_onnx(bundled_model_path(), info, Path(tmp) / "export").onnx_path)
        rows = []
        for method in args.methods.split(","):
            out = subprocess.run([sys.executable, __file__, "--child", model_path, method, str(args.samples),
                                  str(args.chunk)], capture_output=True, text=True, check=True)
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(rows[-1], flush=True)
    result = {"model": "all-MiniLM-L6-v2 (optimum FP32 export)", "batch": "8 x 128 tokens (padded)",
              "goal_peak_rss_mb": GOAL_MB, "machine": f"{platform.machine()}, {platform.processor() or 'cpu'}",
              "rows": rows}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "calibration_memory.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = ["# Calibration memory: MiniLM, streamed ORT calibration", "",
             f"{args.samples} calibration samples, batches of 8 x 128 tokens, `collect_data` per {args.chunk} "
             "batches, only the quantized MatMuls' input activations calibrated. Each method in a fresh process; "
             "baseline = RSS after loading Python, ORT, the tokenizer and the model.", "",
             "| method | samples | tensors | seconds | baseline RSS MB | peak RSS MB | <= 2 GB |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['samples']} | {r['tensors']} | {r['seconds']} | {r['baseline_rss_mb']} | "
                     f"{r['peak_rss_mb']} | {'yes' if r['within_goal'] else 'NO'} |")
    (RESULTS / "calibration_memory.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
