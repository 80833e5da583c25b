"""Weight memory after ORT's load-time folding (profiling/weights.py): a codebook artifact is small on disk but sits
in RAM decoded, and ORT holds the decode intermediates while it folds; the estimates must say so."""

from __future__ import annotations

from pathlib import Path

import onnx
import onnxruntime as ort

from edgecompress.passes.codebook import Codebook, CodebookConfig
from edgecompress.profiling.cost import DTYPE_BYTES
from edgecompress.profiling.estimate import estimate
from edgecompress.profiling.weights import weight_memory
from edgecompress.targets import load_target
from tests.test_codebook import _ctx, _feeds, _two_layer_model


def _init_bytes(model: onnx.ModelProto) -> float:
    total = 0.0
    for i in model.graph.initializer:
        n = 1
        for d in i.dims:
            n *= d
        total += n * DTYPE_BYTES.get(i.data_type, 4)
    return total


def test_plain_model_is_its_file() -> None:
    m = _two_layer_model(k=256, h=192, n=128)
    wm = weight_memory(m)
    assert not wm.folds
    assert wm.file_bytes == wm.resident_bytes == wm.load_peak_bytes == 4 * (256 * 192 + 192 * 128)


def test_codebook_resident_matches_orts_folded_graph(tmp_path: Path) -> None:
    k, h, n = 512, 384, 256
    res = Codebook(CodebookConfig(bits=4, mixed=False)).run(_two_layer_model(k=k, h=h, n=n), _ctx(_feeds(k)))
    path = tmp_path / "coded.onnx"
    onnx.save(res.model, str(path))
    opts = ort.SessionOptions()
    opts.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    folded = _init_bytes(onnx.load(str(tmp_path / "optimized.onnx")))  # what ORT really keeps after loading

    wm = weight_memory(res.model)
    assert wm.folds
    assert wm.file_bytes < 0.6 * (k * h + h * n)  # ~4 bits a weight on disk
    assert abs(wm.resident_bytes - folded) <= 0.05 * folded, (wm.resident_bytes, folded)
    assert wm.resident_bytes >= k * h + h * n  # int8 in RAM, not 4 bits
    assert wm.load_peak_bytes > 4 * wm.resident_bytes  # unpacked fields + int32 indices held while folding


def test_estimate_counts_the_load_peak() -> None:
    k, h, n = 512, 384, 256
    res = Codebook(CodebookConfig(bits=4, mixed=False)).run(_two_layer_model(k=k, h=h, n=n), _ctx(_feeds(k)))
    target = load_target("raspberry-pi-5")
    est = estimate(res.model, target, {"batch": 1, "sequence": 8})
    wm = weight_memory(res.model)
    assert est.peak_ram_mb >= target.estimate.runtime_baseline_mb + wm.load_peak_bytes / 2**20 - 1e-9
    assert est.details["load_peak_mb"] is not None
