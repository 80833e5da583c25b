"""Structured pruning applied to the PyTorch model: the graph pass's exact cuts, on the transformers modules.

The graph-level pass (passes/prune) decides what to remove (its importance, its schedule) and refits the consuming
projection; this module applies exactly that decision to nn.Linear weights, so the student starts from the same
model the one-shot pass would have produced (same kept units, same refit weights; tests/test_distill.py checks the
two agree at zero training steps). Graph blocks are matched to torch modules by value: an optimum export keeps each
nn.Linear's weight as a MatMul initializer equal to weight.T, bit for bit, whatever names the exporter gave it.

Heads are removed through transformers' own `prune_heads` on the attention module (BERT, RoBERTa, DistilBERT...),
which also updates the module's head count; the output projection then takes the refit weights.

Layering: imports torch and numpy only (the model comes from export.py).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import numpy as np

from edgecompress.errors import PassError


@dataclass
class Cut:
    """One pruned block, as the graph pass decided it (arrays of the ORIGINAL graph, to find the torch modules)."""

    kind: str  # "ffn" | "heads"
    producers: list[np.ndarray]  # MatMul weights [d_in, width] whose output columns are sliced
    consumer: np.ndarray  # the consuming MatMul's weight [width, d_out]
    keep_units: np.ndarray  # kept neurons or heads, sorted
    unit_size: int  # 1 for neurons, head_dim for heads
    new_weight: np.ndarray  # the consumer's new weight [kept features, d_out] (the refit's)
    new_bias: np.ndarray  # the consumer's new bias [d_out]
    label: str = ""

    @property
    def columns(self) -> np.ndarray:
        u = self.keep_units.astype(np.int64)
        return (u[:, None] * self.unit_size + np.arange(self.unit_size)[None, :]).reshape(-1)


def _digest(a: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(a, dtype=np.float32).tobytes()).hexdigest()


def linear_index(model: Any) -> dict[str, tuple[str, Any]]:
    """sha256 of each nn.Linear's weight.T (as the ONNX MatMul holds it) -> (module name, module)."""
    import torch

    out: dict[str, tuple[str, Any]] = {}
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear):
            out[_digest(mod.weight.detach().numpy().T)] = (name, mod)
    return out


def _find(index: dict[str, tuple[str, Any]], w: np.ndarray, what: str, label: str) -> tuple[str, Any]:
    hit = index.get(_digest(w))
    if hit is None:
        raise PassError(f"distillation: the {what} of {label} matches no nn.Linear of the PyTorch model",
                        hint="the source checkpoint and the exported graph differ; rebuild without the cache")
    return hit


def _set_linear(lin: Any, weight: np.ndarray, bias: np.ndarray | None) -> None:
    """weight [out, in], bias [out]: new parameters (the shapes change) on the same module."""
    import torch

    lin.weight = torch.nn.Parameter(torch.from_numpy(np.ascontiguousarray(weight, dtype=np.float32)))
    lin.out_features, lin.in_features = weight.shape
    if bias is not None:
        lin.bias = torch.nn.Parameter(torch.from_numpy(np.ascontiguousarray(bias, dtype=np.float32)))


def _head_owner(model: Any, name: str) -> Any:
    """The nearest module above `name` that prunes its own heads (BertAttention, DistilBERT's attention...)."""
    parts = name.split(".")
    for i in range(len(parts) - 1, 0, -1):
        mod = model.get_submodule(".".join(parts[:i]))
        if hasattr(mod, "prune_heads") and mod is not model and not hasattr(mod, "base_model_prefix"):
            return mod
    raise PassError(f"distillation: no attention module with prune_heads above {name}",
                    hint="head pruning with distillation supports BERT-style encoders; prune only FFNs "
                         "(--prune-heads 0)")


def apply_cuts(model: Any, cuts: list[Cut]) -> list[dict[str, Any]]:
    """Prune `model` in place as the graph pass did; returns which modules each cut changed."""
    import torch

    index = linear_index(model)  # before any change: the original weights
    done: list[dict[str, Any]] = []
    with torch.no_grad():
        for cut in cuts:
            prods = [_find(index, w, "producer", cut.label) for w in cut.producers]
            cname, consumer = _find(index, cut.consumer, "consumer", cut.label)
            cols = cut.columns
            if cut.kind == "heads":
                n_heads = cut.consumer.shape[0] // cut.unit_size
                gone = sorted(set(range(n_heads)) - {int(u) for u in cut.keep_units})
                owner = _head_owner(model, prods[0][0])
                owner.prune_heads(gone)  # slices Q/K/V rows and the output's columns, updates the head count
                # prune_heads puts new nn.Linear modules in place of the old ones
                prods = [(n, model.get_submodule(n)) for n, _ in prods]
                consumer = model.get_submodule(cname)
                for (_, lin), w in zip(prods, cut.producers, strict=True):
                    if tuple(lin.weight.shape) != (len(cols), w.shape[0]):
                        raise PassError(f"distillation: prune_heads gave {tuple(lin.weight.shape)} at {cut.label}",
                                        hint="this attention layout is not supported; use --prune-heads 0")
            else:
                for (_, lin), w in zip(prods, cut.producers, strict=True):
                    bias = lin.bias.detach().numpy()[cols] if lin.bias is not None else None
                    _set_linear(lin, w[:, cols].T, bias)
            # a consumer without a bias (Llama) gets one only when the refit needs one, as in the graph
            needs_bias = consumer.bias is not None or bool(np.any(cut.new_bias != 0))
            _set_linear(consumer, cut.new_weight.T, cut.new_bias if needs_bias else None)
            done.append({"block": cut.label, "kind": cut.kind, "consumer": cname,
                         "producers": [n for n, _ in prods], "kept": len(cut.keep_units)})
    return done
