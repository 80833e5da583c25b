"""Sweeps on the local executor and on a real Dask cluster on 127.0.0.1, with tiny ONNX models."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import onnx
import pytest
from click.testing import CliRunner
from conftest import matmul_model

from edgecompress.cli import main
from edgecompress.errors import ConfigError
from edgecompress.sweep import sweep
from edgecompress.sweep.executors import DaskExecutor, LocalExecutor, WorkerDied, make_executor

TARGETS = ["host", "raspberry-pi-5"]
RECIPES = ["fp32", "int8-dynamic"]


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    d = tmp_path_factory.mktemp("onnx-models")
    paths = []
    p = d / "mm.onnx"
    onnx.save(matmul_model(m=4, k=64, n=32), str(p))
    paths.append(str(p))
    bad = d / "broken.onnx"
    bad.write_bytes(b"this is not an onnx model")
    paths.append(str(bad))
    return paths


def _check(result, out: Path, n_models: int = 1) -> None:  # type: ignore[no-untyped-def]
    by_status: dict[str, list] = {}
    for r in result.results:
        by_status.setdefault(r.status, []).append(r)
    assert len(by_status.get("built", [])) == n_models * len(TARGETS) * len(RECIPES), _statuses(result)
    # the broken model fails each of its jobs with one line, and the others still ran
    assert len(by_status["failed"]) == len(TARGETS) * len(RECIPES)
    assert all("broken.onnx" in r.error and "\n" not in r.error for r in by_status["failed"])
    for r in by_status["built"]:
        assert (out / r.job / "model.onnx").is_file()
        assert (out / r.job / "manifest.json").is_file()
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert len(rows) == len(result.results)
    assert {row["status"] for row in rows} == {"built", "failed"}
    assert json.loads((out / "results.json").read_text())[0]["job"]
    assert "| model | target |" in (out / "summary.md").read_text()
    for t in TARGETS:
        assert (out / f"pareto-{t}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_local_sweep_then_resume(models: list[str], tmp_path: Path) -> None:
    out = tmp_path / "sweep"
    first = sweep(models, TARGETS, RECIPES, out, executor="local", runs=3)
    _check(first, out)
    again = sweep(models, TARGETS, RECIPES, out, executor="local", runs=3)
    statuses = [r.status for r in again.results]
    assert statuses.count("skipped") == len(TARGETS) * len(RECIPES) and "built" not in statuses, _statuses(again)
    # a changed input (more timed runs) is a different build key: rebuilt, not skipped
    third = sweep(models[:1], TARGETS[:1], RECIPES[:1], out, executor="local", runs=4)
    assert [r.status for r in third.results] == ["built"], _statuses(third)


def _statuses(result) -> list[tuple[str, str, str]]:  # type: ignore[no-untyped-def]
    """Every job's status and error, for the assertion message (a flaky failure must say which job and why)."""
    return [(r.job, r.status, r.error) for r in result.results]


def test_local_executor_survives_a_dying_worker() -> None:
    ex = LocalExecutor(workers=2)
    ex.submit(os._exit, 7, tag="dies")
    ex.submit(abs, -5, tag="lives")
    ex.submit(int, "not a number", tag="raises")
    outcomes = {o.tag: o for o in ex.as_completed()}
    ex.close()
    assert isinstance(outcomes["dies"].error, WorkerDied) and "code 7" in str(outcomes["dies"].error)
    assert outcomes["lives"].value == 5
    assert isinstance(outcomes["raises"].error, ValueError)


def test_sweep_cli_exit_code_and_bad_input(models: list[str], tmp_path: Path) -> None:
    r = CliRunner().invoke(main, ["sweep", "--models", ",".join(models[:1]), "--targets", "host",
                                  "--recipes", "int8-dynamic", "--out", str(tmp_path / "s"), "--runs", "2",
                                  "--json"], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)[0]["status"] == "built"
    r = CliRunner().invoke(main, ["sweep", "--models", models[0], "--out", str(tmp_path / "t"),
                                  "--executor", "dask://nohost"], catch_exceptions=False)
    assert r.exit_code == 2 and "dask://HOST:PORT" in r.stderr
    r = CliRunner().invoke(main, ["sweep", "--models", models[0], "--out", str(tmp_path / "t"),
                                  "--executor", "ray"], catch_exceptions=False)
    assert r.exit_code == 2 and "unknown executor 'ray'" in r.stderr


# --- a real Dask cluster on 127.0.0.1 --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def dask_cluster():  # type: ignore[no-untyped-def]
    from distributed import LocalCluster

    cluster = LocalCluster(n_workers=2, threads_per_worker=1, host="127.0.0.1", dashboard_address=None,
                           processes=True)
    try:
        yield cluster
    finally:
        cluster.close()


def _dask_url(cluster) -> str:  # type: ignore[no-untyped-def]
    return "dask://" + cluster.scheduler_address.removeprefix("tcp://")


def test_dask_sweep(models: list[str], tmp_path: Path, dask_cluster) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "sweep"
    result = sweep(models, TARGETS, RECIPES, out, executor=_dask_url(dask_cluster), runs=3)
    assert result.executor == "dask"
    _check(result, out)
    # each job used its share of the worker's cores: 2 cores / 2 single-thread workers here
    host_jobs = [r for r in result.results if r.status == "built" and r.target == "host"]
    session = json.loads((out / host_jobs[0].job / "manifest.json").read_text())["profile"]["host"]["session"]
    assert session["intra_op_num_threads"] == max(1, (os.cpu_count() or 1) // 2)


def test_dask_worker_death_is_one_failed_job(dask_cluster) -> None:  # type: ignore[no-untyped-def]
    ex = make_executor(_dask_url(dask_cluster))
    assert isinstance(ex, DaskExecutor)
    ex.submit(os._exit, 3, tag="dies")
    ex.submit(abs, -2, tag="lives")
    outcomes = {o.tag: o for o in ex.as_completed()}
    ex.close()
    assert outcomes["lives"].value == 2
    assert isinstance(outcomes["dies"].error, WorkerDied)


def test_dask_version_mismatch_fails_clearly(dask_cluster) -> None:  # type: ignore[no-untyped-def]
    ex = make_executor(_dask_url(dask_cluster))
    assert isinstance(ex, DaskExecutor)
    with pytest.raises(ConfigError) as e:
        ex.check_versions({"edgecompress": "9.9.9"})
    ex.close()
    assert "has edgecompress 0.1.0, this machine 9.9.9" in e.value.one_line()
    assert "pip install edgecompress==9.9.9" in e.value.one_line()
