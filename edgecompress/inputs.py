"""Checks of the build arguments that the CLI and the Python API share (pipeline.plan runs them first), so that
`edgecompress.build(runs=0)` fails exactly as `edgecompress build --runs 0` does: one ConfigError, exit 2, before
anything is read or written. Recipe knobs are checked where they are declared (recipes.py).

Layering: imports only errors and taskspec (metrics).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from edgecompress.errors import ConfigError
from edgecompress.taskspec import METRICS

MAX_RUNS = 100_000
MAX_THREADS = 1024
# the budget overrides a build accepts (BuildOptions.budgets / --max-size-mb ...): key -> its flag
BUDGET_OVERRIDES = {"max_size_mb": "--max-size-mb", "max_peak_ram_mb": "--max-ram-mb",
                    "max_latency_p90_ms": "--max-latency-ms", "max_load_ms": "max_load_ms",
                    "min_decode_tok_s": "min_decode_tok_s", "max_ttft_ms": "max_ttft_ms"}


def finite_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_int(name: str, value: Any, lo: int, hi: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise ConfigError(f"{name} must be an integer from {lo} to {hi:,}, got {value!r}")


def check_positive(name: str, value: Any) -> None:
    if not finite_number(value) or value <= 0:
        raise ConfigError(f"{name} must be a finite number > 0, got {value!r}")


def check_fidelity_limit(metric: str, value: Any, name: str) -> None:
    """A floor (or ceiling) of `metric`: finite and inside the values the metric can take."""
    m = METRICS[metric]
    lo, hi = m.low, m.high
    if not finite_number(value) or not lo <= value <= hi:
        kind = "floor" if m.higher_is_better else "ceiling"
        raise ConfigError(f"{name} must be a finite number in [{lo:g}, {hi:g}] ({metric}'s {kind}), got {value!r}")


def _check_path(name: str, value: Any, optional: bool = True) -> None:
    if value is None and optional:
        return
    if not isinstance(value, (str, Path)) or not str(value) or "\x00" in str(value):
        raise ConfigError(f"{name} must be a path, got {value!r}")


def check_build_options(opts: Any) -> None:
    """Every BuildOptions field but the recipe knobs: types, ranges, finiteness."""
    check_int("runs (--runs)", opts.runs, 1, MAX_RUNS)
    if opts.threads is not None:
        check_int("threads", opts.threads, 1, MAX_THREADS)
    check_int("eval_batch_size", opts.eval_batch_size, 1, 4096)
    check_int("seed", opts.seed, 0, 2**32 - 1)
    for flag in ("force", "cache"):
        if not isinstance(getattr(opts, flag), bool):
            raise ConfigError(f"{flag} must be true or false, got {getattr(opts, flag)!r}")
    for name in ("model", "out", "calibration", "eval"):
        _check_path(name, getattr(opts, name))
    if not isinstance(opts.target, (str, Path)) or not str(opts.target):
        raise ConfigError(f"target must be a target name or a .toml path, got {opts.target!r}")
    for name in ("text_column", "task", "recipe"):
        v = getattr(opts, name)
        if v is not None and (not isinstance(v, str) or not v.strip() or "\x00" in v):
            raise ConfigError(f"{name} must be a non-empty string, got {v!r}")
    if not isinstance(opts.budgets, dict):
        raise ConfigError(f"budgets must be a mapping of budget name to limit, got {opts.budgets!r}")
    for key, value in opts.budgets.items():
        if key not in BUDGET_OVERRIDES:
            raise ConfigError(f"unknown budget override '{key}'", hint=f"known: {', '.join(BUDGET_OVERRIDES)}")
        check_positive(f"{key} ({BUDGET_OVERRIDES[key]})" if BUDGET_OVERRIDES[key] != key else key, value)
    if opts.min_fidelity is not None and not finite_number(opts.min_fidelity):
        raise ConfigError(f"--min-fidelity must be a finite number, got {opts.min_fidelity!r}")
