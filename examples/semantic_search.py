"""Semantic search over a text file with an edgecompress bundle only: onnxruntime + tokenizers + numpy, no torch.

    edgecompress build --target raspberry-pi-5 --out build/minilm-pi5
    python examples/semantic_search.py build/minilm-pi5 notes.txt "how do I reset the router?" --top 3

The bundle carries the source model's sentence-transformers pipeline (modules.json, sentence_bert_config.json,
1_Pooling/, 2_Normalize/): this reads it, so the vectors are the ones SentenceTransformer(bundle) would give —
same max length, same pooling, same normalisation. Works on the ORT Mobile file too (--model model.ort).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
from tokenizers import Tokenizer


class Embedder:
    def __init__(self, bundle: Path, model_file: str = "model.onnx") -> None:
        modules = json.loads((bundle / "modules.json").read_text())
        self.max_len = json.loads((bundle / "sentence_bert_config.json").read_text()).get("max_seq_length", 512)
        pooling_dir = next(m["path"] for m in modules if m["type"].endswith(".Pooling"))
        pooling = json.loads((bundle / pooling_dir / "config.json").read_text())
        self.mode = "cls" if pooling.get("pooling_mode_cls_token") else "mean"
        self.normalize = any(m["type"].endswith(".Normalize") for m in modules)
        self.tokenizer = Tokenizer.from_file(str(bundle / "tokenizer.json"))
        self.tokenizer.enable_truncation(self.max_len)
        self.tokenizer.enable_padding()
        self.session = ort.InferenceSession(str(bundle / model_file), providers=["CPUExecutionProvider"])
        self.inputs = [i.name for i in self.session.get_inputs()]

    def __call__(self, texts: list[str], batch_size: int = 32) -> np.ndarray:
        out = []
        for i in range(0, len(texts), batch_size):
            enc = self.tokenizer.encode_batch(texts[i:i + batch_size])
            feed = {"input_ids": np.array([e.ids for e in enc], dtype=np.int64),
                    "attention_mask": np.array([e.attention_mask for e in enc], dtype=np.int64),
                    "token_type_ids": np.array([e.type_ids for e in enc], dtype=np.int64)}
            hidden = self.session.run(None, {k: feed[k] for k in self.inputs})[0]
            if self.mode == "cls":
                vec = hidden[:, 0]
            else:
                mask = feed["attention_mask"][..., None].astype(hidden.dtype)
                vec = (hidden * mask).sum(axis=1) / np.clip(mask.sum(axis=1), 1e-9, None)
            if self.normalize:
                vec = vec / np.linalg.norm(vec, axis=1, keepdims=True)
            out.append(vec)
        return np.concatenate(out)


def search(bundle: Path, corpus: list[str], query: str, top: int, model_file: str = "model.onnx"
           ) -> list[tuple[float, str]]:
    embed = Embedder(bundle, model_file)
    docs = embed(corpus)
    q = embed([query])[0]
    scores = docs @ q  # normalised vectors: the dot product is the cosine
    order = np.argsort(-scores)[:top]
    return [(float(scores[i]), corpus[i]) for i in order]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bundle", type=Path)
    ap.add_argument("text_file", type=Path, help="one document per line")
    ap.add_argument("query")
    ap.add_argument("--top", type=int, default=3)
    ap.add_argument("--model", default="model.onnx", help="model.onnx, or model.ort from --package ort-mobile")
    args = ap.parse_args()
    corpus = [line.strip() for line in args.text_file.read_text(encoding="utf-8").splitlines() if line.strip()]
    for score, text in search(args.bundle, corpus, args.query, args.top, args.model):
        print(f"{score:.4f}\t{text}")


if __name__ == "__main__":
    main()
