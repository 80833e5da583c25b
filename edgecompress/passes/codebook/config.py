"""Codebook knobs and config (the facts the CLI, the API and the search read)."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from edgecompress.errors import ConfigError
from edgecompress.passes.options import Option, option, validate_config

log = logging.getLogger(__name__)


GRANULARITIES = ("tensor", "channel")
BASES = ("per-token", "dynamic")
CODEBOOK_BITS = Option("codebook_bits", "codebook: bits per weight index, 2..8.", int, low=2, high=8)
CODEBOOK_GRANULARITY = Option("codebook_granularity", "codebook: one codebook per tensor or per output channel.",
                              choices=GRANULARITIES)
CODEBOOK_KEEP_FLOAT = Option("codebook_keep_float", "codebook: the N MatMuls most sensitive to activation "
                             "quantization keep float activations (slower).", int, low=0)
CODEBOOK_BASE = Option("codebook_base", "codebook: the int8 graph under it, per-token activation scales or ORT "
                       "dynamic int8.", choices=BASES)
MIN_OPSET = 18  # BitwiseAnd / BitwiseOr
_NBINS = 255  # int8 grid -127..127 (symmetric, as ORT's per-channel weights)
# Bytes a decoded tensor adds beyond its indices and codebook (node protos, small initializers): ~0.6-1.5 KB.
_OVERHEAD_BYTES = 1024
_SLACK_BYTES = 16 * 1024  # the node bytes per tensor are estimated: stay this far under a budget


@dataclass(frozen=True)
class CodebookConfig:
    bits: int = option(4, CODEBOOK_BITS)
    granularity: str = option("channel", CODEBOOK_GRANULARITY)
    # Spend the target's size budget on more bits for the most sensitive tensors (bits stays the floor).
    mixed: bool = True
    # most bits a sensitive tensor may get; None: bits + 2 (at most 8)
    max_bits: int | None = None
    # explicit budget (MB, 1e6 bytes); None: the target's max_size_mb
    max_size_mb: float | None = None
    # MatMul weights smaller than this stay plain int8 (a codebook would not pay for its decode)
    min_elements: int = 4096
    # Gather tables (embeddings) at least this large are coded too: the word embedding, not positions
    min_gather_elements: int = 1 << 20
    calibration_batches: int = 16
    iterations: int = 25
    # error feedback (GPTQ) when choosing indices: +0.012 mean cosine at 4 bits on MiniLM, ~1 s per tensor
    gptq: bool = True
    # The integer graph under the codebooks is ORT dynamic int8, except the `keep_float` MatMuls most sensitive
    # to run-time activation quantization (ranked on calibration data), which keep float activations: their
    # weights are still b bits on disk and int8 in memory, but each runs at the float rate. On MiniLM, 6 of 36
    # lift the int8 graph from cosine 0.9927 to 0.9966 and the mixed-bit codebook at 13.5 MB from 0.9855 to
    # 0.9900 (15 MB: 0.9884 -> 0.9926), at ~1.4x int8-dynamic's b8 latency on the dev host.
    # Not built on int8-mixed's smoothing: that lifts int8 (0.9927 -> 0.9946) but makes the output ~4x more
    # sensitive to a coded embedding (4 bits: -0.009 vs -0.0024), a net loss under a size budget.
    keep_float: int = option(0, CODEBOOK_KEEP_FLOAT)
    # Mixed bits: weigh each tensor's error by its measured effect on the model output (the float model with that
    # tensor alone coded at the floor, on this many calibration batches; 0: per-tensor errors as they are). Per
    # unit of relative error, MiniLM's FFN weights move the output 3-10x more than attention's, so the plain
    # per-tensor error spends the budget on the wrong tensors (13.5 MB: cosine 0.9825 -> 0.9855).
    measure_batches: int = 2
    # calibration batches that rank the MatMuls for keep_float
    sensitivity_batches: int = 4
    # The int8 graph under the codebooks: "dynamic" is ORT's dynamic int8 (one activation scale per tensor);
    # "per-token" quantizes each token's activations with its own scale (passes/quantize_int8.per_token_int8,
    # standard MatMulInteger), which removes most of the run-time activation error (MiniLM: the int8 graph
    # 0.9927 -> 0.9971) at ~1.0-1.05x the speed, so the budget goes to the weights.
    base: str = option("per-token", CODEBOOK_BASE)

    def __post_init__(self) -> None:
        validate_config(self, "codebook")
        if self.max_bits is not None and not self.bits <= self.max_bits <= 8:
            raise ConfigError(f"codebook max_bits must be in [{self.bits}, 8], got {self.max_bits}")

    @property
    def top_bits(self) -> int:
        if not self.mixed:
            return self.bits
        return self.max_bits if self.max_bits is not None else min(8, self.bits + 2)
