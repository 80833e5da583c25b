"""Pruning with distillation (--prune-recovery distill): the PyTorch student is pruned exactly as the graph pass
prunes (checked at zero steps), training is deterministic and capped, bad sources are refused in one line."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from conftest import ctrl_c_leaves_nothing, run_onnx, sigint_default

from edgecompress.cli import main
from edgecompress.errors import ConfigError
from edgecompress.graph import GraphIndex
from edgecompress.passes.base import Batch, PassContext
from edgecompress.passes.prune import PruneConfig, StructuredPrune
from edgecompress.recipes import RecipeOptions, make_recipe
from edgecompress.targets import load_target


def _export(src: Path, out: Path) -> tuple[onnx.ModelProto, PassContext]:
    """The tiny model's optimum export and a context with real calibration batches (built-in texts, b8, pad 128)."""
    from edgecompress import export
    from edgecompress.calibration import builtin_texts, tokenize_batches

    info = export.inspect_model(src)
    path = export.export_onnx(src, info, out).onnx_path
    model = onnx.load(path)
    tok = export.load_tokenizer(src)
    names = [i.name for i in model.graph.input]
    texts = builtin_texts("calibration").texts[:96]
    ctx = PassContext(target=load_target("host"), info=info, source=src, seed=0,
                      calibration=lambda: tokenize_batches(tok, texts, names, batch_size=8, pad_to=128),
                      calibration_data={"source": "builtin:calibration", "count": len(texts)})
    return model, ctx


@pytest.fixture(scope="module")
def bert(tiny_bert: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[onnx.ModelProto, PassContext]:
    return _export(tiny_bert, tmp_path_factory.mktemp("distill-bert"))


def _shapes(model: onnx.ModelProto) -> list[tuple[int, ...]]:
    idx = GraphIndex(model)
    return sorted(tuple(idx.initializers[n.input[1]].dims) for n in idx.nodes("MatMul")
                  if idx.is_initializer(n.input[1]))


def _outputs(model: onnx.ModelProto, ctx: PassContext) -> np.ndarray:
    assert ctx.calibration is not None
    batches: list[Batch] = list(ctx.calibration())[:3]
    return np.concatenate([run_onnx(model, b)[0] * b["attention_mask"][..., None] for b in batches])


def test_zero_steps_torch_pruning_equals_graph_pruning(bert: tuple[onnx.ModelProto, PassContext]) -> None:
    """The torch-pruned, re-exported student at 0 steps is the graph pass's refit model: same shapes, same outputs."""
    model, ctx = bert
    knobs = {"ffn_ratio": 0.5, "head_ratio": 0.25}
    graph = StructuredPrune(PruneConfig(recovery="refit", **knobs)).run(model, ctx)
    torch_side = StructuredPrune(PruneConfig(recovery="distill", distill_steps=0, **knobs)).run(model, ctx)
    assert _shapes(graph.model) == _shapes(torch_side.model) != _shapes(model)
    ref = _outputs(graph.model, ctx)
    got = _outputs(torch_side.model, ctx)
    assert np.max(np.abs(got - ref)) < 1e-4, np.max(np.abs(got - ref))
    d = torch_side.report["distill"]
    assert d["steps"] == 0 and d["export_check_max_abs_diff"] < 1e-3
    assert torch_side.report["flops_removed_share"] == graph.report["flops_removed_share"] > 0.2
    assert {m["kind"] for m in d["modules"]} == {"ffn", "heads"}


def test_distillation_is_deterministic_capped_and_recorded(bert: tuple[onnx.ModelProto, PassContext]) -> None:
    model, ctx = bert
    # a generous cap: the default 8 minutes could cut one of the two runs short on a loaded machine
    cfg = PruneConfig(ffn_ratio=0.5, head_ratio=0.25, recovery="distill", distill_steps=12, distill_lr=1e-3,
                      distill_minutes=120)
    a = StructuredPrune(cfg).run(model, ctx)
    b = StructuredPrune(cfg).run(model, ctx)
    wa = {t.name: onnx.numpy_helper.to_array(t) for t in a.model.graph.initializer}
    wb = {t.name: onnx.numpy_helper.to_array(t) for t in b.model.graph.initializer}
    assert wa.keys() == wb.keys() and all(np.array_equal(wa[k], wb[k]) for k in wa)
    d = a.report["distill"]
    assert d["steps"] == 12 and d["stopped_by"] == "steps" and d["cpu_seconds"] > 0
    curve = [loss for _, loss in d["loss_curve"]]
    assert len(curve) == 12 and all(np.isfinite(curve))  # a random tiny BERT has little to learn: see the MiniLM test
    assert d["data"]["count"] == 96 and d["texts_used"] == 96
    # the hard wall-clock cap stops training whatever the step count
    capped = StructuredPrune(replace(cfg, distill_steps=100_000, distill_minutes=1e-4)).run(model, ctx)
    assert capped.report["distill"]["stopped_by"] == "time cap"
    assert capped.report["distill"]["steps"] < 100_000


def test_bfloat16_training_is_deterministic_and_recorded(bert: tuple[onnx.ModelProto, PassContext]) -> None:
    """bfloat16 autocast (what `auto` picks on a CPU with bf16 instructions) trains reproducibly and says so."""
    model, ctx = bert
    cfg = PruneConfig(ffn_ratio=0.5, recovery="distill", distill_steps=6, distill_lr=1e-3, distill_minutes=120,
                      distill_precision="bfloat16")
    a, b = StructuredPrune(cfg).run(model, ctx), StructuredPrune(cfg).run(model, ctx)
    assert [t.raw_data for t in a.model.graph.initializer] == [t.raw_data for t in b.model.graph.initializer]
    d = a.report["distill"]
    assert d["precision"] == {"used": "bfloat16", "asked": "bfloat16", "why": "asked for"}
    assert d["settings"]["precision"] == "bfloat16" and all(np.isfinite([loss for _, loss in d["loss_curve"]]))
    fp32 = StructuredPrune(replace(cfg, distill_precision="float32")).run(model, ctx)
    assert fp32.report["distill"]["precision"]["used"] == "float32"
    assert [t.raw_data for t in fp32.model.graph.initializer] != [t.raw_data for t in a.model.graph.initializer]


def test_auto_precision_follows_the_hosts_bf16_instructions() -> None:
    from edgecompress.distill import training_precision
    from edgecompress.targets import detect_isa

    assert training_precision("auto", frozenset({"avx2", "bf16"}))[0] == "bfloat16"
    assert training_precision("auto", frozenset({"avx2", "avx512_vnni"}))[0] == "float32"
    assert training_precision("float32", frozenset({"bf16"})) == ("float32", "asked for")
    assert "bf16" in detect_isa("flags\t: fpu avx2 avx512f avx512_bf16\n")  # x86's name for it
    assert "bf16" in detect_isa("Features\t: fp asimd asimddp bf16\n")  # Arm's


def test_classifier_distils_on_logits(tiny_bert_cls: Path, tmp_path: Path) -> None:
    model, ctx = _export(tiny_bert_cls, tmp_path / "cls")
    res = StructuredPrune(PruneConfig(ffn_ratio=0.5, recovery="distill", distill_steps=4)).run(model, ctx)
    d = res.report["distill"]
    assert d["loss"].startswith("KL of logits") and d["steps"] == 4
    assert res.model.graph.output[0].name == "logits"


def test_distill_knobs_need_the_distill_recovery() -> None:
    with pytest.raises(ConfigError, match="--distill-steps does nothing without --prune-recovery distill"):
        make_recipe("int8-mixed", RecipeOptions.from_flags({"prune_ffn": 0.3, "distill_steps": 10}))
    with pytest.raises(ConfigError, match="--distill-precision does nothing without --prune-recovery distill"):
        make_recipe("int8-mixed", RecipeOptions.from_flags({"prune_ffn": 0.3, "distill_precision": "bfloat16"}))
    with pytest.raises(ConfigError, match=r"--distill-minutes must be in \(0, 1440\]"):
        RecipeOptions.from_flags({"prune_ffn": 0.3, "prune_recovery": "distill", "distill_minutes": 0})
    recipe = make_recipe("int8-mixed", RecipeOptions(prune_ffn=0.3, prune_recovery="distill", distill_steps=5))
    assert recipe.passes[0].trains() and not recipe.passes[1].trains()


@pytest.mark.parametrize("source", ["model.onnx", "model.gguf"])
def test_untrainable_source_is_refused_in_one_line(source: str, tmp_path: Path) -> None:
    path = tmp_path / source
    path.write_bytes(b"not read: refused before")
    r = CliRunner().invoke(main, ["build", str(path), "--target", "host", "--out", str(tmp_path / "out"),
                                  "--prune-ffn", "0.3", "--prune-recovery", "distill"])
    assert r.exit_code == 2, r.output
    assert "distill trains the source's PyTorch weights" in r.output and "Traceback" not in r.output
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_ctrl_c_during_distillation_leaves_nothing(tiny_bert: Path, tmp_path: Path) -> None:
    out = tmp_path / "parent" / "b"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TMPDIR": str(tmp_path)}
    proc = subprocess.Popen([sys.executable, "-m", "edgecompress.cli", "-v", "build", str(tiny_bert), "--target",
                             "host", "--out", str(out), "--prune-ffn", "0.5", "--prune-recovery", "distill",
                             "--distill-steps", "100000", "--no-cache"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, preexec_fn=sigint_default)
    assert proc.stderr is not None
    deadline = time.time() + 180
    seen = []
    while time.time() < deadline and proc.poll() is None:
        line = proc.stderr.readline()
        seen.append(line)
        if "distillation: training" in line:
            break
    assert proc.poll() is None, "".join(seen)
    time.sleep(1.0)
    ctrl_c_leaves_nothing(proc, out)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("edgecompress-distill-")]


def test_decoder_distils_on_logits_and_builds(tiny_llama: Path, tmp_path: Path) -> None:
    """A causal LM: pruned MLPs distilled on next-token logits (KL), re-exported with its KV cache, then int4."""
    import json

    out = tmp_path / "out"
    r = CliRunner().invoke(main, ["build", str(tiny_llama), "--target", "host", "--recipe", "int4", "--out", str(out),
                                  "--prune-ffn", "0.25", "--prune-recovery", "distill", "--distill-steps", "2",
                                  "--runs", "1"])
    assert r.exit_code in (0, 3), r.output  # 3: a budget of the host; the build itself completed
    manifest = json.loads((out / "manifest.json").read_text())
    prune = manifest["recipe"]["passes"][0]["report"]
    d = prune["distill"]
    assert d["steps"] == 2 and d["loss"].startswith("KL of logits") and prune["flops_removed_share"] > 0
    assert manifest["fidelity"]["metrics"]["perplexity_ratio"] < 1.5
