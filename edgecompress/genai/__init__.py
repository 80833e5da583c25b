"""The decoder fast path: ONNX Runtime GenAI's model builder as the exporter, and bundles its runtime runs as is.

optimum exports a Llama as ~4,000 unfused nodes (attention as MatMul/Softmax, the KV cache concatenated and copied
every step). ORT GenAI's model builder writes the graph ORT's CPU kernels are fastest on: packed QKV,
GroupQueryAttention with the rotary embedding inside, SimplifiedLayerNorm fused with the residual add, and a KV
cache the GenAI runtime keeps in one buffer of the context length, updated in place. edgecompress exports that
graph at fp32 (so its own grid-preserving int4 pass, not the builder's RTN, does the quantizing), and writes the
bundle so that `onnxruntime_genai.Model(bundle)` runs it: genai_config.json, tokenizer, chat template.

Architectures the builder is not used for here, and recipes whose passes only know optimum's graph (pruning,
low-rank, codebooks), take optimum's export (the fallback); the manifest's `export.path` says which, and why.
"""

from __future__ import annotations

import importlib.util

from edgecompress.genai.bundle import BUNDLE_FILES, finalize_bundle
from edgecompress.genai.export import (
    FAST_PATH_ARCHITECTURES,
    FAST_PATH_PASSES,
    GENAI_EXTRA_HINT,
    choose_exporter,
    export_genai,
    genai_version,
)

__all__ = ["BUNDLE_FILES", "FAST_PATH_ARCHITECTURES", "FAST_PATH_PASSES", "GENAI_EXTRA_HINT",
           "available", "choose_exporter", "export_genai", "finalize_bundle", "genai_version"]


def available() -> bool:
    return importlib.util.find_spec("onnxruntime_genai") is not None
