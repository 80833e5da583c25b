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
from edgecompress.calibration import TextSet, count_truncated, tokenize_batches
from edgecompress.evaluate import Fidelity, OnnxRunner, compare, pooled_outputs
from edgecompress.passes.base import Batch, ModelInfo
from edgecompress.progress import Progress
from edgecompress.targets import Target


class TaskAdapter(Protocol):
    info: ModelInfo
    warnings: list[str]

    def check_export(self, onnx_path: Path, progress: Progress) -> export.ExportCheck: ...

    def calibration_batches(self) -> Iterator[Batch]: ...

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


def make_task(info: ModelInfo, inputs: TextInputs) -> TaskAdapter:
    return EncoderTask(info, inputs)
