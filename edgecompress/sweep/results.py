"""A sweep's results as a table (results.csv, results.json, summary.md) plus a Pareto plot per target."""

from __future__ import annotations

import csv
import io
import json
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgecompress.plots import ParetoPoint, pareto_front, pareto_png

if TYPE_CHECKING:  # the sweep package imports this module when it writes results
    from edgecompress.sweep import JobResult

__all__ = ["pareto_front", "plot_pareto", "write_results"]  # pareto_front: kept importable from here


def _atomic_write(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def plot_pareto(path: Path, target: str, rows: list[dict[str, Any]]) -> bool:
    """rows share one fidelity metric; a lower-is-better one (a decoder's perplexity ratio) is flipped so the
    front's "larger is better" holds (report.pareto_axis)."""
    from edgecompress.report import pareto_axis

    ylabel, y = pareto_axis((rows[0]["fidelity_metric"] or "fidelity") if rows else "fidelity")
    points = [ParetoPoint(f"{r['model']}/{r['chosen_recipe'] or r['recipe']}", r["size_mb"], y(r["fidelity"]),
                          bool(r["passed"])) for r in rows]
    png = pareto_png(points, f"{target}: size vs fidelity (green: within budgets)", ylabel)
    if png is None:
        return False
    _atomic_write(path, png)
    return True


def write_results(out: Path, results: list[JobResult]) -> list[str]:
    rows = [r.row() for r in results]
    files = []
    buf = io.StringIO()
    fields = list(rows[0]) if rows else ["job"]
    writer = csv.DictWriter(buf, fieldnames=fields)
    writer.writeheader()
    writer.writerows(rows)
    _atomic_write(out / "results.csv", buf.getvalue().encode())
    _atomic_write(out / "results.json", json.dumps(
        [{**r.row(), "summary": r.summary} for r in results], indent=2, default=str).encode())
    files += ["results.csv", "results.json"]

    lines = ["# Sweep results", "", "| model | target | recipe | status | passed | MB | p90 ms (source) | "
             "fidelity | failed budgets / error |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lat = "" if r["latency_p90_ms"] is None else f"{r['latency_p90_ms']:.1f} ({r['latency_source']})"
        size = "" if r["size_mb"] is None else f"{r['size_mb']:.2f}"
        fid = "" if r["fidelity"] is None else f"{r['fidelity_metric']} {r['fidelity']:.4f}"
        recipe = r["recipe"] if r["chosen_recipe"] in ("", r["recipe"]) else f"{r['recipe']} → {r['chosen_recipe']}"
        lines.append(f"| {r['model']} | {r['target']} | {recipe} | {r['status']} | "
                     f"{'' if r['passed'] is None else ('yes' if r['passed'] else 'no')} | {size} | {lat} | {fid} | "
                     f"{r['error'] or r['failed_budgets']} |")
    for target in sorted({r["target"] for r in rows}):
        ok = [r for r in rows if r["target"] == target and r["size_mb"] is not None and r["fidelity"] is not None]
        # one plot per fidelity metric: an encoder's cosine and a decoder's perplexity ratio share no axis
        metrics = sorted({r["fidelity_metric"] for r in ok}, key=str)
        for metric in metrics or [None]:
            name = f"pareto-{target}.png" if len(metrics) <= 1 else f"pareto-{target}-{metric}.png"
            if plot_pareto(out / name, target, [r for r in ok if r["fidelity_metric"] == metric]):
                files.append(name)
                lines += ["", f"![{target}]({name})"]
    _atomic_write(out / "summary.md", ("\n".join(lines) + "\n").encode())
    files.append("summary.md")
    return files
