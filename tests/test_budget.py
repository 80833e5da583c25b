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


def test_decoder_budgets_replace_the_encoder_ones_and_add_decode_rows() -> None:
    b = Budgets(max_size_mb=40, max_peak_ram_mb=512, max_latency_p90_ms=30, fidelity={"perplexity_ratio": 1.1},
                decoder={"max_size_mb": 200, "max_peak_ram_mb": 768, "min_decode_tok_s": 20, "max_ttft_ms": 1000})
    figs = {"size": Figure(108.4, "MB", "measured"), "peak_ram": Figure(262.8, "MB", "estimated"),
            "latency_p90": Figure(3.0, "ms", "estimated"), "decode_tok_s": Figure(15.0, "tok/s", "estimated"),
            "ttft": Figure(375.6, "ms", "estimated"), "perplexity_ratio": Figure(1.02, "", "measured-on-host")}
    enc = {r.name: r for r in check(b, figs)}
    assert not enc["size"].passed and "decode_tok_s" not in enc  # no floor in [budgets]: no row
    rows = {r.name: r for r in check(b.for_decoder(), figs)}
    assert rows["size"].passed and rows["size"].limit == 200 and rows["peak_ram"].limit == 768
    assert rows["latency_p90"].limit == 30  # not in the decoder table: [budgets]' own
    assert rows["decode_tok_s"].comparison == ">=" and not rows["decode_tok_s"].passed
    assert rows["decode_tok_s"].miss() == "decode_tok_s 15.0 tok/s < 20.0 tok/s budget"
    assert rows["ttft"].passed and rows["perplexity_ratio"].passed and rows["perplexity_ratio"].comparison == "<="
