"""A sweep of models x targets x recipes on a Dask cluster.

    python examples/dask_sweep.py --scheduler tcp://10.0.0.5:8786 --models minilm --targets all --recipes auto \
        --out sweeps/all
    python examples/dask_sweep.py --models ./my-bert --targets raspberry-pi-5,phone-arm64 --recipes int8-dynamic \
        --out sweeps/x --local-workers 2         # no scheduler: a LocalCluster on this machine

Workers need the same edgecompress and onnxruntime as this machine (`pip install "edgecompress[dask]"`); the
sweep checks the versions at start-up. Each job writes its bundle under --out; results.csv, results.json,
summary.md and one Pareto plot per target are written there too. Rerunning resumes (finished jobs are skipped).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scheduler", help="tcp://HOST:PORT of a running Dask scheduler; default: a LocalCluster")
    ap.add_argument("--local-workers", type=int, default=2)
    ap.add_argument("--models", default="minilm")
    ap.add_argument("--targets", default="raspberry-pi-5")
    ap.add_argument("--recipes", default="int8-dynamic")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--runs", type=int, default=10)
    args = ap.parse_args()

    from edgecompress.sweep import sweep

    cluster = None
    address = args.scheduler
    if address is None:
        from distributed import LocalCluster

        cluster = LocalCluster(n_workers=args.local_workers, threads_per_worker=1, host="127.0.0.1",
                               dashboard_address=None, processes=True)
        address = cluster.scheduler_address
    try:
        result = sweep([None if m == "minilm" else m for m in args.models.split(",")], args.targets.split(","),
                       args.recipes.split(","), args.out, executor="dask://" + address.removeprefix("tcp://"),
                       runs=args.runs)
    finally:
        if cluster is not None:
            cluster.close()
    print((args.out / "summary.md").read_text())
    failed = result.failed
    for r in failed:
        print(f"failed: {r.job}: {r.error}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
