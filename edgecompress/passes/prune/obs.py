"""Structured pruning, the maths: removal curves (fluctuation, bias compensation, greedy Optimal Brain Surgeon),
the budget allocation across layers, and the damped least-squares refit. Pure numpy."""

from __future__ import annotations

import heapq
import logging

import numpy as np

from edgecompress.graph import GraphIndex
from edgecompress.passes.prune.patterns import Block, _const
from edgecompress.passes.prune.stats import LayerStats

log = logging.getLogger(__name__)

# ----------------------------------------------------------------------------------------------- importance/orders


def _augmented_weight(idx: GraphIndex, b: Block) -> np.ndarray:
    w = idx.array(b.consumer.weight).astype(np.float64)
    bias = _const(idx, b.consumer.bias) if b.consumer.bias else None
    bias = bias.astype(np.float64) if bias is not None else np.zeros(w.shape[1])
    return np.concatenate([w, bias[None, :]], axis=0)


def removal_curve(b: Block, st: LayerStats, w_aug: np.ndarray, recovery: str, ridge: float,
                  max_units: int) -> tuple[list[int], np.ndarray]:
    """Units in the order they should go, and the loss after removing the first k (k = 0..len), relative to the
    block input's energy so that layers compare."""
    n = max(st.count, 1.0)
    groups = b.groups()
    d = b.hidden
    if recovery in ("none", "bias"):
        mean = st.gram[-1, :d] / n
        second = np.diag(st.gram)[:d] / n
        per_feature = (second if recovery == "none" else np.clip(second - mean**2, 0, None))
        per_feature = per_feature * np.sum(w_aug[:d] ** 2, axis=1) * n
        scores = per_feature.reshape(b.units, b.unit_size).sum(axis=1)
        ranked = [int(u) for u in np.argsort(scores, kind="stable")[:max_units]]
        cum = np.concatenate([[0.0], np.cumsum(scores[ranked])])
        return ranked, cum / max(st.energy, 1e-12)
    # refit: greedy OBS on the damped Gram matrix; several neurons per step keeps it O(F^3 / chunk)
    h = st.gram + ridge * np.mean(np.diag(st.gram)[:d]) * np.eye(d + 1)
    hinv = np.linalg.inv(h)
    w = w_aug.copy()
    alive = np.ones(len(groups), dtype=bool)
    order: list[int] = []
    losses = [0.0]
    chunk = max(1, len(groups) // 128) if b.unit_size == 1 else 1
    while len(order) < max_units:
        if b.unit_size == 1:
            scores = np.sum(w[:d] ** 2, axis=1) / np.clip(np.diag(hinv)[:d], 1e-30, None)
        else:
            scores = np.array([np.trace(w[g].T @ np.linalg.solve(hinv[np.ix_(g, g)], w[g])) for g in groups])
        scores = np.where(alive, scores, np.inf)
        take = [int(u) for u in np.argsort(scores, kind="stable")[:min(chunk, max_units - len(order))]]
        s = np.concatenate([groups[u] for u in take])
        m = np.linalg.inv(hinv[np.ix_(s, s)])
        loss = float(np.trace(w[s].T @ m @ w[s]))
        w -= hinv[:, s] @ (m @ w[s])
        hinv -= hinv[:, s] @ m @ hinv[s, :]
        w[s] = 0.0
        for u in take:
            alive[u] = False
            order.append(u)
            losses.append(losses[-1] + loss / len(take))
    return order, np.asarray(losses) / max(st.energy, 1e-12)


def allocate(curves: list[np.ndarray], budget: float, costs: list[float] | None = None) -> list[int]:
    """Units to remove per layer, spending `budget` (units, or FLOPs with `costs` per unit): each next unit comes
    from the layer whose loss grows least per cost."""
    costs = costs or [1.0] * len(curves)
    counts = [0] * len(curves)
    heap = [(float(c[1] - c[0]) / costs[i], i) for i, c in enumerate(curves) if len(c) > 1]
    heapq.heapify(heap)
    spent = 0.0
    while heap:
        _, i = heapq.heappop(heap)
        if spent + costs[i] > budget + 0.5 * costs[i]:
            continue  # does not fit; a cheaper unit elsewhere may
        spent += costs[i]
        counts[i] += 1
        c = curves[i]
        if counts[i] + 1 < len(c):
            heapq.heappush(heap, (float(c[counts[i] + 1] - c[counts[i]]) / costs[i], i))
    return counts


def refit(st: LayerStats, w_aug: np.ndarray, keep: np.ndarray, ridge: float) -> np.ndarray:
    """Closed-form damped least squares: the rows (kept features + bias) best reproducing [X, 1] @ w_aug.

    The damping pulls toward the original rows, not toward zero: the same prior as the damped OBS steps that chose
    what to remove, and with nothing removed the answer is exactly the original weight (shrinking toward zero cost
    0.001-0.0015 of mean cosine on MiniLM at 25% of FLOPs)."""
    d = st.gram.shape[0] - 1
    k = np.concatenate([keep, [d]])
    g = st.gram
    lam = ridge * np.mean(np.diag(g)[:d])
    damp = np.full(len(k), lam)
    damp[-1] = 0.0
    lhs = g[np.ix_(k, k)] + np.diag(damp)
    return np.asarray(np.linalg.solve(lhs, g[k, :] @ w_aug + damp[:, None] * w_aug[k]))
