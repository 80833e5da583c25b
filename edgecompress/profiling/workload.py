"""What a task adapter asks the profiler to run: a workload kind and the graph's dims for the target.

Profiling never imports tasks (it also runs on devices): the pipeline and the search build a `Workload` from the
adapter's `profile_dims(target)` and its `workload` fact (tasks/base.py), and `profile_bundle` rebuilds one from
what a bundle's manifest recorded. A new kind is implemented here, in profiling, and named by an adapter's fact.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# one forward pass per batch: latency p90, peak RAM; the roofline estimate
FORWARD = "forward"
# a causal LM with its KV cache: prompt prefill, then token-by-token decode (tok/s, time to first token); memory
# includes the KV cache at the target's context length (profiling/decoder.py)
DECODER = "decoder"
KINDS = (FORWARD, DECODER)


@dataclass(frozen=True)
class Workload:
    kind: str = FORWARD
    dims: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown workload kind {self.kind!r} (profiling implements {', '.join(KINDS)})")


def recorded_kind(manifest: dict[str, Any]) -> str:
    """The workload kind a bundle was profiled with at build time (a decoder's profile says "kind": "decoder")."""
    kind = (manifest.get("profile") or {}).get("kind")
    return kind if kind in KINDS else FORWARD


# Bundles built before the manifest recorded a budget section: only decoders had one, [budgets.decoder].
_SECTION_BEFORE_IT_WAS_RECORDED = {DECODER: "decoder"}


def recorded_budget_section(manifest: dict[str, Any], decoder: bool) -> str | None:
    """The target budget section the build applied (the task's `budget_section` fact, kept in the profile)."""
    profile = manifest.get("profile") or {}
    if "budget_section" in profile:
        section = profile["budget_section"]
        return section if isinstance(section, str) else None
    return _SECTION_BEFORE_IT_WAS_RECORDED.get(DECODER if decoder else FORWARD)
