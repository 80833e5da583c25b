"""What makes a bundle runnable by ONNX Runtime GenAI as is: genai_config.json sized for the target, a tokenizer
its tokenizer reads the way transformers does, and the chat template where GenAI looks for it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

GENAI_CONFIG = "genai_config.json"
BUNDLE_FILES = (GENAI_CONFIG, "chat_template.jinja")


def genai_tokenizer(d: Path) -> dict[str, Any]:
    """Adjust d's tokenizer files in place for ORT GenAI's tokenizer; returns what was changed and why.

    A GGUF converted by transformers gets a byte-level BPE whose decoder is a Sequence of SentencePiece steps
    (ByteFallback, Fuse, Replace '▁') ending in ByteLevel; ORT GenAI's tokenizer then takes it for a SentencePiece
    model and encodes every space as an unknown token. ByteLevel alone decodes the same byte-level tokens
    identically in transformers. The chat template (transformers >= 4.47 saves it as chat_template.jinja) goes
    into tokenizer_config.json, where ORT GenAI reads it."""
    changes: dict[str, Any] = {}
    tj = d / "tokenizer.json"
    if tj.is_file():
        tok = json.loads(tj.read_text(encoding="utf-8"))
        dec = tok.get("decoder") or {}
        pre = json.dumps(tok.get("pre_tokenizer") or {})
        steps = [s.get("type") for s in dec.get("decoders", [])] if dec.get("type") == "Sequence" else []
        if (tok.get("model") or {}).get("type") == "BPE" and '"ByteLevel"' in pre and "ByteLevel" in steps \
                and "Replace" in steps:
            tok["decoder"] = next(s for s in dec["decoders"] if s.get("type") == "ByteLevel")
            tj.write_text(json.dumps(tok, ensure_ascii=False), encoding="utf-8")
            changes["decoder"] = f"Sequence({', '.join(steps)}) -> ByteLevel (byte-level BPE)"
    tc, jinja = d / "tokenizer_config.json", d / "chat_template.jinja"
    if tc.is_file() and jinja.is_file():
        cfg = json.loads(tc.read_text(encoding="utf-8"))
        if not cfg.get("chat_template"):
            cfg["chat_template"] = jinja.read_text(encoding="utf-8")
            tc.write_text(json.dumps(cfg, indent=2, ensure_ascii=False), encoding="utf-8")
            changes["chat_template"] = "copied from chat_template.jinja into tokenizer_config.json"
    return changes


def finalize_bundle(bundle: Path, context_length: int, threads: int, model_file: str = "model.onnx"
                    ) -> dict[str, Any] | None:
    """Size genai_config.json for the target: the KV buffer (shared past/present, updated in place) holds
    context_length tokens, the session runs the target's threads. None when the bundle has no genai_config."""
    path = bundle / GENAI_CONFIG
    if not path.is_file():
        return None
    cfg = json.loads(path.read_text(encoding="utf-8"))
    model = cfg["model"]
    max_ctx = int(model.get("context_length") or context_length)
    length = min(context_length, max_ctx)
    cfg.setdefault("search", {})["max_length"] = length
    dec = model["decoder"]
    dec["filename"] = model_file
    opts = dec.setdefault("session_options", {})
    opts["intra_op_num_threads"] = threads
    path.write_text(json.dumps(cfg, indent=4), encoding="utf-8")
    return {"file": GENAI_CONFIG, "max_length": length, "past_present_share_buffer":
            bool(cfg["search"].get("past_present_share_buffer")), "intra_op_num_threads": threads,
            "runs_with": "onnxruntime_genai.Model(bundle) and its Generator"}
