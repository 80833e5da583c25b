"""Structured pruning, pattern finding: FFN and attention-head blocks found by graph pattern, never by node
name (see the package docstring). Layering: reads the graph only (graph.GraphIndex); writes nothing."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx

from edgecompress.graph import GraphIndex
from edgecompress.passes.base import Skip

log = logging.getLogger(__name__)

# Ops that act element by element, so slicing the intermediate dimension commutes with them (scalar constants only).
ELEMENTWISE = frozenset({"Add", "Sub", "Mul", "Div", "Erf", "Tanh", "Sigmoid", "Relu", "Gelu", "FastGelu", "Pow",
                         "Neg", "Exp", "Sqrt", "Softplus", "LeakyRelu", "HardSigmoid", "HardSwish", "Elu", "Selu",
                         "Clip", "Abs", "Cast", "Identity", "Mish"})
FFN_PATTERN = "FFN (MatMul -> element-wise activation -> MatMul, incl. gated SiLU(gate)*up)"
ATTN_PATTERN = "attention heads (Q/K/V MatMul -> Reshape[.., H, dh] -> Softmax -> Reshape[.., H*dh] -> MatMul)"



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
