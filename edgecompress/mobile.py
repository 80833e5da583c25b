"""ORT Mobile packaging (`--package ort-mobile`): what a phone app embeds, made and checked by ONNX Runtime's own tools.

- `model.ort`: onnxruntime.tools.convert_onnx_models_to_ort (fixed optimization style, level all, with
  `target_platform="arm"` for aarch64 targets, which lets its optimizer fuse int8 QDQ as Arm builds do).
- `model.required_operators_and_types.config`: the reduced-operator config that tool writes, the input of ORT's
  `build.py --include_ops_by_config` for a minimal build that holds exactly these ops and types.
- ORT's mobile usability checker (onnxruntime.tools.mobile_helpers.usability_checker) on the model optimized to
  the basic level, as `check_onnx_model_mobile_usability` does: for NNAPI and CoreML (the providers it has op lists
  for), the share of nodes each would take, the partitions, and the nodes that fall back to the CPU provider.
  ORT ships no such checker for XNNPACK or QNN: those are reported as not assessed, with the com.microsoft nodes
  (which only ORT's CPU provider implements) named.
- The .ort is loaded in onnxruntime and its outputs compared with model.onnx's on the same inputs.

Layering: imports errors and profiling.kernels' provider names only; onnxruntime.tools loads lazily (it is slow).
"""

from __future__ import annotations

import contextlib
import io
import logging
import shutil
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from edgecompress.errors import ConfigError, PassError

log = logging.getLogger(__name__)

PACKAGES = ("ort-mobile",)
ORT_FILE = "model.ort"
CONFIG_FILE = "model.required_operators_and_types.config"
USABILITY_FILE = "ort-mobile-usability.txt"
# the target's provider -> ORT's checker (op list file in onnxruntime/tools/mobile_helpers)
_CHECKERS = {"NnapiExecutionProvider": [("NNAPI", "nnapi")],
             "CoreMLExecutionProvider": [("CoreML MLProgram", "coreml_supported_mlprogram_ops.md"),
                                         ("CoreML NeuralNetwork", "coreml_supported_neuralnetwork_ops.md")]}
_NO_CHECKER = {"XnnpackExecutionProvider": "XNNPACK", "QNNExecutionProvider": "QNN"}


def check_package(name: str | None) -> str | None:
    if name is None or name == "none":
        return None
    if name not in PACKAGES:
        raise ConfigError(f"unknown package '{name}'", hint=f"choose one of: {', '.join(PACKAGES)}, none")
    return name


def package_ort_mobile(model_path: Path, stage: Path, arch: str, providers: tuple[str, ...] | list[str],
                       feed: dict[str, np.ndarray]) -> dict[str, Any]:
    """Write model.ort and its operator config into `stage` (beside model.onnx); return the report."""
    from onnxruntime.tools.convert_onnx_models_to_ort import OptimizationStyle, convert_onnx_models_to_ort

    platform = "arm" if arch == "aarch64" else "amd64"
    with tempfile.TemporaryDirectory(prefix="ort-mobile-", dir=stage.parent) as tmp:
        src = Path(tmp) / "in"
        src.mkdir()
        for f in model_path.parent.glob(model_path.name + "*"):  # the model and any external-data file
            shutil.copy2(f, src / f.name)
        out = Path(tmp) / "out"
        log_sink = io.StringIO()
        try:
            with contextlib.redirect_stdout(log_sink), _quiet("ort_format_model.utils"):
                convert_onnx_models_to_ort(src / model_path.name, output_dir=out,
                                           optimization_styles=[OptimizationStyle.Fixed], target_platform=platform,
                                           save_optimized_onnx_model=True, enable_type_reduction=True)
        except Exception as e:
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise PassError(f"onnxruntime could not convert the model to ORT format: {first}",
                            hint="leave out --package ort-mobile, or try another recipe") from e
        ort_file = next(out.glob("*.ort"), None)
        config = next(out.glob("*.required_operators_and_types*.config"), None)
        if ort_file is None or config is None:
            last = (log_sink.getvalue().strip().splitlines() or ["no output"])[-1]
            raise PassError(f"onnxruntime's converter wrote no .ort file or operator config: {last}")
        optimized = next(out.glob("*.optimized.onnx"), None)
        cpu_only = Counter(n.op_type for n in onnx.load(str(optimized), load_external_data=False).graph.node
                           if n.domain not in ("", "ai.onnx")) if optimized is not None else Counter()
        shutil.move(ort_file, stage / ORT_FILE)
        shutil.move(config, stage / CONFIG_FILE)
        check = _compare(model_path, stage / ORT_FILE, feed)
        if optimized is not None:  # the .ort is ORT's optimized graph, serialized: it must compute the same
            same = _compare(optimized, stage / ORT_FILE, feed)
            check["max_abs_diff_vs_optimized_onnx"] = same["max_abs_diff_vs_onnx"]
    usability, text = _usability(model_path, providers, dict(cpu_only))
    (stage / USABILITY_FILE).write_text(text, encoding="utf-8")
    ops = _config_ops(stage / CONFIG_FILE)
    return {"format": "ORT (flatbuffers)", "file": ORT_FILE, "size_bytes": (stage / ORT_FILE).stat().st_size,
            "required_operators_and_types": CONFIG_FILE, "operators": ops,
            "converter": f"onnxruntime.tools.convert_onnx_models_to_ort (optimization style fixed, level all, "
                         f"target_platform {platform})",
            "usability_report": USABILITY_FILE, "providers": usability, "check": check}


def _config_ops(config: Path) -> dict[str, list[str]]:
    """domain;opset;op{types},op... lines -> {domain: [op, ...]}."""
    out: dict[str, list[str]] = {}
    for line in config.read_text(encoding="utf-8").splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        parts = line.split(";")
        if len(parts) == 3:
            ops = [o.split("{")[0] for o in _split_ops(parts[2])]
            out.setdefault(parts[0], [])
            out[parts[0]] = sorted({*out[parts[0]], *ops})
    return out


def _split_ops(s: str) -> list[str]:
    """Split 'A{"inputs": {"0": ["float"]}},B' at the commas outside braces."""
    parts: list[str] = []
    cur: list[str] = []
    depth = 0
    for ch in s:
        depth += ch == "{"
        depth -= ch == "}"
        if ch == "," and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    if cur:
        parts.append("".join(cur))
    return [p.strip() for p in parts if p.strip()]


@contextlib.contextmanager
def _quiet(name: str) -> Any:
    logger = logging.getLogger(name)
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(level)


def _usability(model_path: Path, providers: tuple[str, ...] | list[str], cpu_only: dict[str, int]
               ) -> tuple[dict[str, Any], str]:
    """ORT's usability checker per provider of the target: node share, partitions, CPU fallbacks."""
    from onnxruntime.tools.mobile_helpers import usability_checker as uc
    from onnxruntime.tools.onnx_model_utils import ModelProtoWithShapeInfo, optimize_model

    text = io.StringIO()
    handler = logging.StreamHandler(text)
    logger = logging.getLogger("edgecompress.mobile.usability")
    logger.handlers[:] = [handler]
    logger.setLevel(logging.INFO)
    logger.propagate = False
    report: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="ort-usability-") as tmp:
        basic = Path(tmp) / model_path.name
        optimize_model(model_path, basic, use_external_initializers=True)  # as the checker does: basic level
        model = ModelProtoWithShapeInfo(basic).model_with_shape_info
        contrib = Counter(n.op_type for n in model.graph.node if n.domain not in ("", "ai.onnx"))
        contrib.update(cpu_only)
        try:
            logger.info("ORT Mobile usability (onnxruntime.tools.mobile_helpers.usability_checker) of %s",
                        model_path.name)
            logger.info("overall: NNAPI or CoreML may work well: %s", uc.checker(basic.resolve(), logger))
        except Exception as e:  # the text report is a courtesy; the per-provider figures below are what we keep
            logger.info("the checker's own report failed: %s", e)
        for provider in providers:
            if provider in _CHECKERS:
                for ep, spec in _CHECKERS[provider]:
                    info = (uc.check_nnapi_partitions(model, require_fixed_input_sizes=True) if spec == "nnapi"
                            else uc.check_coreml_partitions(model, True, spec))
                    report[ep] = _partition_report(model, info)
            elif provider in _NO_CHECKER:
                report[_NO_CHECKER[provider]] = {
                    "assessed": False,
                    "note": "ONNX Runtime ships no partition checker for this provider. The com.microsoft nodes "
                            "listed (in the model, or fused by ORT for its CPU provider in model.ort) are ORT's own "
                            "contrib ops: they run on the CPU provider",
                    "com_microsoft_nodes": dict(contrib)}
    return report, text.getvalue()


def _partition_report(model: onnx.ModelProto, info: Any) -> dict[str, Any]:
    supported = {id(n) for group in info.supported_groups for n in group}
    fallback = Counter(f"{n.domain}:{n.op_type}" if n.domain not in ("", "ai.onnx") else n.op_type
                       for n in model.graph.node if id(n) not in supported)
    return {"assessed": True, "nodes": info.num_nodes, "supported_nodes": info.num_supported_nodes,
            "node_share": round(info.num_supported_nodes / info.num_nodes, 4) if info.num_nodes else 0.0,
            "partitions": info.num_partitions, "suitability": info.suitability().name,
            "unsupported_ops": sorted(info.unsupported_ops),
            "cpu_fallback_nodes": dict(sorted(fallback.items(), key=lambda kv: (-kv[1], kv[0]))),
            "dynamic_shape_nodes": info.nodes_unsupported_due_to_dynamic_input}


def _compare(onnx_path: Path, ort_path: Path, feed: dict[str, np.ndarray]) -> dict[str, Any]:
    """Load the .ort in onnxruntime and compare its outputs with model.onnx's on one batch."""
    import onnxruntime as ort

    try:
        a = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
        b = ort.InferenceSession(str(ort_path), providers=["CPUExecutionProvider"])
    except Exception as e:
        raise PassError(f"the ORT-format model does not load in onnxruntime: {str(e).splitlines()[0]}") from e
    names = [o.name for o in a.get_outputs()]
    inputs = {i.name for i in a.get_inputs()}
    feed = {k: v for k, v in feed.items() if k in inputs}
    ra, rb = a.run(names, feed), b.run(names, feed)
    diff = max(float(np.max(np.abs(x.astype(np.float64) - y))) if x.size else 0.0 for x, y in zip(ra, rb, strict=True))
    x, y = (np.asarray(r[0], np.float64).reshape(-1, r[0].shape[-1]) for r in (ra, rb))
    cos = (x * y).sum(1) / np.maximum(np.linalg.norm(x, axis=1) * np.linalg.norm(y, axis=1), 1e-12)
    return {"loads": True, "outputs": names, "max_abs_diff_vs_onnx": diff,
            "cosine_min_vs_onnx": round(float(cos.min()), 6), "batch": {k: list(v.shape) for k, v in feed.items()},
            "note": "model.ort (fused for the target's CPU) against model.onnx (this host's fusions), both on this "
                    "host's CPU provider with the same inputs: x86 int8 kernels round the Arm fusions differently, "
                    f"hence the cosine per row of {names[0]}; against the graph the converter serialized "
                    "the difference is max_abs_diff_vs_optimized_onnx"}


def sample_feed(model: onnx.ModelProto, vocab_size: int | None, seed: int = 0,
                dims: dict[str, int] | None = None) -> dict[str, np.ndarray]:
    """One small seeded batch for any text model's inputs: token ids, an all-ones mask, zero token types, positions,
    and zero past key/values (decoders), with symbolic dims set to batch 2, 8 new and 8 past tokens. `dims` (the
    task's workload dims) fixes the others, such as an image model's channels, height and width."""
    rng = np.random.default_rng(seed)
    inits = {t.name for t in model.graph.initializer}
    sizes = {"batch": 2, "past": 8, "sequence": 8}

    def named(name: str) -> int:  # "past_sequence_length + sequence_length" is the sum of its parts
        return sum(next((v for k, v in sizes.items() if k in part), 8) for part in name.split("+"))

    def dim(d: Any) -> int:
        if d.dim_value > 0:
            return int(d.dim_value)
        if dims and d.dim_param in dims and "batch" not in d.dim_param:
            return int(dims[d.dim_param])
        return named(d.dim_param or "")

    feed: dict[str, np.ndarray] = {}
    for inp in model.graph.input:
        if inp.name in inits:
            continue
        t = inp.type.tensor_type
        shape = [dim(d) for d in t.shape.dim]
        dtype = onnx.helper.tensor_dtype_to_np_dtype(t.elem_type)
        if "mask" in inp.name:
            feed[inp.name] = np.ones(shape, dtype)
        elif "position" in inp.name:
            feed[inp.name] = np.broadcast_to(np.arange(shape[-1], dtype=dtype) + (sizes["past"] if len(shape) else 0),
                                             shape).copy()
        elif np.issubdtype(dtype, np.integer) and "ids" in inp.name and "type" not in inp.name:
            feed[inp.name] = rng.integers(0, min(vocab_size or 1000, 1000), shape).astype(dtype)
        elif np.issubdtype(dtype, np.floating):
            feed[inp.name] = np.zeros(shape, dtype)
        else:
            feed[inp.name] = np.zeros(shape, dtype)
    return feed
