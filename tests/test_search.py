"""--recipe auto: candidates, predictions, the choice, and exit 3 when nothing fits (tiny ONNX models)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import onnx
import pytest
from click.testing import CliRunner
from conftest import matmul_model

from edgecompress.cli import main
from edgecompress.profiling.workload import Workload
from edgecompress.search import Candidate, candidates, predict
from edgecompress.sweep.results import pareto_front
from edgecompress.targets import load_target


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A MatMul whose weight rows hold an outlier: int8 visibly loses fidelity (cosine ~0.999, not a 4-decimal tie)."""
    p = tmp_path_factory.mktemp("auto") / "mm.onnx"
    m = matmul_model(m=4, k=256, n=256)
    w = onnx.numpy_helper.to_array(m.graph.initializer[0]).copy()
    w[0, :] = 30.0
    m.graph.initializer[0].CopyFrom(onnx.numpy_helper.from_array(w, "W"))
    onnx.save(m, str(p))
    return p


def test_candidates_leave_out_what_cannot_help() -> None:
    keep, excluded = candidates("feature-extraction", load_target("raspberry-pi-4"))
    reasons = {e["candidate"]: e["reason"] for e in excluded}
    assert "fp16" in reasons and "no fp16 arithmetic" in reasons["fp16"]
    assert "fp16" in [c.name for c in candidates("feature-extraction", load_target("raspberry-pi-5"))[0]]
    gpu_keep, gpu_excluded = candidates("feature-extraction", load_target("server-gpu"))
    assert "int8-dynamic" not in [c.name for c in gpu_keep]
    assert any("no GPU kernels" in e["reason"] for e in gpu_excluded if e["candidate"] == "int8-dynamic")
    assert [c.name for c in keep][:1] == ["fp32"]
    limited, more = candidates("feature-extraction", load_target("host"), max_candidates=1)
    assert len(limited) == 1 and any("--max-candidates" in e["reason"] for e in more)


def test_predictions_scale_with_precision() -> None:
    m = matmul_model(m=4, k=256, n=256)
    host = load_target("host")
    fp32, int8 = (predict(Candidate(r), m, host, Workload()) for r in ("fp32", "int8-dynamic"))
    assert fp32.size_mb == pytest.approx(256 * 256 * 4 / 1e6)
    assert int8.size_mb == pytest.approx(fp32.size_mb / 4)
    assert fp32.latency_ms is not None and int8.latency_ms is not None


def test_pareto_front() -> None:
    pts = [(10.0, 0.99), (20.0, 0.995), (15.0, 0.98), (5.0, 0.97), (20.0, 0.99)]
    assert sorted(pareto_front(pts)) == [0, 1, 3]


def _auto(tiny: Path, out: Path, *extra: str):  # type: ignore[no-untyped-def]
    return CliRunner().invoke(main, ["build", str(tiny), "--target", "host", "--recipe", "auto", "--out", str(out),
                                     "--runs", "3", *extra], catch_exceptions=False)


def test_auto_picks_the_best_fidelity_that_fits(tiny: Path, tmp_path: Path) -> None:
    r = _auto(tiny, tmp_path / "a", "--json")
    assert r.exit_code == 0, r.output
    manifest = json.loads((tmp_path / "a" / "manifest.json").read_text())
    search = manifest["search"]
    assert search["chosen"] == "fp32"  # exact, and within the host's generous budgets
    statuses = {c["candidate"]: c["status"] for c in search["candidates"]}
    assert statuses["fp32"] == "built" and statuses["int8-dynamic"] == "built"
    other = next(c for c in search["candidates"] if c["candidate"] == "int8-dynamic")
    assert "ranks lower" in other["why"]
    assert "## Recipe search" in (tmp_path / "a" / "report.md").read_text()
    assert not (tmp_path / "a" / "_candidates").exists()

    # a size budget fp32 cannot meet: int8 is chosen, fp32 rejected unbuilt by its prediction
    r = _auto(tiny, tmp_path / "b", "--max-size-mb", "0.1")
    assert r.exit_code == 0, r.output
    search = json.loads((tmp_path / "b" / "manifest.json").read_text())["search"]
    # fp32 cannot fit; the chosen one is the best fidelity among the built candidates within every budget
    fits = {c["candidate"]: c["fidelity"]["cosine_mean"] for c in search["candidates"]
            if c["status"] == "built" and c["passed"]}
    assert search["chosen"] in fits and search["chosen"] != "fp32"
    assert round(fits[search["chosen"]], 4) == round(max(fits.values()), 4)
    fp32 = next(c for c in search["candidates"] if c["candidate"] == "fp32")
    assert fp32["status"] == "rejected before building" and "predicted size" in fp32["reason"]
    # the printed table names candidates with their options (rich would read "[...]" as markup and drop it)
    assert "codebook[" in r.output and "int4[" in r.output


def test_auto_nothing_fits_exit_3(tiny: Path, tmp_path: Path) -> None:
    r = _auto(tiny, tmp_path / "c", "--max-size-mb", "0.001")
    assert r.exit_code == 3
    # the closest is the candidate predicted smallest (a low-bit codebook or int4 on this model), named with its miss
    found = re.match(r"error: no recipe fits host: the closest is (\S+): predicted size [0-9.]+ MB > 0.001 MB budget",
                     r.stderr)
    assert found, r.stderr
    assert not (tmp_path / "c").exists()
    r = _auto(tiny, tmp_path / "d", "--max-size-mb", "0.001", "--keep-best")
    assert r.exit_code == 3 and "written (--keep-best)" in r.stderr
    m = json.loads((tmp_path / "d" / "manifest.json").read_text())
    # the nearest misses are built in order until one builds (a 0.001 MB budget is below what a codebook can reach)
    statuses = {c["candidate"]: c["status"] for c in m["search"]["candidates"]}
    assert statuses[found.group(1)] in ("built", "failed")
    assert statuses[m["search"]["chosen"]] == "built" and m["verdict"]["failed"][0].startswith("size ")


def test_auto_only_flags_need_auto(tiny: Path, tmp_path: Path) -> None:
    r = CliRunner().invoke(main, ["build", str(tiny), "--target", "host", "--keep-best", "--out", str(tmp_path / "x")])
    assert r.exit_code == 2 and "go with --recipe auto" in r.stderr


def test_pruned_candidates_missing_only_fidelity_are_distilled_when_within_reach() -> None:
    """The second round of `--recipe auto`: which built candidates get a distilled variant, and why (or why not)."""
    from edgecompress.budget import BudgetRow
    from edgecompress.search import Candidate, distill_retry

    pruned = Candidate("int8-mixed", {"prune_ffn": 0.25})

    def floor(value: float, limit: float) -> BudgetRow:
        return BudgetRow("cosine_mean", limit, value, "", False, "measured", ">=")

    d, why = distill_retry(pruned, [floor(0.9617, 0.965)])  # 9% of the gap: within reach
    assert d == Candidate("int8-mixed", {"prune_ffn": 0.25, "prune_recovery": "distill"}) and "reach" in why
    d, why = distill_retry(pruned, [floor(0.9617, 0.99)])  # 74% of the gap: out of reach, said so
    assert d is None and "74%" in why and "distillation closes about 25%" in why
    size = BudgetRow("size_mb", 15.0, 20.4, "MB", False, "measured", "<=")
    assert distill_retry(pruned, [floor(0.9617, 0.965), size]) == (None, "")  # training cannot fix a size miss
    assert distill_retry(Candidate("int8-mixed"), [floor(0.9617, 0.965)]) == (None, "")  # nothing pruned
    already = Candidate("int8-mixed", {"prune_ffn": 0.25, "prune_recovery": "distill"})
    assert distill_retry(already, [floor(0.9617, 0.965)]) == (None, "")
