"""The code that runs on a worker: the local executor's per-job process, and helpers Dask workers call.

`python -m edgecompress.sweep.worker` reads a pickled (fn, arg) on stdin and writes a pickled (ok, value) on stdout.
"""

from __future__ import annotations

import os
import pickle
import sys
from collections.abc import Callable
from typing import Any


def worker_versions() -> dict[str, str]:
    from edgecompress.versions import library_versions

    v = library_versions()
    return {"edgecompress": v["edgecompress"], "onnxruntime": v["onnxruntime"]}


def call_with_thread_share(fn: Callable[[Any], Any], arg: Any, shares: dict[str, int]) -> Any:
    """On a Dask worker: onnxruntime ignores OMP_NUM_THREADS, so jobs read their share from the environment."""
    from distributed import get_worker

    os.environ["EDGECOMPRESS_JOB_THREADS"] = str(shares.get(get_worker().address, 1))
    return fn(arg)


def main() -> int:
    fn, arg = pickle.loads(sys.stdin.buffer.read())
    real_stdout = sys.stdout.buffer
    sys.stdout = sys.stderr  # whatever the job prints must not corrupt the result stream
    try:
        result = (True, fn(arg))
    except BaseException as e:  # sent back to the parent, which re-raises it
        result = (False, e)
    try:
        data = pickle.dumps(result)
    except Exception as e:
        data = pickle.dumps((False, RuntimeError(f"unpicklable job result: {e}")))
    real_stdout.write(data)
    real_stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
