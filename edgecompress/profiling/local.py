"""Profile an artifact on this host: the runner script in a fresh process, so memory is the model's own.

The process can be made to look more like the target: pinned to the target's core count with `taskset` (threads
capped to match), and capped at the target's usable RAM with a cgroup-v1 memory child of our own cgroup. Where a
cap cannot be applied the run goes ahead and the profile says so (`limits.warnings`). An out-of-memory kill under
the cap is a result, not a crash: `OutOfMemory` carries the cap, and the caller fails the peak_ram budget with it.
`LocalTransport` is this host's RunnerTransport (profiling/transport.py). Layering: imports errors and
profiling.transport only (plus onnx for the inputs); ssh.py reuses the spec and result helpers.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from edgecompress.errors import ProfileError
from edgecompress.profiling.transport import OutOfMemory, RunnerRun, job_spec, out_of_memory

__all__ = ["OutOfMemory"]  # re-exported: it used to live here

log = logging.getLogger(__name__)

RUNNER = Path(__file__).with_name("runner.py")
CGROUP_V1_MEMORY = Path("/sys/fs/cgroup/memory")

_ONNX_TO_NUMPY = {onnx.TensorProto.INT64: "int64", onnx.TensorProto.INT32: "int32",
                  onnx.TensorProto.FLOAT: "float32", onnx.TensorProto.FLOAT16: "float16",
                  onnx.TensorProto.BOOL: "bool"}


@dataclass
class LatencyStats:
    p50: float
    p90: float
    p99: float
    mean: float
    std: float
    runs: int

    @classmethod
    def of(cls, samples: list[float]) -> LatencyStats:
        a = np.asarray(samples, dtype=np.float64)
        return cls(p50=float(np.percentile(a, 50)), p90=float(np.percentile(a, 90)),
                   p99=float(np.percentile(a, 99)), mean=float(a.mean()), std=float(a.std()), runs=len(a))

    def text(self) -> str:
        return f"p50 {self.p50:.2f} / p90 {self.p90:.2f} / p99 {self.p99:.2f} ms, mean {self.mean:.2f} ± " \
               f"{self.std:.2f} ms over {self.runs} runs"


@dataclass
class HostProfile:
    latency_ms: LatencyStats
    load_ms: float
    peak_rss_mb: float
    baseline_rss_mb: float
    session: dict[str, Any]
    workload: dict[str, int]
    onnxruntime: str
    samples_ms: list[float] = field(default_factory=list)
    ops: dict[str, Any] | None = None  # ORT profiler table (runner op_profile), None when off or failed
    limits: dict[str, Any] = field(default_factory=dict)  # cores/threads/memory cap applied, with warnings
    machine: str = ""
    cpu_affinity: list[int] | None = None

    @classmethod
    def from_result(cls, r: dict[str, Any], dims: dict[str, int], limits: dict[str, Any] | None = None
                    ) -> HostProfile:
        limits = dict(limits or {})
        if r.get("ops_error"):
            limits.setdefault("warnings", []).append(f"per-op table unavailable: {r['ops_error']}")
        return cls(latency_ms=LatencyStats.of(r["latencies_ms"]), load_ms=r["load_ms"],
                   peak_rss_mb=r["peak_rss_mb"], baseline_rss_mb=r["baseline_rss_mb"], session=r["session"],
                   workload=dict(dims), onnxruntime=r["onnxruntime"], samples_ms=r["latencies_ms"],
                   ops=r.get("ops"), limits=limits, machine=r.get("machine", ""),
                   cpu_affinity=r.get("cpu_affinity"))

    def section(self, source: str) -> dict[str, Any]:
        """The manifest's view (no raw samples)."""
        d = {"source": source, "latency_ms": asdict(self.latency_ms), "load_ms": self.load_ms,
             "peak_rss_mb": self.peak_rss_mb, "baseline_rss_mb": self.baseline_rss_mb,
             "model_rss_mb": self.peak_rss_mb - self.baseline_rss_mb, "session": self.session,
             "onnxruntime": self.onnxruntime, "machine": self.machine, "limits": self.limits,
             # raw samples for report.html's latency plot; a tiny model yields thousands in the runner's
             # minimum time, so keep every k-th to stay under ~500
             "samples_ms": [round(x, 3) for x in self.samples_ms[::max(1, len(self.samples_ms) // 500)]]}
        if self.cpu_affinity is not None:
            d["cpu_affinity"] = self.cpu_affinity
        if self.ops is not None:
            d["ops"] = self.ops
        return d


# one input tensor of more than this many elements (2 GiB of float32) is a declared dimension gone wrong
MAX_INPUT_ELEMENTS = 2**29


def input_specs(model_path: Path, dims: dict[str, int], vocab_size: int | None) -> list[dict[str, Any]]:
    """What the runner feeds: random token ids, a full attention mask, zeros elsewhere."""
    m = onnx.load(str(model_path), load_external_data=False)
    inits = {i.name for i in m.graph.initializer}
    specs = []
    for inp in m.graph.input:
        if inp.name in inits:
            continue
        t = inp.type.tensor_type
        shape = []
        for d in t.shape.dim:
            if d.HasField("dim_value"):
                shape.append(d.dim_value)
            elif d.dim_param in dims:
                shape.append(dims[d.dim_param])
            else:
                raise ProfileError(f"input '{inp.name}' has a dimension '{d.dim_param}' the workload does not set")
        dtype = _ONNX_TO_NUMPY.get(t.elem_type, "float32")
        if any(n < 0 for n in shape) or math.prod(shape) > MAX_INPUT_ELEMENTS:
            raise ProfileError(f"input '{inp.name}' has shape {shape}: more than {MAX_INPUT_ELEMENTS:,} elements "
                               "(or a negative dimension) cannot be fed", hint="check the model's input dims and "
                                                                             "the target's workload")
        if inp.name == "input_ids":
            fill = "ids"
        elif inp.name == "attention_mask":
            fill = "ones"
        elif inp.name == "position_ids":
            fill = "range"
        elif dtype.startswith("float"):
            fill = "normal"
        else:
            fill = "zeros"
        specs.append({"name": inp.name, "dtype": dtype, "shape": shape, "fill": fill,
                      "high": int(vocab_size or 2)})
    return specs


def runner_spec(model: str, inputs: list[dict[str, Any]], *, threads: int, runs: int, warmup: int = 5,
                min_seconds: float = 1.0, max_seconds: float = 300.0, op_profile_runs: int = 0,
                optimized_model_path: str | None = None) -> dict[str, Any]:
    """The runner's SPEC (see runner.py), shared by the local and the ssh profilers."""
    return {"model": model, "inputs": inputs, "threads": threads, "providers": ["CPUExecutionProvider"],
            "graph_optimization_level": "all", "warmup": warmup, "runs": runs, "min_seconds": min_seconds,
            "max_seconds": max_seconds, "seed": 0, "optimized_model_path": optimized_model_path,
            "op_profile_runs": op_profile_runs}


def parse_runner_output(stdout: str) -> dict[str, Any] | None:
    lines = [ln for ln in stdout.splitlines() if ln.startswith("{")]
    if not lines:
        return None
    try:
        out: dict[str, Any] = json.loads(lines[-1])
    except json.JSONDecodeError:
        return None
    return out


# --- limits: cores and memory ----------------------------------------------------------------------------------
def _own_memory_cgroup(root: Path) -> Path | None:
    """This process's cgroup-v1 memory group, from /proc/self/cgroup ("4:memory:/some/path")."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) == 3 and "memory" in parts[1].split(","):
            return root / parts[2].lstrip("/")
    return None


class MemoryCap:
    """A cgroup-v1 memory child (as root where v1 is mounted): exceeding it is an OOM kill, exit 137."""

    def __init__(self, limit_mb: float, root: Path = CGROUP_V1_MEMORY) -> None:
        self.limit_mb = limit_mb
        self.root = root
        self.path: Path | None = None

    def create(self) -> str | None:
        """Make the group; returns why not (a warning) when this host does not allow it."""
        parent = _own_memory_cgroup(self.root)
        if parent is None or not (parent / "memory.limit_in_bytes").is_file():
            return f"no cgroup-v1 memory controller at {self.root}"
        collect_stale_cgroups(parent)
        path = parent / f"edgecompress-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        try:
            path.mkdir()
        except OSError as e:
            return f"cannot create a memory cgroup under {parent}: {e.strerror}"
        self.path = path
        try:
            (path / "memory.limit_in_bytes").write_text(str(int(self.limit_mb * 2**20)))
            # with swap the group would page out instead of dying: cap memory+swap too where the kernel has it
            memsw = path / "memory.memsw.limit_in_bytes"
            if memsw.exists():
                with contextlib.suppress(OSError):
                    memsw.write_text(str(int(self.limit_mb * 2**20)))
        except OSError as e:
            self.remove()
            return f"cannot set the memory cgroup limit: {e.strerror}"
        return None

    def wrap(self, cmd: list[str]) -> list[str]:
        """Join the group, then exec the command (the group path is an argument, never spliced into the script)."""
        assert self.path is not None
        return ["sh", "-c", 'echo $$ > "$0" && exec "$@"', str(self.path / "cgroup.procs"), *cmd]

    def stats(self) -> dict[str, Any]:
        if self.path is None:
            return {}
        out: dict[str, Any] = {}
        with contextlib.suppress(OSError, ValueError):
            out["max_usage_mb"] = int((self.path / "memory.max_usage_in_bytes").read_text()) / 2**20
        with contextlib.suppress(OSError, ValueError):
            out["failcnt"] = int((self.path / "memory.failcnt").read_text())
        with contextlib.suppress(OSError, ValueError):
            for line in (self.path / "memory.oom_control").read_text().splitlines():
                key, _, value = line.partition(" ")
                if key == "oom_kill":
                    out["oom_kills"] = int(value)
        return out

    def remove(self) -> None:
        if self.path is None:
            return
        for _ in range(20):  # the killed process may take a moment to leave the group
            try:
                self.path.rmdir()
                break
            except FileNotFoundError:
                break
            except OSError:
                time.sleep(0.05)
        else:
            log.warning("could not remove the memory cgroup %s", self.path)
        self.path = None


def pinned_cpus(cores: int) -> tuple[list[int], str | None]:
    """The first `cores` CPUs this process may use, and a warning when the host has fewer."""
    allowed = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(
        range(os.cpu_count() or 1))
    if cores > len(allowed):
        return allowed, f"the target has {cores} cores, this host only {len(allowed)}: pinned to all of them"
    return allowed[:cores], None


@contextlib.contextmanager
def limited_command(cmd: list[str], *, cores: int | None, memory_mb: float | None,
                    cgroup_root: Path = CGROUP_V1_MEMORY) -> Iterator[tuple[list[str], dict[str, Any], MemoryCap]]:
    """The command wrapped in the limits this host allows, with a record of what was applied."""
    limits: dict[str, Any] = {"cores": cores, "memory_cap_mb": None, "pinning": None, "warnings": []}
    if cores:
        cpus, warning = pinned_cpus(cores)
        if warning:
            limits["warnings"].append(warning)
        limits["cpus"] = cpus
        if shutil.which("taskset"):
            cmd = ["taskset", "-c", ",".join(map(str, cpus)), *cmd]
            limits["pinning"] = "taskset"
        else:
            limits["warnings"].append("taskset not found: the runner pins itself (sched_setaffinity)")
            limits["pinning"] = "sched_setaffinity"
    cap = MemoryCap(memory_mb or 0.0, cgroup_root)
    if memory_mb:
        why_not = cap.create()
        if why_not:
            limits["warnings"].append(f"memory not capped at {memory_mb:.0f} MB: {why_not}")
        else:
            limits["memory_cap_mb"] = memory_mb
            cmd = cap.wrap(cmd)
    for w in limits["warnings"]:  # recorded in the profile; `profile` prints them
        log.info("%s", w)
    try:
        yield cmd, limits, cap
    finally:
        cap.remove()


_TMP_PREFIX = "edgecompress-prof-"


def collect_stale_temp_dirs(root: Path | None = None) -> list[Path]:
    """Remove the profiler temp dirs (`edgecompress-prof-<pid>-*`) of processes that no longer exist: a SIGKILL
    skips TemporaryDirectory's cleanup."""
    from edgecompress.locks import pid_alive

    removed: list[Path] = []
    base = Path(root or tempfile.gettempdir())
    with contextlib.suppress(OSError):
        for p in base.glob(f"{_TMP_PREFIX}*"):
            pid = p.name[len(_TMP_PREFIX):].split("-", 1)[0]
            if pid.isdigit() and int(pid) != os.getpid() and not pid_alive(int(pid)) and p.is_dir() \
                    and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
                removed.append(p)
    return removed


def collect_stale_cgroups(parent: Path) -> list[Path]:
    """Remove our memory cgroups (`edgecompress-<pid>-<hex>`) whose creator is dead (rmdir: only empty ones)."""
    from edgecompress.locks import dead_owner

    removed: list[Path] = []
    with contextlib.suppress(OSError):
        for p in parent.glob("edgecompress-*"):
            if dead_owner(p.name):
                with contextlib.suppress(OSError):
                    p.rmdir()
                    removed.append(p)
    return removed


def run_runner(spec: dict[str, Any], timeout_s: float = 600.0, *, cores: int | None = None,
               memory_mb: float | None = None, cgroup_root: Path = CGROUP_V1_MEMORY
               ) -> tuple[dict[str, Any], dict[str, Any]]:
    """Run runner.py on `spec` (its "model" as given) in a new process with only numpy and onnxruntime loaded:
    (result, limits)."""
    run = LocalTransport(cores, memory_mb, timeout_s, cgroup_root).launch(spec, str(spec["model"]), [])
    return run.result, run.limits


@dataclass
class LocalTransport:
    """This host's RunnerTransport: runner.py in a fresh process, the model read in place (other files are copied
    into the job dir), pinned to `cores` and capped at `memory_mb` where the host allows. `fetch_to`: where the
    runner's JOB_FILES outputs are brought back to (RunnerRun.fetched)."""

    cores: int | None = None
    memory_mb: float | None = None
    timeout_s: float = 600.0
    cgroup_root: Path = CGROUP_V1_MEMORY
    fetch_to: Path | None = None
    on_device: bool = False

    def run(self, files: list[Path], spec: dict[str, Any]) -> RunnerRun:
        model = files[0]
        return self.launch(spec, str(model), [f for f in files[1:] if not f.is_relative_to(model.parent)])

    def launch(self, spec: dict[str, Any], model: str, extra: list[Path]) -> RunnerRun:
        collect_stale_temp_dirs()
        with tempfile.TemporaryDirectory(prefix=f"{_TMP_PREFIX}{os.getpid()}-") as tmp:
            for f in extra:
                shutil.copy2(f, Path(tmp) / f.name)
            spec = job_spec(spec, tmp, model)
            spec_path = Path(tmp) / "spec.json"
            env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
            env["OMP_NUM_THREADS"] = str(spec.get("threads") or 1)
            base = [sys.executable, "-I", str(RUNNER), str(spec_path)]
            with limited_command(base, cores=self.cores, memory_mb=self.memory_mb,
                                 cgroup_root=self.cgroup_root) as (cmd, limits, cap):
                if limits.get("pinning") == "sched_setaffinity":
                    spec["cpu_affinity"] = limits["cpus"]
                spec_path.write_text(json.dumps(spec))
                try:
                    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=self.timeout_s, env=env)
                except subprocess.TimeoutExpired:
                    raise ProfileError(f"profiling took longer than {self.timeout_s:.0f} s",
                                       hint="lower --runs") from None
                cgroup = cap.stats()
            fetched = _fetch(spec, Path(tmp), self.fetch_to)
        if cgroup:
            limits["cgroup"] = cgroup
        result = parse_runner_output(proc.stdout)
        oom = out_of_memory(cap_mb=limits.get("memory_cap_mb"), killed=proc.returncode in (-9, 137),
                            oom_kills=cgroup.get("oom_kills", 0),
                            error=str(result.get("error", "")) if result is not None else "")
        if oom is not None:
            raise oom
        if result is None:
            tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            raise ProfileError(f"the profiler process failed: {tail}")
        if not result.get("ok"):
            raise ProfileError(result.get("error", "the profiler process failed"))
        return RunnerRun(result, limits=limits, fetched=fetched)


def _fetch(spec: dict[str, Any], job: Path, to: Path | None) -> dict[str, Path]:
    """Copy the runner's JOB_FILES outputs that exist in the job dir to `to` (before the job dir goes)."""
    out: dict[str, Path] = {}
    if to is None:
        return out
    for key in ("outputs", "optimized_model_path"):
        src = Path(str(spec.get(key) or ""))
        if spec.get(key) and src.parent == job and src.is_file():
            to.mkdir(parents=True, exist_ok=True)
            out[key] = Path(shutil.copy2(src, to / src.name))
    return out


def profile_local(model_path: Path, *, dims: dict[str, int], vocab_size: int | None, threads: int,
                  runs: int = 30, warmup: int = 5, min_seconds: float = 1.0,
                  optimized_model_path: Path | None = None, cores: int | None = None,
                  memory_cap_mb: float | None = None, op_profile_runs: int = 0,
                  cgroup_root: Path = CGROUP_V1_MEMORY) -> HostProfile:
    """Measure on this host. cores: pin to that many CPUs and cap threads at it; memory_cap_mb: cgroup cap."""
    if cores:
        threads = min(threads, cores) if threads else cores
    spec = runner_spec(str(model_path), input_specs(model_path, dims, vocab_size), threads=threads, runs=runs,
                       warmup=warmup, min_seconds=min_seconds, op_profile_runs=op_profile_runs,
                       optimized_model_path=str(optimized_model_path) if optimized_model_path else None)
    run = LocalTransport(cores, memory_cap_mb, cgroup_root=cgroup_root).run([model_path], spec)
    run.limits["threads"] = threads
    return HostProfile.from_result(run.result, dims, run.limits)
