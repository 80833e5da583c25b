"""Structured pruning: remove whole FFN intermediate neurons and whole attention heads from an exported graph.

Layers are found by graph pattern, never by node name:
- FFN: MatMul(x, W1[d, F]) (+ bias) -> per-element activation (GELU's Div/Erf/Add/Mul, Gelu, Relu, Tanh, or the
  gated SiLU(gate) * up of Llama-style MLPs, whose gate and up read the same x) -> MatMul(h, W2[F, d]) (+ bias).
- attention: Q/K/V MatMul (+ bias) -> Reshape[.., H, dh] -> QK^T MatMul -> Softmax -> MatMul with V -> Transpose
  -> Reshape[.., H*dh] -> output MatMul. The Reshape shape constants (a constant or a Concat of constants and
  Unsqueezed dims, as optimum exports them) are rewritten with the new head count.

Importance comes from calibration activations (the fp32 model run in onnxruntime with the intermediate tensors as
extra outputs). Per layer we accumulate the Gram matrix of the consuming projection's input (with a ones column
for the bias), which is all that the three recoveries need:
- none: remove by a fluctuation score, E[x_j^2] * ||W2_j||^2;
- bias: remove by variance * ||W2_j||^2 and fold the mean of the removed inputs into the next bias (FLAP);
- refit: choose what to remove by greedy Optimal-Brain-Surgeon steps on the Gram matrix (a structure's cost is
  W_S^T [H^-1]_SS^-1 W_S, the exact least-squares loss of dropping it once the rest is refit), then solve the
  least-squares refit min ||X_kept W' - X_full W|| in closed form, damped toward the original weights.
Tokens are weighted by 1/||x_t||^2 of the block's input, as the LayerNorm after the residual add will do.
Each layer's cumulative loss, relative to its residual-stream energy, is its local sensitivity curve. The adaptive
schedule rescales each curve by an end-to-end probe (that block alone pruned at the ratio, the model's output
error on a few calibration batches, per unit of local loss: late layers reach the output undamped) and spends the
global budget (the ratio times all neurons, or all heads; with both ratios, their FLOPs jointly across heads and
neurons) where the marginal loss per FLOP is lowest.

Limits: one Gram matrix of (F+1)^2 float64 per block is held in memory (fine for encoders and small decoders, not
for 7B-class MLPs); attention with grouped K/V heads or rotary embeddings is not head-pruned (reported as skipped).
"""

from __future__ import annotations

import heapq
import logging
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from edgecompress.errors import PassError
from edgecompress.graph import GraphIndex
from edgecompress.passes.base import Batch, Pass, PassContext, PassResult, Skip, register, skips
from edgecompress.passes.capture import Capture, token_rows
from edgecompress.passes.options import BLOCK_SIZE, Option, option, validate_config
from edgecompress.tasknames import DECODER_TASK, ENCODER_TASKS

log = logging.getLogger(__name__)

# Ops that act element by element, so slicing the intermediate dimension commutes with them (scalar constants only).
ELEMENTWISE = frozenset({"Add", "Sub", "Mul", "Div", "Erf", "Tanh", "Sigmoid", "Relu", "Gelu", "FastGelu", "Pow",
                         "Neg", "Exp", "Sqrt", "Softplus", "LeakyRelu", "HardSigmoid", "HardSwish", "Elu", "Selu",
                         "Clip", "Abs", "Cast", "Identity", "Mish"})
FFN_PATTERN = "FFN (MatMul -> element-wise activation -> MatMul, incl. gated SiLU(gate)*up)"
ATTN_PATTERN = "attention heads (Q/K/V MatMul -> Reshape[.., H, dh] -> Softmax -> Reshape[.., H*dh] -> MatMul)"


_RATIO_HINT = "a ratio of the neurons/heads to remove, e.g. 0.3"
PRUNE_FFN = Option("prune_ffn", "Remove this share of every FFN's intermediate neurons, in [0, 1).", float, low=0.0,
                   high=1.0, high_open=True, hint=_RATIO_HINT, enables=True)
PRUNE_HEADS = Option("prune_heads", "Remove this share of attention heads, in [0, 1).", float, low=0.0, high=1.0,
                     high_open=True, hint=_RATIO_HINT, enables=True)
PRUNE_SCHEDULE = Option("prune_schedule", "Per-layer pruning ratios: uniform, or adaptive to layer sensitivity.",
                        choices=("uniform", "adaptive"))
PRUNE_RECOVERY = Option("prune_recovery", "Recovery after pruning: none, bias compensation, or least-squares "
                        "refit.", choices=("none", "bias", "refit"))


@dataclass(frozen=True)
class PruneConfig:
    ffn_ratio: float = option(0.0, PRUNE_FFN)  # share of FFN intermediate neurons to remove
    head_ratio: float = option(0.0, PRUNE_HEADS)  # share of attention heads to remove
    # uniform: the ratio in every layer; adaptive: a global budget spent by sensitivity
    schedule: str = option("uniform", PRUNE_SCHEDULE)
    recovery: str = option("refit", PRUNE_RECOVERY)
    ridge: float = 1e-2  # refit damping, relative to the mean diagonal of the Gram matrix
    max_layer_ratio: float = 0.9  # adaptive: no layer loses more than this share
    # at most this many calibration batches (8 texts each). The statistics stream into fixed-size Gram matrices, so
    # memory does not grow with it; more in-domain texts measurably help the refit (benchmarks/results/pruning.md)
    calibration_batches: int = 512
    token_weighting: bool = True  # weight tokens by 1/||x_t||^2, as the following LayerNorm does
    probe_batches: int = 8  # adaptive: calibration batches for the end-to-end sensitivity probes (0: off)
    reference_seq: int = 128  # FLOPs are reported per sequence of this many tokens (batch 1)
    # kept features per block rounded to a multiple of this (decoders: the 4-bit kernels' block size, so that a
    # pruned down_proj's K stays quantizable); 1 = any count
    keep_multiple: int = 1

    def __post_init__(self) -> None:
        validate_config(self, "prune")


# ---------------------------------------------------------------------------------------------------------- patterns


@dataclass
class Proj:
    """A MatMul by a 2-D initializer, optionally followed by Add of a 1-D initializer bias."""

    matmul: onnx.NodeProto
    weight: str
    bias: str | None
    add: onnx.NodeProto | None
    out: str  # the tensor after the bias

    @property
    def input(self) -> str:
        return self.matmul.input[0]


@dataclass
class ShapeFix:
    """One element of a shape constant to rewrite: `node.input[slot]` holds `value`; `value[pos]` becomes new."""

    node: onnx.NodeProto
    slot: int
    value: np.ndarray
    pos: int
    scale: int  # the new element is (units kept) * scale


@dataclass
class Block:
    kind: str  # "ffn" | "heads"
    producers: list[Proj]  # slice output columns
    consumer: Proj  # slice input rows (and refit)
    features: str  # the consumer's input tensor
    units: int  # neurons or heads
    unit_size: int  # features per unit (1 for neurons, head_dim for heads)
    fixes: list[ShapeFix] = field(default_factory=list)

    @property
    def key(self) -> str:
        return self.consumer.weight  # unique: a pruned weight has exactly one reader

    @property
    def label(self) -> str:
        return self.consumer.matmul.name or self.consumer.weight

    @property
    def hidden(self) -> int:
        return self.units * self.unit_size

    def groups(self) -> list[np.ndarray]:
        return [self.columns([u]) for u in range(self.units)]

    def columns(self, units: Iterable[int]) -> np.ndarray:
        """Feature indices of the consumer's input that belong to `units`."""
        u = np.asarray(list(units), dtype=np.int64)
        return (u[:, None] * self.unit_size + np.arange(self.unit_size)[None, :]).reshape(-1)


def _weight(idx: GraphIndex, name: str) -> np.ndarray | None:
    """A float 2-D initializer read by exactly one node (so slicing it changes nothing else)."""
    t = idx.initializers.get(name)
    if t is None or len(t.dims) != 2 or t.data_type != onnx.TensorProto.FLOAT or len(idx.consumers[name]) != 1:
        return None
    return idx.array(name)


def _const(idx: GraphIndex, name: str) -> np.ndarray | None:
    """Value of an initializer or Constant, also through Identity (exporters alias shared tensors that way)."""
    for _ in range(8):
        value = idx.constant_value(name)
        node = idx.producer.get(name)
        if value is not None or node is None or node.op_type != "Identity":
            return value
        name = node.input[0]
    return None


def _bias_of(idx: GraphIndex, node: onnx.NodeProto, n: int) -> tuple[str, str] | None:
    """(bias name, other input) when `node` is Add(bias[n], x) or Add(x, bias[n]). The bias may be shared (the
    rewrite gives the Add a fresh copy)."""
    if node.op_type != "Add" or len(node.input) != 2:
        return None
    for i in (0, 1):
        v = _const(idx, node.input[i])
        if v is not None and v.shape == (n,) and v.dtype == np.float32:
            return node.input[i], node.input[1 - i]
    return None


def _set_bias(wr: _Writer, p: Proj, value: np.ndarray) -> None:
    assert p.add is not None and p.bias is not None
    slot = list(p.add.input).index(p.bias)
    p.add.input[slot] = wr.add_init(f"{p.weight}_pruned_bias", value.astype(np.float32))


def _proj_producing(idx: GraphIndex, tensor: str) -> Proj | None:
    node = idx.producer.get(tensor)
    if node is None:
        return None
    if node.op_type == "MatMul":
        if _weight(idx, node.input[1]) is None:
            return None
        return Proj(node, node.input[1], None, None, tensor)
    if node.op_type == "Add":
        for i in (0, 1):
            mm = idx.producer.get(node.input[i])
            if mm is None or mm.op_type != "MatMul" or len(idx.consumers[mm.output[0]]) != 1:
                continue
            w = _weight(idx, mm.input[1])
            b = _bias_of(idx, node, w.shape[1]) if w is not None else None
            if b is not None and b[1] == mm.output[0]:
                return Proj(mm, mm.input[1], b[0], node, tensor)
    return None


def _proj_consuming(idx: GraphIndex, mm: onnx.NodeProto) -> Proj | None:
    w = _weight(idx, mm.input[1])
    if w is None:
        return None
    users = idx.consumers[mm.output[0]]
    if len(users) == 1 and mm.output[0] not in idx.graph_outputs:
        b = _bias_of(idx, users[0], w.shape[1])
        if b is not None:
            return Proj(mm, mm.input[1], b[0], users[0], users[0].output[0])
    return Proj(mm, mm.input[1], None, None, mm.output[0])


def _dims(idx: GraphIndex, p: Proj) -> tuple[int, int]:
    k, n = idx.initializers[p.weight].dims
    return int(k), int(n)


def find_ffn(idx: GraphIndex) -> tuple[list[Block], list[Skip]]:
    blocks: list[Block] = []
    skipped: list[Skip] = []
    for mm in idx.nodes("MatMul"):
        consumer = _proj_consuming(idx, mm)
        if consumer is None or idx.is_initializer(mm.input[0]):
            continue
        width, d_out = _dims(idx, consumer)
        producers: list[Proj] = []
        region: list[onnx.NodeProto] = []
        seen: set[str] = set()
        stack, ok = [mm.input[0]], True
        while stack and ok:
            t = stack.pop()
            if t in seen:
                continue
            seen.add(t)
            proj = _proj_producing(idx, t)
            if proj is not None and _dims(idx, proj)[1] == width:
                producers.append(proj)
                continue
            node = idx.producer.get(t)
            if node is None or node.op_type not in ELEMENTWISE or t in idx.graph_outputs:
                ok = False
                break
            region.append(node)
            for inp in node.input:
                if not inp:
                    continue
                const = _const(idx, inp)
                if const is not None:
                    ok = ok and const.size == 1  # a per-neuron constant would need slicing too
                else:
                    stack.append(inp)
        if not ok or not producers:
            continue
        inputs = {p.input for p in producers}
        d_in = {_dims(idx, p)[0] for p in producers}
        if len(inputs) != 1 or d_in != {d_out}:
            continue  # not d -> F -> d on one input (e.g. a pooler -> classifier head)
        inside = {id(n) for n in region} | {id(mm)}
        outs = [o for n in region for o in n.output] + [p.out for p in producers]
        if any(id(c) not in inside for o in outs for c in idx.consumers[o]) or any(
                o in idx.graph_outputs for o in outs):
            skipped.append(Skip(mm.name, "an FFN intermediate tensor is read outside the block"))
            continue
        blocks.append(Block("ffn", producers, consumer, mm.input[0], width, 1))
    return blocks, skipped


def _walk_back(idx: GraphIndex, tensor: str, through: frozenset[str], depth: int,
               want: Any) -> Any:
    """First result of `want(node)` found walking producers back through `through` ops (depth-limited DFS)."""
    node = idx.producer.get(tensor)
    if node is None or depth < 0:
        return None
    hit = want(node)
    if hit is not None:
        return hit
    if node.op_type not in through:
        return None
    for inp in node.input:
        if inp and _const(idx, inp) is None:
            hit = _walk_back(idx, inp, through, depth - 1, want)
            if hit is not None:
                return hit
    return None


def _shape_elements(idx: GraphIndex, node: onnx.NodeProto) -> list[tuple[int | None, ShapeFix | None]] | None:
    """The elements of a Reshape's shape input: (value or None when dynamic, where to rewrite it)."""
    shape = node.input[1]
    const = _const(idx, shape)
    if const is not None:
        return [(int(v), ShapeFix(node, 1, const, i, 0)) for i, v in enumerate(const.reshape(-1))]
    cat = idx.producer.get(shape)
    if cat is None or cat.op_type != "Concat":
        return None
    elems: list[tuple[int | None, ShapeFix | None]] = []
    for slot, inp in enumerate(cat.input):
        c = _const(idx, inp)
        if c is None:
            elems.append((None, None))  # optimum's Unsqueeze(Gather(Shape)) of one dim
        else:
            elems.extend((int(v), ShapeFix(cat, slot, c, i, 0)) for i, v in enumerate(c.reshape(-1)))
    return elems


def _split_reshape(idx: GraphIndex, node: onnx.NodeProto) -> tuple[Proj, int, int, ShapeFix | None] | None:
    """(projection, heads, head_dim, fix) for Reshape(proj(x), [.., H, dh])."""
    if node.op_type != "Reshape":
        return None
    proj = _proj_producing(idx, node.input[0])
    elems = _shape_elements(idx, node)
    if proj is None or elems is None or len(idx.consumers[proj.out]) != 1:
        return None
    n = _dims(idx, proj)[1]
    if len(elems) < 2:
        return None
    (h, fix), (dh, _) = elems[-2], elems[-1]
    if h is None or dh is None or dh <= 0:
        return None
    if h > 0 and h * dh == n and fix is not None:
        return proj, h, dh, fix
    if h == -1 and n % dh == 0:
        return proj, n // dh, dh, None
    return None


def find_attention(idx: GraphIndex) -> tuple[list[Block], list[Skip]]:
    blocks: list[Block] = []
    skipped: list[Skip] = []
    through = frozenset({"Transpose", "Mul", "Div", "Cast", "Identity"})
    score_ops = frozenset({"Add", "Sub", "Mul", "Div", "Cast", "Where", "Identity"})
    for sm in idx.nodes("Softmax"):
        ctx_mm = None
        t = sm.output[0]
        for _ in range(3):
            users = idx.consumers[t]
            if len(users) != 1:
                break
            if users[0].op_type == "MatMul" and users[0].input[0] == t:
                ctx_mm = users[0]
                break
            if users[0].op_type not in ("Cast", "Identity", "Dropout"):
                break
            t = users[0].output[0]
        if ctx_mm is None:
            continue

        def dyn_matmul(n: onnx.NodeProto) -> onnx.NodeProto | None:
            return n if n.op_type == "MatMul" and not any(idx.is_initializer(i) for i in n.input) else None

        score_mm = _walk_back(idx, sm.input[0], score_ops, 6, dyn_matmul)
        if score_mm is None:
            continue
        sides = [_walk_back(idx, score_mm.input[0], through, 4, lambda n: _split_reshape(idx, n)),
                 _walk_back(idx, score_mm.input[1], through, 4, lambda n: _split_reshape(idx, n)),
                 _walk_back(idx, ctx_mm.input[1], through, 4, lambda n: _split_reshape(idx, n))]
        if any(s is None for s in sides):
            skipped.append(Skip(sm.name, "Q/K/V head-split Reshape not recognised"))
            continue
        heads, dh = sides[0][1], sides[0][2]
        if any((s[1], s[2]) != (heads, dh) for s in sides) or len({s[0].input for s in sides}) != 1:
            skipped.append(Skip(sm.name, "Q, K and V differ in heads or input (GQA/cross)"))
            continue
        # context -> Transpose -> Reshape[.., H*dh] -> output projection
        t = ctx_mm.output[0]
        merge = None
        for _ in range(3):
            users = idx.consumers[t]
            if len(users) != 1:
                break
            if users[0].op_type == "Reshape":
                merge = users[0]
                break
            if users[0].op_type != "Transpose":
                break
            t = users[0].output[0]
        out_users = idx.consumers[merge.output[0]] if merge is not None else []
        out_proj = (_proj_consuming(idx, out_users[0]) if len(out_users) == 1 and out_users[0].op_type == "MatMul"
                    and out_users[0].input[0] == merge.output[0] else None)  # type: ignore[union-attr]
        elems = _shape_elements(idx, merge) if merge is not None else None
        if out_proj is None or elems is None or _dims(idx, out_proj)[0] != heads * dh:
            skipped.append(Skip(sm.name, "head-merge Reshape -> output MatMul not recognised"))
            continue
        last_value, last_fix = elems[-1]
        fixes = [ShapeFix(f.node, f.slot, f.value, f.pos, 1) for _, _, _, f in sides if f is not None]
        if last_value == heads * dh and last_fix is not None:
            fixes.append(ShapeFix(last_fix.node, last_fix.slot, last_fix.value, last_fix.pos, dh))
        elif last_value != -1:
            skipped.append(Skip(sm.name, f"head-merge shape ends in {last_value}, not {heads * dh}"))
            continue
        blocks.append(Block("heads", [s[0] for s in sides], out_proj, merge.output[0], heads, dh,  # type: ignore
                            fixes))
    return blocks, skipped


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


# ------------------------------------------------------------------------------------------------------- rewriting


class _Writer:
    def __init__(self, model: onnx.ModelProto) -> None:
        self.model = model
        self.inits = {t.name: t for t in model.graph.initializer}
        self.names = {t.name for t in model.graph.initializer} | {o for n in model.graph.node for o in n.output}

    def set(self, name: str, arr: np.ndarray) -> None:
        self.inits[name].CopyFrom(numpy_helper.from_array(np.ascontiguousarray(arr), name))

    def fresh(self, base: str) -> str:
        i = 0
        while f"{base}_{i}" in self.names:
            i += 1
        self.names.add(f"{base}_{i}")
        return f"{base}_{i}"

    def add_init(self, base: str, arr: np.ndarray) -> str:
        name = self.fresh(base)
        t = numpy_helper.from_array(np.ascontiguousarray(arr), name)
        self.model.graph.initializer.append(t)
        self.inits[name] = t
        return name


def _apply_block(wr: _Writer, idx: GraphIndex, b: Block, keep_units: np.ndarray, new_w: np.ndarray) -> None:
    cols = b.columns(keep_units)
    for p in b.producers:
        wr.set(p.weight, idx.array(p.weight)[:, cols])
        if p.bias:
            _set_bias(wr, p, np.asarray(_const(idx, p.bias))[cols])
    wr.set(b.consumer.weight, new_w[:-1].astype(np.float32))
    bias = new_w[-1].astype(np.float32)
    if b.consumer.bias:
        _set_bias(wr, b.consumer, bias)
    elif np.any(bias != 0):
        # no bias before (Llama): the compensation needs one
        name = wr.add_init(f"{b.consumer.weight}_prune_bias", bias)
        mm = b.consumer.matmul
        old = mm.output[0]
        new = wr.fresh(f"{old}_unbiased")
        mm.output[0] = new
        add = onnx.helper.make_node("Add", [new, name], [old], name=wr.fresh(f"{mm.name}_prune_bias_add"))
        pos = next(i for i, n in enumerate(wr.model.graph.node) if n.output and n.output[0] == new) + 1
        wr.model.graph.node.insert(pos, add)
    for fix in b.fixes:
        value = fix.value.copy()
        flat = value.reshape(-1)
        flat[fix.pos] = len(keep_units) * (fix.scale if fix.scale else 1)
        fix.node.input[fix.slot] = wr.add_init(f"{b.key}_pruned_shape", value)


def _drop_dead_constants(model: onnx.ModelProto) -> None:
    """Remove the Constant/Identity nodes and initializers the rewrite orphaned (replaced shapes and biases)."""
    while True:
        used = {i for n in model.graph.node for i in n.input} | {o.name for o in model.graph.output}
        dead = [n for n in model.graph.node if n.op_type in ("Constant", "Identity") and n.output[0] not in used]
        if not dead:
            break
        for n in dead:
            model.graph.node.remove(n)
    for t in [t for t in model.graph.initializer if t.name not in used]:
        model.graph.initializer.remove(t)


# ------------------------------------------------------------------------------------------------------------ pass


def matmul_flops(model: onnx.ModelProto, seq: int, attention: bool = True) -> int:
    """MatMul FLOPs of one sequence of `seq` tokens (batch 1): every MatMul by a weight, 2*K*N per row (a row per
    token when the input has a sequence axis), plus the QK^T and softmax*V products of recognised attention.
    Counted from the graph's own weights, so it is exact before and after pruning (ONNX shape inference cannot
    resolve optimum's attention shapes)."""
    idx = GraphIndex(model)
    ranks: dict[str, int] = {}
    try:
        g = onnx.shape_inference.infer_shapes(model).graph
        ranks = {vi.name: len(vi.type.tensor_type.shape.dim) for vi in [*g.input, *g.value_info]
                 if vi.type.tensor_type.HasField("shape")}
    except Exception:  # without ranks every weight MatMul counts a row per token
        pass
    total = 0
    for n in idx.nodes("MatMul"):
        if idx.is_initializer(n.input[1]) and len(idx.initializers[n.input[1]].dims) == 2:
            k, m = idx.initializers[n.input[1]].dims
            rows = seq if ranks.get(n.input[0], 3) >= 3 else 1
            total += 2 * rows * int(k) * int(m)
    for b in find_attention(idx)[0] if attention else []:
        total += 2 * 2 * seq * seq * b.hidden
    return total


def _unit_macs(idx: GraphIndex, b: Block, seq: int) -> int:
    """Multiply-adds per token that one unit (neuron or head) of `b` costs."""
    macs = b.unit_size * (sum(_dims(idx, p)[0] for p in b.producers) + _dims(idx, b.consumer)[1])
    if b.kind == "heads":
        macs += 2 * b.unit_size * seq  # QK^T and softmax @ V shrink with the heads
    return macs


@dataclass
class Plan:
    """What to remove, per block (units in removal order), and each block's relative loss."""

    blocks: list[Block]
    remove: list[list[int]]
    loss: list[float]


def _aligned_removal(b: Block, remove: int, multiple: int, nearest: bool) -> int:
    """Units to remove so that the kept features are a multiple of `multiple` (nearest to `remove`, or at most
    `remove`); at least one aligned group is kept. Unchanged when multiple is 1 or the block is not aligned."""
    if multiple <= 1 or b.hidden % multiple:
        return remove
    step = multiple // np.gcd(multiple, b.unit_size)  # units per aligned group
    kept = b.units - remove
    groups = round(kept / step) if nearest else -(-kept // step)
    return int(max(0, min(remove if not nearest else b.units, b.units - max(groups, 1) * step)))


@register(tasks=(*ENCODER_TASKS, DECODER_TASK), order=0,
          # composed with these recipes in the search grid
          search=({"prune_ffn": 0.25},),
          compose=(("int8-dynamic", {}), ("codebook", {"codebook_bits": 4}), ("int4", {})))
class StructuredPrune(Pass[PruneConfig]):
    name = "prune"

    @classmethod
    def configure(cls, values: Mapping[str, Any], task: str | None) -> PruneConfig:
        cfg = super().configure(values, task)
        if task == DECODER_TASK:  # a pruned down_proj keeps K a multiple of the decoder kernels' block
            cfg = replace(cfg, keep_multiple=values.get("block_size", BLOCK_SIZE.default))
        return cfg

    def find(self, model: onnx.ModelProto) -> tuple[list[Block], list[Skip]]:
        """Blocks of the kinds asked for; PassError when a kind asked for has none."""
        cfg: PruneConfig = self.config
        idx = GraphIndex(model)
        blocks: list[Block] = []
        skipped: list[Skip] = []
        missing = []
        for ratio, finder, pattern in ((cfg.ffn_ratio, find_ffn, FFN_PATTERN),
                                       (cfg.head_ratio, find_attention, ATTN_PATTERN)):
            if ratio <= 0:
                continue
            found, skip = finder(idx)
            skipped.extend(skip)
            if not found:
                missing.append(pattern + (f" [{skip[0].reason}]" if skip else ""))
            blocks.extend(found)
        if missing:
            raise PassError(f"pruning found no {' and no '.join(missing)} in this graph",
                            hint="structured pruning supports BERT/RoBERTa/DistilBERT encoders and Llama MLPs")
        return blocks, skipped

    def plan(self, model: onnx.ModelProto, blocks: list[Block], stats: dict[str, LayerStats],
             curve_cache: dict[Any, tuple[list[int], np.ndarray]] | None = None,
             sensitivity: dict[str, float] | None = None) -> Plan:
        """What to remove. uniform: the ratio in every layer. adaptive: the ratio of all neurons (heads) in the
        model, spent by sensitivity; with both ratios, their combined FLOPs are spent jointly on heads and neurons,
        wherever the loss per FLOP is lowest."""
        cfg: PruneConfig = self.config
        idx = GraphIndex(model)
        cache = curve_cache if curve_cache is not None else {}
        remove: list[list[int]] = [[] for _ in blocks]
        loss = [0.0] * len(blocks)
        pools = [(kind, ratio, [i for i, b in enumerate(blocks) if b.kind == kind])
                 for kind, ratio in (("ffn", cfg.ffn_ratio), ("heads", cfg.head_ratio))]
        pools = [p for p in pools if p[1] > 0 and p[2]]
        curves: dict[int, tuple[list[int], np.ndarray]] = {}
        for _, ratio, ids in pools:
            for i in ids:
                b = blocks[i]
                cap = (round(ratio * b.units) if cfg.schedule == "uniform" else int(cfg.max_layer_ratio * b.units))
                cap = min(cap, b.units - 1)
                if cfg.schedule == "uniform":
                    cap = _aligned_removal(b, cap, cfg.keep_multiple, nearest=True)
                key = (b.key, cfg.recovery, cfg.ridge)
                order, curve = cache.get(key, ([], np.zeros(1)))
                if len(order) < cap:
                    order, curve = removal_curve(b, stats[b.key], _augmented_weight(idx, b), cfg.recovery,
                                                 cfg.ridge, cap)
                    cache[key] = (order, curve)
                # end-to-end sensitivity (measured by probing) rescales the layer-local loss so layers compare
                curves[i] = (order[:cap], curve[:cap + 1] * (sensitivity or {}).get(b.key, 1.0))
        counts: dict[int, int] = {}
        if cfg.schedule == "uniform":
            counts = {i: len(o) for i, (o, _) in curves.items()}
        elif len(pools) == 2:
            ids = [i for _, _, pool in pools for i in pool]
            costs = [float(_unit_macs(idx, blocks[i], cfg.reference_seq)) for i in ids]
            budget = sum(ratio * blocks[i].units * _unit_macs(idx, blocks[i], cfg.reference_seq)
                         for _, ratio, pool in pools for i in pool)
            counts = dict(zip(ids, allocate([curves[i][1] for i in ids], budget, costs), strict=True))
        else:
            for _, ratio, ids in pools:
                got = allocate([curves[i][1] for i in ids], round(ratio * sum(blocks[i].units for i in ids)))
                counts.update(zip(ids, got, strict=True))
        for i, k in counts.items():
            k = _aligned_removal(blocks[i], k, cfg.keep_multiple, nearest=False)
            remove[i] = curves[i][0][:k]
            loss[i] = float(curves[i][1][k])
        return Plan(blocks, remove, loss)

    def apply(self, model: onnx.ModelProto, plan: Plan, stats: dict[str, LayerStats],
              check: bool = True) -> PassResult:
        """The pruned model. `check=False` (sensitivity probes) skips shape inference, the checker and FLOPs."""
        cfg: PruneConfig = self.config
        out = onnx.ModelProto()
        out.CopyFrom(model)
        # Plan blocks point into `model`; rewrite the same blocks found again in the copy (keyed by weight name).
        oidx = GraphIndex(out)
        twins: dict[str, Block] = {}
        for kind in {b.kind for b in plan.blocks}:
            for f in (find_ffn if kind == "ffn" else find_attention)(oidx)[0]:
                twins[f.key] = f
        idx = GraphIndex(model)
        wr = _Writer(out)
        layers = []
        seq = cfg.reference_seq
        for b, rem, loss in zip(plan.blocks, plan.remove, plan.loss, strict=True):
            if not rem:
                continue
            keep = np.array(sorted(set(range(b.units)) - set(rem)), dtype=int)
            st = stats[b.key]
            w_aug = _augmented_weight(idx, b)
            cols = b.columns(keep)
            if cfg.recovery == "refit":
                new_w = refit(st, w_aug, cols, cfg.ridge)
            else:
                gone = b.columns(rem)
                new_w = np.concatenate([w_aug[cols], w_aug[-1:]], axis=0)
                if cfg.recovery == "bias":
                    mean = st.gram[-1, gone] / max(st.count, 1.0)
                    new_w[-1] += mean @ w_aug[gone]
            _apply_block(wr, idx, twins[b.key], keep, new_w)
            d_model = _dims(idx, b.consumer)[1]
            removed = len(rem) * b.unit_size
            params = removed * (sum(_dims(idx, p)[0] + (1 if p.bias else 0) for p in b.producers) + d_model)
            macs = len(rem) * _unit_macs(idx, b, seq)
            layers.append({"layer": b.label, "kind": b.kind, "units": b.units, "removed": len(rem),
                           "kept": len(keep), "params_removed": int(params),
                           "flops_removed": int(2 * macs * seq), "relative_loss": round(loss, 6)})
        _drop_dead_constants(out)
        del out.graph.value_info[:]  # stale intermediate shapes; inferred afresh below
        if not check:
            return PassResult(out, {"layers": layers})
        try:
            out = onnx.shape_inference.infer_shapes(out, strict_mode=True, data_prop=True)
            onnx.checker.check_model(out, full_check=True)
        except Exception as e:  # onnx raises several types here
            raise PassError(f"the pruned graph is invalid: {str(e).splitlines()[0]}",
                            hint="this graph variant is not supported by structured pruning") from e
        before, after = matmul_flops(model, seq), matmul_flops(out, seq)
        linear = matmul_flops(model, seq, attention=False)
        report: dict[str, Any] = {
            "ffn_ratio": cfg.ffn_ratio, "head_ratio": cfg.head_ratio, "schedule": cfg.schedule,
            "recovery": cfg.recovery, "importance": ("greedy OBS on calibration Gram matrix" if cfg.recovery == "refit"
                                                     else "activation fluctuation x weight norm"),
            "layers": layers,
            "params_removed": sum(r["params_removed"] for r in layers),
            "flops_reference": f"batch 1 x {seq} tokens, MatMul FLOPs",
            "matmul_flops_before": before, "matmul_flops_after": after,
            "flops_removed_share": round(1 - after / before, 4) if before else 0.0,
            # weight MatMuls only (the linear layers), the convention of ../shared/anchors.md
            "linear_flops_removed_share": round(1 - matmul_flops(out, seq, False) / linear, 4) if linear else 0.0,
            "heads_removed": sum(r["removed"] for r in layers if r["kind"] == "heads"),
            "neurons_removed": sum(r["removed"] for r in layers if r["kind"] == "ffn"),
        }
        if not layers:
            report["skipped"] = skips(Skip("", "the ratios remove nothing (every layer keeps all its units)"))
            return PassResult(model, report, modified=False)
        return PassResult(out, report)

    def run(self, model: onnx.ModelProto, ctx: PassContext) -> PassResult:
        cfg: PruneConfig = self.config
        if cfg.ffn_ratio <= 0 and cfg.head_ratio <= 0:
            return PassResult(model, {"skipped": skips(Skip("", "both pruning ratios are 0"))}, modified=False)
        blocks, skipped = self.find(model)
        if ctx.calibration is None:
            raise PassError("structured pruning needs calibration data", hint="give --calibration texts")
        t0 = time.perf_counter()
        stats = collect_stats(model, blocks, _limit(ctx.calibration(), cfg.calibration_batches),
                              token_weighting=cfg.token_weighting)
        tokens = next(iter(stats.values())).tokens if stats else 0
        ctx.log(f"pruning statistics: {tokens} calibration tokens, {len(blocks)} blocks, "
                f"{time.perf_counter() - t0:.0f} s")
        result = self.prune(model, blocks, stats, ctx.calibration)
        result.report["skipped"] = [*result.report.get("skipped", []), *skips(*skipped)]
        result.report["calibration_tokens"] = tokens
        return result


    def prune(self, model: onnx.ModelProto, blocks: list[Block], stats: dict[str, LayerStats],
              calibration: Callable[[], Iterator[Batch]] | None,
              cache: dict[Any, tuple[list[int], np.ndarray]] | None = None) -> PassResult:
        """plan (with sensitivity probes when adaptive) + apply, from statistics already collected: what run()
        does after collect_stats, exposed so that several configs can share one collection (benchmarks)."""
        cfg: PruneConfig = self.config
        cache = cache if cache is not None else {}
        sensitivity = None
        if cfg.schedule == "adaptive" and cfg.probe_batches > 0 and calibration is not None:
            sensitivity = self.sensitivity(model, blocks, stats, list(_limit(calibration(), cfg.probe_batches)),
                                           cache)
        result = self.apply(model, self.plan(model, blocks, stats, cache, sensitivity), stats)
        if sensitivity is not None:
            result.report["sensitivity"] = {b.label: round(sensitivity[b.key], 4) for b in blocks}
        return result

    def sensitivity(self, model: onnx.ModelProto, blocks: list[Block], stats: dict[str, LayerStats],
                    batches: list[Batch], cache: dict[Any, tuple[list[int], np.ndarray]]) -> dict[str, float]:
        """End-to-end error per unit of layer-local loss, per block: prune each block alone at its ratio and compare
        the model's first output with the fp32 one on a few calibration batches. Layer-local losses alone rank the
        layers wrongly (an error in the last layer reaches the output undamped)."""
        cfg: PruneConfig = self.config
        ref = _run_first_output(model, batches)
        uniform = StructuredPrune(replace(cfg, schedule="uniform"))
        base = uniform.plan(model, blocks, stats, cache)
        out: dict[str, float] = {}
        for i, b in enumerate(blocks):
            if not base.remove[i] or base.loss[i] <= 0:
                out[b.key] = 1.0
                continue
            alone = Plan(blocks, [r if j == i else [] for j, r in enumerate(base.remove)], base.loss)
            probe = uniform.apply(model, alone, stats, check=False).model
            got = _run_first_output(probe, batches)
            err = float(np.mean([np.sum((g - r) ** 2) / max(float(np.sum(r * r)), 1e-30)
                                 for g, r in zip(got, ref, strict=True)]))
            out[b.key] = err / base.loss[i]
        # relative to the mean so the unprobed default (1.0) stays comparable
        mean = float(np.mean(list(out.values())))
        return {k: v / mean for k, v in out.items()} if mean > 0 else out


def _run_first_output(model: onnx.ModelProto, batches: list[Batch]) -> list[np.ndarray]:
    """The model's first output on each batch, padding tokens zeroed when there is an attention mask."""
    import onnxruntime as ort

    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    names = [i.name for i in sess.get_inputs()]
    outs = []
    for b in batches:
        y = np.asarray(sess.run(None, {n: b[n] for n in names})[0], dtype=np.float64)
        mask = b.get("attention_mask")
        if mask is not None and y.shape[:2] == mask.shape:
            y = y * mask[..., None]
        outs.append(y)
    return outs


def _limit(it: Iterator[Batch], n: int) -> Iterator[Batch]:
    for i, b in enumerate(it):
        if i >= n:
            break
        yield b

