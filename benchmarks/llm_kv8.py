"""Benchmark: an int8 KV cache on the decoder fast path (SmolLM2-135M-Instruct), against the fp32 KV cache.

ORT 1.32's CPU GroupQueryAttention takes an int8 cache (T_CACHE int8/uint8 with float scales), and ORT GenAI's
model builder writes it (kv_cache_quant_scheme=int8_per_channel) from per-layer, per-channel scales that its own
calibration tool computes (onnxruntime_genai.models.quantization.kv_cache_calibration: post-RoPE K with the
rotary envelope, raw V, 99.99th percentile), here on edgecompress's built-in calibration passages. Both graphs
then get edgecompress's grid-preserving int4 (passes/int4_grid.py), so only the cache differs.

Perplexity is teacher-forced through the cache: every token of a single window of N wikitext-2 tokens is fed one
at a time to ORT GenAI's Generator, so each prediction reads the whole cache so far (a prefill-only perplexity
would never read a quantized cache). One thread, fresh process per run, the two variants interleaved.

    python benchmarks/llm_kv8.py [--tokens 1024]
Writes benchmarks/results/llm_kv8.json and benchmarks/results/llm_kv8.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
WIKI = Path(os.environ.get("EDGECOMPRESS_WIKITEXT") or REPO.parent / "shared" / "data" / "wikitext2" / "wiki.test.raw")
CONTEXT = 2048

_RUN = r"""
import json, sys, time
import numpy as np
import onnxruntime_genai as og
d, ids_file = sys.argv[1], sys.argv[2]
ids = np.array(json.load(open(ids_file)), dtype=np.int32)
cfg = og.Config(d)
cfg.overlay(json.dumps({"model": {"decoder": {"session_options": {"intra_op_num_threads": 1}}}}))
model = og.Model(cfg)
p = og.GeneratorParams(model)
p.set_search_options(max_length=len(ids) + 1, do_sample=False)
g = og.Generator(model, p)
nll, steps = [], []
for i in range(len(ids) - 1):
    t = time.perf_counter()
    g.append_tokens(ids[i:i + 1])
    steps.append(time.perf_counter() - t)
    lg = np.array(g.get_output("logits"), dtype=np.float64).reshape(-1)
    mx = lg.max()
    nll.append(mx + np.log(np.exp(lg - mx).sum()) - lg[ids[i + 1]])
# VmHWM, not ru_maxrss: Linux keeps ru_maxrss across fork + exec (a child would report its parent's peak)
hwm = next(int(x.split()[1]) for x in open("/proc/self/status") if x.startswith("VmHWM:")) / 1024
print(json.dumps({"nll_mean": float(np.mean(nll)), "tokens": len(nll), "ms_per_token": float(np.median(steps) * 1e3),
                  "peak_rss_mb": hwm}))
"""


def bundle(raw: Path, out: Path) -> Path:
    """The builder's fp32 graph -> edgecompress int4 -> a bundle ORT GenAI runs (as the fast path writes it)."""
    import onnx

    from edgecompress.genai.bundle import finalize_bundle, genai_tokenizer
    from edgecompress.genai.graph import optimum_tied_layout, static_kv_head_dim
    from edgecompress.model import save_model
    from edgecompress.passes.base import ModelInfo, PassContext
    from edgecompress.passes.int4_grid import DecoderInt4
    from edgecompress.targets import load_target

    out.mkdir(parents=True, exist_ok=True)
    model = onnx.load(str(raw / "model.onnx"))
    head = json.loads((raw / "genai_config.json").read_text())["model"]["decoder"]["head_size"]
    model, _ = optimum_tied_layout(model)
    static_kv_head_dim(model, int(head))
    ctx = PassContext(target=load_target("phone-arm64"),
                      info=ModelInfo("llama", "LlamaForCausalLM", "text-generation-with-past"))
    save_model(DecoderInt4().run(model, ctx).model, out / "model.onnx")
    for f in raw.iterdir():
        if f.is_file() and not f.name.startswith("model.onnx"):
            shutil.copy2(f, out / f.name)
    genai_tokenizer(out)
    finalize_bundle(out, CONTEXT, 1)
    return out


def builder(hf_dir: Path, out: Path, *extra: str) -> Path:
    from edgecompress.genai.export import BUILDER_OPTIONS

    subprocess.run([sys.executable, "-m", "edgecompress.genai._builder_main", "-i", str(hf_dir), "-o", str(out),
                    "-p", "fp32", "-e", "cpu", "-c", str(out) + "-cache", "--extra_options", "hf_token=false",
                    *BUILDER_OPTIONS, *extra], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                   env={**os.environ, "HF_HUB_OFFLINE": "1"})
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    from edgecompress import export, llm

    t0 = time.perf_counter()
    hf_dir = llm.gguf_hf_dir(llm.smollm2_gguf())
    shape = llm.decoder_shape(json.loads((hf_dir / "config.json").read_text()))
    tok = export.load_tokenizer(hf_dir)
    ids = tok(WIKI.read_text(encoding="utf-8")[:60_000], add_special_tokens=False)["input_ids"][:args.tokens]
    calib = REPO / "edgecompress" / "data" / "corpus" / "passages_calibration.txt"
    with tempfile.TemporaryDirectory(prefix="bench-kv8-") as tmp:
        t = Path(tmp)
        (t / "ids.json").write_text(json.dumps(ids))
        (t / "calib.json").write_text(json.dumps([x for x in calib.read_text().splitlines() if x.strip()]))
        fp32_raw = builder(hf_dir, t / "fp32-raw")
        scales = t / "kv_scales.json"
        subprocess.run([sys.executable, "-m", "onnxruntime_genai.models.quantization.kv_cache_calibration",
                        "--model", str(fp32_raw / "model.onnx"), "--tokenizer", str(hf_dir), "--out", str(scales),
                        "--quant-type", "int8_per_channel", "--corpus-file", str(t / "calib.json"),
                        "--num-seqs", "16"], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        kv8_raw = builder(hf_dir, t / "kv8-raw", "kv_cache_quant_scheme=int8_per_channel",
                          f"kv_cache_scale_file={scales}")
        variants = {"fp32 KV cache": bundle(fp32_raw, t / "fp32"), "int8 KV cache": bundle(kv8_raw, t / "kv8")}
        runs: dict[str, list[dict[str, Any]]] = {k: [] for k in variants}
        for _ in range(args.repeats):  # interleaved
            for name, d in variants.items():
                out = subprocess.run([sys.executable, "-c", _RUN, str(d), str(t / "ids.json")], check=True,
                                     capture_output=True, text=True)
                runs[name].append(json.loads(out.stdout.strip().splitlines()[-1]))
        configs = {k: json.loads((d / "genai_config.json").read_text())["search"] for k, d in variants.items()}
    rows = []
    base_nll = runs["fp32 KV cache"][0]["nll_mean"]
    for name, rs in runs.items():
        bytes_per = 1 if name.startswith("int8") else 4
        rows.append({"variant": name, "perplexity": float(2.718281828459045 ** rs[0]["nll_mean"]),
                     "perplexity_ratio": float(2.718281828459045 ** (rs[0]["nll_mean"] - base_nll)),
                     "tokens": rs[0]["tokens"], "ms_per_token": sorted(r["ms_per_token"] for r in rs)[len(rs) // 2],
                     "peak_rss_mb": max(r["peak_rss_mb"] for r in rs),
                     "kv_mb_at_context": shape.kv_bytes(CONTEXT, bytes_per) / 1e6,
                     "past_present_share_buffer": bool(configs[name].get("past_present_share_buffer"))})
    result = {"model": llm.SMOLLM2_NAME, "tokens": len(ids), "context": CONTEXT, "rows": rows,
              "scales": "onnxruntime_genai kv_cache_calibration, int8_per_channel, percentile 99.99, 16 sequences of "
                        "edgecompress's built-in calibration passages",
              "load_average": os.getloadavg(), "seconds": round(time.perf_counter() - t0, 1)}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "llm_kv8.json").write_text(json.dumps(result, indent=1))
    (RESULTS / "llm_kv8.md").write_text(markdown(result))
    print(markdown(result))
    return 0


def markdown(r: dict[str, Any]) -> str:
    lines = [f"# int8 KV cache on the decoder fast path: {r['model']}", "",
             f"Teacher-forced perplexity through the cache on one window of {r['tokens']} wikitext-2 test tokens "
             "(each token fed alone to ORT GenAI's Generator: every prediction reads the cache), one thread, fresh "
             f"process per run, interleaved. Scales: {r['scales']}. Both graphs carry edgecompress's int4 weights. "
             f"KV cache at a {r['context']:,}-token context from the arithmetic (layers x 2 x kv heads x head dim "
             "x bytes x tokens). Peak RSS is the run's: the fp32 cache is one buffer allocated up front for the "
             "whole window (past/present shared), the int8 one grows (the builder turns the shared buffer off for "
             "a quantized cache). Shared 2-core machine (load average "
             f"{r['load_average'][0]:.1f}): timings noisy.", "",
             "| variant | perplexity | vs fp32 KV | ms/token t1 | peak RSS MB | KV MB @ context | shared buffer |",
             "|---|---|---|---|---|---|---|"]
    for x in r["rows"]:
        lines.append(f"| {x['variant']} | {x['perplexity']:.3f} | {(x['perplexity_ratio'] - 1) * 100:+.2f}% | "
                     f"{x['ms_per_token']:.1f} | {x['peak_rss_mb']:.0f} | {x['kv_mb_at_context']:.1f} | "
                     f"{'yes' if x['past_present_share_buffer'] else 'no'} |")
    lines += ["", f"Run time {r['seconds']} s.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
