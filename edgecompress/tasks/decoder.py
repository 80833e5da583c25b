"""Causal LMs exported with their KV cache (text-generation-with-past): perplexity and next-token agreement."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from edgecompress import export
from edgecompress.cache import digest, hash_texts
from edgecompress.calibration import TextSet, builtin_texts
from edgecompress.evaluate import Fidelity
from edgecompress.passes.base import Batch, ModelInfo
from edgecompress.profiling.decoder import decoder_dims
from edgecompress.profiling.workload import DECODER
from edgecompress.progress import Progress
from edgecompress.targets import Target
from edgecompress.tasknames import DECODER_TASK
from edgecompress.tasks.base import TaskInputs, register_task
from edgecompress.taskspec import Metric, TaskSpec

# judged on the evaluation text's tokens, next-token prediction
PERPLEXITY_RATIO = Metric("perplexity_ratio", False, "", "perplexity on the evaluation text / the reference's "
                          "perplexity on the same tokens", 0.0)
PERPLEXITY = Metric("perplexity", False, "", "perplexity (exp of mean next-token NLL) on the evaluation text", 1.0)
NEXT_TOKEN_TOP1 = Metric("next_token_top1", True, "", "share of positions whose arg-max next token matches the "
                         "reference's", 0.0, 1.0)

DECODER_SPEC = TaskSpec(DECODER_TASK, (PERPLEXITY_RATIO, PERPLEXITY, NEXT_TOKEN_TOP1),
                        architectures=("ForCausalLM",), torch_class="AutoModelForCausalLM", kv_cache=True, genai=True)


class DecoderSession:
    """A causal LM ONNX model with past_key_values inputs, run here (fidelity and export checks; never timed)."""

    def __init__(self, path: Path, threads: int = 0) -> None:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        self.inputs = {i.name: i for i in self.session.get_inputs()}
        self.past = [n for n in self.inputs if n.startswith("past_key_values")]
        self.presents = ["present" + n[len("past_key_values"):] for n in self.past]
        shape = self.inputs[self.past[0]].shape if self.past else []
        self.kv_heads, self.head_dim = (int(shape[1]), int(shape[3])) if self.past else (0, 0)
        self.kv_dtype = np.float16 if self.past and "float16" in self.inputs[self.past[0]].type else np.float32

    def feed(self, ids: np.ndarray, cache: dict[str, np.ndarray] | None, past_len: int) -> Batch:
        b, t = ids.shape
        feed: Batch = {"input_ids": ids.astype(np.int64)}
        if "attention_mask" in self.inputs:
            feed["attention_mask"] = np.ones((b, past_len + t), dtype=np.int64)
        if "position_ids" in self.inputs:
            feed["position_ids"] = np.broadcast_to(np.arange(past_len, past_len + t, dtype=np.int64), (b, t)).copy()
        for name in self.past:
            feed[name] = cache[name] if cache is not None else np.zeros((b, self.kv_heads, 0, self.head_dim),
                                                                        dtype=self.kv_dtype)
        return feed

    def __call__(self, ids: np.ndarray, cache: dict[str, np.ndarray] | None = None,
                 past_len: int = 0) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """(logits (b, t, vocab) float32, the new cache)."""
        out = self.session.run(["logits", *self.presents], self.feed(ids, cache, past_len))
        return out[0].astype(np.float32), dict(zip(self.past, out[1:], strict=True))


def _log_softmax_nll(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Per-position next-token NLL (float64) of `targets` under `logits` (t, vocab)."""
    z = logits.astype(np.float64)
    z = z - z.max(axis=-1, keepdims=True)
    lse = np.log(np.exp(z).sum(axis=-1))
    return np.asarray(lse - z[np.arange(len(targets)), targets])


def decoder_eval_texts(texts: TextSet) -> TextSet:
    """The built-in evaluation sentences are short; a decoder is judged on the built-in held-out passages."""
    return builtin_texts("passages_evaluation") if texts.source == "builtin:evaluation" else texts


def decoder_calibration_texts(texts: TextSet) -> TextSet:
    return builtin_texts("passages_calibration") if texts.source == "builtin:calibration" else texts


@register_task(DECODER_SPEC, units="tokens", budget_section="decoder", workload=DECODER,
               aligns_to_weight_block=True, default_package=False)
class DecoderTask:
    """Causal LMs: perplexity and next-token top-1 agreement on the evaluation text, judged against PyTorch FP32.

    The text's tokens (texts joined by blank lines, at most `max_tokens`) are cut into windows of `window` tokens;
    each window runs as one prefill with an empty KV cache. The export check also decodes a few tokens through the
    KV cache and compares them with the same positions of the full-window run.
    """

    max_tokens = 4096
    window = 512
    atol = 1e-3  # logits; optimum's own 1e-5 check warns spuriously on 30-layer models

    def __init__(self, info: ModelInfo, inputs: TaskInputs) -> None:
        import json

        from edgecompress.llm import decoder_shape, source_note

        self.info = info
        self.inputs = inputs
        self.warnings: list[str] = []
        self.tokenizer = export.load_tokenizer(inputs.export_dir)
        config = json.loads((inputs.export_dir / "config.json").read_text(encoding="utf-8"))
        self.shape = decoder_shape(config)
        self.window = min(self.window, self.shape.max_positions or self.window)
        self.eval_texts = decoder_eval_texts(inputs.eval_texts)
        self.calibration_texts = decoder_calibration_texts(inputs.calibration_texts)
        self.tokens = self._tokens(self.eval_texts.texts, self.max_tokens)
        if len(self.tokens) < 2:
            from edgecompress.errors import DataError

            raise DataError(f"the evaluation text ({self.eval_texts.source}) has fewer than 2 tokens",
                            hint="give a longer --eval file")
        if (note := source_note(inputs.model_dir)) is not None:
            self.warnings.append(f"{note['gguf_file']}: {note['note']}")
        self._ref_argmax: np.ndarray | None = None
        self._ref_nll: np.ndarray | None = None

    def _tokens(self, texts: tuple[str, ...], limit: int) -> np.ndarray:
        ids = self.tokenizer("\n\n".join(texts), add_special_tokens=False)["input_ids"]
        return np.asarray(ids[:limit], dtype=np.int64)

    def _windows(self) -> list[np.ndarray]:
        w = self.window
        return [self.tokens[i:i + w] for i in range(0, len(self.tokens) - 1, w) if len(self.tokens[i:i + w]) > 1]

    def check_export(self, onnx_path: Path, progress: Progress) -> export.ExportCheck:
        """PyTorch FP32 logits on every window (the reference), the export's on the first, and a KV-cache decode."""
        windows = self._windows()
        with progress.step("check export and compute the PyTorch reference", total=len(windows)) as step:
            torch_model = export.DecoderReference(self.inputs.model_dir)
            sess = DecoderSession(onnx_path)
            argmax, nll = [], []
            worst = 0.0
            for i, win in enumerate(windows):
                ref = torch_model(win[None, :])[0]
                argmax.append(ref[:-1].argmax(-1).astype(np.int32))
                nll.append(_log_softmax_nll(ref[:-1], win[1:]))
                if i == 0:
                    got, _ = sess(win[None, :])
                    worst = float(np.max(np.abs(got[0] - ref)))
                    worst = max(worst, self._kv_check(sess, win, ref))
                step.advance(1)
        self._ref_argmax, self._ref_nll = np.concatenate(argmax), np.concatenate(nll)
        check = export.ExportCheck(worst, self.atol, worst <= self.atol, 1, len(windows[0]), "logits",
                                   reference="PyTorch FP32 (transformers), prefill and KV-cache decode")
        if not check.passed:
            raise export.ExportError(f"the ONNX export's logits differ from PyTorch by {worst:.3g} (> {self.atol:g})",
                                     hint="try another --opset, or report the model architecture")
        return check

    @staticmethod
    def _kv_check(sess: DecoderSession, win: np.ndarray, ref: np.ndarray, steps: int = 4) -> float:
        """Prefill all but the last `steps` tokens, then feed those one at a time through the cache."""
        split = max(1, len(win) - steps)
        _, cache = sess(win[None, :split])
        worst = 0.0
        for pos in range(split, len(win)):
            logits, cache = sess(win[None, pos:pos + 1], cache, past_len=pos)
            worst = max(worst, float(np.max(np.abs(logits[0, -1] - ref[pos]))))
        return worst

    def reference_id(self) -> dict[str, Any]:
        return {"task": self.info.task, "eval": hash_texts(self.eval_texts.texts), "max_tokens": self.max_tokens,
                "window": self.window}

    def save_reference(self, directory: Path) -> None:
        assert self._ref_argmax is not None and self._ref_nll is not None
        np.savez(directory / "reference.npz", argmax=self._ref_argmax, nll=self._ref_nll)

    def load_reference(self, directory: Path) -> None:
        with np.load(directory / "reference.npz") as ref:
            self._ref_argmax, self._ref_nll = ref["argmax"], ref["nll"]

    def calibration_id(self) -> str:
        return digest({"texts": hash_texts(self.calibration_texts.texts), "decoder_windows": 128, "n": 16})

    def calibration_batches(self) -> Iterator[Batch]:
        """Windows of 128 calibration tokens as full model feeds (empty KV cache), at most 16."""
        tokens = self._tokens(self.calibration_texts.texts, 128 * 16)
        sess = DecoderSession(self.inputs.export_dir / "model.onnx")
        for i in range(0, len(tokens) - 127, 128):
            yield sess.feed(tokens[None, i:i + 128], None, 0)

    def fidelity(self, model_path: Path, progress: Progress) -> Fidelity:
        assert self._ref_argmax is not None and self._ref_nll is not None, "check_export computes the reference"
        windows = self._windows()
        with progress.step("fidelity: perplexity and next-token agreement", total=len(windows)) as step:
            sess = DecoderSession(model_path)
            argmax, nll = [], []
            for win in windows:
                logits, _ = sess(win[None, :])
                argmax.append(logits[0, :-1].argmax(-1))
                nll.append(_log_softmax_nll(logits[0, :-1], win[1:]))
                step.advance(1)
        got_nll, got_argmax = np.concatenate(nll), np.concatenate(argmax)
        ppl, ref_ppl = float(np.exp(got_nll.mean())), float(np.exp(self._ref_nll.mean()))
        metrics = {"perplexity_ratio": ppl / ref_ppl, "perplexity": ppl,
                   "next_token_top1": float((got_argmax == self._ref_argmax).mean())}
        return Fidelity(task=self.info.task, metrics=metrics, texts=len(got_nll),
                        text_source=self.eval_texts.source, reference="PyTorch FP32",
                        notes=[f"{len(got_nll)} predicted tokens in {len(windows)} windows of up to {self.window}; "
                               f"reference perplexity {ref_ppl:.4f}"])

    def profile_dims(self, target: Target) -> dict[str, int]:
        """The prompt prefilled with an empty cache, then new_tokens decoded one at a time (float32 KV cache)."""
        return decoder_dims(target, self.shape.kv_bytes_per_token(4))

    @classmethod
    def check_target(cls, info: ModelInfo, target: Target) -> None:
        """Before any work: the context must fit the model's maximum, the prompt and new tokens the context."""
        from edgecompress.errors import ConfigError

        wl = target.workload
        if info.max_positions and wl.context_length > info.max_positions:
            raise ConfigError(f"target {target.name}: context_length {wl.context_length} exceeds the model's maximum "
                              f"of {info.max_positions} positions",
                              hint="lower [workload] context_length in the target file")
        if wl.prompt_length + wl.new_tokens > wl.context_length:
            raise ConfigError(f"target {target.name}: prompt_length + new_tokens ({wl.prompt_length} + "
                              f"{wl.new_tokens}) exceed context_length {wl.context_length}",
                              hint="fix [workload] in the target file")
