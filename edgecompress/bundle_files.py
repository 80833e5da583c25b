"""What goes into a bundle beside model.onnx: every file the source model's own libraries read to behave the same.

A bundle must load as it is in the client a user already has: transformers/optimum (config, tokenizer, chat
template, generation config) and sentence-transformers (modules.json and each module's config: pooling,
normalisation, max_seq_length). Without modules.json, `SentenceTransformer(bundle, backend="onnx")` silently falls
back to mean pooling without normalisation at the tokenizer's 512-token limit: different vectors from the
original model. Files are copied as they are; only a Transformer module kept in a subfolder is pointed at the
bundle's root, where model.onnx and the tokenizer live.

Layering: imports nothing internal.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

# Files of an optimum export dir (or the source model dir) that make the bundle load like any HF ONNX model dir.
HF_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt",
            "merges.txt", "vocab.json", "sentencepiece.bpe.model", "spiece.model", "tokenizer.model",
            "added_tokens.json", "chat_template.jinja", "chat_template.json", "generation_config.json",
            "genai_config.json",  # ORT GenAI's runtime config (decoder fast path, edgecompress/genai)
            "preprocessor_config.json")  # the image processor / feature extractor (vision, speech)
# sentence-transformers' own files at the model's root
ST_ROOT_FILES = ("modules.json", "sentence_bert_config.json", "config_sentence_transformers.json")
_ST_TRANSFORMER = "sentence_transformers.models.Transformer"


def copy_bundle_files(export_dir: Path, source_dir: Path | None, stage: Path) -> dict[str, Any]:
    """Copy the HF side files (the export's first, else the source's) and the sentence-transformers pipeline
    into `stage`. Returns what was written, for the manifest (`bundle_files`)."""
    written: list[str] = []
    for name in HF_FILES:
        for d in (export_dir, source_dir):
            if d is not None and d.is_dir() and (d / name).is_file():
                shutil.copy2(d / name, stage / name)
                written.append(name)
                break
    st = _copy_sentence_transformers(source_dir, stage) if source_dir is not None and source_dir.is_dir() else {}
    written += st.get("files", [])
    out: dict[str, Any] = {"files": sorted(written)}
    if st:
        out["sentence_transformers"] = {k: v for k, v in st.items() if k != "files"}
    return out


def _inside(root: Path, rel: str) -> Path | None:
    """root/rel if it stays inside root (modules.json comes from a model repo: no path escapes)."""
    if not rel:
        return root
    p = (root / rel).resolve()
    return p if p.is_relative_to(root.resolve()) and p != root.resolve() else None


def _copy_sentence_transformers(source: Path, stage: Path) -> dict[str, Any]:
    modules_file = source / "modules.json"
    if not modules_file.is_file():
        return {}
    try:
        modules = json.loads(modules_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        log.warning("%s is unreadable, the bundle carries no sentence-transformers pipeline: %s", modules_file, e)
        return {}
    if not isinstance(modules, list) or not all(isinstance(m, dict) and "type" in m for m in modules):
        log.warning("%s is not a sentence-transformers module list; not copied", modules_file)
        return {}
    files: list[str] = []
    for name in ST_ROOT_FILES[1:]:
        if (source / name).is_file():
            shutil.copy2(source / name, stage / name)
            files.append(name)
    out_modules: list[dict[str, Any]] = []
    for m in modules:
        m = dict(m)
        rel = str(m.get("path", ""))
        src = _inside(source, rel)
        if src is None:
            log.warning("modules.json path %r leaves the model dir; module %s dropped", rel, m.get("name"))
            continue
        if m["type"] == _ST_TRANSFORMER or m["type"].endswith(".Transformer"):
            # model.onnx and the tokenizer sit at the bundle's root: the Transformer module must read them there
            if rel and (src / "sentence_bert_config.json").is_file():
                shutil.copy2(src / "sentence_bert_config.json", stage / "sentence_bert_config.json")
                files.append("sentence_bert_config.json")
            m["path"] = ""
        elif rel:
            dest = stage / rel
            if src.is_dir():
                shutil.copytree(src, dest, dirs_exist_ok=True)
                files += [f.relative_to(stage).as_posix() for f in sorted(dest.rglob("*")) if f.is_file()]
            else:  # e.g. 2_Normalize: a module without files; its folder is written so the layout is complete
                dest.mkdir(parents=True, exist_ok=True)
        out_modules.append(m)
    (stage / "modules.json").write_text(json.dumps(out_modules, indent=2) + "\n", encoding="utf-8")
    files.append("modules.json")
    sbc = _read_json(stage / "sentence_bert_config.json")
    pooling = next((_read_json(stage / m["path"] / "config.json") for m in out_modules
                    if m["type"].endswith(".Pooling") and m.get("path")), {})
    return {"files": sorted(set(files)), "modules": [m["type"].rsplit(".", 1)[-1] for m in out_modules],
            "max_seq_length": sbc.get("max_seq_length"),
            "pooling": [k.removeprefix("pooling_mode_") for k, v in pooling.items()
                        if k.startswith("pooling_mode_") and v is True],
            "normalize": any(m["type"].endswith(".Normalize") for m in out_modules)}


def _read_json(p: Path) -> dict[str, Any]:
    try:
        d = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return {}
    return d if isinstance(d, dict) else {}


def bundle_section(side_files: dict[str, Any], mobile: dict[str, Any]) -> dict[str, Any]:
    """manifest.json `bundle`: the files beside the model and, with --package ort-mobile, the ORT Mobile package."""
    out = dict(side_files)
    if mobile:
        out["ort_mobile"] = mobile
    return out
