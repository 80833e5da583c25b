"""What each task is, as data: declared once, in its adapter's file (edgecompress/tasks/), read by the layers below.

A task's adapter module holds its `TaskSpec` (the output it is judged on, its fidelity metrics with the primary one
first, the config.json architectures that mean it, the transformers class of its PyTorch reference, the files its
model folder needs, ...) and registers it with `@register_task(spec, ...)` (tasks/base.py). export.py, genai/,
distill/, media.py, report.py and the metric readers (targets, budget, inputs, evaluate, search, profiling) read
those facts here: a new model family is a new adapter file, with no edit to them.

Layering: imports nothing internal. This module never names an adapter: the first read imports the adapter package
by name (plugin discovery, as passes.base.registered finds the passes), and its modules declare their specs. A read
while that import is under way (a module-level read in something an adapter imports) raises at once rather than
answering from a half-filled registry.
"""

from __future__ import annotations

import importlib
import math
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import TypeVar

ADAPTERS = "edgecompress.tasks.base"  # registered_tasks() there imports every module of edgecompress/tasks


@dataclass(frozen=True)
class Metric:
    """A fidelity metric: budgets name it; its direction says whether a limit is a floor or a ceiling."""

    name: str
    higher_is_better: bool
    unit: str
    meaning: str
    # the values it can take (inclusive): a limit outside them is refused as a typo (a cosine floor of 1.5, a top-1
    # floor of 99 meant as a percentage, a KL ceiling below 0)
    low: float = -math.inf
    high: float = math.inf


@dataclass(frozen=True)
class TaskSpec:
    """The facts about one task that export, genai, distill and the metric readers need without its adapter."""

    name: str  # the task name (tasknames.py)
    metrics: tuple[Metric, ...]  # what its fidelity reports; the first is its primary one (--min-fidelity, auto)
    # the exported graph output it is judged on; None: not exported by optimum (an .onnx file given as is)
    output: str | None = "logits"
    architectures: tuple[str, ...] = ()  # config.json "architectures" suffixes that mean this task (no --task)
    torch_class: str = "AutoModel"  # the transformers class its PyTorch FP32 reference loads
    kv_cache: bool = False  # exported with its KV cache as graph inputs/outputs (a causal LM)
    modality: str = "text"  # what its --eval/--calibration data are: "text", "image" (media.py), "audio"
    preprocessor: bool = False  # its model folder needs preprocessor_config.json (image processor, feature extractor)
    tokenizer: bool = True  # its model folder needs tokenizer files
    # its encoder-decoder models (export.SEQ2SEQ_SPEECH: Whisper) are exported by optimum as "<task>-with-past"
    seq2seq_with_past: bool = False
    # an .onnx file with a preprocessor_config.json beside it is this task (judged on its data, against itself)
    onnx_with_preprocessor: bool = False
    # ORT GenAI applies (genai/): its model builder is the export's fast path where it covers the model, and the
    # bundle is made GenAI-ready (genai_config.json); the manifest's export section says which path was taken
    genai: bool = False


_SPECS: dict[str, TaskSpec] = {}
_METRICS: dict[str, Metric] = {}
_state = {"loaded": False, "loading": False}
_lock = threading.RLock()  # another thread's first read waits for the load; this thread's re-entry is refused


def declare(spec: TaskSpec) -> None:
    """Register `spec` (tasks.base.register_task calls this). A task or a metric declared twice must agree: a
    metric several tasks report is one `Metric` object, imported from the adapter file that declares it."""
    if not spec.metrics:
        raise TypeError(f"task {spec.name!r} declares no fidelity metric")
    if _SPECS.get(spec.name, spec) != spec:
        raise TypeError(f"task {spec.name!r} is declared twice, differently")
    for m in spec.metrics:
        if _METRICS.get(m.name, m) != m:
            raise TypeError(f"metric {m.name!r} is declared twice, differently")
    _SPECS[spec.name] = spec
    _METRICS.update({m.name: m for m in spec.metrics})


def _load() -> None:
    if _state["loaded"]:
        return
    with _lock:
        if _state["loaded"]:
            return
        if _state["loading"]:
            raise RuntimeError("the task registry was read while the task adapters were being imported")
        _state["loading"] = True
        try:
            importlib.import_module(ADAPTERS).registered_tasks()
            _state["loaded"] = True
        finally:
            _state["loading"] = False


def specs() -> dict[str, TaskSpec]:
    """task name -> its spec, for every adapter."""
    _load()
    return dict(_SPECS)


def spec(task: str) -> TaskSpec | None:
    """`task`'s spec; None for a name no adapter declares."""
    _load()
    return _SPECS.get(task)


K = TypeVar("K")
V = TypeVar("V")


class _Declared(Mapping[K, V]):
    """A read-only view of a table the adapters fill: loads them on first use."""

    def __init__(self, table: Callable[[], Mapping[K, V]]) -> None:
        self._table = table

    def _data(self) -> Mapping[K, V]:
        _load()
        return self._table()

    def __getitem__(self, key: K) -> V:
        return self._data()[key]

    def __iter__(self) -> Iterator[K]:
        return iter(self._data())

    def __len__(self) -> int:
        return len(self._data())


# Every metric some task reports, by name (budgets name these; whether a limit is a floor or a ceiling comes from
# here, so every family shares one budget mechanism), and the metric each task is judged on first (--min-fidelity
# sets its floor, --recipe auto ranks by it).
METRICS: Mapping[str, Metric] = _Declared(lambda: _METRICS)
PRIMARY_METRIC: Mapping[str, str] = _Declared(lambda: {t: s.metrics[0].name for t, s in _SPECS.items()})
