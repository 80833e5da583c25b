"""The build cache: hits when nothing changed, and a miss for ANY change to what determines an entry."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import onnx
import pytest
from conftest import matmul_model

import edgecompress
from edgecompress import export, steps
from edgecompress.cache import Cache, digest
from edgecompress.passes.base import PassContext
from edgecompress.passes.quantize_int8 import DynamicInt8, DynamicInt8Config
from edgecompress.progress import NullProgress
from edgecompress.recipes import Recipe, make_recipe
from edgecompress.targets import load_target


@pytest.fixture
def cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    d = tmp_path / "cache"
    monkeypatch.setenv("EDGECOMPRESS_CACHE_DIR", str(d))
    return d


@pytest.fixture
def tiny_onnx(tmp_path: Path) -> Path:
    p = tmp_path / "mm.onnx"
    onnx.save(matmul_model(m=4, k=64, n=32), str(p))
    return p


def _build(model: Path, out: Path, **kw):  # type: ignore[no-untyped-def]
    return edgecompress.build(model, target="host", recipe=kw.pop("recipe", "int8-dynamic"), out=out, runs=3,
                              force=True, **kw)


def test_digest_ignores_order_and_sees_every_value() -> None:
    assert digest({"a": 1, "b": {2, 1}}) == digest({"b": frozenset({1, 2}), "a": 1})
    assert digest({"a": 1}) != digest({"a": 2}) != digest({"a": "1"})


def test_entries_are_atomic(tmp_path: Path) -> None:
    c = Cache(tmp_path)
    key = digest("x")

    def boom(d: Path) -> None:
        (d / "half").write_text("x")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        c.put("export", key, boom)
    assert c.get("export", key) is None
    assert not list((tmp_path / "export").rglob("half"))
    entry = c.put("export", key, lambda d: (d / "ok").write_text("y"))
    assert c.get("export", key) == entry and (entry / "ok").read_text() == "y"
    assert c.info().entries == {"export": 1}
    assert c.clear() == 1 and c.info().entries == {}


def test_second_build_hits_every_step(tiny_onnx: Path, tmp_path: Path, cache_dir: Path) -> None:
    first = _build(tiny_onnx, tmp_path / "a")
    assert first.cache["hits"] == [] and len(first.cache["misses"]) == 3  # export, reference, pass
    second = _build(tiny_onnx, tmp_path / "b")
    assert len(second.cache["hits"]) == 3 and second.cache["misses"] == []
    assert second.recipe["passes"][0]["cached"] is True
    assert second.artifact.sha256 == first.artifact.sha256
    assert second.build_key == first.build_key


def _keys(model: Path, cache: Cache, scratch: Path, recipe: Recipe | None = None,
          **ctx_kw: object) -> tuple[str, str]:
    """(export key, key after the recipe's passes) for this model and context."""
    info = export.inspect_model(model)
    exp = steps.run_export(cache, model, info, scratch / "e", NullProgress())
    ctx = PassContext(target=ctx_kw.get("target", load_target("host")), info=info,  # type: ignore[arg-type]
                      calibration_id=str(ctx_kw.get("calibration_id", "c0")), seed=int(ctx_kw.get("seed", 0)))
    _, _, key = steps.run_recipe(cache, recipe or make_recipe("int8-dynamic"), onnx.load(str(exp.result.onnx_path)),
                                 exp.key, ctx, scratch / "p", NullProgress())
    return exp.key, key


def test_any_input_change_misses(tiny_onnx: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cache = Cache(tmp_path / "c")
    base = _keys(tiny_onnx, cache, tmp_path / "s0")
    assert _keys(tiny_onnx, cache, tmp_path / "s1") == base  # nothing changed: same keys

    # calibration data, seed and target facts change the pass key but not the export's
    changes = [{"calibration_id": "c1"}, {"seed": 1},
               {"target": replace(load_target("host"), default_recipe="fp32")},
               {"target": load_target("raspberry-pi-5")}]
    for i, kw in enumerate(changes):
        e, p = _keys(tiny_onnx, cache, tmp_path / f"k{i}", **kw)
        assert e == base[0] and p != base[1], kw

    # the pass config
    per_tensor = Recipe("x", "x", (DynamicInt8(DynamicInt8Config(per_channel=False)),), True)
    assert _keys(tiny_onnx, cache, tmp_path / "cfg", recipe=per_tensor)[1] != base[1]

    # library versions change everything
    monkeypatch.setattr(steps, "cache_versions", lambda: {"onnxruntime": "0.0.0"})
    e, p = _keys(tiny_onnx, cache, tmp_path / "v")
    assert e != base[0] and p != base[1]
    monkeypatch.undo()

    # the source weights: one value of one weight
    m = onnx.load(str(tiny_onnx))
    w = onnx.numpy_helper.to_array(m.graph.initializer[0]).copy()
    w.flat[0] += 1e-3
    m.graph.initializer[0].CopyFrom(onnx.numpy_helper.from_array(w, m.graph.initializer[0].name))
    onnx.save(m, str(tiny_onnx))
    e, p = _keys(tiny_onnx, cache, tmp_path / "w")
    assert e != base[0] and p != base[1]


def test_hf_source_fingerprint_covers_config_and_tokenizer(tiny_bert: Path, tmp_path: Path) -> None:
    import shutil

    copy = tmp_path / "m"
    shutil.copytree(tiny_bert, copy)
    before = digest(steps.source_fingerprint(copy))
    cfg = json.loads((copy / "config.json").read_text())
    cfg["layer_norm_eps"] = 1e-6
    (copy / "config.json").write_text(json.dumps(cfg))
    after_cfg = digest(steps.source_fingerprint(copy))
    (copy / "vocab.txt").write_text((copy / "vocab.txt").read_text() + "extra\n")
    assert len({before, after_cfg, digest(steps.source_fingerprint(copy))}) == 3


def test_no_cache_writes_nothing(tiny_onnx: Path, tmp_path: Path, cache_dir: Path) -> None:
    m = _build(tiny_onnx, tmp_path / "a", cache=False)
    assert m.cache["dir"] is None
    assert not cache_dir.exists()


def test_clear_keeps_the_emulator_root(cache_dir: Path) -> None:
    """The Arm emulator root lives in the cache dir but is an installed tool: `cache clear` must not delete it."""
    from click.testing import CliRunner

    from edgecompress.cli import main as cli

    c = Cache(cache_dir)
    c.put("export", digest("x"), lambda d: (d / "model.onnx").write_text("m"))
    (cache_dir / "emulator" / "rootfs").mkdir(parents=True)
    (cache_dir / "emulator" / "rootfs" / "marker").write_text("arm64 root")
    res = CliRunner().invoke(cli, ["cache", "clear"])
    assert res.exit_code == 0, res.output
    assert "removed 1 entries" in res.output and "kept" in res.output
    assert c.info().entries == {} and not (cache_dir / "export").exists()
    assert (cache_dir / "emulator" / "rootfs" / "marker").read_text() == "arm64 root"


def test_a_second_writer_of_one_key_waits_and_uses_the_first_entry(tmp_path: Path) -> None:
    import threading
    import time

    c = Cache(tmp_path)
    key = digest("same")
    calls: list[str] = []

    def slow(d: Path) -> None:
        calls.append("first")
        time.sleep(0.5)
        (d / "x").write_text("first")

    t = threading.Thread(target=c.put, args=("export", key, slow))
    t.start()
    time.sleep(0.1)
    entry, hit = c.materialize("export", key, lambda d: calls.append("second"), tmp_path / "scratch")
    t.join()
    assert calls == ["first"] and hit and (entry / "x").read_text() == "first"
