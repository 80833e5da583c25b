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

from edgecompress.errors import describe_failure

F = TypeVar("F", bound=Callable[..., Any])

EXIT_BUDGET_FAILED = 3


_TERM_WATCH: list[bool] = []


def _interrupt_on_sigterm() -> None:
    """SIGTERM is Ctrl-C (KeyboardInterrupt: everything half-written is removed on the way out). Python runs that
    handler only when the main thread returns to the interpreter, so a long call into C (ONNX Runtime, BLAS) would
    defer it: a watchdog thread, woken by the signal itself through the wakeup fd, gives the main thread
    EDGECOMPRESS_TERM_GRACE_S (10 s) to unwind, then removes what this process is writing and exits 130."""

    def handler(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, handler)
    if _TERM_WATCH:
        return
    import os
    import threading

    r, w = os.pipe()
    os.set_blocking(w, False)
    try:
        signal.set_wakeup_fd(w, warn_on_full_buffer=False)
    except ValueError:  # not the main thread: the plain handler is all we can do
        return
    _TERM_WATCH.append(True)
    grace = float(os.environ.get("EDGECOMPRESS_TERM_GRACE_S", "10"))

    def watch() -> None:
        import time

        from edgecompress.locks import remove_in_flight

        while True:
            got = os.read(r, 64)
            if signal.SIGTERM in got:
                time.sleep(grace)
                remove_in_flight()
                os.write(2, b"error: interrupted (SIGTERM): did not stop within the grace period; "
                            b"what it was writing was removed\n")
                os._exit(130)

    threading.Thread(target=watch, name="edgecompress-sigterm", daemon=True).start()


def _run(fn: Callable[[], int | None], debug: bool) -> None:
    """Run a command body: every exception becomes one line on stderr and a documented exit code
    (errors.describe_failure); the traceback only with --debug."""
    try:
        code = fn() or 0
    except (SystemExit, click.ClickException):  # click's own usage errors: _OneLineErrors prints them
        raise
    except BaseException as e:
        if debug and not isinstance(e, KeyboardInterrupt):
            raise
        line, exit_code = describe_failure(e)
        click.echo(f"error: {line}", err=True)
        sys.exit(exit_code)
    sys.exit(code)


class _OneLineErrors(click.Group):
    """click's usage errors as one line (`error: ... (see `edgecompress CMD -h`)`), like every other error."""

    def main(self, *args: Any, **kwargs: Any) -> Any:
        kwargs["standalone_mode"] = False
        try:
            rv = super().main(*args, **kwargs)
        except click.exceptions.NoArgsIsHelpError as e:
            e.show()
            sys.exit(e.exit_code)
        except click.ClickException as e:
            ctx = getattr(e, "ctx", None)
            where = f" (see `{ctx.command_path} -h`)" if ctx is not None else ""
            click.echo(f"error: {' '.join(e.format_message().split())}{where}", err=True)
            sys.exit(e.exit_code)
        except click.exceptions.Abort:
            click.echo("error: interrupted: nothing was written", err=True)
            sys.exit(130)
        sys.exit(rv if isinstance(rv, int) else 0)


class _FinitePositive(click.ParamType):
    """A finite number > 0: click's FloatRange lets nan and inf through."""

    name = "number"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> float:
        import math

        try:
            f = float(value)
        except (TypeError, ValueError):
            self.fail(f"{value!r} is not a number", param, ctx)
        if not math.isfinite(f) or f <= 0:
            self.fail(f"{value!r} is not a finite number > 0", param, ctx)
        return f


FINITE_POSITIVE = _FinitePositive()


def _console(stderr: bool = False) -> Any:
    from rich.console import Console

    return Console(stderr=stderr, soft_wrap=True)


@click.group(cls=_OneLineErrors, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
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


def recipe_option_flags(fn: F) -> F:
    """One flag per recipe knob, derived from the knobs the registered passes declare (passes/options.py): a new
    knob is a pass config field, never an edit here. Values are validated by the declaration (RecipeOptions),
    the same code path as the Python API, so a bad value is a one-line ConfigError naming the flag."""
    from edgecompress.recipes import knob_default, knobs

    for opt in reversed(list(knobs().values())):
        fn = click.option(opt.flag, type=opt.type, default=None, help=opt.help_text(knob_default(opt.name)))(fn)
    return fn


def _recipe_options(flags: dict[str, Any]) -> Any:
    from edgecompress.recipes import RecipeOptions

    return RecipeOptions.from_flags(flags)


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
@click.option("--max-size-mb", type=click.FloatRange(min=0, min_open=True), help="Override the size budget (MB).")
@click.option("--max-ram-mb", type=click.FloatRange(min=0, min_open=True), help="Override the peak RAM budget (MB).")
@click.option("--max-latency-ms", type=click.FloatRange(min=0, min_open=True),
              help="Override the p90 latency budget (ms).")
@click.option("--min-fidelity", type=float, help="Override the floor of the task's primary fidelity metric "
              "(cosine_mean for embeddings, top1_agreement for classifiers).")
@click.option("--max-candidates", type=click.IntRange(min=1), help="--recipe auto: build at most this many.")
@click.option("--time-budget", type=FINITE_POSITIVE,
              help="--recipe auto: stop building candidates after this many seconds.")
@click.option("--keep-best", is_flag=True, help="--recipe auto: write the closest bundle even if nothing fits.")
@click.option("--no-cache", is_flag=True, help="Neither read nor write the build cache (see `edgecompress cache`).")
@recipe_option_flags
@click.option("--package", type=click.Choice(["ort-mobile", "none"]), default=None,
              help="Also write an ORT Mobile package (model.ort, its operator config, provider coverage) "
                   "[default: the target's, ort-mobile on phone-arm64].")
@click.option("--force", is_flag=True, help="Replace an existing --out.")
@click.option("--json", "as_json", is_flag=True, help="Print the manifest summary as JSON on stdout.")
@click.option("--debug", is_flag=True, help="Show tracebacks.")
def build(model: Path | None, target: str, recipe: str | None, out: Path | None, calibration: Path | None,
          eval_file: Path | None, text_column: str | None, task: str | None, runs: int,
          max_size_mb: float | None, max_ram_mb: float | None, max_latency_ms: float | None,
          min_fidelity: float | None, max_candidates: int | None, time_budget: float | None, keep_best: bool,
          no_cache: bool, package: str | None, force: bool, as_json: bool, debug: bool, **recipe_flags: Any) -> None:
    """Export MODEL, compress it with a recipe, measure it, check the target's budgets, write a bundle.

    MODEL is a local Hugging Face model directory or an .onnx file; without it, the bundled all-MiniLM-L6-v2.
    Exit codes: 0 within every budget, 3 a budget failed (bundle still written), 2 usage error, 1 other error,
    4 the system refused (disk full, permission denied, out of memory), 5 another build is writing --out,
    130 interrupted. Nothing is written on 1, 2, 4, 5 or 130. --force replaces only an edgecompress bundle.

    \b
    Examples:
      edgecompress build --target raspberry-pi-5
      edgecompress build --target host --recipe int8-dynamic --out /tmp/x
      edgecompress build ./my-model --target phone-arm64 --eval texts.csv --text-column sentence --json
      edgecompress build --target raspberry-pi-4 --recipe auto --max-size-mb 15
    """
    from edgecompress.pipeline import BuildOptions

    _interrupt_on_sigterm()
    if recipe != "auto" and (max_candidates or time_budget or keep_best):
        click.echo("error: --max-candidates, --time-budget and --keep-best go with --recipe auto", err=True)
        sys.exit(2)

    def options() -> BuildOptions:
        return BuildOptions(model=model, target=target, recipe=recipe, out=out, calibration=calibration,
                            eval=eval_file, text_column=text_column, task=task, force=force,
                            runs=runs, cache=not no_cache,
                            budgets={k: v for k, v in (("max_size_mb", max_size_mb), ("max_peak_ram_mb", max_ram_mb),
                                                       ("max_latency_p90_ms", max_latency_ms)) if v is not None},
                            min_fidelity=min_fidelity, recipe_options=_recipe_options(recipe_flags),
                            package=package)

    def run(progress: Any = None) -> Any:
        from edgecompress.api import build_bundle

        return build_bundle(options(), progress, max_candidates=max_candidates, time_budget_s=time_budget,
                            keep_best=keep_best)

    def body() -> int:
        if sys.stderr.isatty() and not as_json:
            from edgecompress.progress import RichProgress

            with RichProgress() as progress:
                manifest = run(progress)
        else:
            manifest = run()
        if as_json:
            click.echo(json.dumps(manifest.summary(), indent=2))
        else:
            _print_verdict(manifest)
        return 0 if manifest.passed else EXIT_BUDGET_FAILED

    _run(body, debug)


def _budget_table(title: str, rows: Any) -> Any:
    """The budget verdict table that build and profile both print."""
    from rich.table import Table

    table = Table(title=title)
    for col in ("budget", "value", "limit", "unit", "verdict", "source"):
        table.add_column(col, justify="right" if col in ("value", "limit") else "left")
    for r in rows:
        value = "–" if r.value is None else (f"{r.value:.4f}" if abs(r.value) < 10 else f"{r.value:,.1f}")
        limit = f"{r.limit:.4f}" if abs(r.limit) < 10 else f"{r.limit:,.1f}"
        verdict = "[green]PASS[/]" if r.passed else "[red]FAIL[/]"
        table.add_row(r.name, value, f"{r.comparison} {limit}", r.unit, verdict, r.source)
    return table


def _print_verdict(manifest: Any) -> None:
    console = _console()
    console.print(_budget_table(f"{manifest.source['name']} → {manifest.target['name']} ({manifest.recipe['name']})",
                                manifest.budgets))
    if manifest.search:
        _print_search(console, manifest.search)
    console.print(f"bundle: {manifest.bundle_dir}  model.onnx {manifest.artifact.size_mb:.2f} MB  sha256 "
                  f"{manifest.artifact.sha256[:16]}…")
    if mob := (manifest.bundle or {}).get("ort_mobile"):
        console.print(f"ORT Mobile: {mob['file']} {mob['size_bytes'] / 1e6:.2f} MB, operator config "
                      f"{mob['required_operators_and_types']}, provider coverage in report.html")
    if manifest.export.get("path"):  # decoders: which export path the build took (edgecompress/genai)
        console.print(f"decoder export: {manifest.export['path']} path ({manifest.export['path_why']})"
                      + ("; runs in onnxruntime_genai as is" if manifest.export.get("genai_bundle") else ""))
    if manifest.passed:
        console.print("[green]within every budget[/]")
    else:
        console.print("[red]budget failed:[/] " + "; ".join(r.miss() for r in manifest.failed_budgets))


def _print_search(console: Any, search: dict[str, Any]) -> None:
    from rich.markup import escape
    from rich.table import Table

    # escape: candidate names carry their options in brackets (codebook[codebook-bits=4]), which rich would
    # otherwise take for markup and drop
    table = Table(title=escape(f"recipe search: chose {search['chosen']} ({search['why']})"))
    for col in ("candidate", "status", search["metric"], "MB", "why"):
        table.add_column(col)
    for c in search["candidates"]:
        fid = c.get("fidelity", {}).get(search["metric"])
        table.add_row(escape(c["candidate"] + (" ✔" if c.get("chosen") else "")), c["status"],
                      "" if fid is None else f"{fid:.4f}", "" if c.get("size_mb") is None else f"{c['size_mb']:.2f}",
                      escape(str(c.get("why") or c.get("reason", ""))))
    console.print(table)


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
    """List the recipes, what each does, and the flags each reads.

    \b
    Example:
      edgecompress recipes
    """
    from edgecompress.recipes import RECIPES, recipe_knobs, structural_knobs

    for spec in RECIPES.values():
        click.echo(f"{spec.name:14s} {spec.description}")
        if flags := recipe_knobs(spec):
            click.echo(f"{'':14s} flags: {' '.join(o.flag for o in flags)}")
    click.echo(f"{'any recipe':14s} structural passes first, when asked: "
               f"{' '.join(o.flag for o in structural_knobs())}")


@main.group()
def cache() -> None:
    """Inspect or clear the build cache (exports, reference outputs, pass outputs).

    The cache lives in the user's cache dir (or $EDGECOMPRESS_CACHE_DIR); every entry is keyed by a hash of
    everything that determines it, so a change to any input misses.

    \b
    Examples:
      edgecompress cache info
      edgecompress cache clear
    """


@cache.command("info")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def cache_info(as_json: bool) -> None:
    """Where the cache is and what it holds.

    \b
    Example:
      edgecompress cache info
    """
    from edgecompress.cache import Cache

    def body() -> int:
        info = Cache().info()
        if as_json:
            click.echo(json.dumps({"root": info.root, "entries": info.entries, "bytes": info.bytes,
                                   "other": info.other}, indent=2))
            return 0
        click.echo(f"cache: {info.root}")
        for kind in sorted(info.entries):
            click.echo(f"  {kind:10s} {info.entries[kind]:5d} entries  {info.bytes[kind] / 1e6:10.1f} MB")
        click.echo(f"  total      {sum(info.entries.values()):5d} entries  {info.total_bytes / 1e6:10.1f} MB")
        if info.other:
            click.echo(f"  and {len(info.other)} item{'s' if len(info.other) != 1 else ''} edgecompress did not write "
                       "(`cache clear` leaves them)")
        return 0

    _run(body, False)


@cache.command("clear")
def cache_clear() -> None:
    """Remove every cache entry edgecompress wrote (it never removes anything else; the Arm emulator root, an
    installed tool, is kept).

    \b
    Example:
      edgecompress cache clear
    """
    from edgecompress.cache import Cache

    def body() -> int:
        c = Cache()
        before = c.info()
        n = c.clear()
        click.echo(f"removed {n} entries ({before.total_bytes / 1e6:.1f} MB) from {c.root}")
        for d in c.kept():
            click.echo(f"kept {d} (the Arm emulator, not a cache entry; delete it by hand to remove it)")
        left = c.info().other
        if left:
            shown = ", ".join(left[:5]) + (f" and {len(left) - 5} more" if len(left) > 5 else "")
            click.echo(f"left {len(left)} item{'s' if len(left) != 1 else ''} that edgecompress did not write: "
                       f"{shown}")
        return 0

    _run(body, False)


@main.command()
@click.option("--models", default="minilm", show_default=True,
              help="Comma-separated MODEL paths (HF dirs, .gguf or .onnx files) or bundled names (minilm, "
                   "smollm2).")
@click.option("--targets", "targets_", default="all", show_default=True, help="Comma-separated target names, or all.")
@click.option("--recipes", default="int8-dynamic", show_default=True,
              help="Comma-separated recipe names, or auto (search per target).")
@click.option("-o", "--out", required=True, type=click.Path(path_type=Path), help="Output directory for all bundles.")
@click.option("--executor", default="local", show_default=True,
              help="local (a process pool sized to the cores) or dask://HOST:PORT (an existing Dask cluster).")
@click.option("--workers", type=click.IntRange(min=1), help="Local executor: jobs at once [default: the cores].")
@click.option("--runs", default=10, show_default=True, type=click.IntRange(min=1), help="Timed runs per job.")
@click.option("--eval", "eval_file", type=click.Path(path_type=Path), help="Evaluation texts for every job.")
@click.option("--calibration", type=click.Path(path_type=Path), help="Calibration texts for every job.")
@click.option("--text-column", help="Column (.csv/.tsv) or field (.jsonl) holding the text.")
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON on stdout.")
@click.option("--debug", is_flag=True, help="Show tracebacks.")
def sweep(models: str, targets_: str, recipes: str, out: Path, executor: str, workers: int | None, runs: int,
          eval_file: Path | None, calibration: Path | None, text_column: str | None, as_json: bool,
          debug: bool) -> None:
    """Build every model × target × recipe as an independent job; write a results table and Pareto plots.

    Jobs whose bundle already exists with the same build key are skipped, so rerunning resumes. A failed job is
    reported with its one-line error and does not stop the others. Exit codes: 0 every job built within budgets,
    3 some job failed a budget or failed outright (see results), 2 usage error.

    \b
    Examples:
      edgecompress sweep --targets all --recipes int8-dynamic,fp32 --out sweeps/minilm
      edgecompress sweep --models ./a,./b --targets raspberry-pi-5,phone-arm64 --recipes auto --out sweeps/ab
      edgecompress sweep --targets all --recipes auto --out sweeps/x --executor dask://10.0.0.5:8786
    """
    from edgecompress.recipes import RECIPES
    from edgecompress.sweep import parse_list
    from edgecompress.sweep import sweep as run_sweep
    from edgecompress.targets import available_targets

    _interrupt_on_sigterm()

    def body() -> int:
        model_list: list[str | None] = [m for m in parse_list(models, [], "models")]
        target_list = parse_list(targets_, sorted(available_targets()), "targets")
        recipe_list = parse_list(recipes, list(RECIPES), "recipes")
        console = _console(stderr=True)

        def on_result(r: Any) -> None:
            if not as_json:
                mark = {"built": "[green]built[/]", "skipped": "[cyan]skipped[/]", "failed": "[red]failed[/]"}
                console.print(f"{mark[r.status]} {r.job}" + (f": {r.error}" if r.error else ""))

        result = run_sweep(model_list, target_list, recipe_list, out, executor=executor, workers=workers,
                           runs=runs, eval_file=eval_file, calibration=calibration, text_column=text_column,
                           on_result=on_result)
        if as_json:
            click.echo(json.dumps([r.row() for r in result.results], indent=2, default=str))
        else:
            built = sum(r.status == "built" for r in result.results)
            skipped = sum(r.status == "skipped" for r in result.results)
            _console().print(f"{len(result.results)} jobs: {built} built, {skipped} skipped, "
                             f"{len(result.failed)} failed in {result.seconds:.1f} s on {result.executor}; "
                             f"results in {out}/summary.md")
        ok = not result.failed and all(r.passed for r in result.results)
        return 0 if ok else EXIT_BUDGET_FAILED

    _run(body, debug)


@main.group()
def emulator() -> None:
    """Arm emulation (qemu-user): run a bundle with aarch64 onnxruntime and the target's CPU model.

    It answers what this x86 host cannot: does the artifact load on Arm, which ops ORT picks there, and what
    fidelity Arm's int8 kernels give. No timings (emulation is 25-60x slower). Needs Linux and root.

    \b
    Examples:
      edgecompress emulator setup
      edgecompress emulator run build/all-MiniLM-L6-v2-raspberry-pi-5 --target raspberry-pi-5
    """


@emulator.command("setup")
@click.option("--force", is_flag=True, help="Rebuild the arm64 root even if it is there.")
@click.option("--mirror", help="Debian mirror for debootstrap [default: the one apt uses].")
@click.option("--debug", is_flag=True, help="Show tracebacks.")
def emulator_setup(force: bool, mirror: str | None, debug: bool) -> None:
    """Build the arm64 Debian root with onnxruntime (about 7 minutes once; cached under the cache dir).

    \b
    Example:
      edgecompress emulator setup
    """
    from edgecompress.profiling.emulate import setup_emulator

    def body() -> int:
        info = setup_emulator(force=force, mirror=mirror, on_step=lambda s: click.echo(s, err=True))
        click.echo(f"emulator ready: {info['rootfs']} (onnxruntime {info['onnxruntime']}, "
                   f"python {info['python']}, {info['machine']})")
        return 0

    _run(body, debug)


@emulator.command("run")
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("-t", "--target", required=True, help="An aarch64 target: its CPU features pick QEMU's CPU model.")
@click.option("--texts", default=64, show_default=True, type=click.IntRange(min=1),
              help="Built-in evaluation texts to compare on.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option("--debug", is_flag=True, help="Show tracebacks.")
def emulator_run(bundle: Path, target: str, texts: int, as_json: bool, debug: bool) -> None:
    """Run BUNDLE under Arm emulation: does it load, which ops, fidelity with Arm's kernels vs this host's.

    The bundle is verified first, as by `profile`: exit 10 not a bundle, 16 a file outside it or not matching its
    sha256; 2 usage error (emulator not set up), 1 it does not run.

    \b
    Example:
      edgecompress emulator run build/all-MiniLM-L6-v2-raspberry-pi-5 --target raspberry-pi-5
    """
    from edgecompress.profiling.emulate import emulate_bundle

    def body() -> int:
        r = emulate_bundle(bundle, target, max_texts=texts)
        if as_json:
            click.echo(json.dumps(r, indent=2))
        else:
            _print_emulation(r)
        return 0 if r["runs"] else 1

    _run(body, debug)


def _print_emulation(r: dict[str, Any]) -> None:
    click.echo(f"{r['target']} emulated as QEMU_CPU={r['qemu_cpu']} (onnxruntime {r['onnxruntime']}, "
               f"{r['machine']}): {'loads' if r['loads'] else 'does NOT load'}"
               + ("" if r["runs"] or not r["loads"] else ", fails to run")
               + (f": {r['error']}" if r["error"] else ""))
    if r["ops"]:
        click.echo("ops after ORT's optimizations: " + ", ".join(f"{k} {v}" for k, v in r["ops"].items()))
    if "host_vs_arm" in r:
        d = r["host_vs_arm"]
        click.echo(f"host vs Arm outputs ({d['output']}): max |diff| {d['max_abs_diff']:.4g}"
                   + (" (bitwise identical)" if d["bitwise_identical"] else ""))
    if r.get("fidelity"):
        f = r["fidelity"]
        for k in f["arm"]:
            click.echo(f"{k}: Arm {f['arm'][k]:.6f}   host {f['host'][k]:.6f}   "
                       f"(vs {f['reference']}, {r['texts']} texts)")
    elif r.get("fidelity_note"):
        click.echo(r["fidelity_note"])
    click.echo(r["note"])


# --- profile ------------------------------------------------------------------------------------------------------
@main.command("profile")
@click.argument("bundle_dir", type=click.Path(path_type=Path))
@click.option("-t", "--target", required=True, help="Target profile name or .toml file: its workload, threads, "
              "cores, usable RAM and budgets.")
@click.option("--device", metavar="ssh://USER@HOST[:PORT]",
              help="Measure on a lab device over SSH (it needs python3 with onnxruntime and numpy).")
@click.option("--runs", default=30, show_default=True, type=click.IntRange(min=1),
              help="Timed runs (after warm-up; at least 1 s of them).")
@click.option("--emulate-cores", type=click.IntRange(min=1),
              help="Measure on this host pinned to N cores (taskset), threads capped at N, memory capped at the "
                   "target's usable RAM (a non-host target is otherwise estimated).")
@click.option("--memory-cap/--no-memory-cap", default=True, show_default=True,
              help="Cap this host's measurement at the target's usable RAM (cgroup v1; a warning where the host "
                   "does not allow it).")
@click.option("--emulate", "emulate_arm", is_flag=True,
              help="Also run it under Arm emulation (qemu-user with the target's CPU model): does it load, which "
                   "ops, fidelity with Arm's kernels. No timings. Needs `edgecompress emulator setup`.")
@click.option("--op-runs", default=5, show_default=True, type=click.IntRange(min=0),
              help="Runs of an ORT-profiled session for the per-op table (0: none).")
@click.option("--known-hosts", type=click.Path(path_type=Path), help="known_hosts file [default: "
              "~/.ssh/known_hosts].")
@click.option("--insecure-accept-host-key", is_flag=True, help="Accept any host key from --device (INSECURE: "
              "anyone on the path can impersonate it).")
@click.option("-i", "--identity", multiple=True, type=click.Path(path_type=Path),
              help="Private key for --device (repeatable) [default: ~/.ssh/id_* and ssh-agent].")
@click.option("--remote-python", default="python3", show_default=True, help="Python on the device.")
@click.option("--connect-timeout", default=10.0, show_default=True, type=FINITE_POSITIVE,
              help="Seconds to wait for the device's SSH login.")
@click.option("--run-timeout", default=600.0, show_default=True, type=FINITE_POSITIVE,
              help="Seconds the run on the device may take before it is killed.")
@click.option("--update", is_flag=True, help="Write the new profile and budgets into the bundle's manifest.json "
              "and report.md (atomically; the bundle must be for this target).")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON on stdout.")
@click.option("--debug", is_flag=True, help="Show tracebacks.")
def profile_cmd(bundle_dir: Path, target: str, device: str | None, runs: int, emulate_cores: int | None,
                memory_cap: bool, emulate_arm: bool, op_runs: int, known_hosts: Path | None,
                insecure_accept_host_key: bool,
                identity: tuple[Path, ...], remote_python: str, connect_timeout: float, run_timeout: float,
                update: bool, as_json: bool, debug: bool) -> None:
    """Profile an existing bundle (model.onnx + manifest.json) for a target and check its budgets.

    Where the figures come from: --device (measured there); a host target or --emulate-cores (measured on this
    host); otherwise the roofline estimate. Nothing is written into the bundle unless --update.

    \b
    Exit codes:
       0  within every budget              11  malformed --device URL
       3  a budget failed                  12  device unreachable (refused, timeout, DNS)
       2  usage error (bad option/target)  13  device authentication failed
       1  profiler failure                 14  device host key unknown or mismatched
       4  system refused (disk, memory)    15  device lacks python/numpy/onnxruntime
      10  not a bundle (no manifest.json   16  verification failed: a file the manifest names is
          or model)                            outside the bundle or does not match its sha256
                                          130  interrupted

    \b
    Examples:
      edgecompress profile build/all-MiniLM-L6-v2-host --target host
      edgecompress profile build/x --target raspberry-pi-5 --emulate-cores 4 --json
      edgecompress profile build/x --target raspberry-pi-5 --device ssh://pi@raspberrypi.local
    """
    from edgecompress.profiling import ProfileOptions, profile_bundle, update_bundle

    _interrupt_on_sigterm()

    def body() -> int:
        emulated = None
        if emulate_arm:  # first: a missing emulator is a one-line error before any profiling
            from edgecompress.errors import ConfigError
            from edgecompress.profiling import read_bundle
            from edgecompress.profiling.emulate import emulate_bundle
            from edgecompress.profiling.workload import DECODER, recorded_kind

            if recorded_kind(read_bundle(Path(bundle_dir))[0]) == DECODER:
                raise ConfigError("--emulate does not run decoder (causal LM) bundles yet",
                                  hint="profile it estimated (no flag), here with --emulate-cores N, or on the "
                                       "device with --device ssh://...")

            emulated = emulate_bundle(bundle_dir, target)
        dev = None
        if device:
            from edgecompress.profiling.ssh import DeviceOptions, parse_device_url

            dev = DeviceOptions(parse_device_url(device), known_hosts=known_hosts,
                                insecure_accept_host_key=insecure_accept_host_key, identity=identity,
                                remote_python=remote_python, connect_timeout_s=connect_timeout,
                                run_timeout_s=run_timeout)
        elif known_hosts or insecure_accept_host_key or identity:
            raise click.UsageError("--known-hosts, --insecure-accept-host-key and --identity go with --device")
        opts = ProfileOptions(runs=runs, emulate_cores=emulate_cores, memory_cap=memory_cap,
                              op_profile_runs=op_runs, device=dev)
        result = profile_bundle(bundle_dir, target, opts, emulated=emulated)
        if update:
            update_bundle(result)
        if as_json:
            click.echo(json.dumps({**result.summary(), **({"emulated": emulated} if emulated else {})}, indent=2))
        else:
            _print_profile(result, updated=update)
            if emulated:
                _print_emulation(emulated)
        if emulated and not emulated["runs"]:
            return 1
        return 0 if result.passed else EXIT_BUDGET_FAILED

    _run(body, debug)


def _print_profile(result: Any, updated: bool) -> None:
    from rich.table import Table

    console = _console()
    prof = result.profile
    measured = prof.get("device") or prof.get("host")
    where = (f"device {measured['device']}" if "device" in prof else "this host") if measured else "estimate"
    for w in (measured or {}).get("limits", {}).get("warnings", []):
        console.print(f"[yellow]warning:[/] {w}")
    if measured and measured.get("out_of_memory"):
        console.print(f"[red]{measured['note']}[/]")
    elif measured and "by_threads" in measured:  # a decoder: generation at 1 and the target's threads
        for t, r in measured["by_threads"].items():
            console.print(f"{where}, {t} thread{'s' if t != '1' else ''}: decode {r['decode_tok_s']:.1f} tok/s "
                          f"(step p90 {r['decode_step_ms']['p90']:.2f} ms), time to first token "
                          f"{r['ttft_ms']:.0f} ms, peak RSS {r['peak_rss_mb']:.1f} MB")
        console.print(f"load {measured['load_ms']:.0f} ms; peak RAM with the KV cache at the target's context "
                      f"{measured['peak_ram_with_kv_at_context_mb']:.1f} MB (empty process "
                      f"{measured['baseline_rss_mb']:.1f} MB)")
    elif measured:
        lat = measured["latency_ms"]
        console.print(f"{where}: latency p50 {lat['p50']:.2f} / p90 {lat['p90']:.2f} / p99 {lat['p99']:.2f} ms, "
                      f"mean {lat['mean']:.2f} ± {lat['std']:.2f} ms ({lat['runs']} runs); load "
                      f"{measured['load_ms']:.0f} ms; peak RSS {measured['peak_rss_mb']:.1f} MB (empty process "
                      f"{measured['baseline_rss_mb']:.1f} MB)")
        ops = (measured.get("ops") or {}).get("by_op_type", [])
        if ops:
            table = Table(title=f"top ops (ORT profiler, {measured['ops']['runs']} runs)")
            for col in ("op", "ms/run", "share", "nodes", "provider"):
                table.add_column(col, justify="right" if col in ("ms/run", "share", "nodes") else "left")
            for o in ops[:10]:
                table.add_row(o["op_type"], f"{o['ms_per_run']:.3f}", f"{o['share']:.1%}", str(o["nodes"]),
                              ",".join(o["providers"]))
            console.print(table)
    console.print(_budget_table(f"{result.bundle} → {result.target.name} ({where})", result.budgets))
    if result.passed:
        console.print("[green]within every budget[/]")
    else:
        console.print("[red]budget failed:[/] " + "; ".join(r.miss() for r in result.budgets if not r.passed))
    console.print(f"updated {result.bundle}/manifest.json and report.md" if updated else
                  "(nothing written; --update rewrites the bundle's manifest and report)")


if __name__ == "__main__":
    main()
