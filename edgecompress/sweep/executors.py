"""Where sweep jobs run, behind a tiny interface: submit(fn, arg) and as_completed().

- LocalExecutor: a pool of worker processes sized to the cores; each job runs in a fresh process, so a job that
  crashes or kills its process fails alone.
- DaskExecutor: an existing Dask distributed cluster (the only module that imports `distributed`).
A Ray backend would be a third class with the same two methods.
"""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Any, Protocol
from urllib.parse import urlparse

from edgecompress.errors import ConfigError, EdgeCompressError


class WorkerDied(EdgeCompressError):
    """The process running a job ended without a result (crash, os._exit, out-of-memory kill)."""


@dataclass
class Outcome:
    tag: Any  # what the caller attached at submit time
    value: Any = None
    error: BaseException | None = None


class Executor(Protocol):
    name: str

    def submit(self, fn: Callable[[Any], Any], arg: Any, tag: Any) -> None: ...

    def as_completed(self) -> Iterator[Outcome]: ...

    def close(self) -> None: ...


def _run_in_subprocess(fn: Callable[[Any], Any], arg: Any, threads: int) -> Any:
    payload = pickle.dumps((fn, arg))
    env = {**os.environ, "EDGECOMPRESS_JOB_THREADS": str(threads), "OMP_NUM_THREADS": str(threads)}
    proc = subprocess.run([sys.executable, "-m", "edgecompress.sweep.worker"], input=payload, capture_output=True,
                          env=env)
    if proc.returncode != 0 or not proc.stdout:
        tail = (proc.stderr.decode(errors="replace").strip().splitlines() or ["no output"])[-1]
        raise WorkerDied(f"the worker process exited with code {proc.returncode} without a result ({tail})")
    ok, value = pickle.loads(proc.stdout)
    if not ok:
        raise value
    return value


class LocalExecutor:
    """Up to `workers` jobs at once on this machine, each in its own process, each with cores/workers threads."""

    name = "local"

    def __init__(self, workers: int | None = None) -> None:
        cores = os.cpu_count() or 1
        self.workers = max(1, min(workers or cores, cores))
        self.threads_per_job = max(1, cores // self.workers)
        self._pool = ThreadPoolExecutor(max_workers=self.workers)
        self._futures: dict[Future[Any], Any] = {}

    def submit(self, fn: Callable[[Any], Any], arg: Any, tag: Any) -> None:
        self._futures[self._pool.submit(_run_in_subprocess, fn, arg, self.threads_per_job)] = tag

    def as_completed(self) -> Iterator[Outcome]:
        pending = set(self._futures)
        while pending:
            done, pending = wait(pending, return_when=FIRST_COMPLETED)
            for f in done:
                tag = self._futures.pop(f)
                err = f.exception()
                yield Outcome(tag, None if err else f.result(), err)

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


class DaskExecutor:
    """Jobs on an existing Dask cluster at dask://HOST:PORT (workers need edgecompress installed)."""

    name = "dask"

    def __init__(self, address: str, timeout_s: float = 30.0) -> None:
        try:
            from distributed import Client
        except ImportError:
            raise ConfigError("--executor dask needs the 'distributed' package",
                              hint="pip install 'edgecompress[dask]'") from None
        try:
            self.client = Client(address, timeout=timeout_s, set_as_default=False)
        except OSError as e:
            raise ConfigError(f"cannot reach the Dask scheduler at {address}: {e}",
                              hint="start it with `dask scheduler` and workers with `dask worker ADDRESS`") from None
        self._futures: dict[Any, Any] = {}
        self.threads_per_worker = self._thread_shares()

    def check_versions(self, expected: dict[str, str]) -> None:
        """Every worker must run the same edgecompress (and onnxruntime) as this process."""
        from edgecompress.sweep.worker import worker_versions

        try:
            self.client.wait_for_workers(1, timeout=30)
        except TimeoutError:
            found = {}
        else:
            found = self.client.run(worker_versions)
        if not found:
            raise ConfigError("the Dask cluster has no workers", hint="start workers with `dask worker ADDRESS`")
        for worker, versions in sorted(found.items()):
            for pkg, want in expected.items():
                if versions.get(pkg) != want:
                    raise ConfigError(
                        f"Dask worker {worker} has {pkg} {versions.get(pkg, 'missing')}, this machine {want}",
                        hint=f"run `pip install {pkg}=={want}` on every worker (see README: sweeps on Dask)")

    def _thread_shares(self) -> dict[str, int]:
        """Worker address -> intra-op threads per job: the host's cores shared by all worker threads on it."""
        info = self.client.scheduler_info(n_workers=-1)["workers"]
        cores = self.client.run(os.cpu_count)
        per_host: dict[str, int] = {}
        for addr, w in info.items():
            host = urlparse(addr).hostname or addr
            per_host[host] = per_host.get(host, 0) + int(w.get("nthreads", 1))
        return {addr: max(1, (cores.get(addr) or 1) // per_host[urlparse(addr).hostname or addr])
                for addr in info}

    def submit(self, fn: Callable[[Any], Any], arg: Any, tag: Any) -> None:
        from edgecompress.sweep.worker import call_with_thread_share

        fut = self.client.submit(call_with_thread_share, fn, arg, self.threads_per_worker, pure=False, retries=0)
        self._futures[fut] = tag

    def as_completed(self) -> Iterator[Outcome]:
        from distributed import as_completed

        with self.client.as_current():  # as_completed looks for a current client; ours is not the global default
            completed = as_completed(list(self._futures))
        for fut in completed:
            tag = self._futures.pop(fut)
            try:
                yield Outcome(tag, fut.result())
            except Exception as e:  # includes KilledWorker when a job takes its worker down
                if type(e).__name__ == "KilledWorker":
                    e = WorkerDied(f"the Dask worker running this job died ({type(e).__name__})")
                yield Outcome(tag, None, e)

    def close(self) -> None:
        self.client.close()


def check_executor(spec: str) -> str | None:
    """The Dask scheduler address of `spec` (tcp://HOST:PORT), None for local; ConfigError when malformed."""
    if spec == "local":
        return None
    if not isinstance(spec, str) or not spec.startswith("dask://"):
        raise ConfigError(f"unknown executor '{spec}'", hint="use local or dask://HOST:PORT")
    address = "tcp://" + spec[len("dask://"):]
    try:
        parsed = urlparse(address)
        port = parsed.port
    except ValueError as e:  # a port that is not a number, or out of range
        raise ConfigError(f"malformed executor '{spec}': {e}", hint="use dask://HOST:PORT") from None
    if not parsed.hostname or not port or parsed.path not in ("", "/") or parsed.query or parsed.fragment \
            or parsed.username or parsed.password:
        raise ConfigError(f"malformed executor '{spec}'", hint="use dask://HOST:PORT")
    return address


def make_executor(spec: str, workers: int | None = None) -> Executor:
    address = check_executor(spec)
    return LocalExecutor(workers) if address is None else DaskExecutor(address)
