"""The object-detection task adapter (DETR/YOLOS-class: per-query class logits with a last "no object" class, and
boxes), on the image-classification adapter's inputs: FP32's detections are the ground truth the compressed model is
scored against (mAP at IoU 0.5). Layering: like every tasks/ module."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from edgecompress import export
from edgecompress.evaluate import Fidelity
from edgecompress.passes.base import ModelInfo
from edgecompress.progress import Progress
from edgecompress.tasknames import OBJECT_DETECTION
from edgecompress.tasks.base import TaskInputs, register_task
from edgecompress.tasks.vision import ImageClassificationTask, _softmax, image_data
from edgecompress.taskspec import Metric, TaskSpec

DETECTIONS_PER_IMAGE = 10
IOU_MATCH = 0.5

MAP50 = Metric("map50", True, "", "mAP at IoU 0.5 of the candidate's detections, taking the reference's detections "
               "as ground truth", 0.0, 1.0)
BOX_IOU_MEAN = Metric("box_iou_mean", True, "", "mean IoU of each reference detection with the candidate's box for "
                      "the same query", 0.0, 1.0)
OBJECT_DETECTION_SPEC = TaskSpec(OBJECT_DETECTION, (MAP50, BOX_IOU_MEAN), architectures=("ForObjectDetection",),
                                 torch_class="AutoModelForObjectDetection", modality="image", preprocessor=True,
                                 tokenizer=False)


def detections(logits: np.ndarray, boxes: np.ndarray, k: int = DETECTIONS_PER_IMAGE
               ) -> list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]:
    """Per image, its k most confident queries: (query index, class, score, box cx,cy,w,h). DETR/YOLOS score a
    query by its softmax over the classes, the last one meaning "no object"."""
    p = _softmax(logits)[..., :-1]
    out = []
    for img_p, img_b in zip(p, boxes, strict=True):
        score, label = img_p.max(-1), img_p.argmax(-1)
        top = np.argsort(-score, kind="stable")[:k]
        out.append((top, label[top], score[top], img_b[top]))
    return out


def _xyxy(b: np.ndarray) -> np.ndarray:
    cx, cy, w, h = b[..., 0], b[..., 1], b[..., 2], b[..., 3]
    return np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], axis=-1)


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of every box in a (n, 4) with every box in b (m, 4), both cx,cy,w,h."""
    a, b = _xyxy(a)[:, None, :], _xyxy(b)[None, :, :]
    lo, hi = np.maximum(a[..., :2], b[..., :2]), np.minimum(a[..., 2:], b[..., 2:])
    inter = np.clip(hi - lo, 0, None).prod(-1)
    area = lambda x: np.clip(x[..., 2:] - x[..., :2], 0, None).prod(-1)  # noqa: E731
    union = area(a) + area(b) - inter
    return np.asarray(np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0))


def map50(reference: Sequence[tuple[np.ndarray, ...]], candidate: Sequence[tuple[np.ndarray, ...]]) -> float:
    """mAP at IoU 0.5 of the candidate's detections against the reference's taken as ground truth (VOC-style,
    all-point interpolated AP per class, averaged over the classes the reference detects)."""
    classes = sorted({int(c) for _, labels, _, _ in reference for c in labels})
    aps = []
    for c in classes:
        gts = {i: ref[3][ref[1] == c] for i, ref in enumerate(reference)}
        n_gt = sum(len(g) for g in gts.values())
        preds = [(float(s), i, b) for i, cand in enumerate(candidate)
                 for s, b in zip(cand[2][cand[1] == c], cand[3][cand[1] == c], strict=True)]
        preds.sort(key=lambda t: -t[0])
        used = {i: np.zeros(len(g), dtype=bool) for i, g in gts.items()}
        tp = np.zeros(len(preds))
        for j, (_, i, b) in enumerate(preds):
            if len(gts[i]):  # the best still-unmatched ground-truth box (COCO's matching)
                ious = np.where(used[i], -1.0, box_iou(b[None, :], gts[i])[0])
                best = int(ious.argmax())
                if ious[best] >= IOU_MATCH:
                    used[i][best] = True
                    tp[j] = 1
        if not preds:
            aps.append(0.0)
            continue
        ctp = np.cumsum(tp)
        recall, precision = ctp / max(n_gt, 1), ctp / np.arange(1, len(preds) + 1)
        # all-point interpolation: precision made monotone from the right, summed over recall steps
        mono = np.maximum.accumulate(precision[::-1])[::-1]
        steps = np.diff(np.concatenate([[0.0], recall]))
        aps.append(float((steps * mono).sum()))
    return float(np.mean(aps)) if aps else 1.0


@register_task(OBJECT_DETECTION_SPEC, units="images", data=image_data)
class ObjectDetectionTask(ImageClassificationTask):
    """DETR/YOLOS-class detectors: each image's FP32 detections (its 10 most confident queries) are the ground truth
    the compressed model's detections are scored against (mAP at IoU 0.5), plus the mean IoU query by query."""

    def __init__(self, info: ModelInfo, inputs: TaskInputs) -> None:
        super().__init__(info, inputs)
        self._boxes: np.ndarray = np.zeros((0, 0, 4), dtype=np.float32)

    def check_export(self, onnx_path: Path, progress: Progress) -> export.ExportCheck:
        bs = self.inputs.eval_batch_size
        names = ["logits", "pred_boxes"]
        with progress.step("check export and compute the FP32 reference", total=self._n_batches()) as step:
            torch_model = export.TorchReference(self.inputs.model_dir, self.info.task)
            check = export.check_export(torch_model, onnx_path, [next(self._batches(self.eval_data, 4))])
            logits, boxes = [], []
            for b in self._batches(self.eval_data, bs):
                lg, bx = torch_model.outputs(b, names)
                logits.append(lg)
                boxes.append(bx)
                step.advance(1)
        self._reference = np.concatenate(logits)
        self._boxes = np.concatenate(boxes)
        return check

    def save_reference(self, directory: Path) -> None:
        assert self._reference is not None
        np.savez(directory / "reference.npz", logits=self._reference, boxes=self._boxes)

    def load_reference(self, directory: Path) -> None:
        with np.load(directory / "reference.npz") as ref:
            self._reference, self._boxes = ref["logits"], ref["boxes"]

    def fidelity(self, model_path: Path, progress: Progress) -> Fidelity:
        assert self._reference is not None, "check_export computes the reference first"
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        sess = ort.InferenceSession(str(model_path), opts, providers=["CPUExecutionProvider"])
        logits, boxes = [], []
        with progress.step("fidelity on held-out images", total=self._n_batches()) as step:
            for b in self._batches(self.eval_data, self.inputs.eval_batch_size):
                lg, bx = sess.run(["logits", "pred_boxes"], b)
                logits.append(lg)
                boxes.append(bx)
                step.advance(1)
        got_logits, got_boxes = np.concatenate(logits), np.concatenate(boxes)
        ref_det = detections(self._reference, self._boxes)
        got_det = detections(got_logits, got_boxes)
        # query by query: the candidate's box for each of the reference's detected queries
        ious = [float(np.diag(box_iou(self._boxes[i][q], got_boxes[i][q])).mean())
                for i, (q, _, _, _) in enumerate(ref_det)]
        metrics = {"map50": map50(ref_det, got_det), "box_iou_mean": float(np.mean(ious))}
        notes = [f"{len(got_logits)} images at {self.height}x{self.width}; ground truth = the reference's "
                 f"{DETECTIONS_PER_IMAGE} most confident queries per image (no score threshold)"]
        reference = "the given ONNX model (FP32)" if self.from_onnx else "PyTorch FP32"
        return Fidelity(task=self.info.task, metrics=metrics, texts=len(got_logits),
                        text_source=self.eval_data.source, reference=reference, notes=notes)
