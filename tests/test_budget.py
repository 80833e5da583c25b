from __future__ import annotations

from edgecompress.budget import Figure, check, failed
from edgecompress.targets import Budgets


def test_ceilings_floors_and_sources() -> None:
    b = Budgets(max_size_mb=10, max_peak_ram_mb=100, max_latency_p90_ms=40,
                fidelity={"cosine_mean": 0.99, "kl_mean": 0.01, "top1_agreement": 0.9})
    figs = {
        "size": Figure(9.5, "MB", "measured"),
        "peak_ram": Figure(120, "MB", "estimated"),
        "latency_p90": Figure(52, "ms", "estimated"),
        "cosine_mean": Figure(0.995, "", "measured-on-host"),
    }
    rows = {r.name: r for r in check(b, figs)}
    assert rows["size"].passed and rows["size"].source == "measured"
    assert not rows["peak_ram"].passed and rows["peak_ram"].source == "estimated"
    assert rows["latency_p90"].miss() == "latency_p90 52.0 ms > 40.0 ms budget"
    assert rows["cosine_mean"].passed and rows["cosine_mean"].comparison == ">="
    # floors for metrics this task does not produce are not rows
    assert "kl_mean" not in rows and "top1_agreement" not in rows
    assert [r.name for r in failed(list(rows.values()))] == ["peak_ram", "latency_p90"]


def test_lower_is_better_metric_is_a_ceiling() -> None:
    b = Budgets(max_size_mb=10, max_peak_ram_mb=100, max_latency_p90_ms=40, fidelity={"kl_mean": 0.01})
    rows = {r.name: r for r in check(b, {"kl_mean": Figure(0.02, "nats", "measured-on-host")})}
    assert rows["kl_mean"].comparison == "<=" and not rows["kl_mean"].passed
    assert rows["size"].value is None and not rows["size"].passed
