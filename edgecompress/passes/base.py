"""What a pass is: a pure function of (model, config, context) -> (new model, JSON-able report).

A pass never touches the user's files or global state. If it needs scratch files (ONNX Runtime's quantizers only
write to paths) it uses a private temporary directory and removes it. A pass that finds nothing to do says so in
its report, with the reason, instead of silently returning its input. Layering: passes never import profiling.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, is_dataclass
from typing import Any

import numpy as np
import onnx

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


@dataclass
class PassResult:
    model: onnx.ModelProto
    report: dict[str, Any]
    modified: bool = True


class Pass(ABC):
    """Subclasses set `name` and take a frozen config dataclass."""

    name: str = "pass"

    def __init__(self, config: Any = None) -> None:
        self.config = config

    @abstractmethod
    def run(self, model: onnx.ModelProto, ctx: PassContext) -> PassResult: ...

    def cache_context(self, ctx: PassContext) -> dict[str, Any]:
        """What of the context the output depends on, for the cache key. Conservative: everything a pass could read.

        A pass may narrow this only if it provably ignores the rest.
        """
        return {"target": asdict(ctx.target), "info": asdict(ctx.info), "calibration": ctx.calibration_id,
                "seed": ctx.seed}

    def describe(self) -> dict[str, Any]:
        cfg = asdict(self.config) if is_dataclass(self.config) and not isinstance(self.config, type) else {}
        return {"name": self.name, "config": cfg}
