"""report.html: self-contained, escaped, and actually rendered by a real browser (headless Chromium)."""

from __future__ import annotations

import base64
import html.parser
import json
import os
import shutil
import struct
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import pytest

from edgecompress.budget import BudgetRow
from edgecompress.manifest import Artifact, Manifest
from edgecompress.report import measured_op_times, render_html

EVIL = '<script>alert("x")</script>&<img src=x onerror=alert(1)>'


def _manifest(*, search: bool = True, host: bool = True, ops: bool = False, name: str = "tiny") -> Manifest:
    profile: dict[str, Any] = {
        "workload": {"batch_size": 1, "sequence_length": 128},
        "estimate": {"source": "estimated", "method": "roofline", "latency_ms": 12.5, "peak_ram_mb": 80.0,
                     "ms_by_op_type": {"MatMulInteger": 6.0, "Add": 2.0, "Softmax": 1.0, "Gather": 0.5}},
        "fp32_baseline": {"size_mb": 90.4, "latency_ms": 30.0, "latency_source": "estimated", "fidelity": 1.0},
    }
    if host:
        profile["host"] = {"source": "measured", "latency_ms": {"p50": 10.0, "p90": 11.0}, "load_ms": 50.0,
                           "samples_ms": [10.0 + 0.1 * (i % 17) for i in range(60)]}
        if ops:
            profile["host"]["ops"] = {"runs": 3, "by_op_type": [
                {"op_type": "MatMulInteger", "ms_per_run": 4.0, "share": 0.6, "nodes": 36, "providers": ["CPU"]},
                {"op_type": "LayerNormalization", "ms_per_run": 1.5, "share": 0.4, "nodes": 13,
                 "providers": ["CPU"]}]}
    srch: dict[str, Any] = {}
    if search:
        srch = {"metric": "cosine_mean", "chosen": "int8-dynamic", "why": "best fidelity within budgets",
                "seconds": 12.0, "candidates": [
                    {"candidate": "fp32", "status": "built", "passed": False, "size_mb": 90.4,
                     "fidelity": {"cosine_mean": 1.0}, "why": "size 90.4 MB > 30 MB"},
                    {"candidate": "int8-dynamic", "status": "built", "passed": True, "chosen": True, "size_mb": 22.9,
                     "fidelity": {"cosine_mean": 0.992}},
                    {"candidate": "int4", "status": "built", "passed": False, "size_mb": 14.7,
                     "fidelity": {"cosine_mean": 0.97}},
                    {"candidate": EVIL, "status": "excluded", "reason": EVIL}]}
    kernels = {"integer_matmul_flops_share": 0.9474, "matmul_gflops": 2.87, "integer_matmul_gflops": 2.72,
               "integer_kernels": ["MatMulIntegerToFloat"], "by_op": {"MatMul": {"nodes": 12, "gflops": 0.15},
                                                                      "MatMulIntegerToFloat": {"nodes": 28,
                                                                                               "gflops": 2.72}},
               "workload": {"batch_size": 1, "sequence_length": 128}, "source": "modelled", "target": "phone-arm64",
               "machine": "aarch64 (Cortex-X3)", "whose": "the target's", "method": "Arm builds fuse S8S8",
               "host": {"integer_matmul_flops_share": 0.565, "matmul_gflops": 2.8, "integer_matmul_gflops": 1.58,
                        "integer_kernels": ["MatMulIntegerToFloat"], "by_op": {"MatMul": {"nodes": 33,
                                                                                          "gflops": 1.2}},
                        "workload": {"batch_size": 1, "sequence_length": 128}, "machine": "x86_64 (this host)",
                        "optimized_graph": "diagnostics/optimized-cpu.onnx", "providers": ["CPUExecutionProvider"]}}
    mobile = {"file": "model.ort", "size_bytes": 23_568_768, "required_operators_and_types": "m.config",
              "operators": {"ai.onnx": ["MatMul"], "com.microsoft": ["MatMulIntegerToFloat"]},
              "converter": "onnxruntime.tools.convert_onnx_models_to_ort", "usability_report": "u.txt",
              "check": {"loads": True, "max_abs_diff_vs_onnx": 0.24, "cosine_min_vs_onnx": 0.985,
                        "max_abs_diff_vs_optimized_onnx": 0.0},
              "providers": {"NNAPI": {"assessed": True, "nodes": 436, "supported_nodes": 120, "node_share": 0.2752,
                                      "partitions": 13, "suitability": "NO", "cpu_fallback_nodes": {"Add": 62}},
                            "QNN": {"assessed": False, "com_microsoft_nodes": {"MatMulIntegerToFloat": 28}}}}
    bundle = {"files": ["modules.json"], "sentence_transformers": {"modules": ["Transformer", "Pooling"]},
              "ort_mobile": mobile}
    layers = [{"node": "/l0/dense/MatMul", "op": "MatMul", "weight": [384, 1536], "precision": "int8", "bits": 8,
               "activations": "float", "kept_float": "kept float to hold the floor", "sensitivity": 0.005},
              {"node": EVIL, "op": "Gather", "weight": [30522, 384], "precision": "int8", "bits": 8,
               "activations": "n/a (lookup)"}]
    per_text = {"metric": "cosine", "values": [0.99 + 0.0001 * (i % 50) for i in range(240)],
                "worst": [{"text": EVIL, "cosine": 0.974}, {"text": "a short one", "cosine": 0.98}]}
    return Manifest(
        created="2026-01-01T00:00:00+00:00", tool={"edgecompress": "0.1.0", "onnxruntime": "1.32.0"},
        source={"name": name, "path": "/x", "task": "feature-extraction"},
        target={"name": "raspberry-pi-5"},
        recipe={"name": "int8-dynamic", "description": "dynamic int8", "layers": layers, "passes": [
            {"name": "int8-dynamic", "seconds": 1.0, "config": {"per_channel": True},
             "report": {"note": EVIL, "quantized": {"matmul": 36}, "gather_skipped": "no table"}}]},
        export={"task": "feature-extraction", "opset": 17, "seconds": 1.0,
                "check": {"texts": 8, "max_abs_diff": 1e-5, "output": "last_hidden_state", "atol": 1e-3}},
        fidelity={"reference": "PyTorch FP32", "texts": 240, "text_source": EVIL, "source": "measured on host",
                  "metrics": {"cosine_mean": 0.992, "cosine_p1": 0.98, "cosine_min": 0.97}, "notes": [],
                  "per_text": per_text},
        profile=profile,
        budgets=[BudgetRow("size", 30.0, 22.9, "MB", True, "measured", "<="),
                 BudgetRow("latency_p90", 60.0, 11.0, "ms", True, "measured", "<="),
                 BudgetRow("cosine_mean", 0.99, 0.992, "", True, "measured-on-host", ">=")],
        artifact=Artifact("model.onnx", ["model.onnx", "manifest.json", "report.md", "report.html"], 22_900_000,
                          "ab" * 32),
        warnings=[EVIL], search=srch, kernels=kernels, bundle=bundle,
    )


class _Doc(html.parser.HTMLParser):
    """Collects img attributes, tables (rows of cell texts) and script tags."""

    def __init__(self) -> None:
        super().__init__()
        self.imgs: list[dict[str, str | None]] = []
        self.tables: dict[str, list[list[str]]] = {}
        self.scripts = 0
        self._table: str | None = None
        self._cell: list[str] | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "img":
            self.imgs.append(a)
        elif tag == "script":
            self.scripts += 1
        elif tag == "table":
            self._table = a.get("id") or f"table{len(self.tables)}"
            self.tables[self._table] = []
        elif tag == "tr" and self._table:
            self.tables[self._table].append([])
        elif tag in ("td", "th"):
            self._cell = []

    def handle_endtag(self, tag: str) -> None:
        if tag in ("td", "th") and self._cell is not None and self._table:
            self.tables[self._table][-1].append("".join(self._cell).strip())
            self._cell = None
        elif tag == "table":
            self._table = None

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell.append(data)


def _parse(text: str) -> _Doc:
    d = _Doc()
    d.feed(text)
    return d


def _png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    w, h = struct.unpack(">II", data[16:24])
    return w, h


def test_html_is_self_contained_and_escaped() -> None:
    text = render_html(_manifest(ops=True))
    doc = _parse(text)
    assert doc.scripts == 0  # the injected <script> came out as text
    assert "<script>" not in text and "<img src=x" not in text
    assert html_escape_count(text) >= 4  # warnings, text source, pass report, candidate row
    # no outside requests: every image is an inline PNG
    ids = [i["id"] for i in doc.imgs]
    assert ids == ["plot-per-text", "plot-versus", "plot-latency", "plot-ops", "plot-pareto"]
    # every chart says what its numbers are
    assert text.count("<figcaption><span class=\"kind") == len(ids)
    assert doc.imgs[1]["alt"].endswith("estimated latency)") and doc.imgs[3]["alt"].endswith("(measured)")
    for img in doc.imgs:
        src = img["src"] or ""
        assert src.startswith("data:image/png;base64,")
        w, h = _png_size(base64.b64decode(src.split(",", 1)[1]))
        assert w >= 300 and h >= 150
    assert "http://" not in text and "https://" not in text
    budgets = doc.tables["budgets"]
    assert budgets[0] == ["budget", "value", "limit", "unit", "verdict", "source"]
    assert [r[0] for r in budgets[1:]] == ["size", "latency_p90", "cosine_mean"]
    assert budgets[3][2] == ">= 0.9900" and budgets[3][4] == "PASS" and budgets[3][5] == "measured-on-host"
    assert doc.tables["ops"][1][:4] == ["MatMulInteger", "4.000", "60.0%", "36"]
    # the verdict comes first, before any table
    assert text.index('id="verdict"') < text.index('<table id="budgets"') < text.index('id="load"')
    assert 'SentenceTransformer(&quot;' in text and "model.ort" in text
    kernels = doc.tables["kernels"]
    assert [r[0] for r in kernels[1:]] == ["target phone-arm64", "this host"]
    assert kernels[1][1] == "modelled" and kernels[1][3] == "94.7%" and kernels[2][3] == "56.5%"
    assert doc.tables["providers"][1][:4] == ["NNAPI", "120/436 (27.5%)", "13", "NO"]
    qnn = doc.tables["providers"][2]
    assert qnn[1] == "not assessed" and "MatMulIntegerToFloat ×28" in qnn[4]
    assert doc.tables["export"][-1][1].startswith("1.00e-05")
    passes = doc.tables["passes"]
    assert passes[0] == ["pass", "what it did", "skipped, and why", "seconds", "config"]
    assert "quantized: matmul=36" in passes[1][1] and passes[1][2] == "gather_skipped: no table"
    layers = doc.tables["layers"]
    assert layers[1][3:] == ["int8", "8", "float", "kept float to hold the floor", "0.005"] and layers[2][0] == EVIL
    assert doc.tables["worst-texts"][1] == [EVIL, "0.9740"]
    assert EVIL in [r[0] for r in doc.tables["candidates"]]  # escaped in the source, the original text when parsed


def html_escape_count(text: str) -> int:
    return text.count("&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;")


def test_op_plot_prefers_the_measured_table_and_labels_the_estimate() -> None:
    assert measured_op_times(_manifest(ops=True).profile) == ("host", {"MatMulInteger": 4.0,
                                                                       "LayerNormalization": 1.5})
    assert measured_op_times(_manifest(ops=False).profile) is None
    estimated = render_html(_manifest(ops=False, host=False, search=False))
    doc = _parse(estimated)
    assert [i["id"] for i in doc.imgs] == ["plot-per-text", "plot-versus", "plot-ops"]  # no samples, no search
    assert "Estimated: the per-node roofline" in estimated
    assert "measured, ORT profiler" not in estimated
    assert "Per-op-type kernel time per run from onnxruntime" in render_html(_manifest(ops=True))


def test_failed_budget_is_shown() -> None:
    m = _manifest(search=False)
    m.budgets[0] = BudgetRow("size", 10.0, 22.9, "MB", False, "measured", "<=")
    doc = _parse(text := render_html(m))
    assert doc.tables["budgets"][1][4] == "FAIL"
    assert "Budget failed: size 22.9 MB &gt; 10.0 MB budget" in text


# ---------------------------------------------------------------------------------------- a real build writes it


def test_build_writes_report_html(tiny_bert: Path, tmp_path: Path) -> None:
    from edgecompress.pipeline import BuildOptions, build

    out = tmp_path / "b"
    m = build(BuildOptions(model=tiny_bert, target="host", recipe="int8-dynamic", out=out, runs=5))
    assert "report.html" in m.artifact.files
    text = (out / "report.html").read_text(encoding="utf-8")
    doc = _parse(text)
    ids = [i["id"] for i in doc.imgs]
    assert ids[:4] == ["plot-per-text", "plot-versus", "plot-latency", "plot-ops"]  # host target: measured samples
    assert len(doc.tables["layers"]) > 1 and len(doc.tables["worst-texts"]) == 6
    assert 0 < len(m.profile["host"]["samples_ms"]) <= 1000
    base = m.profile["fp32_baseline"]
    assert base["size_mb"] > m.artifact.size_mb  # int8 is smaller than the FP32 export
    assert len(doc.tables["budgets"]) == len(m.budgets) + 1
    assert json.loads((out / "manifest.json").read_text())["artifact"]["files"] == m.artifact.files


@pytest.mark.slow
def test_auto_build_report_has_the_pareto_plot(tiny_bert: Path, tmp_path: Path) -> None:
    from edgecompress.pipeline import BuildOptions
    from edgecompress.search import build_auto

    out = tmp_path / "auto"
    m = build_auto(BuildOptions(model=tiny_bert, target="host", recipe="auto", out=out, runs=3), max_candidates=2)
    doc = _parse((out / "report.html").read_text(encoding="utf-8"))
    assert "plot-pareto" in [i["id"] for i in doc.imgs]
    built = [c for c in m.search["candidates"] if c["status"] == "built"]
    assert len(doc.tables["candidates"]) == len(m.search["candidates"]) + 1 and len(built) >= 2
    assert not (out / "_candidates").exists()


# ------------------------------------------------------------------------------------------- headless Chromium

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--hide-scrollbars"]


def _chromium() -> str:
    """The chromium binary; installs the Debian package when missing (as root), skips if that cannot be done."""
    found = shutil.which("chromium")
    if found:
        return found
    if os.geteuid() == 0 and shutil.which("apt-get"):
        subprocess.run(["apt-get", "install", "-y", "-q", "chromium"], capture_output=True, timeout=600)
        found = shutil.which("chromium")
        if not found:
            subprocess.run(["apt-get", "update", "-q"], capture_output=True, timeout=300)
            subprocess.run(["apt-get", "install", "-y", "-q", "chromium"], capture_output=True, timeout=600)
            found = shutil.which("chromium")
    if not found:
        pytest.skip("chromium is not installed and could not be installed (apt-get install -y chromium)")
    return found


# Injected by the test only (the report has no scripts): after load, write each image's decoded size into the DOM.
PROBE = """<script>
window.addEventListener('load', () => {
  for (const img of document.images) {
    img.setAttribute('data-natural-width', String(img.naturalWidth));
    img.setAttribute('data-complete', String(img.complete));
  }
  document.body.setAttribute('data-probed', 'yes');
});
</script>"""


def _run_chromium(binary: str, args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    with tempfile.TemporaryDirectory(prefix="chromium-profile-") as profile:
        return subprocess.run([binary, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args], capture_output=True,
                              text=True, timeout=120, cwd=cwd)


@pytest.mark.slow
def test_report_renders_in_headless_chromium(tmp_path: Path) -> None:
    binary = _chromium()
    page = tmp_path / "report.html"
    page.write_text(render_html(_manifest(ops=True)), encoding="utf-8")
    probed = tmp_path / "probed.html"
    probed.write_text(page.read_text(encoding="utf-8").replace("</body>", PROBE + "</body>"), encoding="utf-8")

    dom = _run_chromium(binary, ["--virtual-time-budget=5000", "--dump-dom", probed.as_uri()], tmp_path)
    assert dom.returncode == 0, dom.stderr[-500:]
    doc = _parse(dom.stdout)
    assert 'data-probed="yes"' in dom.stdout, "the load handler did not run"
    assert len(doc.imgs) == 5
    for img in doc.imgs:  # decoded by the browser, at the PNG's own width
        w, _ = _png_size(base64.b64decode((img["src"] or "").split(",", 1)[1]))
        assert img["data-complete"] == "true"
        assert img["data-natural-width"] == str(w), img["id"]
    assert {"budgets", "kernels", "providers", "export", "passes", "layers", "fidelity", "worst-texts",
            "candidates"} <= set(doc.tables)
    assert len(doc.tables["budgets"]) == 4 and len(doc.tables["candidates"]) == 5

    shot = tmp_path / "shot.png"
    r = _run_chromium(binary, ["--window-size=1200,2400", f"--screenshot={shot}", page.as_uri()], tmp_path)
    assert r.returncode == 0 and shot.is_file(), r.stderr[-500:]
    if os.environ.get("EDGECOMPRESS_KEEP_SCREENSHOT"):  # to look at it: a person reads this page
        shutil.copy(shot, os.environ["EDGECOMPRESS_KEEP_SCREENSHOT"])
    data = shot.read_bytes()
    assert _png_size(data) == (1200, 2400)
    import matplotlib.image
    import numpy as np

    pixels = np.asarray(matplotlib.image.imread(shot))[..., :3]
    # non-trivial: many distinct colours (plots, green/red verdicts), not a blank or error page
    assert len(data) > 50_000
    assert len(np.unique((pixels * 255).astype(np.uint8).reshape(-1, 3), axis=0)) > 200
    assert pixels.std() > 0.05
