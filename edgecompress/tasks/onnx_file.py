"""An .onnx file given as MODEL: no export, judged against itself on seeded random inputs."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from edgecompress import export
from edgecompress.cache import digest
from edgecompress.evaluate import Fidelity, OnnxRunner, compare
from edgecompress.passes.base import Batch, ModelInfo
from edgecompress.progress import Progress
from edgecompress.targets import Target
from edgecompress.tasknames import ONNX_TASK
from edgecompress.tasks.base import ArrayReference, TaskInputs, register_task
from edgecompress.tasks.text import COSINE_MEAN, COSINE_MIN, COSINE_P1
from edgecompress.taskspec import TaskSpec

# judged as embeddings are (flattened, unit-normalised outputs); not exported, so no judged output name
ONNX_SPEC = TaskSpec(ONNX_TASK, (COSINE_MEAN, COSINE_P1, COSINE_MIN), output=None, tokenizer=False)


@register_task(ONNX_SPEC, units="texts")
class OnnxFileTask(ArrayReference):
    """An .onnx file given as is: judged against itself on seeded random inputs (no tokenizer, no PyTorch).

    Symbolic dims: the first is the batch, the others take the target's sequence length. Integer inputs that index
    a Gather get ids below that table's row count; other integer inputs get zeros and ones.
    """

    samples = 64
    batch = 8

    def __init__(self, info: ModelInfo, inputs: TaskInputs | Path, seed: int = 0) -> None:
        import onnx

        onnx_path = inputs.export_dir / "model.onnx" if isinstance(inputs, TaskInputs) else inputs
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
