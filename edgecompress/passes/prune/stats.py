"""Structured pruning, statistics: the Gram matrices of each block's consuming projection input over calibration
tokens (the one activation capture, passes/capture.py)."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import onnx

from edgecompress.errors import PassError
from edgecompress.graph import GraphIndex
from edgecompress.passes.base import Batch
from edgecompress.passes.capture import Capture, token_rows
from edgecompress.passes.prune.patterns import Block, _dims

log = logging.getLogger(__name__)

# ------------------------------------------------------------------------------------------------------ statistics


@dataclass
class LayerStats:
    gram: np.ndarray  # (D+1, D+1): [X, 1]^T [X, 1] over calibration tokens
    energy: float  # sum of squared norms of the block's input (residual stream) over the same tokens
    tokens: int = 0

    @property
    def count(self) -> float:
        """Calibration tokens (weighted)."""
        return float(self.gram[-1, -1])


def collect_stats(model: onnx.ModelProto, blocks: list[Block], batches: Iterable[Batch],
                  max_batches: int | None = None, token_weighting: bool = True) -> dict[str, LayerStats]:
    """Run the fp32 model in onnxruntime with each block's input and features as extra outputs.

    With `token_weighting`, each token counts by 1/||x_t||^2 of the block's input (the residual stream the block's
    output is added to): the LayerNorm that follows rescales every token to one norm, so an error matters relative
    to its own token's norm, and a few huge-norm tokens must not dominate the fit.
    """
    idx = GraphIndex(model)
    wanted: dict[str, int] = {}
    for b in blocks:
        wanted[b.features] = b.hidden
        wanted[b.producers[0].input] = _dims(idx, b.producers[0])[0]
    capture = Capture(model, wanted, purpose="collect pruning statistics")
    out_names = list(wanted)
    grams = {b.key: np.zeros((b.hidden + 1, b.hidden + 1)) for b in blocks}
    energy = {b.key: 0.0 for b in blocks}
    seen = tokens = 0
    for batch in batches:
        mask = batch.get("attention_mask")
        values = capture(batch)
        outs = {name: token_rows(np.asarray(values[name], dtype=np.float64).reshape(-1, wanted[name]), mask)
                for name in out_names}
        tokens += len(outs[out_names[0]])
        for b in blocks:
            h, x = outs[b.features], outs[b.producers[0].input]
            sq = np.sum(x * x, axis=1)
            w = x.shape[1] / np.clip(sq, 1e-12, None) if token_weighting else np.ones(len(sq))
            ha = np.concatenate([h, np.ones((h.shape[0], 1))], axis=1)
            grams[b.key] += (ha * w[:, None]).T @ ha
            energy[b.key] += float(np.sum(w * sq))
        seen += 1
        if max_batches is not None and seen >= max_batches:
            break
    if seen == 0:
        raise PassError("pruning needs calibration data, and the calibration set is empty")
    return {b.key: LayerStats(grams[b.key], energy[b.key], tokens) for b in blocks}
