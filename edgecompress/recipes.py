"""Recipes: a name -> an ordered list of passes.

A new recipe is a new entry in RECIPES built from passes, never a new branch in the pipeline. Passes compose in a
fixed order: structural passes (pruning, low-rank) first, then quantization or codebooks last.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from dataclasses import dataclass, replace

from edgecompress.errors import ConfigError
from edgecompress.passes.base import Pass
from edgecompress.passes.fp16 import Fp16, Fp16Config
from edgecompress.passes.quantize_int4 import Int4Config, Int4WeightOnly
from edgecompress.passes.quantize_int8 import (
    DynamicInt8,
    DynamicInt8Config,
    MixedInt8,
    MixedInt8Config,
    StaticInt8,
    StaticInt8Config,
)

CALIBRATION_METHODS = ("minmax", "entropy", "percentile")
INT4_METHODS = ("rtn", "hqq", "gptq")
CODEBOOK_GRANULARITIES = ("tensor", "channel")
CODEBOOK_BASES = ("per-token", "dynamic")
PRUNE_SCHEDULES = ("uniform", "adaptive")
PRUNE_RECOVERIES = ("none", "bias", "refit")
DECODER_TASK = "text-generation-with-past"  # = export.DECODER_TASKS[0]; recipes do not import export


@dataclass(frozen=True)
class RecipeOptions:
    """Typed knobs a recipe may read. Each field belongs to one pass family; validated on construction, so a bad
    value is a one-line usage error before any work starts."""

    # static INT8 / int8-mixed (passes/quantize_int8.py)
    calibration_method: str = "minmax"
    calibration_samples: int = 256
    # INT4 weight-only (passes/quantize_int4.py)
    block_size: int = 32
    int4_method: str = "rtn"
    # weight-sharing codebooks (passes/codebook.py)
    codebook_bits: int = 4
    codebook_granularity: str = "channel"
    # MatMuls most sensitive to run-time activation quantization that keep float activations under the codebooks
    # (0: dynamic int8 everywhere, int8 speed)
    codebook_keep_float: int = 0
    # the int8 graph under the codebooks: per-token activation scales (default) or ORT dynamic int8 (per tensor)
    codebook_base: str = "per-token"
    # structured pruning (passes/prune.py): ratios in [0, 1); 0 = off
    prune_ffn: float = 0.0
    prune_heads: float = 0.0
    prune_schedule: str = "uniform"
    prune_recovery: str = "refit"
    # low-rank factorization (passes/lowrank.py): SVD energy kept; None = off
    low_rank_energy: float | None = None

    def __post_init__(self) -> None:
        def one_of(name: str, value: str, allowed: tuple[str, ...]) -> None:
            if value not in allowed:
                raise ConfigError(f"unknown --{name.replace('_', '-')} '{value}'", hint=f"use {'|'.join(allowed)}")

        one_of("calibration_method", self.calibration_method, CALIBRATION_METHODS)
        one_of("int4_method", self.int4_method, INT4_METHODS)
        one_of("codebook_granularity", self.codebook_granularity, CODEBOOK_GRANULARITIES)
        one_of("codebook_base", self.codebook_base, CODEBOOK_BASES)
        one_of("prune_schedule", self.prune_schedule, PRUNE_SCHEDULES)
        one_of("prune_recovery", self.prune_recovery, PRUNE_RECOVERIES)
        if self.calibration_samples < 1:
            raise ConfigError(f"--calibration-samples must be at least 1, got {self.calibration_samples}")
        if self.block_size < 16 or self.block_size & (self.block_size - 1):
            raise ConfigError(f"--block-size must be a power of two >= 16, got {self.block_size}",
                              hint="use 16, 32, 64 or 128")
        if not 2 <= self.codebook_bits <= 8:
            raise ConfigError(f"--codebook-bits must be between 2 and 8, got {self.codebook_bits}")
        if self.codebook_keep_float < 0:
            raise ConfigError(f"codebook_keep_float must be >= 0, got {self.codebook_keep_float}")
        for name in ("prune_ffn", "prune_heads"):
            r = getattr(self, name)
            if not 0.0 <= r < 1.0:
                raise ConfigError(f"--{name.replace('_', '-')} must be in [0, 1), got {r}",
                                  hint="a ratio of the neurons/heads to remove, e.g. 0.3")
        if self.low_rank_energy is not None and not 0.0 < self.low_rank_energy <= 1.0:
            raise ConfigError(f"--low-rank-energy must be in (0, 1], got {self.low_rank_energy}",
                              hint="the share of singular-value energy to keep, e.g. 0.95")


@dataclass(frozen=True)
class RecipeSpec:
    name: str
    description: str
    make: Callable[[RecipeOptions], list[Pass]]
    # Whether the recipe claims integer/low-bit kernels (the int-kernel share check applies).
    quantizing: bool = False
    tasks: tuple[str, ...] = ("feature-extraction", "text-classification", "onnx")
    # the passes for a decoder (causal LM) when they differ from `make`'s (passes/decoder.py); None: same as make
    decoder: Callable[[RecipeOptions], list[Pass]] | None = None


@dataclass(frozen=True)
class Recipe:
    name: str
    description: str
    passes: tuple[Pass, ...]
    quantizing: bool

    def describe(self) -> dict[str, object]:
        return {"name": self.name, "description": self.description,
                "passes": [p.describe() for p in self.passes]}


def _decoder_int4(o: RecipeOptions) -> list[Pass]:
    """Decoders: untie lm_head, then grid-aware 4-bit (exact on GGUF Q4_1 weights) incl. lm_head and embedding."""
    from edgecompress.passes.decoder import DecoderInt4, DecoderInt4Config

    if o.int4_method != "rtn":
        raise ConfigError(f"--int4-method {o.int4_method} is not available for decoders",
                          hint="decoders use grid-aware rtn (exact on GGUF 4-bit weights): leave --int4-method out")
    return [DecoderInt4(DecoderInt4Config(block_size=o.block_size))]


def _decoder_codebook(o: RecipeOptions) -> list[Pass]:
    """Decoders: codebooks decoded at load into MatMulNBits' 8-bit weights (never dynamic int8 activations)."""
    if o.codebook_keep_float:
        raise ConfigError("--codebook-keep-float applies to encoder codebooks only",
                          hint="decoders keep float activations already: leave it out")
    from edgecompress.passes.decoder import DecoderCodebook, DecoderCodebookConfig

    return [DecoderCodebook(DecoderCodebookConfig(bits=o.codebook_bits, granularity=o.codebook_granularity,
                                                  block_size=o.block_size))]


RECIPES: dict[str, RecipeSpec] = {
    spec.name: spec
    for spec in (
        RecipeSpec("fp32", "export only: the FP32 ONNX model, verified against PyTorch", lambda o: [],
                   tasks=("feature-extraction", "text-classification", "onnx", DECODER_TASK)),
        RecipeSpec(
            "int8-dynamic",
            "ONNX Runtime dynamic INT8: per-channel int8 weights (word-embedding Gather included), "
            "activations quantized at run time",
            lambda o: [DynamicInt8(DynamicInt8Config())],
            quantizing=True,
        ),
        RecipeSpec(
            "int8-static",
            "ONNX Runtime static INT8 (QDQ) of the Linear MatMuls and embedding Gathers: per-channel int8 weights, "
            "calibrated activation ranges (--calibration-method, --calibration-samples), U8S8/S8S8 and reduce_range "
            "from the target's ISA; the most sensitive MatMuls keep float activations if the fidelity floor needs it",
            lambda o: [StaticInt8(StaticInt8Config(calibration_method=o.calibration_method,
                                                   calibration_samples=o.calibration_samples))],
            quantizing=True,
        ),
        RecipeSpec(
            "int8-mixed",
            "INT8 with per-node sensitivity: activation outliers smoothed into the weights (SmoothQuant, alpha 0.7), "
            "dynamic int8 with one activation scale per token (standard ops, ORT MatMulInteger) and per-row "
            "embedding tables; the MatMuls whose quantized activations cost the most fidelity keep float "
            "activations (int8 weights) until the fidelity floor holds",
            lambda o: [MixedInt8(MixedInt8Config(calibration_method=o.calibration_method,
                                                 calibration_samples=o.calibration_samples))],
            quantizing=True,
        ),
        RecipeSpec(
            "fp16",
            "FP16 weights and compute (ONNX Runtime's transformer float16 converter), fp32 inputs and outputs; "
            "for GPUs and CPUs with fp16 arithmetic",
            lambda o: [Fp16(Fp16Config())],
        ),
        RecipeSpec(
            "int4",
            "4-bit weight-only blockwise (ONNX Runtime MatMulNBits; word-embedding Gather included), "
            "float activations; --block-size, --int4-method rtn|hqq|gptq",
            lambda o: [Int4WeightOnly(Int4Config.from_options(o))],
            quantizing=True,
            tasks=("feature-extraction", "text-classification", "onnx", DECODER_TASK),
            decoder=_decoder_int4,
        ),
        RecipeSpec(
            "codebook",
            "weight-sharing codebooks: int8 (per-token activation scales, --codebook-base) whose weights (word "
            "embedding included) are stored as "
            "--codebook-bits indices into per-channel (--codebook-granularity) int8 codebooks and decoded to int8 "
            "at load; tensors sensitive on calibration data get more bits while the size budget allows",
            lambda o: [_codebook_pass(o)],
            quantizing=True,
            tasks=("feature-extraction", "text-classification", "onnx", DECODER_TASK),
            # decoders: decoded into MatMulNBits 8-bit weights, activations int8 per block (passes/decoder.py)
            decoder=_decoder_codebook,
        ),
    )
}


def _codebook_pass(options: RecipeOptions) -> Pass:
    from edgecompress.passes.codebook import Codebook

    return Codebook.from_options(options)


def structural_passes(options: RecipeOptions, task: str | None = None) -> list[Pass]:
    """Passes that change the graph's shape, run before any recipe's own passes: prune, then low-rank.

    They compose with every recipe (e.g. `--recipe int8-dynamic --prune-ffn 0.3`).
    """
    passes: list[Pass] = []
    try:
        if options.prune_ffn > 0 or options.prune_heads > 0:
            from edgecompress.passes.prune import StructuredPrune

            prune = StructuredPrune.from_options(options)
            if task == DECODER_TASK:  # a pruned down_proj keeps K a multiple of the decoder kernels' block
                prune = StructuredPrune(replace(prune.config, keep_multiple=options.block_size))
            passes.append(prune)
        if options.low_rank_energy is not None:
            from edgecompress.passes.lowrank import LowRank

            passes.append(LowRank.from_options(options))
    except ImportError as e:
        raise ConfigError(f"this edgecompress has no {e.name}", hint="upgrade edgecompress") from None
    return passes


# Why a recipe refuses decoders (causal LMs), shown with the refusal.
DECODER_REFUSALS = {
    "int8-dynamic": "ORT dynamic int8 (per-channel) breaks decoders: perplexity in the millions on SmolLM2",
    "int8-static": "static int8 activations are not calibrated for KV-cache decoders here",
    "int8-mixed": "built on dynamic int8, which breaks decoders (perplexity in the millions on SmolLM2)",
    "fp16": "the float16 converter is not validated on KV-cache decoders yet",
}


def default_recipe(target_default: str, task: str) -> str:
    """The target's default recipe, or for a task it refuses (a decoder on an int8 target) the edge default int4."""
    spec = RECIPES.get(target_default)
    if spec is None or task in spec.tasks:
        return target_default
    return "int4" if task in RECIPES["int4"].tasks else "fp32"


def make_recipe(name: str, options: RecipeOptions | None = None, task: str | None = None) -> Recipe:
    spec = RECIPES.get(name)
    if spec is None:
        close = difflib.get_close_matches(name, list(RECIPES), n=2)
        hint = f"did you mean {' or '.join(close)}?" if close else f"recipes: {', '.join(RECIPES)}"
        raise ConfigError(f"unknown recipe '{name}'", hint=hint)
    if task is not None and task not in spec.tasks:
        why = DECODER_REFUSALS.get(name, "") if task == DECODER_TASK else ""
        raise ConfigError(f"recipe '{name}' does not apply to {task} models" + (f": {why}" if why else ""),
                          hint=f"it supports {', '.join(spec.tasks)}")
    options = options or RecipeOptions()
    make = spec.decoder if task == DECODER_TASK and spec.decoder is not None else spec.make
    return Recipe(name=spec.name, description=spec.description,
                  passes=(*structural_passes(options, task), *make(options)),
                  quantizing=spec.quantizing)
