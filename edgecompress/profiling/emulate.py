"""Arm emulation: run a bundle with aarch64 onnxruntime under qemu-user, for correctness and numerics only.

`setup_emulator()` builds a Debian arm64 root (debootstrap + qemu-user-static, Debian's packages) and installs
PyPI's aarch64 onnxruntime and numpy wheels into a venv there, cached under the user's cache dir. `emulate_bundle()`
runs the bundle's model in that root with the target's CPU model (QEMU_CPU picks ORT's kernel path: with or without
dotprod/i8mm) through the self-contained runner's fidelity mode, and reports whether the model loads, the op
histogram of the graph ORT optimized there, and the fidelity that Arm's kernels give. int8 results differ between
this x86 host and Arm (see anchors.md), so host-measured fidelity is not proof for an Arm device.

No timings: emulation is 25-60x slower than the real device. Needs Linux and root (debootstrap, chroot, mount).
Without /sys, ORT warns that cpuinfo failed; its kernels still follow QEMU_CPU (read from the ELF hwcaps):
cortex-a72 and cortex-a76 give different MatMulInteger results in tests/test_emulate.py.
Layering: profiling never imports cli; the runner is copied into the root as a file, not imported there.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgecompress.errors import ConfigError, ProfileError, UsageError
from edgecompress.profiling.local import parse_runner_output
from edgecompress.profiling.transport import RunnerRun, job_spec, out_of_memory
from edgecompress.targets import Target, load_target

log = logging.getLogger(__name__)

RUNNER = Path(__file__).with_name("runner.py")
SUITE = "bookworm"  # its python3 is 3.11: the wheels are downloaded for that
PYTHON_VERSION = "3.11"
VENV = "/opt/ortvenv"
WHEELS_IN_ROOT = "/opt/wheels"
READY = "ready.json"
APT_HINT = "apt-get install -y qemu-user-static binfmt-support debootstrap"
SETUP_HINT = "run `edgecompress emulator setup` first (as root, about 7 minutes)"


def emulator_dir() -> Path:
    """$EDGECOMPRESS_EMULATOR_DIR, else <cache dir>/emulator (the cache dir honours $EDGECOMPRESS_CACHE_DIR)."""
    if env := os.environ.get("EDGECOMPRESS_EMULATOR_DIR"):
        return Path(env)
    from edgecompress.cache import default_cache_dir

    return default_cache_dir() / "emulator"


def qemu_cpu(target: Target) -> str:
    """The QEMU CPU model whose features match the target's: that decides which ORT kernels run."""
    if target.hardware.arch != "aarch64":
        raise ConfigError(f"target '{target.name}' is {target.hardware.arch}, not aarch64: nothing to emulate",
                          hint="pick an Arm target, e.g. raspberry-pi-5")
    isa = set(target.hardware.isa)
    cpu = target.hardware.cpu.lower()
    if {"i8mm", "sve", "bf16"} & isa:
        return "max"  # Armv8.6+/v9 features: qemu 7.2 has no named core with them
    if "cortex-a72" in cpu or "dotprod" not in isa:
        return "cortex-a72"  # Armv8.0: no dotprod, no fp16 arithmetic
    return "cortex-a76"  # Armv8.2 with dotprod and fp16 (A76, A78, Neoverse N1)


@dataclass(frozen=True)
class Emulator:
    root: Path  # the emulator dir

    @property
    def rootfs(self) -> Path:
        return self.root / "rootfs"

    @property
    def ready_file(self) -> Path:
        return self.root / READY

    def ready(self) -> dict[str, Any] | None:
        try:
            info: dict[str, Any] = json.loads(self.ready_file.read_text())
        except (OSError, ValueError):
            return None
        return info if (self.rootfs / VENV.lstrip("/") / "bin" / "python").exists() else None


# ---------------------------------------------------------------------------------------------------------- setup


def _check_host() -> None:
    if not sys.platform.startswith("linux"):
        raise UsageError("Arm emulation needs Linux (qemu-user, chroot)")
    if os.geteuid() != 0:
        raise UsageError("Arm emulation needs root (debootstrap, chroot and mount)", hint="run it as root")
    missing = [t for t in ("debootstrap", "qemu-aarch64-static", "chroot", "mount", "update-binfmts")
               if shutil.which(t) is None]
    if missing:
        raise UsageError(f"missing tools for Arm emulation: {', '.join(missing)}", hint=APT_HINT)


def ensure_binfmt() -> None:
    """Register qemu-aarch64 with the kernel so the chroot can exec arm64 binaries."""
    binfmt = Path("/proc/sys/fs/binfmt_misc")
    if not (binfmt / "status").exists():
        subprocess.run(["mount", "-t", "binfmt_misc", "binfmt_misc", str(binfmt)], capture_output=True)
    entry = binfmt / "qemu-aarch64"
    if not entry.exists() or not entry.read_text().startswith("enabled"):
        subprocess.run(["update-binfmts", "--enable", "qemu-aarch64"], capture_output=True)
    if not entry.exists() or not entry.read_text().startswith("enabled"):
        raise ProfileError("could not register qemu-aarch64 with binfmt_misc",
                           hint=f"{APT_HINT}; then: mount -t binfmt_misc binfmt_misc {binfmt}; "
                                "update-binfmts --enable qemu-aarch64")


def debian_mirror() -> str:
    """The Debian mirror this machine's apt uses (the only network allowed here), else deb.debian.org."""
    paths = [Path("/etc/apt/sources.list"), *sorted(Path("/etc/apt/sources.list.d").glob("*"))]
    for p in paths:
        try:
            text = p.read_text()
        except OSError:
            continue
        for m in re.finditer(r"(?m)^\s*(?:URIs:\s*|deb\s+(?:\[[^]]*\]\s+)?)(\S+)", text):
            uri = m.group(1)
            if uri.rstrip("/").endswith("/debian"):
                return uri
    return "http://deb.debian.org/debian"


def _run_logged(cmd: list[str], logf: Path, what: str, env: dict[str, str] | None = None,
                timeout: float = 1800) -> str:
    with logf.open("a") as f:
        f.write(f"\n$ {' '.join(cmd)}\n")
        f.flush()
        try:
            proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                                  timeout=timeout)
        except subprocess.TimeoutExpired:
            raise ProfileError(f"emulator setup: {what} took over {timeout:.0f} s", hint=f"see {logf}") from None
        f.write(proc.stdout)
    if proc.returncode != 0:
        tail = (proc.stdout.strip().splitlines() or ["no output"])[-1][:200]
        raise ProfileError(f"emulator setup: {what} failed: {tail}", hint=f"full log: {logf}")
    return proc.stdout


@contextlib.contextmanager
def _lock(root: Path) -> Iterator[None]:
    """One setup or emulated run at a time per emulator dir: they share the /proc mount in the root."""
    root.mkdir(parents=True, exist_ok=True)
    with (root / ".lock").open("w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


@contextlib.contextmanager
def _proc_mounted(rootfs: Path) -> Iterator[None]:
    # /proc only: binding /sys as well makes ORT segfault under qemu 7.2 (it then warns about CPU detection)
    proc = rootfs / "proc"
    mounted = False
    if not os.path.ismount(proc):
        subprocess.run(["mount", "-t", "proc", "proc", str(proc)], check=True, capture_output=True)
        mounted = True
    try:
        yield
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(proc)], capture_output=True)


def _host_versions() -> dict[str, str]:
    import onnxruntime

    return {"onnxruntime": onnxruntime.__version__, "numpy": np.__version__}


def setup_emulator(*, force: bool = False, mirror: str | None = None,
                   on_step: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Build (or reuse) the arm64 root with onnxruntime and numpy at this host's versions. Idempotent."""
    _check_host()
    emu = Emulator(emulator_dir())
    step = on_step or (lambda s: log.info("%s", s))
    with _lock(emu.root):
        ensure_binfmt()
        if not force and (info := emu.ready()):
            step(f"already set up: {emu.rootfs}")
            return {**info, "reused": True}
        emu.ready_file.unlink(missing_ok=True)
        logf = emu.root / "setup.log"
        logf.write_text(f"edgecompress emulator setup {time.ctime()}\n")
        t0 = time.perf_counter()
        marker = emu.rootfs / ".edgecompress-debootstrap-complete"
        if force or not marker.exists():
            partial = emu.root / "rootfs.partial"
            for d in (partial, emu.rootfs):
                if d.exists():
                    _remove_root(d)
            mirror = mirror or debian_mirror()
            step(f"debootstrap arm64 {SUITE} from {mirror} (about 7 minutes)")
            _run_logged(["debootstrap", "--arch=arm64", "--variant=minbase",
                         "--include=python3,python3-venv,python3-pip,ca-certificates", SUITE, str(partial), mirror],
                        logf, "debootstrap")
            os.replace(partial, emu.rootfs)
            marker.write_text(time.ctime())
        versions = _host_versions()
        wheels = emu.root / "wheels"
        step(f"download aarch64 wheels: onnxruntime=={versions['onnxruntime']} numpy=={versions['numpy']}")
        wheels.mkdir(exist_ok=True)
        _run_logged([sys.executable, "-m", "pip", "download", "--quiet", "--only-binary=:all:",
                     "--platform", "manylinux_2_28_aarch64", "--platform", "manylinux2014_aarch64",
                     "--python-version", PYTHON_VERSION, "--implementation", "cp", "-d", str(wheels),
                     f"onnxruntime=={versions['onnxruntime']}", f"numpy=={versions['numpy']}"],
                    logf, "pip download of the aarch64 wheels")
        inside = emu.rootfs / WHEELS_IN_ROOT.lstrip("/")
        shutil.rmtree(inside, ignore_errors=True)
        shutil.copytree(wheels, inside)
        step("install onnxruntime and numpy in the arm64 root (about 1.5 minutes)")
        with _proc_mounted(emu.rootfs):
            chroot = ["chroot", str(emu.rootfs)]
            _run_logged([*chroot, "python3", "-m", "venv", "--clear", VENV], logf, "python3 -m venv")
            _run_logged([*chroot, f"{VENV}/bin/pip", "install", "--quiet", "--no-index", "--find-links",
                         WHEELS_IN_ROOT, f"onnxruntime=={versions['onnxruntime']}", f"numpy=={versions['numpy']}"],
                        logf, "pip install in the arm64 root")
            out = _run_logged([*chroot, f"{VENV}/bin/python", "-c",
                               "import json, platform, numpy, onnxruntime; print(json.dumps({'machine': "
                               "platform.machine(), 'python': platform.python_version(), 'onnxruntime': "
                               "onnxruntime.__version__, 'numpy': numpy.__version__}))"],
                              logf, "import check in the arm64 root")
        info = {**json.loads(out.strip().splitlines()[-1]), "suite": SUITE, "rootfs": str(emu.rootfs),
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "seconds": round(time.perf_counter() - t0, 1)}
        if info["machine"] != "aarch64":
            raise ProfileError(f"the emulated root reports machine {info['machine']}, not aarch64",
                               hint=f"see {logf}")
        emu.ready_file.write_text(json.dumps(info, indent=1))
        step(f"ready: onnxruntime {info['onnxruntime']} on {info['machine']} in {info['seconds']} s")
        return {**info, "reused": False}


def _remove_root(d: Path) -> None:
    # only a root edgecompress made: a finished one carries the marker, a partial one debootstrap's own work dir
    if not ((d / ".edgecompress-debootstrap-complete").is_file()
            or (d.name == "rootfs.partial" and ((d / "debootstrap").is_dir() or not any(d.iterdir())))):
        raise ProfileError(f"refusing to remove {d}: it is not an emulator root edgecompress made",
                           hint="move it away or point EDGECOMPRESS_CACHE_DIR elsewhere, then run "
                                "`edgecompress emulator setup` again")
    # never rmtree through a live mount (debootstrap mounts proc/sys while it works)
    for sub in ("proc", "sys", "dev/pts", "dev"):
        if os.path.ismount(d / sub):
            subprocess.run(["umount", "-l", str(d / sub)], capture_output=True)
    shutil.rmtree(d)


# ------------------------------------------------------------------------------------------------------------ run


@dataclass
class EmulatorTransport:
    """The arm64 root under qemu-user as a RunnerTransport: the files and runner.py copied into a job dir inside
    the root, run with QEMU_CPU=cpu, the runner's JOB_FILES outputs brought back to `fetch_to`, the job dir
    removed. A runner error is returned, not raised: whether the model loads and runs there is what it asks."""

    cpu: str
    timeout_s: float = 1800
    fetch_to: Path | None = None
    on_device: bool = False  # numerics only: never a timing or memory figure

    def run(self, files: list[Path], spec: dict[str, Any]) -> RunnerRun:
        emu = Emulator(emulator_dir())
        if emu.ready() is None:
            raise UsageError("the Arm emulator is not set up", hint=SETUP_HINT)
        _check_host()
        with _lock(emu.root):
            ensure_binfmt()
            job_rel = f"tmp/edgecompress-{uuid.uuid4().hex[:12]}"
            job = emu.rootfs / job_rel
            job.mkdir(parents=True)
            try:
                for f in files:
                    shutil.copy2(f, job / f.name)
                shutil.copy2(RUNNER, job / "runner.py")
                spec = job_spec(spec, f"/{job_rel}", f"/{job_rel}/{files[0].name}")
                spec.pop("work_dir")  # the fidelity mode writes only the named outputs
                (job / "spec.json").write_text(json.dumps(spec))
                env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "QEMU_CPU": self.cpu,
                       "OMP_NUM_THREADS": str(spec.get("threads") or 1), "LANG": "C.UTF-8"}
                with _proc_mounted(emu.rootfs):
                    try:
                        proc = subprocess.run(["chroot", str(emu.rootfs), f"{VENV}/bin/python", "-I",
                                               f"/{job_rel}/runner.py", f"/{job_rel}/spec.json"],
                                              capture_output=True, text=True, env=env, timeout=self.timeout_s)
                    except subprocess.TimeoutExpired:
                        raise ProfileError(f"the emulated run took over {self.timeout_s:.0f} s",
                                           hint="give fewer texts (--texts)") from None
                result = parse_runner_output(proc.stdout)
                if result is None:
                    oom = out_of_memory(cap_mb=None, killed=proc.returncode in (-9, 137), where=" under emulation")
                    if oom is not None:
                        raise oom
                    tail = (proc.stderr.strip().splitlines() or [f"exit code {proc.returncode}"])[-1]
                    raise ProfileError(f"the emulated runner failed: {tail[:300]}")
                fetched: dict[str, Path] = {}
                for key in ("outputs", "optimized_model_path"):
                    name = Path(str(spec.get(key) or "")).name
                    if spec.get(key) and (job / name).is_file() and self.fetch_to is not None:
                        self.fetch_to.mkdir(parents=True, exist_ok=True)
                        fetched[key] = Path(shutil.copy2(job / name, self.fetch_to / name))
            finally:
                shutil.rmtree(job, ignore_errors=True)
        return RunnerRun(result, fetched=fetched)


def run_in_emulator(model_files: list[Path], batches: list[dict[str, np.ndarray]], cpu: str, *,
                    threads: int = 1, timeout_s: float = 1800, optimized_to: Path | None = None
                    ) -> tuple[dict[str, Any], list[dict[str, np.ndarray]], dict[str, int]]:
    """Run `model_files[0]` (the rest: its external data) on the batches in the arm64 root with QEMU_CPU=cpu.
    `optimized_to`: where to keep the graph ORT optimized there (the Arm kernel share is read from it).

    Returns (runner result, outputs per batch by output name, op histogram of the graph ORT optimized there).
    """
    import tempfile

    with tempfile.TemporaryDirectory(prefix="edgecompress-emulate-") as tmp:
        inputs = Path(tmp) / "in" / "inputs.npz"
        inputs.parent.mkdir()
        arrays: dict[str, Any] = {f"{i}/{k}": v for i, b in enumerate(batches) for k, v in b.items()}
        np.savez(inputs, **arrays)
        spec = {"mode": "fidelity", "batches": "inputs.npz", "n_batches": len(batches), "outputs": "outputs.npz",
                "threads": threads, "optimized_model_path": "optimized.onnx"}
        run = EmulatorTransport(cpu, timeout_s, fetch_to=Path(tmp) / "out").run([*model_files, inputs], spec)
        result = run.result
        outputs: list[dict[str, np.ndarray]] = []
        ops: dict[str, int] = {}
        if result.get("ok"):
            with np.load(run.fetched["outputs"]) as z:
                outputs = [{n: z[f"{i}/{n}"] for n in result["outputs"]} for i in range(len(batches))]
        if "optimized_model_path" in run.fetched:
            ops = op_histogram(run.fetched["optimized_model_path"])
            if optimized_to is not None:
                optimized_to.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(run.fetched["optimized_model_path"], optimized_to)
    return result, outputs, ops


def op_histogram(path: Path) -> dict[str, int]:
    import onnx

    m = onnx.load(str(path), load_external_data=False)
    counts = Counter(f"{n.domain}.{n.op_type}" if n.domain not in ("", "ai.onnx") else n.op_type
                     for n in m.graph.node)
    return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


def _reference_runner(manifest: dict[str, Any], task: str) -> tuple[Callable[[dict[str, np.ndarray]], np.ndarray],
                                                                      str] | None:
    """The FP32 reference the build used: PyTorch on the source model, or the given .onnx file on this host."""
    from edgecompress import export
    from edgecompress.evaluate import OnnxRunner

    src = Path(manifest.get("source", {}).get("path", ""))
    if src.is_dir():
        return export.TorchReference(src, task), "PyTorch FP32"
    if src.suffix == ".onnx" and src.is_file():
        return OnnxRunner(src, export.judged_output(task)), f"{src.name} on this host"
    return None


def emulate_bundle(bundle_dir: Path | str, target: str | Path | Target, *, max_texts: int = 64,
                   batch_size: int = 16, threads: int = 1) -> dict[str, Any]:
    """Run a bundle under Arm emulation with the target's CPU model: does it load, which ops, what fidelity.

    Fidelity is computed on the first `max_texts` built-in evaluation texts against the build's FP32 reference,
    both with this host's kernels and with Arm's, so the two can be compared line by line.
    """
    from edgecompress import export
    from edgecompress.calibration import builtin_texts, tokenize_batches
    from edgecompress.evaluate import OnnxRunner, compare, pool

    bundle = Path(bundle_dir)
    tgt = target if isinstance(target, Target) else load_target(target)
    cpu = qemu_cpu(tgt)
    from edgecompress.profiling import read_bundle

    manifest, model_path = read_bundle(bundle)  # every file the manifest names verified (exit 10 / 16)
    if Emulator(emulator_dir()).ready() is None:  # before any heavy work
        raise UsageError("the Arm emulator is not set up", hint=SETUP_HINT)
    task = (manifest.get("source") or {}).get("task")
    if task not in export.supported_tasks():
        raise UsageError(f"{bundle}: its manifest names no task edgecompress can emulate ({task!r})")
    model_files = [model_path, *(bundle / f for f in manifest["artifact"]["files"]
                                 if f.startswith(model_path.name) and f != model_path.name)]
    import onnx

    proto = onnx.load(str(model_path), load_external_data=False)
    inits = {i.name for i in proto.graph.initializer}
    input_names = [i.name for i in proto.graph.input if i.name not in inits]
    tokenizer = export.load_tokenizer(bundle)
    texts = builtin_texts("evaluation").texts[:max_texts]
    batches = list(tokenize_batches(tokenizer, texts, input_names, batch_size=batch_size, max_length=512))

    t0 = time.perf_counter()
    result, arm_out, ops = run_in_emulator(model_files, batches, cpu, threads=threads)
    report: dict[str, Any] = {
        "source": "emulated", "target": tgt.name, "qemu_cpu": cpu, "machine": result.get("machine"),
        "onnxruntime": result.get("onnxruntime"), "loads": bool(result.get("loaded")),
        "runs": bool(result.get("ok")), "error": result.get("error"), "ops": ops, "texts": len(texts),
        "emulated_seconds": round(time.perf_counter() - t0, 1),
        "note": "emulated with qemu-user: numerics of Arm's kernels; no timings (25-60x slower than the device)",
    }
    if not result.get("ok"):
        return report
    output_name = export.judged_output(task)
    host_runner = OnnxRunner(model_path, output_name, threads=threads)
    host_raw = [host_runner(b) for b in batches]
    arm_raw = [o[output_name] for o in arm_out]
    host_pooled = np.concatenate([pool(task, o, b) for o, b in zip(host_raw, batches, strict=True)])
    arm_pooled = np.concatenate([pool(task, o, b) for o, b in zip(arm_raw, batches, strict=True)])
    report["host_vs_arm"] = {
        "output": output_name,
        "max_abs_diff": float(max(np.abs(h.astype(np.float64) - a).max() for h, a in zip(host_raw, arm_raw,
                                                                                          strict=True))),
        "bitwise_identical": all(np.array_equal(h, a) for h, a in zip(host_raw, arm_raw, strict=True)),
    }
    ref = _reference_runner(manifest, task)
    if ref is None:
        report["fidelity"] = None
        report["fidelity_note"] = "the source model is gone: no FP32 reference to compare against"
        return report
    run_ref, ref_name = ref
    ref_pooled = np.concatenate([pool(task, run_ref(b), b) for b in batches])
    report["fidelity"] = {"reference": ref_name, "arm": compare(task, ref_pooled, arm_pooled),
                          "host": compare(task, ref_pooled, host_pooled)}
    return report

