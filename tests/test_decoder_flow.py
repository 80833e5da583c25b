"""Decoders through the rest of the flow: `profile` of a decoder bundle, decoder budgets, `--recipe auto`, `sweep`
and the report's wording, on a tiny random Llama (2 layers, GQA, tied embeddings)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import onnx
import pytest
from click.testing import CliRunner
from test_ssh import Lab, lab  # noqa: F401  (lab: a real OpenSSH server on 127.0.0.1; skips without one)

from edgecompress.cli import main
from edgecompress.profiling.weights import weight_memory
from edgecompress.targets import load_target

DECODER = "text-generation-with-past"
KV_BYTES_PER_TOKEN = 2 * 2 * 2 * 16 * 4  # layers x (K, V) x kv_heads x head_dim x fp32


@pytest.fixture(scope="module")
def short_eval(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three built-in held-out passages (~600 tokens): a perplexity in well under a second."""
    src = Path(__file__).resolve().parents[1] / "edgecompress/data/corpus/passages_evaluation.txt"
    path = tmp_path_factory.mktemp("eval") / "eval.txt"
    path.write_text("\n".join(src.read_text(encoding="utf-8").splitlines()[:3]), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def phone_bundle(tiny_llama: Path, short_eval: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """int4 for the phone: estimated profile, the phone's [budgets.decoder]."""
    from edgecompress.pipeline import BuildOptions, build

    out = tmp_path_factory.mktemp("phone") / "b"
    m = build(BuildOptions(model=tiny_llama, target="phone-arm64", recipe="int4", out=out, runs=3, eval=short_eval))
    assert m.passed, [r.miss() for r in m.failed_budgets]
    return out


def test_build_holds_a_decoder_to_the_decoder_budgets(phone_bundle: Path) -> None:
    m = json.loads((phone_bundle / "manifest.json").read_text())
    rows = {r["name"]: r for r in m["budgets"]}
    dec = load_target("phone-arm64").for_budget_section("decoder").budgets
    assert rows["size"]["limit"] == dec.max_size_mb == 200
    assert rows["peak_ram"]["limit"] == dec.max_peak_ram_mb == 768 and rows["peak_ram"]["source"] == "estimated"
    assert rows["decode_tok_s"]["limit"] == 20 and rows["decode_tok_s"]["source"] == "estimated"
    assert rows["ttft"]["limit"] == 1000 and rows["latency_p90"]["limit"] == 50
    # the memory figure includes the KV cache at the phone's 2048-token context
    est = m["profile"]["estimate"]
    kv_mb = KV_BYTES_PER_TOKEN * 2048 / 1e6
    assert m["profile"]["kv_cache"]["mb_at_context"] == pytest.approx(kv_mb)
    # weights as ORT holds them: the int4 pass's fp16 block offsets are cast to fp32 at load (profiling/weights.py)
    resident = weight_memory(onnx.load(str(phone_bundle / "model.onnx"))).resident_bytes
    assert resident > m["artifact"]["size_bytes"] * 0.9
    assert rows["peak_ram"]["value"] == pytest.approx(60 + max(m["artifact"]["size_bytes"], resident) / 1e6 + kv_mb)
    # the FP32 baseline of the report is a decode step estimated the same way as the candidate's, not an encoder
    # roofline: (weights + KV at the mean context) / (bandwidth x efficiency)
    base = m["profile"]["fp32_baseline"]
    t = load_target("phone-arm64")
    per_token = base["size_mb"] * 1e6 + KV_BYTES_PER_TOKEN * (128 + 64 / 2)
    assert base["latency_ms"] == pytest.approx(per_token / (0.6 * t.hardware.bandwidth_gbs * 1e9) * 1e3, rel=1e-3)
    assert base["latency_ms"] > est["latency_ms"]  # FP32 weights are bigger than int4's


def test_report_counts_tokens_for_decoders(phone_bundle: Path) -> None:
    md = (phone_bundle / "report.md").read_text()
    m = json.loads((phone_bundle / "manifest.json").read_text())
    assert f"on {m['fidelity']['texts']} tokens (" in md and " texts (" not in md
    assert f"on {m['export']['check']['texts']} tokens: max |Δ|" in md
    assert "KV cache 512 B/token" in md and "2,048-token context" in md
    html = (phone_bundle / "report.html").read_text()
    assert f"on {m['fidelity']['texts']} tokens (" in html and "decode step" in html


def test_profile_a_decoder_bundle_estimated_and_on_this_host(phone_bundle: Path) -> None:
    runner = CliRunner()
    r = runner.invoke(main, ["profile", str(phone_bundle), "--target", "raspberry-pi-5", "--json"])
    assert r.exit_code == 0, r.output
    est = json.loads(r.output)
    rows = {b["name"]: b for b in est["budgets"]}
    assert rows["size"]["limit"] == 500 and rows["peak_ram"]["limit"] == 1536  # the Pi 5's decoder budgets
    assert rows["decode_tok_s"]["source"] == "estimated" and rows["ttft"]["source"] == "estimated"
    assert est["estimate"]["decode_tok_s"] == pytest.approx(rows["decode_tok_s"]["value"])
    assert rows["perplexity_ratio"]["source"] == "measured-on-host"  # carried from the build's manifest

    r = runner.invoke(main, ["profile", str(phone_bundle), "--target", "host", "--json"])
    assert r.exit_code == 0, r.output
    host = json.loads(r.output)
    measured = host["measured"]
    assert measured["source"] == "measured" and set(measured["by_threads"]) == {"1", "2"}  # 1 and the target's N
    for run in measured["by_threads"].values():
        assert run["decode_tok_s"] > 0 and run["ttft_ms"] > 0 and run["decode_step_ms"]["p90"] > 0
    rows = {b["name"]: b for b in host["budgets"]}
    assert {"decode_tok_s", "ttft", "load_time", "peak_ram"} <= set(rows)
    assert rows["decode_tok_s"]["value"] == pytest.approx(measured["by_threads"]["2"]["decode_tok_s"])
    assert rows["peak_ram"]["source"] == "measured"
    # peak RSS of the fresh process, plus the KV cache the runner's short generation did not grow to
    grown = KV_BYTES_PER_TOKEN * (128 + 64)
    assert rows["peak_ram"]["value"] == pytest.approx(
        measured["peak_rss_mb"] + (KV_BYTES_PER_TOKEN * 2048 - grown) / 1e6)
    r = runner.invoke(main, ["profile", str(phone_bundle), "--target", "host"])  # the human-readable output
    assert r.exit_code == 0 and "tok/s" in r.output and "time to first token" in r.output, r.output


def test_recipe_auto_on_a_decoder(tiny_llama: Path, short_eval: Path, tmp_path: Path) -> None:
    """Decoder candidates only, refusals with their reason, predictions with the KV cache, ranked by perplexity."""
    from edgecompress.pipeline import BuildOptions
    from edgecompress.recipes import RECIPES
    from edgecompress.search import build_auto

    # int4 is ~1.5 MB, FP32 ~8 MB: a 3 MB size budget leaves int4, and FP32 is rejected before it is built; two
    # candidates (fp32, int4) keep it quick whatever else applies to decoders
    m = build_auto(BuildOptions(model=tiny_llama, target="phone-arm64", recipe="auto", out=tmp_path / "a", runs=3,
                                eval=short_eval, budgets={"max_size_mb": 3.0}), max_candidates=2)
    s = m.search
    assert s["metric"] == "perplexity_ratio" and s["chosen"] == "int4" and m.recipe["name"] == "int4"
    by = {c["candidate"]: c for c in s["candidates"]}
    assert by["fp32"]["status"] == "rejected before building" and "predicted size" in by["fp32"]["reason"]
    # the prediction is a decoder's: memory includes the KV cache, latency is a decode step with a tok/s figure
    pred = by["int4"]["prediction"]
    assert pred["decode_tok_s"] > 0 and pred["ttft_ms"] > 0
    assert pred["resident_mb"] > 60 + KV_BYTES_PER_TOKEN * 2048 / 1e6
    for name, spec in RECIPES.items():  # what recipes.py says does not apply to decoders is refused, with why
        if DECODER not in spec.tasks and name in by:
            assert by[name]["status"] == "excluded" and "does not apply to text-generation-with-past" in \
                by[name]["reason"], by[name]
    assert "perplexity in the millions" in by["int8-dynamic"]["reason"]
    assert m.budgets and all(r.passed for r in m.budgets)
    assert "## Recipe search" in (tmp_path / "a" / "report.md").read_text()


def test_sweep_builds_a_decoder(tiny_llama: Path, short_eval: Path, tmp_path: Path) -> None:
    from edgecompress.sweep import sweep

    out = tmp_path / "sweep"
    res = sweep([str(tiny_llama)], ["phone-arm64"], ["int4", "int8-dynamic"], out, runs=3, eval_file=short_eval)
    by = {r.recipe: r for r in res.results}
    assert by["int4"].status == "built" and by["int4"].passed, by["int4"]
    assert by["int8-dynamic"].status == "failed" and "perplexity in the millions" in by["int8-dynamic"].error
    rows = {r["recipe"]: r for r in csv.DictReader((out / "results.csv").open())}
    assert rows["int4"]["fidelity_metric"] == "perplexity_ratio" and float(rows["int4"]["size_mb"]) < 3
    assert float(rows["int4"]["decode_tok_s"]) >= 20 and float(rows["int4"]["ttft_ms"]) > 0
    assert (out / "pareto-phone-arm64.png").read_bytes()[:4] == b"\x89PNG"
    assert "perplexity_ratio" in (out / "summary.md").read_text()


def test_emulate_refuses_a_decoder_bundle_in_one_line(phone_bundle: Path) -> None:
    r = CliRunner().invoke(main, ["profile", str(phone_bundle), "--target", "raspberry-pi-5", "--emulate"])
    assert r.exit_code == 2 and "--emulate does not run decoder" in r.output and "Traceback" not in r.output


def test_profile_a_decoder_bundle_on_a_lab_device(lab: Lab, phone_bundle: Path) -> None:  # noqa: F811
    from edgecompress.profiling import ProfileOptions, profile_bundle

    r = profile_bundle(phone_bundle, "raspberry-pi-5", ProfileOptions(device=lab.device()))
    dev = r.profile["device"]
    assert dev["source"] == "measured" and set(dev["by_threads"]) == {"1", "4"}  # the Pi 5's 4 threads, remotely
    assert dev["remote_dir_removed"] is True and lab.leftovers() == []
    rows = {b.name: b for b in r.budgets}
    assert rows["decode_tok_s"].source == rows["ttft"].source == rows["peak_ram"].source == "measured"
    assert rows["decode_tok_s"].value == pytest.approx(dev["by_threads"]["4"]["decode_tok_s"])
    assert "host" not in r.profile and r.profile["estimate"]["source"] == "estimated"
