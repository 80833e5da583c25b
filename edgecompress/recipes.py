"""Recipes: a name -> an ordered list of passes.

A new recipe is a new entry in RECIPES built from passes, never a new branch in the pipeline. Passes compose in a
fixed order: structural passes (pruning, low-rank) first, then quantization or codebooks last.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from dataclasses import dataclass

from edgecompress.errors import ConfigError
from edgecompress.passes.base import Pass
from edgecompress.passes.quantize_int8 import DynamicInt8, DynamicInt8Config


@dataclass(frozen=True)
class RecipeOptions:
    """Typed knobs a recipe may read. Each field belongs to one pass family."""


@dataclass(frozen=True)
class RecipeSpec:
    name: str
    description: str
    make: Callable[[RecipeOptions], list[Pass]]
    # Whether the recipe claims integer/low-bit kernels (the int-kernel share check applies).
    quantizing: bool = False
    tasks: tuple[str, ...] = ("feature-extraction", "text-classification", "onnx")


@dataclass(frozen=True)
class Recipe:
    name: str
    description: str
    passes: tuple[Pass, ...]
    quantizing: bool

    def describe(self) -> dict[str, object]:
        return {"name": self.name, "description": self.description,
                "passes": [p.describe() for p in self.passes]}


RECIPES: dict[str, RecipeSpec] = {
    spec.name: spec
    for spec in (
        RecipeSpec("fp32", "export only: the FP32 ONNX model, verified against PyTorch", lambda o: []),
        RecipeSpec(
            "int8-dynamic",
            "ONNX Runtime dynamic INT8: per-channel int8 weights (word-embedding Gather included), "
            "activations quantized at run time",
            lambda o: [DynamicInt8(DynamicInt8Config())],
            quantizing=True,
        ),
    )
}


def make_recipe(name: str, options: RecipeOptions | None = None, task: str | None = None) -> Recipe:
    spec = RECIPES.get(name)
    if spec is None:
        close = difflib.get_close_matches(name, list(RECIPES), n=2)
        hint = f"did you mean {' or '.join(close)}?" if close else f"recipes: {', '.join(RECIPES)}"
        raise ConfigError(f"unknown recipe '{name}'", hint=hint)
    if task is not None and task not in spec.tasks:
        raise ConfigError(f"recipe '{name}' does not apply to {task} models",
                          hint=f"it supports {', '.join(spec.tasks)}")
    return Recipe(name=spec.name, description=spec.description, passes=tuple(spec.make(options or RecipeOptions())),
                  quantizing=spec.quantizing)
