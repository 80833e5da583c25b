"""Where a decoder's time goes: ORT's profiler (SessionOptions.enable_profiling) on a 128-token prefill and on
decode steps, per op type, for each graph given. One thread, plain onnxruntime, the KV cache fed back each step
(a growing past, as the profiler and fidelity of edgecompress run it).

    python benchmarks/llm_profile.py NAME=path/to/model.onnx [NAME=...] [--decode 32] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np


def profile(model: Path, prompt: int = 128, decode: int = 32, threads: int = 1) -> dict[str, Any]:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.enable_profiling = True
    with tempfile.TemporaryDirectory() as tmp:
        so.profile_file_prefix = os.path.join(tmp, "ort")
        sess = ort.InferenceSession(str(model), so, providers=["CPUExecutionProvider"])
        inputs = {i.name: i for i in sess.get_inputs()}
        past = [n for n in inputs if n.startswith("past_key_values")]
        presents = ["present" + n[len("past_key_values"):] for n in past]
        shape = inputs[past[0]].shape
        dtype = np.float16 if "float16" in inputs[past[0]].type else np.float32
        rng = np.random.default_rng(0)

        def feed(ids: np.ndarray, cache: dict[str, np.ndarray] | None, past_len: int) -> dict[str, np.ndarray]:
            f: dict[str, np.ndarray] = {"input_ids": ids}
            if "attention_mask" in inputs:
                f["attention_mask"] = np.ones((1, past_len + ids.shape[1]), dtype=np.int64)
            if "position_ids" in inputs:
                f["position_ids"] = np.arange(past_len, past_len + ids.shape[1], dtype=np.int64)[None, :]
            for n in past:
                f[n] = cache[n] if cache else np.zeros((1, int(shape[1]), 0, int(shape[3])), dtype=dtype)
            return f

        ids = rng.integers(3, 1000, size=(1, prompt), dtype=np.int64)
        sess.run(["logits", *presents], feed(ids, None, 0))  # warm-up (run 0)
        out = sess.run(["logits", *presents], feed(ids, None, 0))  # the measured prefill (run 1)
        cache = dict(zip(past, out[1:], strict=True))
        for step in range(decode):  # runs 2..
            tok = np.array([[int(np.argmax(out[0][0, -1]))]], dtype=np.int64)
            out = sess.run(["logits", *presents], feed(tok, cache, prompt + step))
            cache = dict(zip(past, out[1:], strict=True))
        trace = json.loads(Path(sess.end_profiling()).read_text())
    runs = sorted((e for e in trace if e.get("name") == "model_run"), key=lambda e: e["ts"])
    phases: dict[str, dict[str, float]] = {"prefill": defaultdict(float), "decode": defaultdict(float)}
    totals = {"prefill": runs[1]["dur"], "decode": sum(r["dur"] for r in runs[2:])}
    nodes = sorted((e for e in trace if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")),
                   key=lambda e: e["ts"])
    for e in nodes:
        idx = next((i for i, r in enumerate(runs) if r["ts"] <= e["ts"] <= r["ts"] + r["dur"]), None)
        if idx is None or idx == 0:
            continue
        phases["prefill" if idx == 1 else "decode"][e["args"]["op_name"]] += e["dur"]
    result: dict[str, Any] = {"model": str(model), "prompt": prompt, "decode_steps": decode, "threads": threads,
                              "nodes_per_run": len([e for e in nodes if runs[1]["ts"] <= e["ts"]
                                                    <= runs[1]["ts"] + runs[1]["dur"]])}
    for phase, ops in phases.items():
        total_us = totals[phase]
        per = decode if phase == "decode" else 1
        result[phase] = {"ms_per_run": total_us / per / 1e3,
                         "kernel_ms_per_run": sum(ops.values()) / per / 1e3,
                         "share": {k: round(v / total_us, 4) for k, v in sorted(ops.items(), key=lambda kv: -kv[1])}}
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("models", nargs="+", help="NAME=path/to/model.onnx")
    ap.add_argument("--decode", type=int, default=32)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    results = {}
    for spec in args.models:
        name, path = spec.split("=", 1)
        results[name] = r = profile(Path(path), args.prompt, args.decode)
        print(f"== {name}: {r['nodes_per_run']} kernels per run; prefill {r['prefill']['ms_per_run']:.1f} ms, "
              f"decode {r['decode']['ms_per_run']:.2f} ms/step (kernels {r['decode']['kernel_ms_per_run']:.2f})")
        for phase in ("decode", "prefill"):
            top = list(r[phase]["share"].items())[:8]
            print(f"   {phase}: " + ", ".join(f"{k} {v:.1%}" for k, v in top))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
