"""Text encoders (feature extraction, classification): one forward pass per batch, judged against PyTorch FP32."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from edgecompress import export
from edgecompress.cache import digest, hash_texts
from edgecompress.calibration import count_truncated, tokenize_batches
from edgecompress.evaluate import Fidelity, OnnxRunner, compare, per_text_summary, pooled_outputs
from edgecompress.passes.base import Batch, ModelInfo
from edgecompress.progress import Progress
from edgecompress.targets import Target
from edgecompress.tasknames import FEATURE_EXTRACTION, TEXT_CLASSIFICATION
from edgecompress.tasks.base import ArrayReference, TaskInputs, register_task
from edgecompress.taskspec import Metric, TaskSpec

# embeddings: the pooled output (evaluate.pooled_outputs) against the reference's; also an .onnx file's (onnx_file.py)
COSINE_MEAN = Metric("cosine_mean", True, "", "mean cosine between pooled embeddings and the reference's", -1.0, 1.0)
COSINE_P1 = Metric("cosine_p1", True, "", "1st percentile of that cosine", -1.0, 1.0)
COSINE_MIN = Metric("cosine_min", True, "", "worst text's cosine", -1.0, 1.0)
# classifiers: also image classifiers' (vision.py)
TOP1_AGREEMENT = Metric("top1_agreement", True, "", "share of texts (images) whose arg-max class matches the "
                        "reference's", 0.0, 1.0)
KL_MEAN = Metric("kl_mean", False, "nats", "mean KL(reference || candidate) of the class distributions", 0.0)

FEATURE_EXTRACTION_SPEC = TaskSpec(FEATURE_EXTRACTION, (COSINE_MEAN, COSINE_P1, COSINE_MIN),
                                   output="last_hidden_state", architectures=("Model",))
TEXT_CLASSIFICATION_SPEC = TaskSpec(TEXT_CLASSIFICATION, (TOP1_AGREEMENT, KL_MEAN),
                                    architectures=("ForSequenceClassification",),
                                    torch_class="AutoModelForSequenceClassification")


@register_task(FEATURE_EXTRACTION_SPEC, TEXT_CLASSIFICATION_SPEC, units="texts")
class EncoderTask(ArrayReference):
    """Feature extraction and classification: one forward pass per batch, judged against PyTorch FP32."""

    def __init__(self, info: ModelInfo, inputs: TaskInputs) -> None:
        self.info = info
        self.inputs = inputs
        self.tokenizer = export.load_tokenizer(inputs.export_dir)
        self.max_len = min(info.max_positions or 512, 512)
        self.warnings: list[str] = []
        truncated = count_truncated(self.tokenizer, inputs.eval_texts.texts, self.max_len)
        if truncated:
            self.warnings.append(f"{truncated} evaluation texts are longer than {self.max_len} tokens and were "
                                 "truncated")
        # calibration batches are padded/truncated to one fixed length (calibration_batches)
        cal_len = min(128, self.max_len)
        truncated = count_truncated(self.tokenizer, inputs.calibration_texts.texts, cal_len)
        if truncated:
            self.warnings.append(f"{truncated} calibration texts are longer than {cal_len} tokens and were "
                                 "truncated to that length for calibration")
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

    def calibration_id(self) -> str:
        return digest({"texts": hash_texts(self.inputs.calibration_texts.texts), "batch": 8,
                       "pad_to": min(128, self.max_len)})

    def calibration_batches(self) -> Iterator[Batch]:
        # calibrators need one fixed length across batches
        return self._batches(self.inputs.calibration_texts.texts, batch_size=8, pad_to=min(128, self.max_len))

    def fidelity(self, model_path: Path, progress: Progress) -> Fidelity:
        assert self._reference is not None, "check_export computes the reference first"
        with progress.step("fidelity on held-out texts", total=self._n_eval_batches()) as step:
            runner = OnnxRunner(model_path, export.judged_output(self.info.task))
            pooled = pooled_outputs(_counting(runner, step.advance), self.info.task,
                                    self._batches(self.inputs.eval_texts.texts, self.inputs.eval_batch_size))
        return Fidelity(task=self.info.task, metrics=compare(self.info.task, self._reference, pooled),
                        texts=len(self.inputs.eval_texts.texts), text_source=self.inputs.eval_texts.source,
                        reference="PyTorch FP32", per_text=per_text_summary(self.info.task, self._reference, pooled,
                                                                           self.inputs.eval_texts.texts))

    def profile_dims(self, target: Target) -> dict[str, int]:
        return {"batch_size": target.workload.batch,
                "sequence_length": min(target.workload.sequence_length, self.max_len)}


def _counting(run: Callable[[Batch], Any], advance: Callable[[int], None]) -> Callable[[Batch], Any]:
    def wrapped(batch: Batch) -> Any:
        out = run(batch)
        advance(1)
        return out

    return wrapped
