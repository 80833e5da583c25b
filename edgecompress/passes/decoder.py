"""Kept for callers of the old module (issue 14's decoder export path imports from here): passes/decoder.py was
dissolved into its techniques. New code imports from where each now lives:

- lm_head.py: find and untie a tied lm_head (LmHead, find_lm_head, untie_lm_head, word_embedding);
- int4_grid.py: grid-aware 4-bit for decoders (DecoderInt4, DecoderInt4Config, affine_4bit, pack_nibbles, ...);
- codebook/decoder.py: codebooks decoded into MatMulNBits' 8-bit weights (DecoderCodebook, DecoderCodebookConfig);
- isa.py: which CPU features give an int8 dot product (accuracy_level_for).

Remove this module once nothing imports it.
"""

from __future__ import annotations

from edgecompress import isa
from edgecompress.passes.codebook.decoder import DecoderCodebook, DecoderCodebookConfig
from edgecompress.passes.int4_grid import (
    DecoderInt4,
    DecoderInt4Config,
    affine_4bit,
    pack_nibbles,
    symmetric_8bit_grid,
)
from edgecompress.passes.lm_head import LmHead, find_lm_head, untie_lm_head, word_embedding

# the old name of isa.INT8_DOT
INT8_DOT_ISA = frozenset(isa.INT8_DOT)


def accuracy_level_for(target_isa: frozenset[str] | set[str]) -> tuple[int, str]:
    """isa.accuracy_level_for under its old name and signature."""
    return isa.accuracy_level_for(target_isa)


__all__ = ["INT8_DOT_ISA", "DecoderCodebook", "DecoderCodebookConfig", "DecoderInt4", "DecoderInt4Config", "LmHead",
           "accuracy_level_for", "affine_4bit", "find_lm_head", "pack_nibbles", "symmetric_8bit_grid",
           "untie_lm_head", "word_embedding"]
