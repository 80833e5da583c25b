"""edgecompress: a Hugging Face model in, an ONNX bundle that fits an edge device out, with proof.

The Python API mirrors the CLI:

    import edgecompress
    manifest = edgecompress.build(target="raspberry-pi-5")          # the bundled all-MiniLM-L6-v2
    manifest.passed, manifest.budgets, manifest.artifact.size_mb

Heavy dependencies (torch, transformers, optimum) load only when a build runs.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgecompress.errors import (
    BuildInterrupted,
    ConfigError,
    DataError,
    EdgeCompressError,
    ExportError,
    ModelError,
    OutputError,
    PassError,
    ProfileError,
    UsageError,
)
from edgecompress.targets import Target, load_target

if TYPE_CHECKING:
    from edgecompress.manifest import Manifest
    from edgecompress.progress import Progress

__version__ = "0.1.0"

__all__ = [
    "BuildInterrupted",
    "ConfigError",
    "DataError",
    "EdgeCompressError",
    "ExportError",
    "ModelError",
    "OutputError",
    "PassError",
    "ProfileError",
    "Target",
    "UsageError",
    "build",
    "load_target",
]


def _path(value: Any) -> Any:
    return Path(value) if isinstance(value, (str, Path)) and value != "" else value


def build(
    model: str | Path | None = None,
    *,
    target: str | Path = "host",
    recipe: str | None = None,
    out: str | Path | None = None,
    calibration: str | Path | None = None,
    eval: str | Path | None = None,
    text_column: str | None = None,
    task: str | None = None,
    force: bool = False,
    runs: int = 30,
    cache: bool = True,
    package: str | None = None,
    progress: Progress | None = None,
    max_candidates: int | None = None,
    time_budget_s: float | None = None,
    keep_best: bool = False,
    **recipe_options: Any,
) -> Manifest:
    """Same as `edgecompress build`: returns the Manifest; raises EdgeCompressError subclasses.

    Recipe knobs are keyword arguments named as the flags without dashes (codebook_bits=3), validated by the same
    declarations as the flags (a knob the recipe does not read is a ConfigError). `recipe="auto"` searches
    (max_candidates, time_budget_s, keep_best as --max-candidates, --time-budget, --keep-best).
    A failed budget is not an exception: check `manifest.passed` / `manifest.failed_budgets`. `package="ort-mobile"`
    adds model.ort (None: the target's default). Errors name these arguments (force=True), not the CLI's flags.
    """
    from edgecompress.api import build_bundle
    from edgecompress.pipeline import BuildOptions
    from edgecompress.recipes import RecipeOptions

    # values of the wrong type pass through unconverted, so that pipeline.plan refuses them as the CLI would
    opts = BuildOptions(
        model=_path(model), target=target, recipe=recipe, out=_path(out), calibration=_path(calibration),
        eval=_path(eval), text_column=text_column, task=task, force=force, runs=runs, cache=cache,
        recipe_options=RecipeOptions(**recipe_options), package=package,
    )
    try:
        return build_bundle(opts, progress, max_candidates=max_candidates, time_budget_s=time_budget_s,
                            keep_best=keep_best)
    except EdgeCompressError as e:  # the same error, in this function's words (force=True, not --force)
        e.message = api_words(e.message)
        e.hint = api_words(e.hint) if e.hint else e.hint
        e.args = (e.message, *e.args[1:])
        raise


_API_BOOL_FLAGS = {"force": "force=True", "no_cache": "cache=False"}


def api_words(text: str) -> str:
    """A CLI error's flags as this function's arguments: `--force` -> `force=True`, `--out X` -> `out=X`."""
    import re

    def sub(m: re.Match[str]) -> str:
        name, space = m.group(1).replace("-", "_"), m.group(2) or ""
        if name in _API_BOOL_FLAGS:
            return _API_BOOL_FLAGS[name] + space
        return f"{name}=" if space else name

    return re.sub(r"(?<![\w-])--([a-z][a-z0-9-]*)( (?=[^\s-]))?", sub, text)
