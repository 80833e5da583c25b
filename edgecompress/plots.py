"""PNG plots (matplotlib, Agg backend) for report.html and sweep results: each function returns PNG bytes.

Layering: imports nothing internal, so sweep/results.py and report.py can both use it.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

GREEN, RED, BLUE, GREY = "tab:green", "tab:red", "tab:blue", "tab:gray"


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")  # no display; also safe in worker processes
    import matplotlib.pyplot as plt

    return plt


def _png(fig: Any) -> bytes:
    plt = _pyplot()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


@dataclass(frozen=True)
class ParetoPoint:
    label: str
    size_mb: float
    fidelity: float
    passed: bool  # within every budget


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of points not dominated: smaller x (size) and larger y (fidelity) are better."""
    front = []
    for i, (x, y) in enumerate(points):
        dominated = any((x2 <= x and y2 >= y) and (x2 < x or y2 > y) for j, (x2, y2) in enumerate(points) if j != i)
        if not dominated:
            front.append(i)
    return front


def pareto_png(points: Sequence[ParetoPoint], title: str, ylabel: str) -> bytes | None:
    """Size vs fidelity: the front joined, green within budgets, red outside, front points as circles."""
    if not points:
        return None
    plt = _pyplot()
    xy = [(p.size_mb, p.fidelity) for p in points]
    front = set(pareto_front(xy))
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    for i, (p, (x, y)) in enumerate(zip(points, xy, strict=True)):
        ax.scatter([x], [y], color=GREEN if p.passed else RED, marker="o" if i in front else "x",
                   s=50 if i in front else 30)
        ax.annotate(p.label, (x, y), fontsize=7, xytext=(4, 4), textcoords="offset points")
    fx = sorted(xy[i] for i in front)
    ax.plot([p[0] for p in fx], [p[1] for p in fx], color=BLUE, linewidth=1, label="Pareto front")
    ax.set_xlabel("artifact size (MB)")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.legend(loc="lower right", fontsize=8)
    return _png(fig)


def latency_png(samples_ms: Sequence[float], *, budget_ms: float | None, title: str) -> bytes | None:
    """Histogram of measured latencies with p50/p90 and the budget marked."""
    if not samples_ms:
        return None
    import numpy as np

    plt = _pyplot()
    a = np.asarray(samples_ms, dtype=np.float64)
    fig, ax = plt.subplots(figsize=(6, 3.2), dpi=100)
    ax.hist(a, bins=min(30, max(5, len(a) // 3)), color=BLUE, alpha=0.8)
    for q, style in ((50, ":"), (90, "--")):
        v = float(np.percentile(a, q))
        ax.axvline(v, color="black", linestyle=style, linewidth=1, label=f"p{q} {v:.2f} ms")
    if budget_ms is not None and budget_ms <= 2 * a.max():
        ax.axvline(budget_ms, color=RED, linewidth=1.5, label=f"budget {budget_ms:g} ms")
    elif budget_ms is not None:  # far right of every sample: a line there would squash the histogram
        title = f"{title}; budget {budget_ms:g} ms, off the scale"
    ax.set_xlabel("latency per run (ms)")
    ax.set_ylabel("runs")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    return _png(fig)


def op_breakdown_png(ms_by_op: dict[str, float], *, title: str, top: int = 12) -> bytes | None:
    """Horizontal bars of time per op type, largest first; the rest summed as 'other'."""
    items = sorted(((k, float(v)) for k, v in ms_by_op.items() if v and v > 0), key=lambda kv: -kv[1])
    if not items:
        return None
    if len(items) > top:
        items = [*items[:top - 1], (f"other ({len(items) - top + 1} types)", sum(v for _, v in items[top - 1:]))]
    plt = _pyplot()
    total = sum(v for _, v in items)
    fig, ax = plt.subplots(figsize=(6, 0.3 * len(items) + 1.2), dpi=100)
    names = [k for k, _ in items][::-1]
    vals = [v for _, v in items][::-1]
    ax.barh(names, vals, color=BLUE)
    for y, v in enumerate(vals):
        ax.annotate(f"{v:.2f} ms ({100 * v / total:.0f}%)", (v, y), fontsize=7, xytext=(3, -3),
                    textcoords="offset points")
    ax.set_xlim(0, max(vals) * 1.3)
    ax.set_xlabel("ms")
    ax.tick_params(axis="y", labelsize=8)
    ax.set_title(title, fontsize=10)
    return _png(fig)


@dataclass(frozen=True)
class Bar:
    label: str
    value: float | None
    note: str = ""  # e.g. "estimated"


@dataclass(frozen=True)
class Panel:
    title: str
    bars: Sequence[Bar]
    limit: float | None = None  # a budget line
    zoom: bool = False  # y axis around the values (fidelity 0.99 vs 1.0 is invisible from zero)


def versus_png(panels: Sequence[Panel], *, title: str) -> bytes | None:
    """Side-by-side bar panels (e.g. size / fidelity / latency), each a few bars and an optional budget line."""
    panels = [p for p in panels if any(b.value is not None for b in p.bars)]
    if not panels:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(2.4 * len(panels) + 0.6, 3.2), dpi=100, squeeze=False)
    for ax, panel in zip(axes[0], panels, strict=True):
        bars = panel.bars
        vals = [b.value or 0.0 for b in bars]
        known = [b.value for b in bars if b.value is not None] + ([panel.limit] if panel.limit is not None else [])
        lo, hi = min(known), max(known)
        bottom = max(0.0, lo - (hi - lo) * 0.5 - 0.002) if panel.zoom else 0.0
        ax.bar([b.label for b in bars], [v - bottom for v in vals], bottom=bottom,
               color=[GREY, BLUE, GREEN, RED][:len(bars)])
        for x, b in enumerate(bars):
            if b.value is not None:
                text = f"{b.value:.4f}" if abs(b.value) < 2 else f"{b.value:.1f}"
                ax.annotate(text + (f"\n{b.note}" if b.note else ""), (x, b.value), ha="center", fontsize=7,
                            xytext=(0, 2), textcoords="offset points")
        if panel.limit is not None:
            ax.axhline(panel.limit, color=RED, linestyle="--", linewidth=1)
            ax.annotate(f"budget {panel.limit:g}", (1.0, panel.limit), xycoords=("axes fraction", "data"),
                        ha="right", va="bottom", fontsize=7, color=RED)
        ax.set_ylim(bottom, bottom + (hi - bottom) * 1.3 if hi > bottom else bottom + 1)
        ax.set_title(panel.title, fontsize=9)
        ax.tick_params(axis="x", labelsize=8)
    fig.suptitle(title, fontsize=10)
    return _png(fig)


def per_text_png(values: Sequence[float], *, metric: str, floor: float | None, title: str) -> bytes | None:
    """Histogram of each evaluation text's score against the reference, with the mean and the budget's floor."""
    if not values:
        return None
    import numpy as np

    plt = _pyplot()
    a = np.asarray(values, dtype=np.float64)
    fig, ax = plt.subplots(figsize=(6, 3.2), dpi=100)
    ax.hist(a, bins=min(40, max(5, len(a) // 4)), color=BLUE, alpha=0.8)
    ax.axvline(float(a.mean()), color="black", linestyle="--", linewidth=1, label=f"mean {a.mean():.4f}")
    if floor is not None:
        ax.axvline(floor, color=RED, linewidth=1.5, label=f"budget floor on the mean {floor:g}")
    ax.set_xlabel(f"{metric} per text")
    ax.set_ylabel("texts")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    return _png(fig)
