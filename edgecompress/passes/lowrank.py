"""Low-rank factorization: MatMul(x, W[k, n]) -> MatMul(MatMul(x, A[k, r]), B[r, n]) from a truncated SVD.

The rank per weight is the smallest that keeps `energy` of the squared singular values. A weight is factored only
where that saves FLOPs and bytes, r * (k + n) < k * n; otherwise it is left as it is and the report says why.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from edgecompress.errors import PassError
from edgecompress.graph import GraphIndex
from edgecompress.passes.base import ModelInfo, Pass, PassContext, PassResult, Skip, matmul_only, register, skips
from edgecompress.passes.options import Option, option, validate_config
from edgecompress.tasknames import DECODER_TASK, ENCODER_TASKS

log = logging.getLogger(__name__)


LOW_RANK_ENERGY = Option("low_rank_energy", "Factor MatMul weights by truncated SVD keeping this share of the "
                         "singular-value energy, e.g. 0.95.", float, low=0.0, high=1.0, low_open=True,
                         hint="the share of singular-value energy to keep, e.g. 0.95", enables=True)


@dataclass(frozen=True)
class LowRankConfig:
    energy: float = option(0.95, LOW_RANK_ENERGY)  # share of sum(s_i^2) the kept singular values must hold
    min_params: int = 4096  # weights smaller than this are not worth a second MatMul

    def __post_init__(self) -> None:
        validate_config(self, "low-rank")


def svd_factors(w: np.ndarray, rank: int,
                svd: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """A[k, r], B[r, n] with A @ B the best rank-r approximation of w (sqrt(s) on both sides balances ranges)."""
    u, s, vt = svd if svd is not None else np.linalg.svd(w.astype(np.float64), full_matrices=False)
    root = np.sqrt(s[:rank])
    return (u[:, :rank] * root).astype(np.float32), (root[:, None] * vt[:rank]).astype(np.float32)


def rank_for_energy(s: np.ndarray, energy: float) -> int:
    """Smallest r with sum(s[:r]^2) >= energy * sum(s^2), never above the numerical rank (singular values under
    float32 round-off of the largest carry no information, so energy 1.0 means the exact rank)."""
    s = np.sort(s.astype(np.float64))[::-1]
    e = np.cumsum(s**2)
    if e[-1] <= 0:
        return 1
    numerical = max(1, int(np.sum(s > s[0] * len(s) * np.finfo(np.float32).eps)))
    return min(numerical, int(np.searchsorted(e / e[-1], energy - 1e-12)) + 1)


@register(tasks=(*ENCODER_TASKS, DECODER_TASK), order=1)
class LowRank(Pass[LowRankConfig]):
    name = "low-rank"

    @classmethod
    def refuses(cls, info: ModelInfo | None) -> str | None:
        return matmul_only(info)

    def run(self, model: onnx.ModelProto, ctx: PassContext) -> PassResult:
        cfg = self.config
        idx = GraphIndex(model)
        out = onnx.ModelProto()
        out.CopyFrom(model)
        names = {t.name for t in out.graph.initializer} | {o for n in out.graph.node for o in n.output}
        layers: list[dict[str, Any]] = []
        skipped: list[Skip] = []
        new_nodes: list[onnx.NodeProto] = []
        drop: set[str] = set()
        for original in out.graph.node:
            node = onnx.NodeProto()
            node.CopyFrom(original)  # edited copies replace the node list at the end
            new_nodes.append(node)
            if node.op_type != "MatMul" or not idx.is_initializer(node.input[1]):
                continue
            wname = node.input[1]
            t = idx.initializers[wname]
            label = node.name or wname
            if len(t.dims) != 2 or t.data_type != onnx.TensorProto.FLOAT:
                skipped.append(Skip(label, "weight is not a 2-D float32 matrix"))
                continue
            if len(idx.consumers[wname]) != 1:
                skipped.append(Skip(label, "weight is shared with another node"))
                continue
            k, n = (int(d) for d in t.dims)
            if k * n < cfg.min_params:
                skipped.append(Skip(label, f"small weight ({k}x{n})"))
                continue
            w = idx.array(wname)
            usv = np.linalg.svd(w.astype(np.float64), full_matrices=False)
            s = usv[1]
            r = rank_for_energy(s, cfg.energy)
            if r * (k + n) >= k * n:
                skipped.append(Skip(label, f"{k}x{n}: rank {r} for {cfg.energy:.4g} energy saves nothing "
                                           f"({r * (k + n)} >= {k * n} params)"))
                continue
            a, b = svd_factors(w, r, usv)
            an, bn, mid = (_fresh(names, f"{wname}_lr_a"), _fresh(names, f"{wname}_lr_b"),
                           _fresh(names, f"{node.output[0]}_lr"))
            out.graph.initializer.extend([numpy_helper.from_array(a, an), numpy_helper.from_array(b, bn)])
            drop.add(wname)
            second = onnx.helper.make_node("MatMul", [mid, bn], [node.output[0]],
                                           name=_fresh(names, f"{node.name or wname}_lr_b"))
            node.input[1] = an
            node.output[0] = mid
            new_nodes.append(second)
            kept = float(np.sum(s[:r] ** 2) / max(np.sum(s**2), 1e-30))
            layers.append({"layer": label, "shape": [k, n], "rank": r, "energy_kept": round(kept, 6),
                           "params_before": k * n, "params_after": r * (k + n)})
        report: dict[str, Any] = {
            "energy": cfg.energy, "layers": layers, "skipped": skips(*skipped),
            "params_before": sum(x["params_before"] for x in layers),
            "params_after": sum(x["params_after"] for x in layers),
            "rank_summary": _summary([x["rank"] for x in layers]),
        }
        if not layers:
            report["skipped"] = skips(Skip("", f"no MatMul weight is cheaper factored at {cfg.energy:.4g} energy"
                                           if skipped else "no MatMul with a constant weight"), *skipped)
            return PassResult(model, report, modified=False)
        del out.graph.node[:]
        out.graph.node.extend(new_nodes)
        keep_inits = [t for t in out.graph.initializer if t.name not in drop]
        del out.graph.initializer[:]
        out.graph.initializer.extend(keep_inits)
        del out.graph.value_info[:]
        try:
            out = onnx.shape_inference.infer_shapes(out, strict_mode=True)
            onnx.checker.check_model(out, full_check=True)
        except Exception as e:  # onnx raises several types here
            raise PassError(f"the factored graph is invalid: {str(e).splitlines()[0]}") from e
        log.info("low-rank: factored %d MatMuls, %d -> %d params", len(layers), report["params_before"],
                 report["params_after"])
        return PassResult(out, report)


def _fresh(names: set[str], base: str) -> str:
    name, i = base, 0
    while name in names:
        i += 1
        name = f"{base}_{i}"
    names.add(name)
    return name


def _summary(ranks: list[int]) -> dict[str, Any]:
    if not ranks:
        return {"count": 0}
    return {"count": len(ranks), "min": min(ranks), "median": float(np.median(ranks)), "max": max(ranks)}
