"""manifest.json: everything a build decided and measured, as one typed object."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from edgecompress.budget import BudgetRow

SCHEMA_VERSION = 1


def _finite(o: Any) -> Any:
    if isinstance(o, float) and not math.isfinite(o):
        return None
    if isinstance(o, dict):
        return {k: _finite(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_finite(v) for v in o]
    return o


@dataclass
class Artifact:
    file: str
    files: list[str]
    size_bytes: int
    sha256: str
    # sha256 of every other file in the bundle (relative path -> hex), checked by `profile` and `emulator run`;
    # absent from bundles of older versions (only `sha256`, of model.onnx, is checked there)
    hashes: dict[str, str] = field(default_factory=dict)

    @property
    def size_mb(self) -> float:
        return self.size_bytes / 1e6


@dataclass
class Manifest:
    created: str
    tool: dict[str, str]
    source: dict[str, Any]
    target: dict[str, Any]
    recipe: dict[str, Any]
    export: dict[str, Any]
    fidelity: dict[str, Any]
    profile: dict[str, Any]
    budgets: list[BudgetRow]
    artifact: Artifact
    timings_s: dict[str, float] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    bundle_dir: str = ""  # where the build wrote it (the bundle itself may move)
    cache: dict[str, Any] = field(default_factory=dict)  # which steps came from the cache
    build_key: str = ""  # sha256 of everything that determines this bundle (pipeline.build_key)
    search: dict[str, Any] = field(default_factory=dict)  # --recipe auto: every candidate and why
    # integer-kernel share of MatMul FLOPs in ORT's optimized graph (profiling/kernels.py)
    kernels: dict[str, Any] = field(default_factory=dict)
    schema: int = SCHEMA_VERSION

    @property
    def passed(self) -> bool:
        return all(r.passed for r in self.budgets)

    @property
    def failed_budgets(self) -> list[BudgetRow]:
        return [r for r in self.budgets if not r.passed]

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["artifact"]["size_mb"] = round(self.artifact.size_mb, 3)
        d["verdict"] = {"passed": self.passed, "failed": [r.miss() for r in self.failed_budgets]}
        return d

    def summary(self) -> dict[str, Any]:
        """What `--json` prints: the verdict and the headline figures."""
        return {
            "passed": self.passed,
            "target": self.target["name"],
            "recipe": self.recipe["name"],
            "model": self.source["name"],
            "task": self.source["task"],
            "artifact": {"file": self.artifact.file, "size_mb": round(self.artifact.size_mb, 3),
                         "sha256": self.artifact.sha256},
            "fidelity": self.fidelity.get("metrics", {}),
            "budgets": [r.as_dict() for r in self.budgets],
            "failed": [r.miss() for r in self.failed_budgets],
        }

    def to_json(self) -> str:
        # strict JSON: a NaN or infinite figure (a broken model's fidelity) is written as null, never as NaN
        return json.dumps(_finite(self.as_dict()), indent=2, sort_keys=False, allow_nan=False) + "\n"

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Manifest:
        d = dict(d)
        d.pop("verdict", None)
        art = dict(d.pop("artifact"))
        art.pop("size_mb", None)
        budgets = [BudgetRow(**r) for r in d.pop("budgets")]
        return cls(artifact=Artifact(**art), budgets=budgets, **d)

    @classmethod
    def load(cls, path: Path) -> Manifest:
        return cls.from_dict(json.loads(Path(path).read_text(encoding="utf-8")))
