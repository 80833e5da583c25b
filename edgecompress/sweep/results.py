"""A sweep's results as a table (results.csv, results.json, summary.md) plus a Pareto plot per target."""

from __future__ import annotations

import csv
import io
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from edgecompress.sweep import JobResult


def _atomic_write(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of points not dominated: smaller x (size) and larger y (fidelity) are better."""
    front = []
    for i, (x, y) in enumerate(points):
        dominated = any((x2 <= x and y2 >= y) and (x2 < x or y2 > y) for j, (x2, y2) in enumerate(points) if j != i)
        if not dominated:
            front.append(i)
    return front


def plot_pareto(path: Path, target: str, rows: list[dict[str, Any]]) -> bool:
    pts = [(r["size_mb"], r["fidelity"]) for r in rows]
    if not pts:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    front = set(pareto_front(pts))
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    for i, (r, (x, y)) in enumerate(zip(rows, pts, strict=True)):
        color = "tab:green" if r["passed"] else "tab:red"
        ax.scatter([x], [y], color=color, marker="o" if i in front else "x", s=50 if i in front else 30)
        ax.annotate(f"{r['model']}/{r['chosen_recipe'] or r['recipe']}", (x, y), fontsize=7,
                    xytext=(4, 4), textcoords="offset points")
    fx = sorted(pts[i] for i in front)
    ax.plot([p[0] for p in fx], [p[1] for p in fx], color="tab:blue", linewidth=1, label="Pareto front")
    ax.set_xlabel("artifact size (MB)")
    ax.set_ylabel(rows[0]["fidelity_metric"] or "fidelity")
    ax.set_title(f"{target}: size vs fidelity (green: within budgets)")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    _atomic_write(path, buf.getvalue())
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
        name = f"pareto-{target}.png"
        if plot_pareto(out / name, target, ok):
            files.append(name)
            lines += ["", f"![{target}]({name})"]
    _atomic_write(out / "summary.md", ("\n".join(lines) + "\n").encode())
    files.append("summary.md")
    return files
