"""Budget verdicts: figures x budgets -> one row per budget. Pure; imports only data definitions."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal

from edgecompress.targets import Budgets
from edgecompress.taskspec import METRICS

Source = Literal["measured", "estimated", "emulated", "measured-on-host"]


@dataclass(frozen=True)
class Figure:
    value: float
    unit: str
    source: str  # where the number comes from: measured (this host or a device), estimated, emulated
    detail: str = ""
    failed: bool = False  # the measurement itself is a miss (out of memory under the cap): fails whatever the value


@dataclass(frozen=True)
class BudgetRow:
    name: str
    limit: float
    value: float | None
    unit: str
    passed: bool
    source: str
    comparison: str  # "<=" (a ceiling) or ">=" (a floor)
    note: str = ""  # why a row failed beyond its value (e.g. "out of memory: killed at the 512 MB cap")

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def miss(self) -> str:
        """'p90 52 ms > 40 ms budget' style text for a failed row."""
        if self.value is None:
            return f"{self.name}: no figure"
        op = ">" if self.comparison == "<=" else "<"
        if self.note:
            return f"{self.name}: {self.note}"
        return f"{self.name} {_fmt(self.value)}{(' ' + self.unit) if self.unit else ''} {op} " \
               f"{_fmt(self.limit)}{(' ' + self.unit) if self.unit else ''} budget"


def _fmt(x: float) -> str:
    return f"{x:.4f}" if abs(x) < 10 else f"{x:.1f}"


# budget field -> (figure name, unit, comparison)
_CEILINGS = {
    "max_size_mb": ("size", "MB"),
    "max_peak_ram_mb": ("peak_ram", "MB"),
    "max_latency_p90_ms": ("latency_p90", "ms"),
}
# ceilings checked only where there is a figure: load time is measured, never estimated
_MEASURED_CEILINGS = {
    "max_load_ms": ("load_time", "ms"),
    "max_ttft_ms": ("ttft", "ms"),  # decoders: time to first token
}
# floors checked only where there is a figure and a limit (decoders)
_MEASURED_FLOORS = {
    "min_decode_tok_s": ("decode_tok_s", "tok/s"),
}


def check(budgets: Budgets, figures: dict[str, Figure]) -> list[BudgetRow]:
    rows = []
    for field_name, (figure_name, unit) in _CEILINGS.items():
        limit = getattr(budgets, field_name)
        fig = figures.get(figure_name)
        rows.append(BudgetRow(figure_name, limit, fig.value if fig else None, unit,
                              bool(fig and not fig.failed and fig.value <= limit), fig.source if fig else "missing",
                              "<=", fig.detail if fig and fig.failed else ""))
    for field_name, (figure_name, unit) in _MEASURED_CEILINGS.items():
        limit, fig = getattr(budgets, field_name, None), figures.get(figure_name)
        if limit is not None and fig is not None:
            rows.append(BudgetRow(figure_name, limit, fig.value, unit, not fig.failed and fig.value <= limit,
                                  fig.source, "<=", fig.detail if fig.failed else ""))
    for field_name, (figure_name, unit) in _MEASURED_FLOORS.items():
        limit, fig = getattr(budgets, field_name, None), figures.get(figure_name)
        if limit is not None and fig is not None:
            rows.append(BudgetRow(figure_name, limit, fig.value, unit, not fig.failed and fig.value >= limit,
                                  fig.source, ">=", fig.detail if fig.failed else ""))
    for metric, limit in budgets.fidelity.items():
        fig = figures.get(metric)
        if fig is None:
            continue  # a floor for another task's metric (e.g. top1_agreement on an embedding model)
        floor = METRICS[metric].higher_is_better
        passed = fig.value >= limit if floor else fig.value <= limit
        rows.append(BudgetRow(metric, limit, fig.value, fig.unit, passed, fig.source, ">=" if floor else "<="))
    return rows


def failed(rows: list[BudgetRow]) -> list[BudgetRow]:
    return [r for r in rows if not r.passed]
