"""What a task adapter is, what the pipeline hands it, and the registry that finds one for a task name.

A model family (text encoders, causal LMs, an .onnx file as is, image classifiers and detectors, speech) is one
adapter module in this package: a class with the `TaskAdapter` methods, decorated with `@register_task(spec, ...)`.
The `TaskSpec` of each task it serves (taskspec.py: judged output, metrics, architectures, reference class, model
folder needs) is what the layers below read; the class-level facts (`TaskFacts`) are what the pipeline, search,
report and profiler read. `make_task` imports every module of the package, so a new adapter file is found without
being listed anywhere. ARCHITECTURE.md ("Where a new thing goes") says what else a new family touches.

Layering: tasks sit above export, evaluate, calibration, passes.base, targets and taskspec, and below
pipeline/search/api. Passes and profiling never import tasks: they receive what an adapter produced (calibration
batches, profile dims and the workload kind).
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol, TypeVar

import numpy as np

from edgecompress.passes.base import Batch, ModelInfo
from edgecompress.profiling.workload import FORWARD, Workload
from edgecompress.targets import Target
from edgecompress.taskspec import TaskSpec, declare

if TYPE_CHECKING:
    from edgecompress import export
    from edgecompress.evaluate import Fidelity
    from edgecompress.progress import Progress

Role = Literal["evaluation", "calibration"]


class DataSet(Protocol):
    """What the pipeline loads for --eval/--calibration and hands the adapter: calibration.TextSet for text
    models; a vision or speech adapter brings its own (images, audio clips) through its `data` loader."""

    @property
    def source(self) -> str: ...  # where it came from ("builtin:evaluation", a file or folder path): in reports

    def describe(self) -> dict[str, Any]: ...  # JSON-able summary: {"source", "count"}

    def fingerprint(self) -> str: ...  # identifies the content: part of the build key and reference cache key


# (path given by --eval/--calibration or None for the built-in set, --text-column, role) -> the data set
DataLoader = Callable[[Path | None, str | None, Role], DataSet]


def text_data(path: Path | None, column: str | None, role: Role) -> DataSet:
    """Texts from a .txt/.jsonl/.csv/.tsv file, or the built-in corpus split for the role."""
    from edgecompress.calibration import builtin_texts, load_texts

    return load_texts(path, column) if path is not None else builtin_texts(role)


@dataclass
class TaskInputs:
    """Everything an adapter needs from the pipeline. Modality-neutral: the data sets are whatever the adapter's
    `data` loader returned (TextSet for text); the export folder holds every file the exporter wrote (one
    model.onnx today; encoder_model.onnx + decoder_with_past_model.onnx for an encoder-decoder such as Whisper)."""

    model_dir: Path  # the source model (a Hugging Face folder, or the .onnx file given as MODEL)
    export_dir: Path  # the exported ONNX model(s), config and preprocessor/tokenizer files
    input_names: list[str]  # the exported model.onnx's graph inputs
    eval_data: Any  # DataSet
    calibration_data: Any  # DataSet
    eval_batch_size: int = 32
    extra: dict[str, Any] = field(default_factory=dict)  # adapter-specific inputs a caller passes through

    # text adapters read their data under the old names
    @property
    def eval_texts(self) -> Any:
        return self.eval_data

    @property
    def calibration_texts(self) -> Any:
        return self.calibration_data


def TextInputs(model_dir: Path, export_dir: Path, input_names: list[str], eval_texts: Any,
               calibration_texts: Any, eval_batch_size: int = 32) -> TaskInputs:
    """TaskInputs under the names it had when every task was a text task (kept for existing callers)."""
    return TaskInputs(model_dir, export_dir, input_names, eval_texts, calibration_texts, eval_batch_size)


class TaskAdapter(Protocol):
    """One model family, behind the interface the pipeline drives (steps.run_reference, pipeline._build_into)."""

    info: ModelInfo
    warnings: list[str]  # shown in the manifest and report (truncated texts, a GGUF source's note, ...)

    def check_export(self, onnx_path: Path, progress: Progress) -> export.ExportCheck:
        """Check the export against the source framework; compute and keep the reference outputs."""
        ...

    # The reference outputs are cached between builds: what determines them, and how to store/restore them.
    def reference_id(self) -> dict[str, Any]: ...

    def save_reference(self, directory: Path) -> None: ...

    def load_reference(self, directory: Path) -> None: ...

    def calibration_batches(self) -> Iterator[Batch]:
        """Full model feeds (input name -> array) for calibrating passes; each call starts afresh."""
        ...

    def calibration_id(self) -> str:
        """Identifies the calibration feeds (data and preprocessing): part of every pass's cache key."""
        ...

    def fidelity(self, model_path: Path, progress: Progress) -> Fidelity:
        """The compressed model judged against the reference, with the metrics its TaskSpec declares (taskspec.py)."""
        ...

    def profile_dims(self, target: Target) -> dict[str, int]:
        """The target's workload as the graph's symbolic dims (and, for a decoder workload, its decode facts):
        what the estimate, the kernel check and the runner feed. Its kind is the class fact `workload`."""
        ...


class ArrayReference:
    """The reference cache of an adapter whose reference is one array (`_reference`), kept as reference.npy."""

    _reference: np.ndarray | None

    def save_reference(self, directory: Path) -> None:
        assert self._reference is not None
        np.save(directory / "reference.npy", self._reference)

    def load_reference(self, directory: Path) -> None:
        self._reference = np.load(directory / "reference.npy")


T = TypeVar("T")


@dataclass(frozen=True)
class TaskFacts:
    """What the pipeline, search, report and profiler need to know about a task without building its adapter.
    (What the layers below the adapters read is the task's TaskSpec, taskspec.py.)"""

    specs: tuple[TaskSpec, ...]  # the tasks this adapter serves
    adapter: type  # the class; constructed as adapter(info, TaskInputs)
    # the word for what fidelity.texts counts, in reports: "texts", "tokens" (a decoder), "images", "clips", ...
    units: str = "texts"
    # the target's [budgets.<section>] that applies over [budgets] when the target has one ("decoder"); None: none
    budget_section: str | None = None
    # how the profiler runs it: "forward" (one forward pass per batch) or "decoder" (prompt prefill, then
    # token-by-token decode through the KV cache; memory includes the cache at the context length)
    workload: str = FORWARD  # profiling.workload.KINDS
    # loads --eval/--calibration (or the built-in set) for this family
    data: DataLoader = text_data
    # structural passes keep a pruned matmul's K a multiple of the recipe's 4-bit block (decoder kernels need it)
    aligns_to_weight_block: bool = False
    # the target's [runtime] package (ORT Mobile) applies by default; False: only when asked with --package
    default_package: bool = True

    @property
    def tasks(self) -> tuple[str, ...]:  # the task names (tasknames.py)
        return tuple(s.name for s in self.specs)

    def spec(self, task: str) -> TaskSpec:
        return next(s for s in self.specs if s.name == task)


_REGISTRY: dict[str, TaskFacts] = {}


def register_task(*specs: TaskSpec, units: str = "texts", budget_section: str | None = None, workload: str = FORWARD,
                  data: DataLoader = text_data, aligns_to_weight_block: bool = False,
                  default_package: bool = True) -> Callable[[type[T]], type[T]]:
    """Class decorator: `@register_task(IMAGE_CLASSIFICATION_SPEC, units="images", data=image_data)`."""

    def deco(cls: type[T]) -> type[T]:
        facts = TaskFacts(tuple(specs), cls, units=units, budget_section=budget_section, workload=workload,
                          data=data, aligns_to_weight_block=aligns_to_weight_block, default_package=default_package)
        for spec in specs:
            declare(spec)
        for task in facts.tasks:
            old = _REGISTRY.get(task)
            if old is not None and (old.adapter.__module__, old.adapter.__qualname__) != (cls.__module__,
                                                                                      cls.__qualname__):
                raise TypeError(f"task {task!r} has two adapters: {old.adapter.__qualname__} and {cls.__qualname__}")
            _REGISTRY[task] = facts
        cls.facts = facts  # type: ignore[attr-defined]
        return cls

    return deco


def _load_all() -> None:
    """Import every module of edgecompress.tasks, so that each adapter file registers itself."""
    package = __name__.rpartition(".")[0]
    for mod in pkgutil.iter_modules([str(Path(__file__).parent)], package + "."):
        importlib.import_module(mod.name)


def registered_tasks() -> dict[str, TaskFacts]:
    """task name -> its facts, for every adapter in the package."""
    _load_all()
    return dict(_REGISTRY)


def task_facts(task: str) -> TaskFacts:
    """The facts of `task`'s adapter; KeyError-free: an unknown task is a ModelError naming the known ones."""
    facts = registered_tasks().get(task)
    if facts is None:
        from edgecompress.errors import ModelError

        raise ModelError(f"task '{task}' has no task adapter", hint=f"known: {', '.join(sorted(_REGISTRY))}")
    return facts


def make_task(info: ModelInfo, inputs: TaskInputs) -> TaskAdapter:
    """The adapter for info.task, built on the pipeline's inputs."""
    adapter: TaskAdapter = task_facts(info.task).adapter(info, inputs)
    return adapter


def workload_for(task: TaskAdapter, target: Target) -> Workload:
    """What the profiler runs for this adapter on `target`: its `workload` fact and its profile dims."""
    return Workload(task_facts(task.info.task).workload, task.profile_dims(target))


def validate_workload(info: ModelInfo, target: Target) -> None:
    """Before any work: the adapter's own checks of the target's workload (`check_target`, when it has one)."""
    check = getattr(task_facts(info.task).adapter, "check_target", None)
    if check is not None:
        check(info, target)
