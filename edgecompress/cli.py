"""Command line: parse, call the API, print, map errors to exit codes. Nothing else imports this module."""

from __future__ import annotations

import json
import logging
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from edgecompress.errors import EdgeCompressError

F = TypeVar("F", bound=Callable[..., Any])

EXIT_BUDGET_FAILED = 3


def _interrupt_on_sigterm() -> None:
    def handler(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, handler)


def _run(fn: Callable[[], int | None], debug: bool) -> None:
    """Run a command body: typed errors become one line on stderr and their exit code."""
    try:
        code = fn() or 0
    except EdgeCompressError as e:
        if debug:
            raise
        click.echo(f"error: {e.one_line()}", err=True)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        click.echo("error: interrupted: nothing was written", err=True)
        sys.exit(130)
    sys.exit(code)


def _console(stderr: bool = False) -> Any:
    from rich.console import Console

    return Console(stderr=stderr, soft_wrap=True)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(package_name="edgecompress")
@click.option("-v", "--verbose", is_flag=True, help="Log what each step does (on stderr).")
@click.pass_context
def main(ctx: click.Context, verbose: bool) -> None:
    """edgecompress: a Hugging Face model in, an ONNX bundle that fits an edge device out, with proof.

    \b
    Examples:
      edgecompress build --target raspberry-pi-5
      edgecompress build ./my-bert --target host --recipe int8-dynamic --out /tmp/x
      edgecompress targets list
    """
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, stream=sys.stderr,
                        format="%(levelname)s %(name)s: %(message)s")
    ctx.ensure_object(dict)


@main.command()
@click.argument("model", required=False, type=click.Path(path_type=Path))
@click.option("-t", "--target", required=True, help="Target profile name (see `edgecompress targets list`) or a "
              ".toml file.")
@click.option("-r", "--recipe", help="Recipe name (see `edgecompress recipes`); default: the target's.")
@click.option("-o", "--out", type=click.Path(path_type=Path), help="Bundle directory [default: "
              "build/<model>-<target>/].")
@click.option("--calibration", type=click.Path(path_type=Path), help="Calibration texts: .txt, .jsonl, .csv or "
              ".tsv [default: the built-in corpus].")
@click.option("--eval", "eval_file", type=click.Path(path_type=Path), help="Evaluation texts, same formats "
              "[default: the built-in corpus].")
@click.option("--text-column", help="Column (.csv/.tsv) or field (.jsonl) holding the text.")
@click.option("--task", help="Task to export for (default: inferred from config.json), e.g. feature-extraction.")
@click.option("--runs", default=30, show_default=True, type=click.IntRange(min=1),
              help="Timed runs when profiling on this host.")
@click.option("--trust-remote-code", is_flag=True, help="Allow models that need code from their repo.")
@click.option("--force", is_flag=True, help="Replace an existing --out.")
@click.option("--json", "as_json", is_flag=True, help="Print the manifest summary as JSON on stdout.")
@click.option("--debug", is_flag=True, help="Show tracebacks.")
def build(model: Path | None, target: str, recipe: str | None, out: Path | None, calibration: Path | None,
          eval_file: Path | None, text_column: str | None, task: str | None, runs: int, trust_remote_code: bool,
          force: bool, as_json: bool, debug: bool) -> None:
    """Export MODEL, compress it with a recipe, measure it, check the target's budgets, write a bundle.

    MODEL is a local Hugging Face model directory; without it, the bundled all-MiniLM-L6-v2 is used.
    Exit codes: 0 within every budget, 3 a budget failed (bundle still written), 2 usage error,
    1 other error, 130 interrupted. Nothing is written on 1, 2 or 130.

    \b
    Examples:
      edgecompress build --target raspberry-pi-5
      edgecompress build --target host --recipe int8-dynamic --out /tmp/x
      edgecompress build ./my-model --target phone-arm64 --eval texts.csv --text-column sentence --json
    """
    from edgecompress.pipeline import BuildOptions
    from edgecompress.pipeline import build as run_build

    _interrupt_on_sigterm()
    opts = BuildOptions(model=model, target=target, recipe=recipe, out=out, calibration=calibration,
                        eval=eval_file, text_column=text_column, task=task, force=force,
                        trust_remote_code=trust_remote_code, runs=runs)

    def body() -> int:
        if sys.stderr.isatty() and not as_json:
            from edgecompress.progress import RichProgress

            with RichProgress() as progress:
                manifest = run_build(opts, progress)
        else:
            manifest = run_build(opts)
        if as_json:
            click.echo(json.dumps(manifest.summary(), indent=2))
        else:
            _print_verdict(manifest)
        return 0 if manifest.passed else EXIT_BUDGET_FAILED

    _run(body, debug)


def _print_verdict(manifest: Any) -> None:
    from rich.table import Table

    console = _console()
    table = Table(title=f"{manifest.source['name']} → {manifest.target['name']} ({manifest.recipe['name']})")
    for col in ("budget", "value", "limit", "unit", "verdict", "source"):
        table.add_column(col, justify="right" if col in ("value", "limit") else "left")
    for r in manifest.budgets:
        value = "–" if r.value is None else (f"{r.value:.4f}" if abs(r.value) < 10 else f"{r.value:,.1f}")
        limit = f"{r.limit:.4f}" if abs(r.limit) < 10 else f"{r.limit:,.1f}"
        verdict = "[green]PASS[/]" if r.passed else "[red]FAIL[/]"
        table.add_row(r.name, value, f"{r.comparison} {limit}", r.unit, verdict, r.source)
    console.print(table)
    console.print(f"bundle: {manifest.bundle_dir}  model.onnx {manifest.artifact.size_mb:.2f} MB  sha256 "
                  f"{manifest.artifact.sha256[:16]}…")
    if manifest.passed:
        console.print("[green]within every budget[/]")
    else:
        console.print("[red]budget failed:[/] " + "; ".join(r.miss() for r in manifest.failed_budgets))


@main.group()
def targets() -> None:
    """List and inspect target profiles (targets/*.toml).

    \b
    Examples:
      edgecompress targets list
      edgecompress targets show raspberry-pi-5
    """


@targets.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def targets_list(as_json: bool) -> None:
    """List the known targets with their default recipe and budgets.

    \b
    Example:
      edgecompress targets list
    """
    from edgecompress.targets import available_targets, load_target_file

    def body() -> int:
        rows = [load_target_file(p) for p in available_targets().values()]
        if as_json:
            click.echo(json.dumps([{"name": t.name, "description": t.description, "file": t.path} for t in rows],
                                  indent=2))
            return 0
        from rich.table import Table

        table = Table()
        for col in ("target", "default recipe", "size ≤ MB", "RAM ≤ MB", "p90 ≤ ms", "description"):
            table.add_column(col)
        for t in rows:
            b = t.budgets
            table.add_row(t.name, t.default_recipe, f"{b.max_size_mb:g}", f"{b.max_peak_ram_mb:g}",
                          f"{b.max_latency_p90_ms:g}", t.description)
        _console().print(table)
        return 0

    _run(body, False)


@targets.command("show")
@click.argument("name")
def targets_show(name: str) -> None:
    """Show one target profile: hardware, providers, workload, budgets, estimate factors.

    \b
    Example:
      edgecompress targets show raspberry-pi-5
    """
    from dataclasses import asdict

    from edgecompress.targets import load_target

    def body() -> int:
        t = load_target(name)
        d = asdict(t)
        d["hardware"]["isa"] = sorted(t.hardware.isa)
        click.echo(json.dumps(d, indent=2))
        return 0

    _run(body, False)


@main.command("recipes")
def recipes_cmd() -> None:
    """List the recipes and what each does.

    \b
    Example:
      edgecompress recipes
    """
    from edgecompress.recipes import RECIPES

    for spec in RECIPES.values():
        click.echo(f"{spec.name:14s} {spec.description}")


if __name__ == "__main__":
    main()
