"""Benchmark: a tiny random Whisper (2+2 layers, d_model 32; tests/test_speech.py's) and wav2vec2 built end to end:
Whisper on every target with the target's default recipe, and each recipe on raspberry-pi-5.

No real pretrained speech model installs from PyPI, so these are random models: their transcripts are garbage and
the figures say only that the pipeline runs and how closely each compressed model follows FP32 (wer/cer/token_top1
against FP32's greedy transcripts on the 6 built-in clips). Latency figures of non-host targets are estimates.

    python benchmarks/speech.py
Writes benchmarks/results/speech.json and benchmarks/results/speech.md.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
RECIPES = ("fp32", "int8-dynamic", "int8-static", "int8-mixed", "int4", "codebook", "fp16")


def build(model: Path, target: str, recipe: str | None, out: Path) -> dict:
    import edgecompress
    from edgecompress.errors import EdgeCompressError

    t0 = time.perf_counter()
    try:
        m = edgecompress.build(model, target=target, recipe=recipe, out=out, force=True, runs=5, package="none")
    except EdgeCompressError as e:
        return {"target": target, "recipe": recipe, "error": e.one_line(), "seconds": round(time.perf_counter() - t0)}
    fig = {r.name: r.value for r in m.budgets}
    return {"target": target, "recipe": m.recipe["name"], "passed": m.passed,
            "failed": [r.miss() for r in m.failed_budgets], "size_mb": round(m.artifact.size_mb, 3),
            "latency_p90_ms": fig.get("latency_p90"), "latency_source": next(
                (r.source for r in m.budgets if r.name == "latency_p90"), None),
            "fidelity": {k: round(v, 4) for k, v in m.fidelity["metrics"].items()},
            "int_share": {"encoder_model" if m.kernels.get("components") else "model":
                          m.kernels["integer_matmul_flops_share"],
                          **{k: v["integer_matmul_flops_share"] for k, v in m.kernels.get("components", {}).items()}},
            "seconds": round(time.perf_counter() - t0)}


def main() -> None:
    sys.path.insert(0, str(REPO / "tests"))
    from test_speech import TARGETS, _wav2vec2, _whisper

    rows: dict[str, list[dict]] = {"whisper_targets": [], "whisper_recipes": [], "wav2vec2_recipes": []}
    with tempfile.TemporaryDirectory(prefix="bench-speech-") as tmp:
        os.environ["EDGECOMPRESS_CACHE_DIR"] = str(Path(tmp) / "cache")
        (Path(tmp) / "whisper").mkdir()
        (Path(tmp) / "w2v").mkdir()
        whisper, w2v = _whisper(Path(tmp) / "whisper"), _wav2vec2(Path(tmp) / "w2v")
        for t in TARGETS:
            rows["whisper_targets"].append(build(whisper, t, None, Path(tmp) / "out"))
            print(rows["whisper_targets"][-1], flush=True)
        for r in RECIPES:
            rows["whisper_recipes"].append(build(whisper, "raspberry-pi-5", r, Path(tmp) / "out"))
            print(rows["whisper_recipes"][-1], flush=True)
            rows["wav2vec2_recipes"].append(build(w2v, "raspberry-pi-5", r, Path(tmp) / "out"))
            print(rows["wav2vec2_recipes"][-1], flush=True)
    RESULTS.mkdir(exist_ok=True)
    meta = {"machine": platform.machine(), "python": platform.python_version(),
            "command": "python benchmarks/speech.py"}
    (RESULTS / "speech.json").write_text(json.dumps({"meta": meta, **rows}, indent=1) + "\n")
    md = ["# Speech recognition: tiny random Whisper and wav2vec2 end to end", "",
          "Random weights (tests/test_speech.py's models): fidelity is agreement with FP32's greedy transcripts on "
          "the 6 built-in clips, not accuracy. Latency of non-host targets is estimated. "
          f"`{meta['command']}` on {meta['machine']}.", ""]
    for key, title in (("whisper_targets", "Whisper, every target, its default recipe"),
                       ("whisper_recipes", "Whisper on raspberry-pi-5, each recipe"),
                       ("wav2vec2_recipes", "wav2vec2 (CTC) on raspberry-pi-5, each recipe")):
        md += [f"## {title}", "", "| target | recipe | exit | size MB | clip p90 ms | wer | cer | token_top1 | "
               "int-kernel share | failed / error |", "|---|---|---|---|---|---|---|---|---|---|"]
        for r in rows[key]:
            if "error" in r:
                md.append(f"| {r['target']} | {r['recipe']} | 1 | | | | | | | {r['error'][:160]} |")
                continue
            f = r["fidelity"]
            md.append(f"| {r['target']} | {r['recipe']} | {0 if r['passed'] else 3} | {r['size_mb']} | "
                      f"{r['latency_p90_ms']:.1f} ({r['latency_source']}) | {f['wer']:.3f} | {f['cer']:.3f} | "
                      f"{f['token_top1']:.3f} | {', '.join(f'{v:.2f}' for v in r['int_share'].values())} | "
                      f"{'; '.join(r['failed'])[:160]} |")
        md.append("")
    (RESULTS / "speech.md").write_text("\n".join(md))


if __name__ == "__main__":
    main()
