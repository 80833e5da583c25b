"""Weighted k-means on the int8 grid: a b-bit codebook per tensor or per output channel."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from edgecompress.passes.codebook.config import _NBINS, _OVERHEAD_BYTES

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------------------------
# k-means on the int8 grid


@dataclass
class Coded:
    """One tensor's codebook coding. Channels are the columns of `indices` (axis 1)."""

    indices: np.ndarray  # (rows, channels) int, values < 2**bits
    codebook: np.ndarray  # (2**bits, channels) int8 for per-channel, (2**bits, 1) for per-tensor
    scale: np.ndarray  # (channels,) float32: weight = codebook value * scale
    bits: int

    def decoded_int8(self) -> np.ndarray:
        if self.codebook.shape[1] == 1:
            return self.codebook[:, 0][self.indices]
        return np.take_along_axis(self.codebook, self.indices, axis=0)

    def dequantized(self) -> np.ndarray:
        return self.decoded_int8().astype(np.float32) * self.scale[None, :]


def _weighted_lloyd(hist: np.ndarray, sums: np.ndarray, k: int, iterations: int,
                    init: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Weighted 1-D k-means of each row's histogram over bins 0..NBINS-1.

    hist: (rows, NBINS) weight per bin; sums: (rows, NBINS) weight * exact value (bin units) per bin.
    Returns centroids (rows, k) sorted, and the bin -> cluster assignment (rows, NBINS).
    """
    rows = hist.shape[0]
    if init is None:
        # deterministic init: weighted quantiles; Lloyd keeps 1-D clusters contiguous and sorted
        cum = np.cumsum(hist, axis=1)
        total = np.maximum(cum[:, -1:], 1e-30)
        targets = (np.arange(k) + 0.5) / k
        init = np.stack([np.argmax(cum / total >= t, axis=1) for t in targets], axis=1).astype(np.float64)
    cent = np.sort(init, axis=1)
    flat_base = (np.arange(rows) * k)[:, None]
    mark_base = (np.arange(rows) * (_NBINS + 1))[:, None]
    assign = np.zeros((rows, _NBINS), dtype=np.int64)
    for _ in range(iterations):
        bounds = (cent[:, 1:] + cent[:, :-1]) / 2  # bin v joins cluster #(bounds < v)
        first = np.clip(np.floor(bounds).astype(np.int64) + 1, 0, _NBINS)
        marks = np.bincount((mark_base + first).ravel(), minlength=rows * (_NBINS + 1))
        new_assign = np.cumsum(marks.reshape(rows, _NBINS + 1), axis=1)[:, :_NBINS]
        flat = (flat_base + new_assign).ravel()
        w = np.bincount(flat, hist.ravel(), minlength=rows * k).reshape(rows, k)
        s = np.bincount(flat, sums.ravel(), minlength=rows * k).reshape(rows, k)
        cent = np.sort(np.where(w > 0, s / np.maximum(w, 1e-30), cent), axis=1)
        if np.array_equal(new_assign, assign):
            break
        assign = new_assign
    return cent, assign


def _sse(hist: np.ndarray, sums: np.ndarray, cent: np.ndarray, assign: np.ndarray) -> np.ndarray:
    """Weighted squared error per row, each bin at its weighted mean value."""
    mean = sums / np.maximum(hist, 1e-30)
    return np.sum(hist * (mean - np.take_along_axis(cent, assign, axis=1)) ** 2, axis=1)


def kmeans_codebook(weight: np.ndarray, bits: int, *, row_weights: np.ndarray | None = None,
                    per_channel: bool = True, iterations: int = 25) -> Coded:
    """Code a float weight (rows, channels) with 2**bits shared int8 values per channel (or per tensor).

    row_weights (rows,) weigh each row's error (calibration mean square of the matching input); None: uniform.
    """
    w = np.asarray(weight, dtype=np.float64)
    rows, channels = w.shape
    k = 1 << bits
    amax = np.abs(w).max(axis=0)
    s0 = np.where(amax > 0, amax / 127.0, 1.0)
    norm = w / s0[None, :]  # channel values on the int8 grid, in [-127, 127]
    bins = np.clip(np.rint(norm), -127, 127).astype(np.int64) + 127
    if k >= _NBINS:
        # 8 bits hold the whole int8 grid: exactly round-to-nearest int8, one shared identity codebook
        codebook = np.arange(-127, 129).clip(max=127).astype(np.int8)[:, None]
        return Coded(indices=bins, codebook=codebook, scale=s0.astype(np.float32), bits=bits)
    rw = np.ones(rows) if row_weights is None else np.maximum(np.asarray(row_weights, np.float64), 1e-12)
    elem_w = np.broadcast_to(rw[:, None], w.shape)
    hrows = channels if per_channel else 1
    chan = np.broadcast_to(np.arange(channels)[None, :] if per_channel else np.zeros((1, 1), np.int64), w.shape)
    flat = (chan * _NBINS + bins).ravel()
    hist = np.bincount(flat, elem_w.ravel(), minlength=hrows * _NBINS).reshape(hrows, _NBINS)
    sums = np.bincount(flat, (elem_w * (norm + 127)).ravel(), minlength=hrows * _NBINS).reshape(hrows, _NBINS)
    cent, assign = _weighted_lloyd(hist, sums, k, iterations)
    if per_channel and channels > 1:
        # Lloyd on a few hundred values a channel stops in poor local optima; a second start from the
        # tensor-wide codebook often ends lower (4 bits, Gaussian: 0.098 vs 0.112). Keep the better, per channel.
        pooled, _ = _weighted_lloyd(hist.sum(0, keepdims=True), sums.sum(0, keepdims=True), k, iterations)
        cent2, assign2 = _weighted_lloyd(hist, sums, k, iterations, init=np.repeat(pooled, hrows, axis=0))
        better = _sse(hist, sums, cent2, assign2) < _sse(hist, sums, cent, assign)
        cent = np.where(better[:, None], cent2, cent)
        assign = np.where(better[:, None], assign2, assign)
    cent = cent - 127  # back to [-127, 127] grid units
    if per_channel:
        cmax = np.abs(cent).max(axis=1)
        # Stretch each channel's centroids onto the full int8 range: a finer grid for the snap.
        stretch = np.where(cmax > 0, 127.0 / np.maximum(cmax, 1e-30), 1.0)
        codebook = np.clip(np.rint(cent * stretch[:, None]), -127, 127).astype(np.int8).T  # (k, channels)
        scale = (s0 / stretch).astype(np.float32)
        indices = np.take_along_axis(assign.T, bins, axis=0)  # assign.T: (NBINS, channels)
    else:
        cmax = float(np.abs(cent).max())
        stretch_t = 127.0 / cmax if cmax > 0 else 1.0
        codebook = np.clip(np.rint(cent[0] * stretch_t), -127, 127).astype(np.int8)[:, None]
        scale = (s0 / stretch_t).astype(np.float32)
        indices = assign[0][bins]
    return Coded(indices=indices.astype(np.int64), codebook=codebook, scale=scale, bits=bits)


def packed_bytes(n: int, bits: int, channels: int, per_channel: bool) -> int:
    """Bytes a coded tensor adds to the file: packed indices + codebook (+ node overhead)."""
    idx = n if bits == 8 else bits * -(-n // 8)
    book = (1 << bits) * (channels if per_channel and bits < 8 else 1)
    return idx + book + _OVERHEAD_BYTES + 256 * bits
