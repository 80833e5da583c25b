"""Task adapters: what differs between model families, behind one interface the pipeline drives.

An adapter knows how to turn texts into model inputs, what the reference outputs are, which fidelity metrics
apply, and what workload the profiler should feed. Encoders (feature extraction, classification) are one case;
decoders slot in as another adapter without the pipeline growing branches.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from edgecompress import export
from edgecompress.cache import digest, hash_texts
from edgecompress.calibration import TextSet, count_truncated, tokenize_batches
from edgecompress.evaluate import Fidelity, OnnxRunner, compare, pooled_outputs
from edgecompress.passes.base import Batch, ModelInfo
from edgecompress.progress import Progress
from edgecompress.targets import Target


class TaskAdapter(Protocol):
    info: ModelInfo
    warnings: list[str]

    def check_export(self, onnx_path: Path, progress: Progress) -> export.ExportCheck: ...

    # The reference outputs are cached between builds: what determines them, and how to store/restore them.
    def reference_id(self) -> dict[str, Any]: ...

    def save_reference(self, directory: Path) -> None: ...

    def load_reference(self, directory: Path) -> None: ...

    def calibration_batches(self) -> Iterator[Batch]: ...

    def calibration_id(self) -> str: ...

    def fidelity(self, model_path: Path, progress: Progress) -> Fidelity: ...

    def profile_dims(self, target: Target) -> dict[str, int]: ...


@dataclass
class TextInputs:
    """Everything an adapter needs from the pipeline."""

    model_dir: Path
    export_dir: Path
    input_names: list[str]
    eval_texts: TextSet
    calibration_texts: TextSet
    eval_batch_size: int = 32


class EncoderTask:
    """Feature extraction and classification: one forward pass per batch, judged against PyTorch FP32."""

    def __init__(self, info: ModelInfo, inputs: TextInputs) -> None:
        self.info = info
        self.inputs = inputs
        self.tokenizer = export.load_tokenizer(inputs.export_dir)
        self.max_len = min(info.max_positions or 512, 512)
        self.warnings: list[str] = []
        truncated = count_truncated(self.tokenizer, inputs.eval_texts.texts, self.max_len)
        if truncated:
            self.warnings.append(f"{truncated} evaluation texts are longer than {self.max_len} tokens and were "
                                 "truncated")
        self._reference: np.ndarray | None = None

    def _batches(self, texts: tuple[str, ...], batch_size: int, pad_to: int | None = None) -> Iterator[Batch]:
        return tokenize_batches(self.tokenizer, texts, self.inputs.input_names, batch_size=batch_size,
                                max_length=self.max_len, pad_to=pad_to)

    def _n_eval_batches(self) -> int:
        return -(-len(self.inputs.eval_texts.texts) // self.inputs.eval_batch_size)

    def check_export(self, onnx_path: Path, progress: Progress) -> export.ExportCheck:
        """Check the export against PyTorch and keep PyTorch's pooled outputs on the eval texts as reference."""
        with progress.step("check export and compute the PyTorch reference", total=self._n_eval_batches()) as step:
            torch_model = export.TorchReference(self.inputs.model_dir, self.info.task)
            check = export.check_export(torch_model, onnx_path,
                                        self._batches(self.inputs.eval_texts.texts[:8], batch_size=4))
            self._reference = pooled_outputs(_counting(torch_model, step.advance), self.info.task,
                                             self._batches(self.inputs.eval_texts.texts,
                                                           self.inputs.eval_batch_size))
        return check

    def reference_id(self) -> dict[str, Any]:
        return {"task": self.info.task, "eval": hash_texts(self.inputs.eval_texts.texts),
                "batch": self.inputs.eval_batch_size, "max_len": self.max_len}

    def save_reference(self, directory: Path) -> None:
        assert self._reference is not None
        np.save(directory / "reference.npy", self._reference)

    def load_reference(self, directory: Path) -> None:
        self._reference = np.load(directory / "reference.npy")

    def calibration_id(self) -> str:
        return digest({"texts": hash_texts(self.inputs.calibration_texts.texts), "batch": 8,
                       "pad_to": min(128, self.max_len)})

    def calibration_batches(self) -> Iterator[Batch]:
        # calibrators need one fixed length across batches
        return self._batches(self.inputs.calibration_texts.texts, batch_size=8, pad_to=min(128, self.max_len))

    def fidelity(self, model_path: Path, progress: Progress) -> Fidelity:
        assert self._reference is not None, "check_export computes the reference first"
        with progress.step("fidelity on held-out texts", total=self._n_eval_batches()) as step:
            runner = OnnxRunner(model_path, export.SUPPORTED_TASKS[self.info.task])
            pooled = pooled_outputs(_counting(runner, step.advance), self.info.task,
                                    self._batches(self.inputs.eval_texts.texts, self.inputs.eval_batch_size))
        return Fidelity(task=self.info.task, metrics=compare(self.info.task, self._reference, pooled),
                        texts=len(self.inputs.eval_texts.texts), text_source=self.inputs.eval_texts.source,
                        reference="PyTorch FP32")

    def profile_dims(self, target: Target) -> dict[str, int]:
        return {"batch_size": target.workload.batch,
                "sequence_length": min(target.workload.sequence_length, self.max_len)}


def _counting(run: Callable[[Batch], Any], advance: Callable[[int], None]) -> Callable[[Batch], Any]:
    def wrapped(batch: Batch) -> Any:
        out = run(batch)
        advance(1)
        return out

    return wrapped


class OnnxFileTask:
    """An .onnx file given as is: judged against itself on seeded random inputs (no tokenizer, no PyTorch).

    Symbolic dims: the first is the batch, the others take the target's sequence length. Integer inputs that index
    a Gather get ids below that table's row count; other integer inputs get zeros and ones.
    """

    samples = 64
    batch = 8

    def __init__(self, info: ModelInfo, onnx_path: Path, seed: int = 0) -> None:
        import onnx

        self.info = info
        self.warnings: list[str] = []
        self.seed = seed
        model = onnx.load(str(onnx_path), load_external_data=False)
        self.output_name = model.graph.output[0].name
        inits = {i.name: i for i in model.graph.initializer}
        gather_rows = {n.input[1]: inits[n.input[0]].dims[0] for n in model.graph.node
                       if n.op_type == "Gather" and n.input[0] in inits and inits[n.input[0]].dims}
        self.inputs: list[tuple[str, int, list[str | int], int]] = []
        for inp in model.graph.input:
            if inp.name in inits:
                continue
            t = inp.type.tensor_type
            dims: list[str | int] = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?")
                                     for d in t.shape.dim]
            self.inputs.append((inp.name, t.elem_type, dims, int(gather_rows.get(inp.name, 2))))
        self._reference: np.ndarray | None = None
        self._onnx_path = onnx_path

    def _dims(self, batch: int, seq: int) -> dict[str, int]:
        out: dict[str, int] = {}
        for _, _, dims, _ in self.inputs:
            for i, d in enumerate(dims):
                if isinstance(d, str):
                    out.setdefault(d, batch if i == 0 else seq)
        return out

    def _batches(self, seed: int, seq: int = 16) -> Iterator[Batch]:
        import onnx

        rng = np.random.default_rng(seed)
        dims = self._dims(self.batch, seq)
        for _ in range(self.samples // self.batch):
            batch: Batch = {}
            for name, elem, shape, high in self.inputs:
                concrete = [d if isinstance(d, int) else dims[d] for d in shape]
                dtype = onnx.helper.tensor_dtype_to_np_dtype(elem)
                if np.issubdtype(dtype, np.integer):
                    batch[name] = rng.integers(0, high, size=concrete).astype(dtype)
                else:
                    batch[name] = rng.standard_normal(concrete).astype(dtype)
            yield batch

    def check_export(self, onnx_path: Path, progress: Progress) -> export.ExportCheck:
        with progress.step("reference outputs of the given ONNX model"):
            runner = OnnxRunner(onnx_path, self.output_name)
            self._reference = np.concatenate([_flat_unit(runner(b)) for b in self._batches(self.seed)])
        return export.ExportCheck(0.0, 0.0, True, self.samples // self.batch, self.samples, self.output_name,
                                  reference="the given ONNX model (no export)")

    def reference_id(self) -> dict[str, Any]:
        return {"task": self.info.task, "seed": self.seed, "samples": self.samples, "batch": self.batch}

    def save_reference(self, directory: Path) -> None:
        assert self._reference is not None
        np.save(directory / "reference.npy", self._reference)

    def load_reference(self, directory: Path) -> None:
        self._reference = np.load(directory / "reference.npy")

    def calibration_id(self) -> str:
        return digest({"random": self.seed + 1, "samples": self.samples, "batch": self.batch})

    def calibration_batches(self) -> Iterator[Batch]:
        return self._batches(self.seed + 1)

    def fidelity(self, model_path: Path, progress: Progress) -> Fidelity:
        assert self._reference is not None, "check_export computes the reference first"
        with progress.step("fidelity on seeded random inputs"):
            runner = OnnxRunner(model_path, self.output_name)
            got = np.concatenate([_flat_unit(runner(b)) for b in self._batches(self.seed)])
        return Fidelity(task=self.info.task, metrics=compare("feature-extraction", self._reference, got),
                        texts=self.samples, text_source=f"seeded random inputs (seed {self.seed})",
                        reference="the given ONNX model")

    def profile_dims(self, target: Target) -> dict[str, int]:
        return self._dims(target.workload.batch, target.workload.sequence_length)


def _flat_unit(out: np.ndarray) -> np.ndarray:
    flat = out.reshape(out.shape[0], -1).astype(np.float64)
    return flat / np.clip(np.linalg.norm(flat, axis=1, keepdims=True), 1e-12, None)


def make_task(info: ModelInfo, inputs: TextInputs) -> TaskAdapter:
    if info.task == export.ONNX_TASK:
        return OnnxFileTask(info, inputs.export_dir / "model.onnx")
    return EncoderTask(info, inputs)
