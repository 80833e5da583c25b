"""Knowledge distillation after structured pruning (`--prune-recovery distill`, issue 15).

The graph-level pruning pass (passes/prune) decides what to remove and refits the consuming projections; here that
exact decision is applied to the PyTorch source model (surgery.py), the pruned student is trained to match the FP32
teacher on the calibration texts (train.py), and the student is exported again through optimum (export.py, the one
boundary to optimum) so that the recipe's passes (int8, codebooks...) run on it as on any export.

The evaluation texts are never seen here: the pass only gets the calibration batches.

Layering: PyTorch training lives in this package only; passes/prune calls `distill`, and this package imports
nothing from passes but the shared types (no cycle: prune -> distill -> export -> passes.base).
"""

from __future__ import annotations

import copy
import logging
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from edgecompress import export
from edgecompress.distill.surgery import Cut, apply_cuts
from edgecompress.distill.train import MODEL_INPUTS, Data, Outcome, Settings, train
from edgecompress.errors import PassError
from edgecompress.progress import NullProgress, Progress

log = logging.getLogger(__name__)


def distill(source: Path, task: str, cuts: list[Cut], batches: Iterable[dict[str, np.ndarray]],
            settings: Settings, progress: Progress | None = None,
            log_fn: Callable[[str], None] = log.info) -> tuple[onnx.ModelProto, dict[str, Any]]:
    """The pruned student, distilled and exported: (the ONNX model, a JSON-able report)."""
    import torch

    from edgecompress.model import load_model

    progress = progress or NullProgress()
    data = Data(batches, settings.max_texts)
    if data.count == 0:
        raise PassError("distillation got no calibration texts", hint="give --calibration texts")
    with progress.step("distillation: load the PyTorch teacher and prune the student"):
        teacher = export.load_torch_model(source, task)
        student = copy.deepcopy(teacher)
        changed = apply_cuts(student, cuts)
    params = sum(p.numel() for p in student.parameters())
    outcome: Outcome = train(student, teacher, task, data, settings, progress, log_fn)
    del teacher
    student.eval()
    for p in student.parameters():
        p.requires_grad_(False)
    with tempfile.TemporaryDirectory(prefix="edgecompress-distill-") as tmp:
        with progress.step("export the distilled model (optimum)"):
            # the task names are optimum's own (a decoder's text-generation-with-past exports its KV cache)
            path = export.export_torch_model(student, task, Path(tmp))
        # a KV-cache decoder is not checked on a forward batch (TorchReference feeds no cache)
        check = _check(student, task, path, data) if task in export.supported_tasks() and \
            not export.exports_kv_cache(task) else None
        model = load_model(path)
    report: dict[str, Any] = {
        "steps": outcome.steps, "steps_asked": settings.steps, "stopped_by": outcome.stopped,
        "seconds": outcome.seconds, "cpu_seconds": outcome.cpu_seconds, "threads": outcome.threads,
        "loss_curve": [list(p) for p in outcome.loss_curve],
        "loss": ("1 - cosine of mean-pooled embeddings + relative hidden-state MSE (all layers)"
                 if task == "feature-extraction" else
                 f"KL of logits at temperature {settings.temperature:g} + relative hidden-state MSE (all layers)"),
        "settings": asdict(settings), "texts_used": outcome.texts, "tokens": outcome.tokens,
        "student_params": int(params), "modules": changed, "torch": torch.__version__,
        **({"export_check_max_abs_diff": check} if check is not None else {}),
    }
    return model, report


def training_precision(asked: str, isa: frozenset[str] | None = None) -> tuple[str, str]:
    """The matmul precision of the training loop, and why: `asked` unless "auto", which takes bfloat16 where this
    machine's CPU has bf16 instructions (the training runs here, so the host's ISA decides, not the target's)."""
    from edgecompress import isa as isa_facts
    from edgecompress.targets import detect_isa

    if asked != "auto":
        return asked, "asked for"
    flags = detect_isa() if isa is None else isa
    if isa_facts.has_bf16_arithmetic(flags):
        return "bfloat16", "auto: this CPU has bf16 instructions"
    return "float32", "auto: this CPU has no bf16 instructions (bfloat16 would be emulated, slower)"


def _check(student: Any, task: str, path: Path, data: Data, atol: float = 1e-3) -> float:
    """The exported student against itself in PyTorch on one calibration batch (ExportError beyond atol)."""
    ref = export.TorchReference(None, task, model=student)
    idx = np.arange(min(8, data.count))
    batch = {k: v for k, v in data.batch(idx).items() if k in MODEL_INPUTS}
    return export.check_export(ref, path, [batch], atol=atol).max_abs_diff


__all__ = ["Cut", "Settings", "apply_cuts", "distill", "training_precision"]
