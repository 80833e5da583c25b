from __future__ import annotations

import re
from pathlib import Path

import pytest

from edgecompress.errors import ConfigError
from edgecompress.targets import Target, available_targets, load_target, load_target_file

REPO = Path(__file__).resolve().parents[1]
EXPECTED = {"server-gpu", "jetson-orin-nano", "raspberry-pi-4", "raspberry-pi-5", "phone-arm64", "host"}


def test_every_target_file_loads() -> None:
    files = sorted((REPO / "targets").glob("*.toml"))
    assert {f.stem for f in files} >= EXPECTED
    for f in files:
        t = load_target_file(f)
        assert t.name == f.stem
        assert t.hardware.cores > 0 and t.runtime.providers
        assert t.budgets.max_size_mb > 0 and t.budgets.fidelity
        assert len(t.sha256) == 64


def test_available_targets_lists_the_shipped_ones() -> None:
    assert set(available_targets()) >= EXPECTED


def test_unknown_target_suggests_the_closest() -> None:
    with pytest.raises(ConfigError) as e:
        load_target("raspberry-pi5")
    assert "unknown target 'raspberry-pi5'" in e.value.one_line()
    assert "raspberry-pi-5" in e.value.one_line()


def _write(tmp_path: Path, text: str, name: str = "mydev") -> Path:
    p = tmp_path / f"{name}.toml"
    p.write_text(text)
    return p


def _host_text() -> str:
    return (REPO / "targets" / "host.toml").read_text()


@pytest.mark.parametrize(
    ("edit", "needle"),
    [
        (lambda s: s.replace("cores = 2", 'cores = "two"'), "'hardware.cores' must be a positive integer"),
        (lambda s: s.replace("cores = 2", "cores = 2\nclock_ghz = 3"), "unknown key 'hardware.clock_ghz'"),
        (lambda s: s.replace("bandwidth_gbs = 20.0", ""), "'hardware.bandwidth_gbs' must be"),
        (lambda s: re.sub(r"isa = .*", 'isa = ["avx9"]', s), "'hardware.isa'"),
        (lambda s: s.replace("max_size_mb = 100", "max_size_mb = -1"), "'budgets.max_size_mb'"),
        (lambda s: s.replace("cosine_mean = 0.99", "cosine_avg = 0.99"), "'budgets.fidelity.cosine_avg'"),
        (lambda s: s.replace("[runtime]", "[runtime"), "malformed target file"),
        (lambda s: s.replace('name = "mydev"', 'name = "other"'), "'name' must be \"mydev\""),
    ],
)
def test_malformed_target_names_file_and_key(tmp_path: Path, edit, needle: str) -> None:
    path = _write(tmp_path, edit(_host_text().replace('name = "host"', 'name = "mydev"')))
    with pytest.raises(ConfigError) as e:
        load_target(path)
    msg = e.value.one_line()
    assert str(path) in msg
    assert needle in msg


def test_target_from_a_user_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _write(tmp_path, _host_text().replace('name = "host"', 'name = "mydev"'))
    monkeypatch.setenv("EDGECOMPRESS_TARGETS_DIR", str(tmp_path))
    assert load_target("mydev").name == "mydev"


def test_host_isa_is_detected_from_cpuinfo(tmp_path: Path) -> None:
    from edgecompress.targets import detect_isa

    x86 = "processor\t: 0\nflags\t\t: fpu sse avx2 fma f16c avx512f avx512_vnni\n"
    arm = "processor\t: 0\nFeatures\t: fp asimd asimdhp asimddp i8mm\n"
    assert detect_isa(x86) == {"avx2", "fma", "f16c", "avx512", "avx512_vnni"}
    assert detect_isa(arm) == {"neon", "fp16", "dotprod", "i8mm"}
    assert load_target("host").hardware.isa == detect_isa()
    # "detect" is only meaningful for the machine we run on
    src = (REPO / "targets" / "raspberry-pi-5.toml").read_text()
    bad = tmp_path / "raspberry-pi-5.toml"
    bad.write_text(re.sub(r"isa = \[.*\]", 'isa = "detect"', src))
    with pytest.raises(ConfigError, match=r"hardware\.isa"):
        load_target(bad)


# --- decoder budgets ([budgets.decoder]) -------------------------------------------------------------------------
DECODER = "text-generation-with-past"


def _as_judged(t: Target, task: str) -> Target:
    """The target as pipeline.plan applies it to a model of `task`: its adapter's budget section."""
    from edgecompress.tasks import task_facts

    return t.for_budget_section(task_facts(task).budget_section)
SMOLLM2_KV_MB_AT_2K = 46_080 * 2048 / 1e6  # layers x 2 x kv_heads x head_dim x 4 B x context


def test_every_target_holds_decoders_to_decoder_budgets() -> None:
    for name in EXPECTED:
        t = load_target(name)
        enc, dec = t.budgets, _as_judged(t, DECODER).budgets
        assert _as_judged(t, "feature-extraction") is t  # encoders keep [budgets]
        assert dec.decoder == {} and dec.fidelity == enc.fidelity
        assert dec.min_decode_tok_s is not None and dec.max_ttft_ms is not None
        # one decode step may take at most 1 / the tok/s floor
        assert dec.max_latency_p90_ms == pytest.approx(1000 / dec.min_decode_tok_s)
        # the documented rule: RAM at most half the usable RAM, size at most half the RAM budget and at most what a
        # decode step can stream at the tok/s floor (the host is measured, so only the RAM halves bind there)
        hw, eff = t.hardware, t.estimate
        assert dec.max_peak_ram_mb <= hw.usable_ram_mb / 2
        assert dec.max_size_mb <= dec.max_peak_ram_mb / 2
        if not t.host:
            assert dec.max_size_mb <= eff.bandwidth_efficiency * hw.bandwidth_gbs * 1e3 / dec.min_decode_tok_s + 1
        # SmolLM2 int4 (108.4 MB) with its KV cache at the context fits; its FP32 export (652.5 MB) does not
        assert eff.runtime_baseline_mb + 108.4 + SMOLLM2_KV_MB_AT_2K <= dec.max_peak_ram_mb
        assert dec.max_size_mb >= 108.4
        if name in ("phone-arm64", "raspberry-pi-5", "raspberry-pi-4"):
            assert dec.max_size_mb < 652.5


def test_decoder_budgets_table_is_validated(tmp_path: Path) -> None:
    base = _host_text().replace('name = "host"', 'name = "mydev"')
    for bad, needle in (("max_size = 10", "unknown key 'budgets.decoder.max_size' (did you mean "
                                          "'budgets.decoder.max_size_mb'?)"),
                        ("max_size_mb = -3", "'budgets.decoder.max_size_mb' must be a positive number"),
                        ('min_decode_tok_s = "fast"', "'budgets.decoder.min_decode_tok_s'")):
        text = re.sub(r"\[budgets\.decoder\]\n(.*\n)*?\n", f"[budgets.decoder]\n{bad}\n\n", base, count=1)
        with pytest.raises(ConfigError) as e:
            load_target(_write(tmp_path, text))
        assert needle in e.value.one_line() and str(tmp_path) in e.value.one_line()
    # no table: a decoder gets [budgets] as is
    text = re.sub(r"\[budgets\.decoder\]\n(.*\n)*?\n", "", base, count=1)
    t = load_target(_write(tmp_path, text))
    assert t.budgets.decoder == {} and _as_judged(t, DECODER) is t


def test_build_overrides_win_over_decoder_budgets(tmp_path: Path) -> None:
    """pipeline.plan applies [budgets.decoder] first, then --max-size-mb and friends."""
    from dataclasses import replace

    t = _as_judged(load_target("phone-arm64"), DECODER)
    assert t.budgets.max_size_mb == 200
    overridden = replace(t.budgets, max_size_mb=150.0)
    assert overridden.max_size_mb == 150 and overridden.max_peak_ram_mb == 768
