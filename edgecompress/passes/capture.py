"""Activation capture: run a float model in onnxruntime with intermediate tensors as extra outputs, and keep the
rows of real tokens. The one implementation the codebook, pruning, int4 (GPTQ) and smoothing statistics use, so
there is one padding rule: an activation whose leading dimensions hold exactly one row per attention-mask position
keeps the rows under the mask; any other shape is kept whole.

Layering: a pass helper; imports errors and passes.base only.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import onnx

from edgecompress.errors import PassError
from edgecompress.passes.base import Batch


def with_outputs(model: onnx.ModelProto, names: Iterable[str]) -> onnx.ModelProto:
    """A copy of `model` whose graph also outputs `names` (graph inputs and existing outputs are left as they are:
    ORT never fuses away a graph output, so the values survive its optimizations)."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    skip = {o.name for o in m.graph.output} | {i.name for i in m.graph.input}
    for name in names:
        if name not in skip:
            m.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
            skip.add(name)
    return m


class Capture:
    """Values of named tensors per calibration batch. `optimize=False` turns ORT's graph optimizations off (the
    codebook's statistics read tensors an optimized graph could rewrite)."""

    def __init__(self, model: onnx.ModelProto, names: Iterable[str], *, optimize: bool = True,
                 purpose: str = "collect calibration statistics") -> None:
        import onnxruntime as ort

        self.names = list(dict.fromkeys(names))
        graph_inputs = {i.name for i in model.graph.input}
        self._fetch = [n for n in self.names if n not in graph_inputs]  # a graph input is read from the feed
        opts = ort.SessionOptions()
        if not optimize:
            opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        try:
            self._sess = ort.InferenceSession(with_outputs(model, self._fetch).SerializeToString(), opts,
                                              providers=["CPUExecutionProvider"])
        except Exception as e:  # onnxruntime raises its own untyped errors
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise PassError(f"could not run the model to {purpose}: {first}") from e
        self.feeds = [i.name for i in self._sess.get_inputs()]

    def __call__(self, batch: Batch) -> dict[str, np.ndarray]:
        missing = [f for f in self.feeds if f not in batch]
        if missing:
            raise PassError(f"calibration batches lack the model input(s) {', '.join(missing)}")
        feed = {f: batch[f] for f in self.feeds}
        values = dict(zip(self._fetch, self._sess.run(self._fetch, feed), strict=True)) if self._fetch else {}
        return {n: values[n] if n in values else feed[n] for n in self.names}


def token_rows(x: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    """x as (rows, channels), without the padding rows when x has one row per attention-mask position."""
    rows = x.reshape(-1, x.shape[-1])
    if mask is not None and mask.size == rows.shape[0]:
        rows = rows[mask.reshape(-1).astype(bool)]  # padding tokens never reach a pooled output
    return rows
