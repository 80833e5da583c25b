"""Benchmark: the bundled MiniLM across every target with --recipe auto, locally and on a 2-worker Dask cluster.

Records the recipe chosen per target, each search's time, and the sweep's wall time on the local executor vs a
LocalCluster(n_workers=2, threads_per_worker=1) on this machine. Each sweep starts from an empty cache, so both
executors do the same work.

    python benchmarks/sweep.py            # or: make bench-sweep
Writes benchmarks/results/sweep.json and benchmarks/results/sweep.md.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def run_sweep(executor: str, targets: list[str], runs: int) -> dict:
    from edgecompress.sweep import sweep

    with tempfile.TemporaryDirectory(prefix="bench-sweep-") as tmp:
        os.environ["EDGECOMPRESS_CACHE_DIR"] = str(Path(tmp) / "cache")  # cold cache for a fair comparison
        t0 = time.perf_counter()
        result = sweep([None], targets, ["auto"], Path(tmp) / "out", executor=executor, runs=runs)
        wall = time.perf_counter() - t0
    rows = []
    for r in result.results:
        search = r.summary.get("search", {})
        rows.append({"target": r.target, "status": r.status, "chosen": r.summary.get("recipe"),
                     "passed": r.passed, "error": r.error,
                     "size_mb": r.summary.get("artifact", {}).get("size_mb"),
                     "fidelity": r.summary.get("fidelity", {}),
                     "failed": r.summary.get("failed", []),
                     "search_s": search.get("seconds"), "job_s": round(r.seconds, 1),
                     "candidates": [(c["candidate"], c["status"]) for c in search.get("candidates", [])]})
    return {"executor": result.executor, "wall_s": round(wall, 1), "jobs": rows}


def main() -> int:
    from distributed import LocalCluster

    from edgecompress.targets import available_targets
    from edgecompress.versions import library_versions

    targets = sorted(available_targets())
    runs = int(os.environ.get("BENCH_RUNS", "10"))
    local = run_sweep("local", targets, runs)
    with LocalCluster(n_workers=2, threads_per_worker=1, host="127.0.0.1", dashboard_address=None) as cluster:
        dask = run_sweep("dask://" + cluster.scheduler_address.removeprefix("tcp://"), targets, runs)
    out = {"model": "all-MiniLM-L6-v2 (bundled)", "targets": targets, "runs": runs,
           "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
           "versions": library_versions(), "local": local, "dask": dask,
           "command": "python benchmarks/sweep.py"}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "sweep.json").write_text(json.dumps(out, indent=2) + "\n")
    (RESULTS / "sweep.md").write_text(markdown(out))
    print(markdown(out))
    return 0


def markdown(out: dict) -> str:
    lines = [
        "# Sweep benchmark: `--recipe auto` for the bundled MiniLM on every target", "",
        f"`{out['command']}` on {out['machine']['cpus']} CPUs; each sweep from an empty cache; "
        f"{out['runs']} timed runs per host measurement.", "",
        "| target | chosen recipe | within budgets | MB | cosine_mean | search s | misses |",
        "|---|---|---|---|---|---|---|",
    ]
    for j in out["local"]["jobs"]:
        cos = j["fidelity"].get("cosine_mean")
        size = "" if j["size_mb"] is None else f"{j['size_mb']:.2f}"
        search_s = "–" if j["search_s"] is None else j["search_s"]
        lines.append(f"| {j['target']} | {j['chosen'] or '–'} | {'yes' if j['passed'] else 'no'} | {size} | "
                     f"{'' if cos is None else f'{cos:.4f}'} | {search_s} | "
                     f"{'; '.join(j['failed']) or j['error']} |")
    lines += ["", "| executor | wall time s |", "|---|---|",
              f"| local (process pool, {out['machine']['cpus']} workers) | {out['local']['wall_s']} |",
              f"| Dask LocalCluster, 2 workers × 1 thread | {out['dask']['wall_s']} |", ""]
    if any(j["search_s"] is None for j in out["local"]["jobs"]):
        lines.append("Search times were not recorded by this run (sweep jobs did not return the search section "
                     "then; they do now). Job times in the JSON count from submission, queueing included.")
        lines.append("")
    same = [a["chosen"] == b["chosen"] for a, b in zip(out["local"]["jobs"], out["dask"]["jobs"], strict=True)]
    lines.append(f"Both executors chose the same recipe for {sum(same)} of {len(same)} targets.")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
