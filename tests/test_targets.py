from __future__ import annotations

import re
from pathlib import Path

import pytest

from edgecompress.errors import ConfigError
from edgecompress.targets import available_targets, load_target, load_target_file

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
