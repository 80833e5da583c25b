#!/usr/bin/env python3
"""Self-contained profiling runner: standard library, numpy and onnxruntime only.

It is run as a script in a fresh process (locally, or copied to a lab device), so that its peak RSS is the model's
cost plus the runtime's and nothing of edgecompress, torch or transformers. It must not import edgecompress.

    python runner.py SPEC.json            # prints one JSON object on stdout

SPEC: {"model": path, "inputs": [{"name", "dtype", "shape", "fill": "ids"|"ones"|"zeros", "high"}],
       "threads": int, "providers": [...], "graph_optimization_level": "all"|"extended"|"basic"|"disabled",
       "warmup": int, "runs": int, "min_seconds": float, "max_seconds": float, "seed": int,
       "optimized_model_path": path or null,
       "cpu_affinity": [cpu ids] or null     # pin here when the caller could not (no taskset)
       "op_profile_runs": int                # >0: a second, profiled session for the per-op table
       "work_dir": path or null}             # where ORT's profiling trace goes (default: beside SPEC)

Exit status: 0 ok, 3 numpy/onnxruntime missing, 4 the model does not load, 5 it fails to run. An out-of-memory
kill shows up to the caller as exit 137 / signal 9, with no JSON.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import resource
import sys
import time


def _status_mb(field: str) -> float | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return None


def peak_rss_mb() -> float:
    hwm = _status_mb("VmHWM")
    if hwm is not None:
        return hwm
    ru = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return ru / (1024.0 * 1024.0) if sys.platform == "darwin" else ru / 1024.0


def current_rss_mb() -> float:
    rss = _status_mb("VmRSS")
    return rss if rss is not None else peak_rss_mb()


def make_inputs(np, specs, seed):
    rng = np.random.default_rng(seed)
    feed = {}
    for s in specs:
        shape = tuple(s["shape"])
        dtype = np.dtype(s["dtype"])
        fill = s.get("fill", "zeros")
        if fill == "ids":
            low = min(1000, max(0, int(s.get("high", 2)) - 1))
            feed[s["name"]] = rng.integers(low, int(s.get("high", 2)), size=shape).astype(dtype)
        elif fill == "ones":
            feed[s["name"]] = np.ones(shape, dtype=dtype)
        elif fill == "range":
            feed[s["name"]] = np.broadcast_to(np.arange(shape[-1], dtype=dtype), shape).copy()
        elif fill == "normal":
            feed[s["name"]] = rng.standard_normal(size=shape).astype(dtype)
        else:
            feed[s["name"]] = np.zeros(shape, dtype=dtype)
    return feed


def _runtime(result: dict):
    """(numpy, onnxruntime), or None once the missing-dependency result is printed (the caller exits 3)."""
    try:
        import numpy as np
        import onnxruntime as ort
    except ImportError as e:
        result.update(error=f"missing module on this machine: {e.name}", error_kind="missing-dependency")
        print(json.dumps(result))
        return None
    result.update(onnxruntime=ort.__version__, numpy=np.__version__)
    return np, ort


def _session(ort, model: str, opts, providers: list, result: dict):
    """An InferenceSession, or None once the load failure is printed (the caller exits 4)."""
    try:
        return ort.InferenceSession(model, opts, providers=providers)
    except Exception as e:
        result.update(error=f"onnxruntime could not load the model: {str(e).splitlines()[0] if str(e) else e}",
                      error_kind="load")
        print(json.dumps(result))
        return None


def run_fidelity(spec: dict) -> int:
    """Fidelity mode (Arm emulation): run given input batches, save the outputs; no timings, no RSS.

    SPEC: {"mode": "fidelity", "model": path, "batches": npz path with keys "<i>/<input name>", "n_batches": int,
           "outputs": npz path to write ("<i>/<output name>"), "threads": int, "optimized_model_path": path or null}
    Prints one JSON object: ok, load/run errors, output names and the onnxruntime version.
    """
    result: dict = {"ok": False, "mode": "fidelity", "python": platform.python_version(),
                    "machine": platform.machine()}
    if (rt := _runtime(result)) is None:
        return 3
    np, ort = rt
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = int(spec.get("threads", 1))
    opts.inter_op_num_threads = 1
    if spec.get("optimized_model_path"):
        opts.optimized_model_filepath = spec["optimized_model_path"]
    if (sess := _session(ort, spec["model"], opts, ["CPUExecutionProvider"], result)) is None:
        return 4
    result["loaded"] = True
    names = [i.name for i in sess.get_inputs()]
    out_names = [o.name for o in sess.get_outputs()]
    saved = {}
    try:
        with np.load(spec["batches"]) as batches:
            for i in range(int(spec["n_batches"])):
                outs = sess.run(None, {n: batches[f"{i}/{n}"] for n in names})
                saved.update({f"{i}/{n}": o for n, o in zip(out_names, outs, strict=True)})
    except Exception as e:
        result.update(error=f"onnxruntime failed while running the model: {str(e).splitlines()[0]}",
                      error_kind="run")
        print(json.dumps(result))
        return 5
    np.savez(spec["outputs"], **saved)
    result.update(ok=True, outputs=out_names, inputs=names)
    print(json.dumps(result))
    return 0


def run_decoder(spec: dict) -> int:
    """Decoder mode (causal LM exported with its KV cache): prefill a prompt, then generate token by token.

    SPEC: {"mode": "decoder", "model": path, "threads": int, "prompt_length": int, "new_tokens": int,
           "vocab_size": int, "repeats": int, "seed": int}
    Time to first token = prefill (the arg-max of the last logits is the first token); decode tokens/s = the
    median over repeats of new_tokens / the time to generate them, each step feeding `present.*` back as
    `past_key_values.*`. Prints one JSON object.
    """
    result: dict = {"ok": False, "mode": "decoder", "python": platform.python_version(),
                    "machine": platform.machine()}
    if (rt := _runtime(result)) is None:
        return 3
    np, ort = rt
    result["baseline_rss_mb"] = current_rss_mb()
    opts = ort.SessionOptions()
    threads = int(spec.get("threads", 1))
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    t0 = time.perf_counter()
    if (sess := _session(ort, spec["model"], opts, ["CPUExecutionProvider"], result)) is None:
        return 4
    result["load_ms"] = (time.perf_counter() - t0) * 1e3
    inputs = {i.name: i for i in sess.get_inputs()}
    past = [n for n in inputs if n.startswith("past_key_values")]
    presents = ["present" + n[len("past_key_values"):] for n in past]
    past_dtype = np.float16 if past and inputs[past[0]].type == "tensor(float16)" else np.float32
    # the KV shape: (batch, kv_heads, past_len, head_dim); heads and head dim are static in the export
    kv_dims = [d if isinstance(d, int) else 0 for d in inputs[past[0]].shape] if past else []
    rng = np.random.default_rng(int(spec.get("seed", 0)))
    vocab = max(2, int(spec.get("vocab_size", 2)))
    prompt_len, new_tokens = int(spec["prompt_length"]), int(spec["new_tokens"])

    def feed(ids, cache, past_len):
        f = {"input_ids": ids}
        total = past_len + ids.shape[1]
        if "attention_mask" in inputs:
            f["attention_mask"] = np.ones((1, total), dtype=np.int64)
        if "position_ids" in inputs:
            f["position_ids"] = np.arange(past_len, total, dtype=np.int64)[None, :]
        for name in past:
            f[name] = cache[name] if cache is not None else np.zeros(
                (1, kv_dims[1], 0, kv_dims[3]), dtype=past_dtype)
        return f

    def generate():
        prompt = rng.integers(min(100, vocab - 1), vocab, size=(1, prompt_len)).astype(np.int64)
        t = time.perf_counter()
        out = sess.run(["logits", *presents], feed(prompt, None, 0))
        ttft = (time.perf_counter() - t) * 1e3
        steps = []
        token = np.array([[int(out[0][0, -1].argmax())]], dtype=np.int64)
        cache = dict(zip(past, out[1:], strict=True))
        start = time.perf_counter()
        for i in range(new_tokens):
            t = time.perf_counter()
            out = sess.run(["logits", *presents], feed(token, cache, prompt_len + i))
            token = np.array([[int(out[0][0, -1].argmax())]], dtype=np.int64)
            cache = dict(zip(past, out[1:], strict=True))
            steps.append((time.perf_counter() - t) * 1e3)
        return ttft, new_tokens / (time.perf_counter() - start), steps

    try:
        generate()  # warm-up: first-run allocations and kernel selection
        runs = [generate() for _ in range(max(1, int(spec.get("repeats", 3))))]
    except Exception as e:
        result.update(error=f"onnxruntime failed while generating: {str(e).splitlines()[0]}", error_kind="run")
        print(json.dumps(result))
        return 5
    ttfts = sorted(r[0] for r in runs)
    rates = sorted(r[1] for r in runs)
    steps = [x for r in runs for x in r[2]]
    result.update(ok=True, threads=threads, prompt_length=prompt_len, new_tokens=new_tokens,
                  ttft_ms=ttfts[len(ttfts) // 2], prefill_ms=ttfts[len(ttfts) // 2],
                  decode_tok_s=rates[len(rates) // 2], decode_step_ms=summarize(np, steps),
                  peak_rss_mb=peak_rss_mb(), repeats=len(runs), cpu_count=os.cpu_count())
    print(json.dumps(result))
    return 0


def summarize(np, samples):
    a = np.asarray(samples, dtype=np.float64)
    return {"p50": float(np.percentile(a, 50)), "p90": float(np.percentile(a, 90)),
            "p99": float(np.percentile(a, 99)), "mean": float(a.mean()), "std": float(a.std()), "runs": len(a)}


def op_profile(ort, np, spec, opts_factory, providers, feed, runs, work_dir):
    """Per-node kernel times from ORT's own profiler (a chrome-trace JSON), aggregated by op type and node.

    A separate session: profiling adds per-node overhead, so the timed runs above never have it on.
    """
    opts = opts_factory()
    opts.enable_profiling = True
    opts.profile_file_prefix = os.path.join(work_dir, "ort_profile")
    sess = ort.InferenceSession(spec["model"], opts, providers=providers)
    for _ in range(runs):
        sess.run(None, feed)
    trace_path = sess.end_profiling()
    try:
        with open(trace_path) as f:
            events = json.load(f)
    finally:
        with contextlib.suppress(OSError):
            os.remove(trace_path)
    nodes = {}
    for e in events:
        if e.get("cat") != "Node" or not str(e.get("name", "")).endswith("_kernel_time"):
            continue
        name = e["name"][: -len("_kernel_time")]
        args = e.get("args", {})
        n = nodes.setdefault(name, {"node": name, "op_type": args.get("op_name", "?"),
                                    "provider": args.get("provider", "?"), "us": 0.0, "calls": 0})
        n["us"] += float(e.get("dur", 0))
        n["calls"] += 1
    total_us = sum(n["us"] for n in nodes.values()) or 1.0
    by_op = {}
    by_provider = {}
    for n in nodes.values():
        o = by_op.setdefault(n["op_type"], {"op_type": n["op_type"], "us": 0.0, "nodes": 0, "providers": []})
        o["us"] += n["us"]
        o["nodes"] += 1
        if n["provider"] not in o["providers"]:
            o["providers"].append(n["provider"])
        by_provider[n["provider"]] = by_provider.get(n["provider"], 0) + 1
    rows = sorted(by_op.values(), key=lambda o: -o["us"])
    node_rows = sorted(nodes.values(), key=lambda n: -n["us"])
    return {
        "runs": runs,
        "kernel_ms_per_run": total_us / 1e3 / runs,
        "by_op_type": [{"op_type": o["op_type"], "ms_per_run": o["us"] / 1e3 / runs, "share": o["us"] / total_us,
                        "nodes": o["nodes"], "providers": sorted(o["providers"])} for o in rows],
        "nodes_by_provider": by_provider,
        # every node, slowest first: the provider each one landed on is the point
        "nodes": [{"node": n["node"], "op_type": n["op_type"], "provider": n["provider"],
                   "ms_per_run": n["us"] / 1e3 / runs, "share": n["us"] / total_us} for n in node_rows],
    }


def main(argv: list[str]) -> int:
    with open(argv[1]) as f:
        spec = json.load(f)
    if spec.get("mode") == "fidelity":
        return run_fidelity(spec)
    if spec.get("mode") == "decoder":
        return run_decoder(spec)
    result: dict = {"ok": False, "python": platform.python_version(), "machine": platform.machine()}
    if (rt := _runtime(result)) is None:
        return 3
    np, ort = rt

    if spec.get("cpu_affinity") and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, set(spec["cpu_affinity"]))
    if hasattr(os, "sched_getaffinity"):
        result["cpu_affinity"] = sorted(os.sched_getaffinity(0))

    threads = int(spec.get("threads", 0))
    levels = {"disabled": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
              "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
              "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
              "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}
    level = spec.get("graph_optimization_level", "all")

    def session_options():
        o = ort.SessionOptions()
        o.intra_op_num_threads = threads
        o.inter_op_num_threads = 1
        o.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        o.graph_optimization_level = levels[level]
        return o

    opts = session_options()
    if spec.get("optimized_model_path"):
        opts.optimized_model_filepath = spec["optimized_model_path"]
    available = ort.get_available_providers()
    providers = [p for p in spec.get("providers", ["CPUExecutionProvider"]) if p in available] or [
        "CPUExecutionProvider"]

    feed = make_inputs(np, spec["inputs"], int(spec.get("seed", 0)))
    result["baseline_rss_mb"] = current_rss_mb()  # interpreter + numpy + onnxruntime, no session yet

    t0 = time.perf_counter()
    if (sess := _session(ort, spec["model"], opts, providers, result)) is None:
        return 4
    result["load_ms"] = (time.perf_counter() - t0) * 1e3
    result["after_load_rss_mb"] = current_rss_mb()
    result["providers_used"] = sess.get_providers()

    warmup, runs = int(spec.get("warmup", 5)), int(spec.get("runs", 30))
    min_s, max_s = float(spec.get("min_seconds", 0.0)), float(spec.get("max_seconds", 120.0))
    try:
        for _ in range(warmup):
            sess.run(None, feed)
        lat = []
        start = time.perf_counter()
        while True:
            t = time.perf_counter()
            sess.run(None, feed)
            lat.append((time.perf_counter() - t) * 1e3)
            elapsed = time.perf_counter() - start
            if (len(lat) >= runs and elapsed >= min_s) or elapsed >= max_s:
                break
    except Exception as e:
        result["error"] = f"onnxruntime failed while running the model: {str(e).splitlines()[0]}"
        result["error_kind"] = "run"
        print(json.dumps(result))
        return 5
    result.update(
        ok=True,
        latencies_ms=lat,
        latency_summary_ms=summarize(np, lat),
        warmup=warmup,
        peak_rss_mb=peak_rss_mb(),  # taken before the profiled session below exists
        session={"intra_op_num_threads": threads, "inter_op_num_threads": 1, "execution_mode": "sequential",
                 "graph_optimization_level": level, "providers": providers},
        cpu_count=os.cpu_count(),
    )
    op_runs = int(spec.get("op_profile_runs", 0))
    if op_runs > 0:
        del sess
        work_dir = spec.get("work_dir") or os.path.dirname(os.path.abspath(argv[1]))
        try:
            result["ops"] = op_profile(ort, np, spec, session_options, providers, feed, op_runs, work_dir)
        except Exception as e:  # the timed figures stand; the table is a bonus
            result["ops_error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
