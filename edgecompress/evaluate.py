"""Fidelity: how closely a compressed model follows the FP32 reference on held-out texts.

- feature extraction: cosine between mean-pooled, L2-normalised embeddings (mean, 1st percentile, min);
- classification: arg-max agreement and mean KL(reference || candidate) of the softmax distributions.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgecompress.passes.base import Batch
from edgecompress.taskspec import METRICS


def pool(task: str, output: np.ndarray, batch: Batch) -> np.ndarray:
    """Reduce a model output to what users compare: one vector per text."""
    if task == "feature-extraction":
        mask = batch["attention_mask"][..., None].astype(np.float64)
        summed = (output.astype(np.float64) * mask).sum(axis=1)
        emb = summed / np.clip(mask.sum(axis=1), 1e-9, None)
        return emb / np.clip(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12, None)
    if task == "text-classification":
        return output.astype(np.float64)
    raise ValueError(f"no pooling for task {task}")


def _softmax(x: np.ndarray) -> np.ndarray:
    z = x - x.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def compare(task: str, reference: np.ndarray, candidate: np.ndarray) -> dict[str, float]:
    if task == "feature-extraction":
        cos = np.sum(reference * candidate, axis=1)
        return {"cosine_mean": float(cos.mean()), "cosine_p1": float(np.percentile(cos, 1)),
                "cosine_min": float(cos.min())}
    if task == "text-classification":
        p, q = _softmax(reference), _softmax(candidate)
        kl = np.sum(p * (np.log(np.clip(p, 1e-12, None)) - np.log(np.clip(q, 1e-12, None))), axis=-1)
        agree = reference.argmax(-1) == candidate.argmax(-1)
        return {"top1_agreement": float(agree.mean()), "kl_mean": float(kl.mean())}
    raise ValueError(f"no fidelity metrics for task {task}")


def pooled_outputs(run: Callable[[Batch], np.ndarray], task: str, batches: Iterable[Batch]) -> np.ndarray:
    return np.concatenate([pool(task, run(b), b) for b in batches])


class OnnxRunner:
    """Runs an ONNX file in this process on the CPU provider (fidelity only; never timed)."""

    def __init__(self, path: Path, output_name: str, threads: int = 0) -> None:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.log_severity_level = 3  # its load-time notes (unused initializers removed) are not the user's business
        if threads:
            opts.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        self.inputs = [i.name for i in self.session.get_inputs()]
        self.output_name = output_name

    def __call__(self, batch: Batch) -> np.ndarray:
        return self.session.run([self.output_name], {k: batch[k] for k in self.inputs})[0]


@dataclass
class Fidelity:
    task: str
    metrics: dict[str, float]
    texts: int
    text_source: str
    reference: str
    source: str = "measured on host (onnxruntime CPUExecutionProvider)"
    notes: list[str] = field(default_factory=list)
    per_text: dict[str, Any] = field(default_factory=dict)  # per_text_summary: the distribution and worst texts

    def as_dict(self) -> dict[str, Any]:
        d = {"task": self.task, "metrics": self.metrics, "texts": self.texts, "text_source": self.text_source,
             "reference": self.reference, "source": self.source, "notes": self.notes,
             "units": {k: METRICS[k].unit for k in self.metrics}}
        if self.per_text:
            d["per_text"] = self.per_text
        return d


def per_text_summary(task: str, reference: np.ndarray, candidate: np.ndarray, texts: tuple[str, ...] | list[str],
                     worst: int = 5, keep: int = 2000) -> dict[str, Any]:
    """Each text's score (cosine for embeddings, KL for classifiers) and the texts that fared worst, for the
    report's distribution; at most `keep` values are stored."""
    if task == "feature-extraction":  # low cosine is worst
        values, name = np.sum(reference * candidate, axis=1), "cosine"
        order = np.argsort(values)[:worst]
    elif task == "text-classification":  # high KL is worst
        p, q = _softmax(reference), _softmax(candidate)
        values = np.sum(p * (np.log(np.clip(p, 1e-12, None)) - np.log(np.clip(q, 1e-12, None))), axis=-1)
        name = "kl"
        order = np.argsort(-values)[:worst]
    else:
        return {}
    return {"metric": name, "values": [round(float(v), 5) for v in values[:keep]],
            "worst": [{"text": str(texts[i])[:300], name: round(float(values[i]), 5)} for i in order]}
