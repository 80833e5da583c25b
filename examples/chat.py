"""A chat loop on a decoder bundle (e.g. SmolLM2-135M-Instruct): onnxruntime with its KV cache, the bundle's own
tokenizer, chat template and generation config. No torch.

    edgecompress build smollm2 --target phone-arm64 --out build/smollm2-phone
    python examples/chat.py build/smollm2-phone            # type a message, Enter; an empty line or EOF quits

Greedy decoding, stopping at the generation config's end-of-sequence ids or --max-new-tokens.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort


class Chat:
    def __init__(self, bundle: Path, model_file: str = "model.onnx") -> None:
        from transformers import AutoTokenizer  # the tokenizer and its chat template only: no torch needed

        self.tokenizer = AutoTokenizer.from_pretrained(str(bundle))
        config = json.loads((bundle / "config.json").read_text())
        gen_file = bundle / "generation_config.json"
        gen = json.loads(gen_file.read_text()) if gen_file.is_file() else {}
        eos = gen.get("eos_token_id", config.get("eos_token_id"))
        self.eos = set(eos if isinstance(eos, list) else [eos]) - {None}
        self.max_new_tokens = int(gen.get("max_new_tokens") or 64)
        self.session = ort.InferenceSession(str(bundle / model_file), providers=["CPUExecutionProvider"])
        self.inputs = {i.name: i for i in self.session.get_inputs()}
        self.outputs = [o.name for o in self.session.get_outputs()]
        heads = config.get("num_key_value_heads") or config["num_attention_heads"]
        head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
        self.empty_past = {n: np.zeros((1, heads, 0, head_dim), np.float32) for n in self.inputs
                           if n.startswith("past_key_values")}
        self.history: list[dict[str, str]] = []

    def generate(self, ids: list[int], max_new_tokens: int) -> list[int]:
        past, new = dict(self.empty_past), []
        step, total = list(ids), 0
        for _ in range(max_new_tokens):
            total += len(step)
            feed = {"input_ids": np.array([step], np.int64), "attention_mask": np.ones((1, total), np.int64),
                    "position_ids": np.arange(total - len(step), total, dtype=np.int64)[None], **past}
            out = dict(zip(self.outputs, self.session.run(None, {k: v for k, v in feed.items() if k in self.inputs}),
                           strict=True))
            token = int(out["logits"][0, -1].argmax())
            past = {n.replace("present", "past_key_values"): v for n, v in out.items() if n.startswith("present")}
            if token in self.eos:
                break
            new.append(token)
            step = [token]
        return new

    def reply(self, message: str, max_new_tokens: int | None = None) -> str:
        self.history.append({"role": "user", "content": message})
        ids = self.tokenizer.apply_chat_template(self.history, add_generation_prompt=True, tokenize=True)
        text = self.tokenizer.decode(self.generate(list(ids), max_new_tokens or self.max_new_tokens),
                                     skip_special_tokens=True)
        self.history.append({"role": "assistant", "content": text})
        return text


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bundle", type=Path)
    ap.add_argument("--max-new-tokens", type=int, default=None, help="default: the bundle's generation config")
    ap.add_argument("--model", default="model.onnx")
    args = ap.parse_args()
    chat = Chat(args.bundle, args.model)
    interactive = sys.stdin.isatty()
    while True:
        if interactive:
            print("you> ", end="", flush=True)
        line = sys.stdin.readline()
        if not line.strip():
            break
        print(f"bot> {chat.reply(line.strip(), args.max_new_tokens)}", flush=True)


if __name__ == "__main__":
    main()
