"""Benchmark: fidelity of the bundled MiniLM's int8 recipes with this host's kernels vs Arm's (emulated).

Each recipe is built for raspberry-pi-5 (the build measures fidelity with this x86 host's kernels), then the same
model.onnx runs under qemu-user as the Pi 5's Cortex-A76 (dotprod) and the Pi 4's Cortex-A72 (no dotprod) with
aarch64 onnxruntime of the same version, on the same texts; each is compared with PyTorch FP32. FP32 is the
control: its outputs should match to float rounding. No timings: emulation is 25-60x slower than the device.

    edgecompress emulator setup          # once, as root (~7 minutes)
    python benchmarks/arm_fidelity.py [--texts 120] [--recipes fp32,int8-dynamic,int8-static]
Writes benchmarks/results/arm_fidelity.json and benchmarks/results/arm_fidelity.md.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
TARGET = "raspberry-pi-5"
EMULATED = ("raspberry-pi-5", "raspberry-pi-4")  # cortex-a76 (dotprod), cortex-a72 (no dotprod)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--texts", type=int, default=120, help="built-in evaluation texts (of 240)")
    ap.add_argument("--recipes", default="fp32,int8-dynamic,int8-static")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--render-only", action="store_true", help="rewrite the .md from the committed .json")
    args = ap.parse_args()
    if args.render_only:
        (RESULTS / "arm_fidelity.md").write_text(render(json.loads((RESULTS / "arm_fidelity.json").read_text())))
        return 0

    from edgecompress.pipeline import BuildOptions, build
    from edgecompress.profiling.emulate import emulate_bundle, emulator_dir
    from edgecompress.recipes import RECIPES

    recipes = [r for r in args.recipes.split(",") if r in RECIPES]
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-arm-") as tmp:
        for recipe in recipes:
            out = Path(tmp) / recipe
            t0 = time.perf_counter()
            try:
                m = build(BuildOptions(target=TARGET, recipe=recipe, out=out, runs=3))
            except Exception as e:  # a budget miss still writes the bundle; anything else is recorded
                manifest = out / "manifest.json"
                if not manifest.is_file():
                    rows.append({"recipe": recipe, "error": str(e)})
                    continue
                from edgecompress.manifest import Manifest

                m = Manifest.load(manifest)
            build_s = time.perf_counter() - t0
            print(f"{recipe}: built in {build_s:.0f} s", file=sys.stderr, flush=True)
            for emulated in EMULATED:
                r = emulate_bundle(out, emulated, max_texts=args.texts, threads=args.threads)
                rows.append({"recipe": recipe, "size_mb": round(m.artifact.size_mb, 2),
                             "build_fidelity_on_host": m.fidelity["metrics"], "emulated": r})
                print(f"  {emulated} ({r['qemu_cpu']}, {r['emulated_seconds']} s): "
                      f"{json.dumps(r.get('fidelity'))}", file=sys.stderr, flush=True)

    emulator = json.loads((emulator_dir() / "ready.json").read_text())
    data = {"target": TARGET, "texts": args.texts, "host": {"machine": platform.machine(), "processor": _cpu_model()},
            "emulator": {k: emulator.get(k) for k in ("onnxruntime", "numpy", "python", "suite")},
            "rows": rows}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "arm_fidelity.json").write_text(json.dumps(data, indent=1) + "\n")
    (RESULTS / "arm_fidelity.md").write_text(render(data))
    print(render(data))
    return 0


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def render(d: dict) -> str:
    lines = [
        "# Fidelity with this host's int8 kernels vs Arm's (emulated)", "",
        f"Bundled all-MiniLM-L6-v2 built for `{d['target']}`; the same `model.onnx` run on this host "
        f"({d['host']['processor']}, {d['host']['machine']}) and under qemu-user with each target's CPU model "
        f"(aarch64 onnxruntime {d['emulator']['onnxruntime']}, Debian {d['emulator']['suite']}), on the first "
        f"{d['texts']} built-in evaluation texts. Fidelity: cosine of mean-pooled embeddings vs PyTorch FP32.", "",
        "| recipe | MB | emulated as | cosine mean host | cosine mean Arm | cosine p1 host | cosine p1 Arm | "
        "cosine min host | cosine min Arm | max abs diff host vs Arm | bitwise equal | Arm ops (optimized graph) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in d["rows"]:
        if "error" in r:
            lines.append(f"| {r['recipe']} | build failed: {r['error']} ||||||||||")
            continue
        e = r["emulated"]
        f = e.get("fidelity") or {}
        h, a = f.get("host", {}), f.get("arm", {})

        def c(x: dict, k: str) -> str:
            return f"{x[k]:.5f}" if k in x else ""

        ops = ", ".join(f"{k.removeprefix('com.microsoft.')} {v}" for k, v in e["ops"].items()
                        if any(t in k for t in ("MatMul", "Quantiz", "Gemm", "Attention")))  # the compute kernels
        diff = e.get("host_vs_arm", {})
        lines.append(f"| {r['recipe']} | {r['size_mb']} | {e['target']} ({e['qemu_cpu']}) | "
                     f"{c(h, 'cosine_mean')} | {c(a, 'cosine_mean')} | "
                     f"{c(h, 'cosine_p1')} | {c(a, 'cosine_p1')} | {c(h, 'cosine_min')} | {c(a, 'cosine_min')} | "
                     f"{diff.get('max_abs_diff', float('nan')):.4g} | {diff.get('bitwise_identical')} | {ops} |")
    lines += ["", "Host vs Arm, and Arm without dotprod (A72) vs with (A76), in `cosine_*` (Arm minus host):", ""]
    by = {(r["recipe"], r["emulated"]["qemu_cpu"]): r["emulated"].get("fidelity") or {} for r in d["rows"]
          if "emulated" in r}
    for recipe in dict.fromkeys(r["recipe"] for r in d["rows"]):
        a76, a72 = by.get((recipe, "cortex-a76")), by.get((recipe, "cortex-a72"))
        if not a76 or not a72:
            continue
        parts = [f"{k}: Arm A76 {a76['arm'][k] - a76['host'][k]:+.5f}, Arm A72 {a72['arm'][k] - a72['host'][k]:+.5f}"
                 for k in ("cosine_mean", "cosine_p1", "cosine_min")]
        same = "identical" if a76["arm"] == a72["arm"] else "different"
        lines.append(f"- {recipe}: {'; '.join(parts)} (A72 and A76 metrics {same})")
    lines += ["", "The build's own fidelity (all texts, this host) is in the JSON as `build_fidelity_on_host`. "
              "Emulation gives numerics only: no timings.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
