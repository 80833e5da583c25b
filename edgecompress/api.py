"""The one entry point that builds a bundle: `--recipe auto` is dispatched here, once, for the Python API
(edgecompress.build), the CLI and the sweep.

Layering: api -> search -> pipeline -> steps/passes/profiling. The pipeline builds one recipe and knows nothing
of the search; the search is a client of the pipeline; nothing below imports this module.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from edgecompress.errors import ConfigError, UsageError

if TYPE_CHECKING:
    from edgecompress.manifest import Manifest
    from edgecompress.pipeline import BuildOptions
    from edgecompress.progress import Progress

AUTO = "auto"


def _check_auto(opts: BuildOptions, searching: bool) -> None:
    if opts.recipe == AUTO and opts.recipe_options.given:
        names = ", ".join(opts.recipe_options.label(k) for k in opts.recipe_options.given)
        raise ConfigError(f"{names} do{'es' if len(opts.recipe_options.given) == 1 else ''} not apply to recipe "
                          "'auto' (the search chooses every recipe's options)",
                          hint="leave them out, or name a recipe")
    if opts.recipe != AUTO and searching:
        raise UsageError("max_candidates, time_budget_s and keep_best go with recipe='auto'",
                         hint="use --recipe auto, or leave them out")


def build_bundle(opts: BuildOptions, progress: Progress | None = None, *, max_candidates: int | None = None,
                 time_budget_s: float | None = None, keep_best: bool = False) -> Manifest:
    """Build one recipe, or search (`opts.recipe == "auto"`, search.build_auto) and build the winner."""
    _check_auto(opts, max_candidates is not None or time_budget_s is not None or keep_best)
    if opts.recipe == AUTO:
        from edgecompress.search import build_auto

        return build_auto(opts, progress, max_candidates=max_candidates, time_budget_s=time_budget_s,
                          keep_best=keep_best)
    from edgecompress.pipeline import build

    return build(opts, progress)


def bundle_key(opts: BuildOptions) -> str:
    """The build key of what build_bundle(opts) would write (a sweep skips a job whose bundle has it)."""
    _check_auto(opts, False)
    if opts.recipe == AUTO:
        from edgecompress.search import auto_key

        return auto_key(opts)
    from edgecompress.pipeline import build_key, plan

    return build_key(plan(opts), opts)
