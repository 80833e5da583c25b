"""What a pass is: a pure function of (model, config, context) -> (new model, JSON-able report).

A pass never touches the user's files or global state. If it needs scratch files (ONNX Runtime's quantizers only
write to paths) it uses a private temporary directory and removes it. A pass that finds nothing to do says so in
its report, with the reason, instead of silently returning its input. Layering: passes never import profiling.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass, field, is_dataclass
from pathlib import Path
from typing import Any, ClassVar, Generic, TypeVar, get_args, get_origin

import numpy as np
import onnx

from edgecompress.progress import NullProgress, Progress
from edgecompress.targets import Target

# A batch as fed to onnxruntime: input name -> array (fixed shape within the batch).
Batch = dict[str, np.ndarray]


@dataclass(frozen=True)
class ModelInfo:
    """What passes may need to know about the source model (from its config.json)."""

    model_type: str
    architecture: str
    task: str
    vocab_size: int | None = None
    hidden_size: int | None = None
    num_attention_heads: int | None = None
    intermediate_size: int | None = None
    max_positions: int | None = None
    # image models: "conv" (CNNs, their FLOPs in Conv) or "transformer" (ViT-class, MatMul-heavy); None for text
    family: str | None = None


@dataclass(frozen=True)
class TaskTraits:
    """What a pass may read about the task when it is configured, from the task adapter's facts (tasks/base.py;
    passes never import tasks): recipes.make_recipe fills it in."""

    name: str | None = None
    # structural passes keep a pruned MatMul's K a multiple of the 4-bit block (the decoder kernels need it)
    aligns_to_weight_block: bool = False


@dataclass
class PassContext:
    target: Target
    info: ModelInfo
    # Calibration batches are produced lazily and may be iterated several times; each call starts afresh.
    calibration: Callable[[], Iterator[Batch]] | None = None
    seed: int = 0
    log: Callable[[str], None] = field(default=lambda msg: None)
    # identifies the calibration data (texts and tokenization); part of every pass's cache key
    calibration_id: str = ""
    # the source model directory with trainable weights (an HF checkpoint), for passes that train (pruning with
    # distillation); None for an .onnx or GGUF source. Its content is already in the pass's cache key (the export's).
    source: Path | None = None
    # what the calibration texts are (source, count, sha256), for reports of passes that train on them
    calibration_data: dict[str, Any] = field(default_factory=dict)
    # long passes report their progress here (the CLI shows it)
    progress: Progress = field(default_factory=NullProgress)


@dataclass
class PassResult:
    model: onnx.ModelProto
    report: dict[str, Any]
    modified: bool = True


@dataclass(frozen=True)
class Skip:
    """Something a pass left alone, and why (onnxscript's MatchResult.fail): every pass reports skips this way,
    as `report["skipped"] = [Skip(...).as_dict(), ...]`, so the CLI and the report read them alike."""

    site: str  # the node, tensor or block left alone; "" for the whole model
    reason: str

    def as_dict(self) -> dict[str, str]:
        return {"site": self.site, "reason": self.reason}


def matmul_only(info: ModelInfo | None) -> str | None:
    """The refusal of a pass that quantizes only MatMuls (and embedding Gathers), for a convolutional network."""
    if info is not None and info.family == "conv":
        return ("it quantizes MatMul weights only, and a convolutional network's work is in Conv layers (ORT has no "
                "4-bit or dynamic-int8 Conv kernel worth using); use int8-static (QDQ Conv) or fp16")
    return None


def skips(*items: Skip) -> list[dict[str, str]]:
    """Skips as they go into a report (JSON)."""
    return [s.as_dict() for s in items]


def skip_text(report: dict[str, Any]) -> str:
    """A report's skips in one line, whole-model ones (site "") first."""
    items = sorted(report.get("skipped") or [], key=lambda s: s["site"] != "")
    return "; ".join(f"{s['site']}: {s['reason']}" if s["site"] else s["reason"] for s in items)


C = TypeVar("C")


class Pass(ABC, Generic[C]):
    """A transform configured by a frozen dataclass `C`: `class Foo(Pass[FooConfig])`. Subclasses set `name`;
    `register` (below) makes one a recipe or a structural pass."""

    name: str = "pass"
    # set from the generic argument (Pass[FooConfig]) when the subclass is defined
    config_class: ClassVar[type]
    # set by @register
    registration: ClassVar[Registration | None] = None

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        for base in cls.__dict__.get("__orig_bases__", ()):
            if get_origin(base) is Pass and get_args(base) and isinstance(get_args(base)[0], type):
                cls.config_class = get_args(base)[0]
        cls.registration = None  # a subclass is not registered by its parent's decorator

    def __init__(self, config: C | None = None) -> None:
        self.config: C = config if config is not None else self.config_class()

    @classmethod
    def configure(cls, values: Mapping[str, Any], task: TaskTraits) -> C:
        """The config for the recipe knobs given (knob name -> value): each knob field takes its value, the rest
        keep their defaults. A pass overrides this only where a knob maps to more than one field."""
        from edgecompress.passes.options import field_options

        return cls.config_class(**{f: values[opt.name] for f, (opt, _) in field_options(cls.config_class).items()
                                   if opt.name in values})

    @classmethod
    def from_options(cls, options: Any, task: TaskTraits | None = None) -> Pass[C]:
        """This pass configured from a recipes.RecipeOptions (the knobs given)."""
        return cls(cls.configure(options.given, task or TaskTraits()))

    @classmethod
    def requires(cls, target: Target, info: ModelInfo | None) -> str | None:
        """Why this pass cannot help on `target` (checked at plan time, before any export), or None."""
        return None

    @classmethod
    def refuses(cls, info: ModelInfo | None) -> str | None:
        """Why this pass cannot work on this model at all (a build refuses it at plan time, the search leaves it
        out), or None."""
        return None

    @abstractmethod
    def run(self, model: onnx.ModelProto, ctx: PassContext) -> PassResult: ...

    def trains(self) -> bool:
        """Whether this pass trains the source's PyTorch weights (it then needs ctx.source: the pipeline refuses an
        .onnx or GGUF source before any work)."""
        return False

    def cache_context(self, ctx: PassContext) -> dict[str, Any]:
        """What of the context the output depends on, for the cache key. Conservative: everything a pass could read.

        A pass may narrow this only if it provably ignores the rest.
        """
        return {"target": asdict(ctx.target), "info": asdict(ctx.info), "calibration": ctx.calibration_id,
                "seed": ctx.seed}

    def describe(self) -> dict[str, Any]:
        cfg = asdict(self.config) if is_dataclass(self.config) and not isinstance(self.config, type) else {}
        return {"name": self.name, "config": cfg}


# --------------------------------------------------------------------------------------------------- registration


@dataclass(frozen=True)
class WeightBytes:
    """Bytes per weight parameter (MatMul/Gemm weights, the word-embedding Gather) after a pass, and the matmul
    compute precision: what `--recipe auto` predicts from the FP32 graph before building (search.predict)."""

    matmul: float
    gather: float
    precision: str  # fp32 | fp16 | int8 | int4
    # in memory once loaded, when it differs from on disk (codebooks decode to int8 at load)
    resident: float | None = None


@dataclass(frozen=True)
class Registration:
    recipe: str  # the recipe this pass makes ("" for a structural pass, which composes with every recipe)
    tasks: tuple[str, ...]
    description: str = ""
    quantizes: bool = False  # claims integer/low-bit kernels: the int-kernel share check applies
    # position in `edgecompress recipes` and the search grid
    order: int = 100
    weight_bytes: WeightBytes | Callable[[Mapping[str, Any]], WeightBytes] | None = None
    # the search grid: knob values to try, one candidate each, in order ({} = the defaults)
    search: tuple[dict[str, Any], ...] = ()
    # structural passes: (recipe, knobs) each search candidate is composed with
    compose: tuple[tuple[str, dict[str, Any]], ...] = ()
    # task -> why the recipe refuses it (shown with the refusal)
    refusals: Mapping[str, str] = field(default_factory=dict)
    structural: bool = False


# registration order; recipes.py and search.py read it
REGISTRY: list[type[Pass[Any]]] = []


def register(*, recipe: str = "", tasks: tuple[str, ...], description: str = "", quantizes: bool = False,
             order: int = 100, weight_bytes: WeightBytes | Callable[[Mapping[str, Any]], WeightBytes] | None = None,
             search: tuple[dict[str, Any], ...] = (), compose: tuple[tuple[str, dict[str, Any]], ...] = (),
             refusals: Mapping[str, str] | None = None) -> Callable[[type[Pass[Any]]], type[Pass[Any]]]:
    """Class decorator: make a pass a recipe (`recipe="int4"`; one pass per recipe and task) or, without a recipe,
    a structural pass run before any recipe's when one of its enabling knobs is set."""

    def deco(cls: type[Pass[Any]]) -> type[Pass[Any]]:
        cls.registration = Registration(recipe=recipe, tasks=tasks, description=description, quantizes=quantizes,
                                        order=order, weight_bytes=weight_bytes, search=search, compose=compose,
                                        refusals=dict(refusals or {}), structural=not recipe)
        REGISTRY[:] = [c for c in REGISTRY if c.__qualname__ != cls.__qualname__ or c.__module__ != cls.__module__]
        REGISTRY.append(cls)
        return cls

    return deco


def registered() -> list[type[Pass[Any]]]:
    """Every registered pass, after importing every module of edgecompress.passes (a new pass file is found
    without being listed anywhere), by `order`."""
    import importlib
    import pkgutil

    for mod in pkgutil.walk_packages([str(Path(__file__).parent)], __name__.rpartition(".")[0] + "."):
        importlib.import_module(mod.name)
    return sorted(REGISTRY, key=lambda c: c.registration.order if c.registration else 0)
