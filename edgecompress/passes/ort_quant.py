"""The one boundary to ONNX Runtime's quantization tooling. Its quirks (seen on ORT 1.32) live here:

- its quantizers read and write file paths, so we round-trip through a private temporary directory;
- dynamic quantization of some graphs fails with "Unable to find data type for weight_name=..." unless
  `DefaultTensorType` is set to FLOAT;
- it logs a "consider pre-processing" warning on every call, which says nothing about the result: silenced.
"""

from __future__ import annotations

import io
import logging
import tempfile
from collections.abc import Iterable, Sequence
from contextlib import contextmanager, redirect_stdout
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from edgecompress.errors import PassError


@contextmanager
def _quiet_root_logger():
    # ORT's quantizers log through the root logger; keep the user's terminal for what matters.
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


def quantize_dynamic(
    model: onnx.ModelProto,
    *,
    op_types: Sequence[str] = ("MatMul", "Gather"),
    per_channel: bool = True,
    reduce_range: bool = False,
    nodes_to_exclude: Sequence[str] = (),
) -> onnx.ModelProto:
    """ORT dynamic quantization (int8 weights, activations quantized at run time) of an in-memory model."""
    from onnxruntime.quantization import QuantType
    from onnxruntime.quantization import quantize_dynamic as ort_quantize_dynamic

    with tempfile.TemporaryDirectory(prefix="edgecompress-q-") as tmp, _quiet_root_logger():
        out = Path(tmp) / "quantized.onnx"
        try:
            ort_quantize_dynamic(
                model,
                out,
                op_types_to_quantize=list(op_types),
                per_channel=per_channel,
                reduce_range=reduce_range,
                weight_type=QuantType.QInt8,
                nodes_to_exclude=list(nodes_to_exclude),
                extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT},
            )
        except Exception as e:  # ORT raises bare Exceptions/ValueErrors with long texts
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise PassError(f"ONNX Runtime dynamic quantization failed: {first}") from e
        return onnx.load(str(out))


# --- static INT8 (QDQ) with streamed calibration ----------------------------------------------------------------
# Quirks of this part (ORT 1.32):
# - a calibrator keeps every intermediate output of every sample given to one collect_data call (entropy calibration
#   of BERT exhausted memory, onnxruntime#10503): we call collect_data once per small chunk of batches; MinMax merges
#   ranges and the histogram calibrators merge histograms between calls, so memory is bounded by the chunk;
# - by default it calibrates every float input and output of every op: narrowed to the tensors we quantize;
# - one collect_data call stacks its arrays, so the batches of one chunk must share one shape;
# - the histogram collector print()s progress on stdout, which belongs to the CLI (--json): redirected;
# - quantize_static takes precomputed ranges only through its JSON calibration cache file.
CALIBRATORS = ("minmax", "entropy", "percentile")


class _ChunkReader:
    """ORT's CalibrationDataReader protocol over one chunk of feeds."""

    def __init__(self, feeds: Sequence[dict[str, np.ndarray]]) -> None:
        self._it = iter(feeds)

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._it, None)


def _shape_key(batch: dict[str, np.ndarray]) -> tuple[tuple[str, tuple[int, ...]], ...]:
    return tuple(sorted((k, v.shape) for k, v in batch.items()))


def calibrate(
    model: onnx.ModelProto,
    batches: Iterable[dict[str, np.ndarray]],
    tensors: Sequence[str],
    *,
    method: str = "minmax",
    chunk_batches: int = 2,
) -> dict[str, tuple[float, float]]:
    """Activation ranges {tensor: (low, high)} of `tensors` over `batches` with ORT's calibrator `method`.

    Streams: at most `chunk_batches` batches of intermediate outputs are held at a time, whatever the sample count.
    """
    from onnxruntime.quantization import calibrate as cal

    if method not in CALIBRATORS:
        raise PassError(f"unknown calibration method '{method}'", hint=f"use {'|'.join(CALIBRATORS)}")
    wanted = set(tensors)
    with tempfile.TemporaryDirectory(prefix="edgecompress-cal-") as tmp, _quiet_root_logger(), \
            redirect_stdout(io.StringIO()):
        src = Path(tmp) / "model.onnx"
        onnx.save(model, str(src))
        aug = str(Path(tmp) / "augmented.onnx")
        calibrator: Any
        try:
            if method == "minmax":
                calibrator = cal.MinMaxCalibrater(src, None, aug)
            elif method == "entropy":
                calibrator = cal.EntropyCalibrater(src, None, aug, num_bins=128, num_quantized_bins=128)
            else:  # ORT's defaults for percentile: symmetric (absolute-value histogram), 99.999th percentile
                calibrator = cal.PercentileCalibrater(src, None, aug, symmetric=True, num_bins=2048,
                                                      percentile=99.999)
            select = calibrator.select_tensors_to_calibrate
            calibrator.select_tensors_to_calibrate = lambda m: _narrow(select(m), wanted)
            calibrator.augment_graph()
            calibrator.create_inference_session()
            chunk: list[dict[str, np.ndarray]] = []
            seen = 0
            for batch in batches:
                if chunk and (len(chunk) >= chunk_batches or _shape_key(chunk[0]) != _shape_key(batch)):
                    calibrator.collect_data(_ChunkReader(chunk))
                    chunk = []
                chunk.append(batch)
                seen += 1
            if not seen:
                raise PassError("no calibration batches were given", hint="give --calibration FILE")
            calibrator.collect_data(_ChunkReader(chunk))
            ranges = calibrator.compute_data()
        except PassError:
            raise
        except Exception as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise PassError(f"ONNX Runtime {method} calibration failed: {first}") from e
    out = {}
    for name in wanted:
        if name in ranges:
            low, high = ranges[name].range_value
            out[name] = (float(np.min(low)), float(np.max(high)))
    return out


def _narrow(selected: tuple[set[str], dict[str, Any]], wanted: set[str]) -> tuple[set[str], dict[str, Any]]:
    tensors, value_infos = selected
    return tensors & wanted, value_infos


def quantize_static(
    model: onnx.ModelProto,
    ranges: dict[str, tuple[float, float]],
    *,
    nodes: Sequence[str],
    activation_type: str = "uint8",
    reduce_range: bool = False,
    per_channel: bool = True,
    method: str = "minmax",
) -> onnx.ModelProto:
    """ORT static QDQ quantization of exactly `nodes` (MatMul with a constant weight, Gather of a constant table).

    Only their inputs are quantized (outputs stay float), so ORT fuses each into MatMulIntegerToFloat rather than
    requantizing between ops; weights are symmetric int8 (per output channel when `per_channel`).
    """
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType
    from onnxruntime.quantization import quantize_static as ort_quantize_static
    from onnxruntime.quantization.calibrate import TensorData, TensorsData, save_tensors_data

    methods = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
               "percentile": CalibrationMethod.Percentile}
    act = {"uint8": QuantType.QUInt8, "int8": QuantType.QInt8}[activation_type]
    op_types = sorted({n.op_type for n in model.graph.node if n.name in set(nodes)})
    data = TensorsData(methods[method], {k: TensorData(lowest=np.array(lo, dtype=np.float32),
                                                       highest=np.array(hi, dtype=np.float32))
                                         for k, (lo, hi) in ranges.items()})
    with tempfile.TemporaryDirectory(prefix="edgecompress-qs-") as tmp, _quiet_root_logger():
        out, cache = Path(tmp) / "quantized.onnx", Path(tmp) / "ranges.json"
        save_tensors_data(data, cache)
        try:
            ort_quantize_static(
                model, out, None, quant_format=QuantFormat.QDQ, op_types_to_quantize=op_types,
                per_channel=per_channel, reduce_range=reduce_range, activation_type=act,
                weight_type=QuantType.QInt8, nodes_to_quantize=list(nodes), calibrate_method=methods[method],
                calibration_cache_path=cache,
                # DedicatedQDQPair: a MatMul left out must not read a shared, already quantized activation
                extra_options={"MatMulConstBOnly": True, "WeightSymmetric": True, "DedicatedQDQPair": True,
                               "ActivationSymmetric": activation_type == "int8",
                               "OpTypesToExcludeOutputQuantization": op_types,
                               "DefaultTensorType": onnx.TensorProto.FLOAT},
            )
        except Exception as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise PassError(f"ONNX Runtime static quantization failed: {first}") from e
        return onnx.load(str(out))


def preprocess(model: onnx.ModelProto) -> onnx.ModelProto:
    """ORT's quantization pre-processing (quant_pre_process: shape inference and its basic graph optimizations):
    constant folding, Pad folded into Conv, the flatten simplified. ORT's quantizer otherwise wraps every Pad of a
    TF-style "same" padding in its own Q/DQ pair: EfficientNet-Lite0 int8 ran at 0.79x FP32 without it, 0.56x with
    it (one thread, this host), at the same fidelity."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    with tempfile.TemporaryDirectory(prefix="edgecompress-pre-") as tmp, _quiet_root_logger():
        src, out = Path(tmp) / "model.onnx", Path(tmp) / "pre.onnx"
        onnx.save(model, str(src))
        try:
            # skip_symbolic_shape: on a failure ORT's symbolic shape inference writes sym_shape_infer_temp.onnx into
            # the working directory (the user's); ONNX's own shape inference is enough for what the optimizer folds
            quant_pre_process(str(src), str(out), skip_symbolic_shape=True)
        except Exception as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise PassError(f"ONNX Runtime's quantization pre-processing failed: {first}") from e
        return onnx.load(str(out))


def quantize_qdq_all(
    model: onnx.ModelProto,
    ranges: dict[str, tuple[float, float]],
    *,
    nodes_to_exclude: Sequence[str] = (),
    activation_type: str = "uint8",
    reduce_range: bool = False,
    per_channel: bool = True,
    method: str = "minmax",
) -> onnx.ModelProto:
    """ORT static QDQ of every op it can quantize (Conv, Gemm, MatMul, Add, pooling, ...), outputs included, so
    consecutive convolutions stay in int8 (QLinearConv chains) instead of converting back to float between them.
    For convolutional networks; `nodes_to_exclude` stay float. Weights symmetric int8 (per output channel)."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType
    from onnxruntime.quantization import quantize_static as ort_quantize_static
    from onnxruntime.quantization.calibrate import TensorData, TensorsData, save_tensors_data

    methods = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
               "percentile": CalibrationMethod.Percentile}
    act = {"uint8": QuantType.QUInt8, "int8": QuantType.QInt8}[activation_type]
    data = TensorsData(methods[method], {k: TensorData(lowest=np.array(lo, dtype=np.float32),
                                                       highest=np.array(hi, dtype=np.float32))
                                         for k, (lo, hi) in ranges.items()})
    with tempfile.TemporaryDirectory(prefix="edgecompress-qdq-") as tmp, _quiet_root_logger():
        out, cache = Path(tmp) / "quantized.onnx", Path(tmp) / "ranges.json"
        save_tensors_data(data, cache)
        try:
            ort_quantize_static(
                model, out, None, quant_format=QuantFormat.QDQ, per_channel=per_channel,
                reduce_range=reduce_range, activation_type=act, weight_type=QuantType.QInt8,
                nodes_to_exclude=list(nodes_to_exclude), calibrate_method=methods[method],
                calibration_cache_path=cache,
                extra_options={"WeightSymmetric": True, "ActivationSymmetric": activation_type == "int8",
                               "DefaultTensorType": onnx.TensorProto.FLOAT},
            )
        except Exception as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise PassError(f"ONNX Runtime static quantization failed: {first}") from e
        return onnx.load(str(out))


def optimized_op_histogram(model: onnx.ModelProto) -> dict[str, int]:
    """The op histogram after ORT's graph optimizations (what actually runs): QDQ groups become int8 kernels, or
    fold back into float ops (e.g. DequantizeLinear -> Gemm) when ORT has no fusion for them."""
    import onnxruntime as ort

    with tempfile.TemporaryDirectory(prefix="edgecompress-opt-") as tmp:
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        opts.optimized_model_filepath = str(Path(tmp) / "optimized.onnx")
        opts.log_severity_level = 3
        try:
            ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
        except Exception as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise PassError(f"ONNX Runtime cannot load the quantized model: {first}") from e
        optimized = onnx.load(opts.optimized_model_filepath, load_external_data=False)
    hist: dict[str, int] = {}
    for n in optimized.graph.node:
        hist[n.op_type] = hist.get(n.op_type, 0) + 1
    return dict(sorted(hist.items()))


# --- weight-only blockwise (MatMulNBits) and float16 --------------------------------------------------------------
# Quirks of this part (ORT 1.32):
# - importing matmul_nbits_quantizer calls logging.basicConfig(level=INFO) on the root logger: undone after import;
# - it mutates the model it is given (we pass a copy) and forces opset 21 / IR 10 once Gather is quantized;
# - its GPTQ (a vendored neural-compressor) keys everything by node name, so unnamed nodes get names first, needs an
#   iterable, deep-copyable calibration reader (a list of feed dicts), forgets the com.microsoft opset import, and
#   returns RTN's weights bit for bit (a transposed error update): the int4 pass uses its own GPTQ; method="gptq" here
#   is kept so a test notices when ORT fixes it;
# - HQQ writes float zero points, which GatherBlockQuantized cannot take; GPTQ only handles MatMul: with those, the
#   word-embedding Gather is quantized by the default (RTN) quantizer in a second call.
WEIGHT_ONLY_METHODS = ("rtn", "hqq", "gptq")


def _nbits_module() -> Any:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        from onnxruntime.quantization import matmul_nbits_quantizer
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
    return matmul_nbits_quantizer


def name_nodes(model: onnx.ModelProto) -> None:
    """Give every unnamed node a unique name, in place (ORT selects and reports nodes by name)."""
    used = {n.name for n in model.graph.node if n.name}
    for i, node in enumerate(model.graph.node):
        if not node.name:
            name = f"{node.op_type}_{i}"
            while name in used:
                name += "_"
            node.name = name
            used.add(name)


def _ensure_ms_opset(model: onnx.ModelProto) -> None:
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(onnx.helper.make_opsetid("com.microsoft", 1))


def quantize_weight_only(
    model: onnx.ModelProto,
    *,
    method: str = "rtn",
    block_size: int = 32,
    symmetric: bool = False,
    op_types: Sequence[str] = ("MatMul", "Gather"),
    calibration: Sequence[dict] | None = None,
) -> onnx.ModelProto:
    """4-bit blockwise weight-only quantization (MatMul -> MatMulNBits, Gather -> GatherBlockQuantized).

    method: "rtn" (ORT's default round-to-nearest), "hqq" (half-quadratic, needs torch) or "gptq" (needs
    `calibration`, a list of feed dicts for the model's inputs). Returns a new model; the input is not touched.
    """
    if method not in WEIGHT_ONLY_METHODS:
        raise PassError(f"unknown weight-only method '{method}'", hint=f"use {'|'.join(WEIGHT_ONLY_METHODS)}")
    if method == "gptq" and not calibration:
        raise PassError("GPTQ needs calibration batches and none were given",
                        hint="give --calibration FILE, or use --int4-method rtn")
    nbits = _nbits_module()
    m = onnx.ModelProto()
    m.CopyFrom(model)
    name_nodes(m)
    axes = (("MatMul", 0), ("Gather", 1))

    def run(q: Any) -> onnx.ModelProto:
        q.process()
        return q.model.model

    matmul_ops = tuple(op for op in op_types if op == "MatMul")
    gather_ops = tuple(op for op in op_types if op == "Gather")
    import contextlib
    import io
    import warnings

    try:
        # GPTQ prints a progress bar on stdout (ours is for --json); HQQ's torch and RTN's all-zero blocks warn
        with _quiet_root_logger(), contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore", (UserWarning, RuntimeWarning))
            if method == "rtn":
                cfg = nbits.DefaultWeightOnlyQuantConfig(block_size=block_size, is_symmetric=symmetric,
                                                         op_types_to_quantize=tuple(op_types), quant_axes=axes)
                return run(nbits.MatMulNBitsQuantizer(m, block_size=block_size, is_symmetric=symmetric,
                                                      algo_config=cfg))
            if matmul_ops:
                algo: Any
                if method == "hqq":
                    algo = nbits.HQQWeightOnlyQuantConfig(block_size=block_size, bits=4,
                                                          op_types_to_quantize=matmul_ops)
                else:
                    algo = nbits.GPTQWeightOnlyQuantConfig(calibration_data_reader=list(calibration or ()),
                                                           op_types_to_quantize=matmul_ops)
                m = run(nbits.MatMulNBitsQuantizer(m, block_size=block_size, is_symmetric=symmetric,
                                                   algo_config=algo))
                _ensure_ms_opset(m)
            if gather_ops:
                cfg = nbits.DefaultWeightOnlyQuantConfig(block_size=block_size, is_symmetric=symmetric,
                                                         op_types_to_quantize=gather_ops, quant_axes=axes)
                m = run(nbits.MatMulNBitsQuantizer(m, block_size=block_size, is_symmetric=symmetric,
                                                   algo_config=cfg))
            return m
    except PassError:
        raise
    except Exception as e:  # ORT/INC raise bare Exceptions and AssertionErrors with long texts
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise PassError(f"ONNX Runtime 4-bit ({method}) quantization failed: {first}") from e


def convert_float16(model: onnx.ModelProto, *, keep_io_types: bool = True,
                    op_block_list: Sequence[str] | None = None) -> onnx.ModelProto:
    """ORT's transformer float16 converter. (onnxconverter-common's produced a model ORT refused to load on MiniLM:
    a float16 Cast output typed float.) Returns a new model; the input is not touched."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    m = onnx.ModelProto()
    m.CopyFrom(model)
    try:
        with _quiet_root_logger():
            out = convert_float_to_float16(m, keep_io_types=keep_io_types,
                                           op_block_list=list(op_block_list) if op_block_list is not None else None)
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise PassError(f"ONNX Runtime float16 conversion failed: {first}") from e
    return out
