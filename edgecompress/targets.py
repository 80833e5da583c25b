"""Target profiles: one TOML file per device, read with tomllib and validated strictly.

A new device is a new file. Unknown keys, missing keys and wrong types are errors that name the file, the key and
what was expected. Layering: imports only errors and taskspec (the metrics a fidelity budget may name).
"""

from __future__ import annotations

import difflib
import hashlib
import math
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import tomllib

from edgecompress.errors import ConfigError
from edgecompress.taskspec import METRICS

ISA_FLAGS = frozenset(
    {"avx2", "fma", "f16c", "avx512", "avx512_vnni", "avx_vnni", "neon", "fp16", "dotprod", "i8mm", "bf16", "sve",
     "sve2"}
)
KNOWN_PROVIDERS = frozenset(
    {"CPUExecutionProvider", "CUDAExecutionProvider", "TensorrtExecutionProvider", "XnnpackExecutionProvider",
     "NnapiExecutionProvider", "QNNExecutionProvider", "CoreMLExecutionProvider", "OpenVINOExecutionProvider",
     "DmlExecutionProvider", "ACLExecutionProvider", "ArmNNExecutionProvider"}
)


@dataclass(frozen=True)
class Hardware:
    cpu: str
    arch: str
    cores: int
    isa: frozenset[str]
    memory_mb: int
    usable_ram_mb: int
    bandwidth_gbs: float
    peak_gflops_fp32: float
    peak_gflops_fp16: float
    peak_gops_int8: float
    accelerator: str = ""


@dataclass(frozen=True)
class Runtime:
    providers: tuple[str, ...]
    threads: int
    package: str | None = None  # "ort-mobile": builds add model.ort unless --package none (mobile.py)


@dataclass(frozen=True)
class Workload:
    """The reference workload the latency budget is measured at."""

    batch: int
    sequence_length: int
    # decoders (LLMs): prompt tokens prefilled, tokens generated after it, and the context the KV cache is sized for
    prompt_length: int = 128
    new_tokens: int = 64
    context_length: int = 2048
    # image models whose processor does not fix the input size: the side of the square image the budget assumes
    image_size: int = 224
    # speech recognition: the clip a latency figure is for (seconds of 16 kHz audio; RTF = latency / this)
    audio_seconds: float = 10.0


@dataclass(frozen=True)
class Budgets:
    max_size_mb: float
    max_peak_ram_mb: float
    max_latency_p90_ms: float
    # metric name (see taskspec.METRICS) -> limit; the metric's direction says whether it is a floor or a ceiling
    fidelity: dict[str, float] = field(default_factory=dict)
    # session creation (load + graph optimization), measured only; optional in the TOML
    max_load_ms: float = 5000.0
    # decoders only (checked where there is a decode figure): generation speed floor, time-to-first-token ceiling
    min_decode_tok_s: float | None = None
    max_ttft_ms: float | None = None
    # [budgets.decoder]: the fields above that a causal LM is held to instead (a decoder's weights and KV cache are
    # a different size class from an encoder's); applied by Target.for_budget_section, empty where the file has no table
    decoder: dict[str, float] = field(default_factory=dict)

    def for_decoder(self) -> Budgets:
        """These budgets as a decoder is held to them: [budgets] with [budgets.decoder] on top."""
        if not self.decoder:
            return self
        over: dict[str, Any] = dict(self.decoder)  # only float fields (checked by _decoder_budgets)
        return replace(self, **over, decoder={})


@dataclass(frozen=True)
class EstimateFactors:
    """How far real kernels fall short of the roofline: measured / roofline, per target."""

    compute_efficiency: float
    bandwidth_efficiency: float
    runtime_baseline_mb: float


@dataclass(frozen=True)
class Target:
    name: str
    description: str
    host: bool
    default_recipe: str
    hardware: Hardware
    runtime: Runtime
    workload: Workload
    budgets: Budgets
    estimate: EstimateFactors
    path: str
    sha256: str

    def for_budget_section(self, section: str | None) -> Target:
        """The target as a model is judged on it: a task's budget section (its adapter's `budget_section` fact,
        e.g. "decoder": [budgets.decoder]) over [budgets]; None, or a section the file lacks: [budgets].

        Apply it before any per-build overrides (--max-size-mb ...), so that those still win."""
        if section == "decoder" and self.budgets.decoder:
            return replace(self, budgets=self.budgets.for_decoder())
        return self

    def summary(self) -> dict[str, Any]:
        return {"name": self.name, "file": self.path, "sha256": self.sha256, "host": self.host,
                "isa": sorted(self.hardware.isa)}


# --- schema --------------------------------------------------------------------------------------------------
# section -> key -> (python types accepted, required, description of what is expected)
_Num = (int, float)
_SCHEMA: dict[str, dict[str, tuple[tuple[type, ...], bool, str]]] = {
    "": {
        "name": ((str,), True, "a string"),
        "description": ((str,), True, "a string"),
        "host": ((bool,), False, "true or false"),
        "default_recipe": ((str,), True, "a recipe name"),
    },
    "hardware": {
        "cpu": ((str,), True, "a string"),
        "arch": ((str,), True, '"x86_64" or "aarch64"'),
        "cores": ((int,), True, "a positive integer"),
        "isa": ((list, str), True, f'a list of ISA flags from {sorted(ISA_FLAGS)}, or "detect" (this host)'),
        "memory_mb": ((int,), True, "a positive integer (MB)"),
        "usable_ram_mb": ((int,), True, "a positive integer (MB)"),
        "bandwidth_gbs": (_Num, True, "a positive number (GB/s)"),
        "peak_gflops_fp32": (_Num, True, "a positive number (GFLOP/s)"),
        "peak_gflops_fp16": (_Num, True, "a positive number (GFLOP/s)"),
        "peak_gops_int8": (_Num, True, "a positive number (GOP/s)"),
        "accelerator": ((str,), False, "a string"),
    },
    "runtime": {
        "providers": ((list,), True, "a list of ONNX Runtime execution provider names"),
        "threads": ((int,), True, "a positive integer"),
        "package": ((str,), False, '"ort-mobile" (the default --package of builds for this target) or "none"'),
    },
    "workload": {
        "batch": ((int,), True, "a positive integer"),
        "sequence_length": ((int,), True, "a positive integer"),
        "prompt_length": ((int,), False, "a positive integer (decoder prompt tokens)"),
        "new_tokens": ((int,), False, "a positive integer (decoder tokens generated)"),
        "context_length": ((int,), False, "a positive integer (decoder context the KV cache is sized for)"),
        "image_size": ((int,), False, "a positive integer (image side in pixels, for image models)"),
        "audio_seconds": (_Num, False, "a positive number (speech: seconds of audio per clip)"),
    },
    "budgets": {
        "max_size_mb": (_Num, True, "a positive number (MB)"),
        "max_peak_ram_mb": (_Num, True, "a positive number (MB)"),
        "max_latency_p90_ms": (_Num, True, "a positive number (ms)"),
        "max_load_ms": (_Num, False, "a positive number (ms)"),
        "min_decode_tok_s": (_Num, False, "a positive number (decoder tokens/s, a floor)"),
        "max_ttft_ms": (_Num, False, "a positive number (decoder time to first token, ms)"),
        "fidelity": ((dict,), False, "a table of metric = limit"),
        "decoder": ((dict,), False, "a table of budget = limit for decoders (causal LMs)"),
    },
    "estimate": {
        "compute_efficiency": (_Num, True, "a number in (0, 1]"),
        "bandwidth_efficiency": (_Num, True, "a number in (0, 1]"),
        "runtime_baseline_mb": (_Num, True, "a number (MB)"),
    },
}


# Upper bounds "within reason": beyond them a value is a typo, and some would make the estimator or the profiler
# allocate without bound (a batch of 10**9).
_MAX: dict[str, float] = {
    "hardware.cores": 1024, "runtime.threads": 1024, "hardware.memory_mb": 16 * 2**20,
    "hardware.usable_ram_mb": 16 * 2**20, "workload.batch": 1024, "workload.sequence_length": 131_072,
    "workload.prompt_length": 131_072, "workload.new_tokens": 131_072, "workload.context_length": 1_048_576,
    "workload.image_size": 8192,
    "workload.audio_seconds": 600,
}
MAX_TARGET_FILE_BYTES = 1 << 20


def _bad(path: Path, key: str, expected: str, got: object = None) -> ConfigError:
    got_text = "" if got is None else f", got {got!r}"
    return ConfigError(f"malformed target file {path}: key '{key}' must be {expected}{got_text}",
                       hint="fix the file, or compare with `edgecompress targets show host`")


def _section(path: Path, data: dict[str, Any], name: str) -> dict[str, Any]:
    spec = _SCHEMA[name]
    table = data if name == "" else data.get(name)
    if name and table is None:
        raise _bad(path, f"[{name}]", "a table")
    if not isinstance(table, dict):
        raise _bad(path, f"[{name}]", "a table", table)
    prefix = f"{name}." if name else ""
    allowed = set(spec) | (set(_SCHEMA) - {""} if name == "" else set())
    for key in table:
        if key not in allowed:
            close = difflib.get_close_matches(key, allowed, n=1)
            hint = f" (did you mean '{prefix}{close[0]}'?)" if close else ""
            raise ConfigError(f"malformed target file {path}: unknown key '{prefix}{key}'{hint}",
                              hint=f"allowed keys here: {', '.join(sorted(allowed))}")
    out: dict[str, Any] = {}
    for key, (types, required, expected) in spec.items():
        if key not in table:
            if required:
                raise _bad(path, prefix + key, expected + " (missing)")
            continue
        value = table[key]
        if isinstance(value, bool) and bool not in types:
            raise _bad(path, prefix + key, expected, value)
        if not isinstance(value, types):
            raise _bad(path, prefix + key, expected, value)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            lo_ok = value >= 0 if key == "runtime_baseline_mb" else value > 0
            hi = _MAX.get(prefix + key, math.inf)
            if not math.isfinite(value) or not lo_ok or value > hi:
                bound = f" (at most {hi:,})" if math.isfinite(hi) else ""
                raise _bad(path, prefix + key, f"{expected}{bound}", value)
        out[key] = value
    return out


# [budgets.decoder]: which [budgets] keys a decoder may be held to differently
_DECODER_BUDGETS = ("max_size_mb", "max_peak_ram_mb", "max_latency_p90_ms", "max_load_ms", "min_decode_tok_s",
                    "max_ttft_ms")


def _decoder_budgets(path: Path, table: dict[str, Any]) -> dict[str, float]:
    out: dict[str, float] = {}
    for key, value in table.items():
        if key not in _DECODER_BUDGETS:
            close = difflib.get_close_matches(key, _DECODER_BUDGETS, n=1)
            hint = f" (did you mean 'budgets.decoder.{close[0]}'?)" if close else ""
            raise ConfigError(f"malformed target file {path}: unknown key 'budgets.decoder.{key}'{hint}",
                              hint=f"allowed keys here: {', '.join(_DECODER_BUDGETS)}")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
            raise _bad(path, f"budgets.decoder.{key}", "a positive number", value)
        out[key] = float(value)
    return out


def _parse(path: Path, data: dict[str, Any], sha: str) -> Target:
    top = _section(path, data, "")
    hw = _section(path, data, "hardware")
    rt = _section(path, data, "runtime")
    wl = _section(path, data, "workload")
    bd = _section(path, data, "budgets")
    est = _section(path, data, "estimate")

    if top["name"] != path.stem:
        raise _bad(path, "name", f'"{path.stem}" (the file name without .toml)', top["name"])
    if hw["arch"] not in ("x86_64", "aarch64"):
        raise _bad(path, "hardware.arch", '"x86_64" or "aarch64"', hw["arch"])
    if isinstance(hw["isa"], str):
        if hw["isa"] != "detect" or not top.get("host", False):
            raise _bad(path, "hardware.isa", 'a list of flags ("detect" only on a host = true target)', hw["isa"])
        hw["isa"] = sorted(detect_isa())
    for flag in hw["isa"]:
        if flag not in ISA_FLAGS:
            raise _bad(path, "hardware.isa", f"flags from {sorted(ISA_FLAGS)}", flag)
    for p in rt["providers"]:
        if p not in KNOWN_PROVIDERS:
            raise _bad(path, "runtime.providers", f"provider names from {sorted(KNOWN_PROVIDERS)}", p)
    if rt.get("package", "none") not in ("ort-mobile", "none"):
        raise _bad(path, "runtime.package", '"ort-mobile" or "none"', rt["package"])
    if hw["usable_ram_mb"] > hw["memory_mb"]:
        raise _bad(path, "hardware.usable_ram_mb", f"at most memory_mb ({hw['memory_mb']})", hw["usable_ram_mb"])
    for key in ("compute_efficiency", "bandwidth_efficiency"):
        if not 0 < est[key] <= 1:
            raise _bad(path, f"estimate.{key}", "a number in (0, 1]", est[key])
    fidelity = bd.pop("fidelity", {})
    decoder = _decoder_budgets(path, bd.pop("decoder", {}))
    for metric, limit in fidelity.items():
        if metric not in METRICS:
            raise _bad(path, f"budgets.fidelity.{metric}", f"a metric from {sorted(METRICS)}")
        lo, hi = METRICS[metric].low, METRICS[metric].high
        if isinstance(limit, bool) or not isinstance(limit, (int, float)) or not math.isfinite(limit) \
                or not lo <= limit <= hi:
            raise _bad(path, f"budgets.fidelity.{metric}", f"a finite number in [{lo:g}, {hi:g}]", limit)
    if rt["threads"] > 4 * hw["cores"]:
        raise _bad(path, "runtime.threads", f"at most 4 x hardware.cores ({4 * hw['cores']})", rt["threads"])
    if "prompt_length" in wl and "context_length" in wl and wl["prompt_length"] >= wl["context_length"]:
        raise _bad(path, "workload.prompt_length", f"less than context_length ({wl['context_length']})",
                   wl["prompt_length"])

    return Target(
        name=top["name"],
        description=top["description"],
        host=top.get("host", False),
        default_recipe=top["default_recipe"],
        hardware=Hardware(
            cpu=hw["cpu"], arch=hw["arch"], cores=hw["cores"], isa=frozenset(hw["isa"]),
            memory_mb=hw["memory_mb"], usable_ram_mb=hw["usable_ram_mb"], bandwidth_gbs=float(hw["bandwidth_gbs"]),
            peak_gflops_fp32=float(hw["peak_gflops_fp32"]), peak_gflops_fp16=float(hw["peak_gflops_fp16"]),
            peak_gops_int8=float(hw["peak_gops_int8"]), accelerator=hw.get("accelerator", ""),
        ),
        runtime=Runtime(providers=tuple(rt["providers"]), threads=rt["threads"],
                        package=None if rt.get("package", "none") == "none" else rt["package"]),
        workload=Workload(batch=wl["batch"], sequence_length=wl["sequence_length"],
                          **{k: wl[k] for k in ("prompt_length", "new_tokens", "context_length", "image_size",
                                                "audio_seconds")
                             if k in wl}),
        budgets=Budgets(
            max_size_mb=float(bd["max_size_mb"]), max_peak_ram_mb=float(bd["max_peak_ram_mb"]),
            max_latency_p90_ms=float(bd["max_latency_p90_ms"]),
            fidelity={k: float(v) for k, v in fidelity.items()},
            **({"max_load_ms": float(bd["max_load_ms"])} if "max_load_ms" in bd else {}),
            **{k: float(bd[k]) for k in ("min_decode_tok_s", "max_ttft_ms") if k in bd},
            decoder=decoder,
        ),
        estimate=EstimateFactors(
            compute_efficiency=float(est["compute_efficiency"]),
            bandwidth_efficiency=float(est["bandwidth_efficiency"]),
            runtime_baseline_mb=float(est["runtime_baseline_mb"]),
        ),
        path=str(path),
        sha256=sha,
    )


# --- lookup --------------------------------------------------------------------------------------------------
def target_dirs() -> list[Path]:
    """Where target files are looked up, first match wins: $EDGECOMPRESS_TARGETS_DIR, then the shipped ones."""
    dirs: list[Path] = []
    if env := os.environ.get("EDGECOMPRESS_TARGETS_DIR"):
        dirs.extend(Path(p) for p in env.split(os.pathsep) if p)
    here = Path(__file__).resolve().parent
    packaged = here / "_targets"  # inside a wheel
    dirs.append(packaged if packaged.is_dir() else here.parent / "targets")  # editable install / source tree
    return dirs


def available_targets() -> dict[str, Path]:
    found: dict[str, Path] = {}
    for d in target_dirs():
        if d.is_dir():
            for f in sorted(d.glob("*.toml")):
                found.setdefault(f.stem, f)
    return found


# /proc/cpuinfo flag (x86 "flags", Arm "Features") -> our ISA flag
_CPUINFO_FLAGS = {"avx2": "avx2", "fma": "fma", "f16c": "f16c", "avx512f": "avx512", "avx512_vnni": "avx512_vnni",
                  "avx_vnni": "avx_vnni", "asimd": "neon", "asimddp": "dotprod", "i8mm": "i8mm", "asimdhp": "fp16",
                  "bf16": "bf16", "avx512_bf16": "bf16", "amx_bf16": "bf16", "sve": "sve",
                  "sve2": "sve2"}


def detect_isa(cpuinfo: str | None = None) -> frozenset[str]:
    """This machine's ISA flags, from /proc/cpuinfo: hosts differ (one has VNNI, the next does not), and the
    quantization passes choose their settings from these flags."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return frozenset()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return frozenset(_CPUINFO_FLAGS[f] for f in value.split() if f in _CPUINFO_FLAGS)
    return frozenset()


def load_target_file(path: Path) -> Target:
    if not path.is_file():  # a FIFO or device would block the read
        raise ConfigError(f"target file {path} is not a regular file", hint="give a .toml file")
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_TARGET_FILE_BYTES + 1)
    except OSError as e:
        raise ConfigError(f"cannot read target file {path}: {e.strerror}") from None
    if len(raw) > MAX_TARGET_FILE_BYTES:
        raise ConfigError(f"target file {path} is larger than {MAX_TARGET_FILE_BYTES >> 20} MiB",
                          hint="a target file is a few dozen lines of TOML")
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"malformed target file {path}: {e}", hint="it must be valid TOML") from None
    return _parse(path, data, hashlib.sha256(raw).hexdigest())


def load_target(name_or_path: str | Path) -> Target:
    """A target by name (targets/NAME.toml) or by the path of a .toml file."""
    text = str(name_or_path)
    if text.endswith(".toml") or os.sep in text:
        p = Path(text)
        if not p.exists():
            raise ConfigError(f"target file not found: {p}")
        return load_target_file(p)
    known = available_targets()
    if text not in known:
        close = difflib.get_close_matches(text, list(known), n=3, cutoff=0.4)
        hint = f"did you mean {', '.join(close)}?" if close else f"known targets: {', '.join(sorted(known))}"
        raise ConfigError(f"unknown target '{text}'", hint=hint + " See `edgecompress targets list`")
    return load_target_file(known[text])
