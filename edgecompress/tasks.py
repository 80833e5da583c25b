"""Task adapters: what differs between model families, behind one interface the pipeline drives.

An adapter knows how to turn texts into model inputs, what the reference outputs are, which fidelity metrics
apply, and what workload the profiler should feed. Encoders (feature extraction, classification) are one case;
decoders slot in as another adapter without the pipeline growing branches.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from edgecompress import export
from edgecompress.cache import digest, hash_texts
from edgecompress.calibration import TextSet, builtin_texts, count_truncated, tokenize_batches
from edgecompress.evaluate import Fidelity, OnnxRunner, compare, per_text_summary, pooled_outputs
from edgecompress.passes.base import Batch, ModelInfo
from edgecompress.progress import Progress
from edgecompress.targets import Target
from edgecompress.tasknames import SPEECH_TASK


class TaskAdapter(Protocol):
    info: ModelInfo
    warnings: list[str]

    def check_export(self, onnx_path: Path, progress: Progress) -> export.ExportCheck: ...

    # The reference outputs are cached between builds: what determines them, and how to store/restore them.
    def reference_id(self) -> dict[str, Any]: ...

    def save_reference(self, directory: Path) -> None: ...

    def load_reference(self, directory: Path) -> None: ...

    def calibration_batches(self) -> Iterator[Batch]: ...

    def calibration_id(self) -> str: ...

    def fidelity(self, model_path: Path, progress: Progress) -> Fidelity: ...

    def profile_dims(self, target: Target) -> dict[str, int]: ...


@dataclass
class TextInputs:
    """Everything an adapter needs from the pipeline."""

    model_dir: Path
    export_dir: Path
    input_names: list[str]
    eval_texts: TextSet
    calibration_texts: TextSet
    eval_batch_size: int = 32


class EncoderTask:
    """Feature extraction and classification: one forward pass per batch, judged against PyTorch FP32."""

    def __init__(self, info: ModelInfo, inputs: TextInputs) -> None:
        self.info = info
        self.inputs = inputs
        self.tokenizer = export.load_tokenizer(inputs.export_dir)
        self.max_len = min(info.max_positions or 512, 512)
        self.warnings: list[str] = []
        truncated = count_truncated(self.tokenizer, inputs.eval_texts.texts, self.max_len)
        if truncated:
            self.warnings.append(f"{truncated} evaluation texts are longer than {self.max_len} tokens and were "
                                 "truncated")
        # calibration batches are padded/truncated to one fixed length (calibration_batches)
        cal_len = min(128, self.max_len)
        truncated = count_truncated(self.tokenizer, inputs.calibration_texts.texts, cal_len)
        if truncated:
            self.warnings.append(f"{truncated} calibration texts are longer than {cal_len} tokens and were "
                                 "truncated to that length for calibration")
        self._reference: np.ndarray | None = None

    def _batches(self, texts: tuple[str, ...], batch_size: int, pad_to: int | None = None) -> Iterator[Batch]:
        return tokenize_batches(self.tokenizer, texts, self.inputs.input_names, batch_size=batch_size,
                                max_length=self.max_len, pad_to=pad_to)

    def _n_eval_batches(self) -> int:
        return -(-len(self.inputs.eval_texts.texts) // self.inputs.eval_batch_size)

    def check_export(self, onnx_path: Path, progress: Progress) -> export.ExportCheck:
        """Check the export against PyTorch and keep PyTorch's pooled outputs on the eval texts as reference."""
        with progress.step("check export and compute the PyTorch reference", total=self._n_eval_batches()) as step:
            torch_model = export.TorchReference(self.inputs.model_dir, self.info.task)
            check = export.check_export(torch_model, onnx_path,
                                        self._batches(self.inputs.eval_texts.texts[:8], batch_size=4))
            self._reference = pooled_outputs(_counting(torch_model, step.advance), self.info.task,
                                             self._batches(self.inputs.eval_texts.texts,
                                                           self.inputs.eval_batch_size))
        return check

    def reference_id(self) -> dict[str, Any]:
        return {"task": self.info.task, "eval": hash_texts(self.inputs.eval_texts.texts),
                "batch": self.inputs.eval_batch_size, "max_len": self.max_len}

    def save_reference(self, directory: Path) -> None:
        assert self._reference is not None
        np.save(directory / "reference.npy", self._reference)

    def load_reference(self, directory: Path) -> None:
        self._reference = np.load(directory / "reference.npy")

    def calibration_id(self) -> str:
        return digest({"texts": hash_texts(self.inputs.calibration_texts.texts), "batch": 8,
                       "pad_to": min(128, self.max_len)})

    def calibration_batches(self) -> Iterator[Batch]:
        # calibrators need one fixed length across batches
        return self._batches(self.inputs.calibration_texts.texts, batch_size=8, pad_to=min(128, self.max_len))

    def fidelity(self, model_path: Path, progress: Progress) -> Fidelity:
        assert self._reference is not None, "check_export computes the reference first"
        with progress.step("fidelity on held-out texts", total=self._n_eval_batches()) as step:
            runner = OnnxRunner(model_path, export.SUPPORTED_TASKS[self.info.task])
            pooled = pooled_outputs(_counting(runner, step.advance), self.info.task,
                                    self._batches(self.inputs.eval_texts.texts, self.inputs.eval_batch_size))
        return Fidelity(task=self.info.task, metrics=compare(self.info.task, self._reference, pooled),
                        texts=len(self.inputs.eval_texts.texts), text_source=self.inputs.eval_texts.source,
                        reference="PyTorch FP32", per_text=per_text_summary(self.info.task, self._reference, pooled,
                                                                           self.inputs.eval_texts.texts))

    def profile_dims(self, target: Target) -> dict[str, int]:
        return {"batch_size": target.workload.batch,
                "sequence_length": min(target.workload.sequence_length, self.max_len)}


def _counting(run: Callable[[Batch], Any], advance: Callable[[int], None]) -> Callable[[Batch], Any]:
    def wrapped(batch: Batch) -> Any:
        out = run(batch)
        advance(1)
        return out

    return wrapped


class OnnxFileTask:
    """An .onnx file given as is: judged against itself on seeded random inputs (no tokenizer, no PyTorch).

    Symbolic dims: the first is the batch, the others take the target's sequence length. Integer inputs that index
    a Gather get ids below that table's row count; other integer inputs get zeros and ones.
    """

    samples = 64
    batch = 8

    def __init__(self, info: ModelInfo, onnx_path: Path, seed: int = 0) -> None:
        import onnx

        self.info = info
        self.warnings: list[str] = []
        self.seed = seed
        model = onnx.load(str(onnx_path), load_external_data=False)
        self.output_name = model.graph.output[0].name
        inits = {i.name: i for i in model.graph.initializer}
        gather_rows = {n.input[1]: inits[n.input[0]].dims[0] for n in model.graph.node
                       if n.op_type == "Gather" and n.input[0] in inits and inits[n.input[0]].dims}
        self.inputs: list[tuple[str, int, list[str | int], int]] = []
        for inp in model.graph.input:
            if inp.name in inits:
                continue
            t = inp.type.tensor_type
            dims: list[str | int] = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?")
                                     for d in t.shape.dim]
            self.inputs.append((inp.name, t.elem_type, dims, int(gather_rows.get(inp.name, 2))))
        self._reference: np.ndarray | None = None
        self._onnx_path = onnx_path

    def _dims(self, batch: int, seq: int) -> dict[str, int]:
        out: dict[str, int] = {}
        for _, _, dims, _ in self.inputs:
            for i, d in enumerate(dims):
                if isinstance(d, str):
                    out.setdefault(d, batch if i == 0 else seq)
        return out

    def _batches(self, seed: int, seq: int = 16) -> Iterator[Batch]:
        import onnx

        rng = np.random.default_rng(seed)
        dims = self._dims(self.batch, seq)
        for _ in range(self.samples // self.batch):
            batch: Batch = {}
            for name, elem, shape, high in self.inputs:
                concrete = [d if isinstance(d, int) else dims[d] for d in shape]
                dtype = onnx.helper.tensor_dtype_to_np_dtype(elem)
                if np.issubdtype(dtype, np.integer):
                    batch[name] = rng.integers(0, high, size=concrete).astype(dtype)
                else:
                    batch[name] = rng.standard_normal(concrete).astype(dtype)
            yield batch

    def check_export(self, onnx_path: Path, progress: Progress) -> export.ExportCheck:
        with progress.step("reference outputs of the given ONNX model"):
            runner = OnnxRunner(onnx_path, self.output_name)
            self._reference = np.concatenate([_flat_unit(runner(b)) for b in self._batches(self.seed)])
        return export.ExportCheck(0.0, 0.0, True, self.samples // self.batch, self.samples, self.output_name,
                                  reference="the given ONNX model (no export)")

    def reference_id(self) -> dict[str, Any]:
        return {"task": self.info.task, "seed": self.seed, "samples": self.samples, "batch": self.batch}

    def save_reference(self, directory: Path) -> None:
        assert self._reference is not None
        np.save(directory / "reference.npy", self._reference)

    def load_reference(self, directory: Path) -> None:
        self._reference = np.load(directory / "reference.npy")

    def calibration_id(self) -> str:
        return digest({"random": self.seed + 1, "samples": self.samples, "batch": self.batch})

    def calibration_batches(self) -> Iterator[Batch]:
        return self._batches(self.seed + 1)

    def fidelity(self, model_path: Path, progress: Progress) -> Fidelity:
        assert self._reference is not None, "check_export computes the reference first"
        with progress.step("fidelity on seeded random inputs"):
            runner = OnnxRunner(model_path, self.output_name)
            got = np.concatenate([_flat_unit(runner(b)) for b in self._batches(self.seed)])
        return Fidelity(task=self.info.task, metrics=compare("feature-extraction", self._reference, got),
                        texts=self.samples, text_source=f"seeded random inputs (seed {self.seed})",
                        reference="the given ONNX model")

    def profile_dims(self, target: Target) -> dict[str, int]:
        return self._dims(target.workload.batch, target.workload.sequence_length)


def _flat_unit(out: np.ndarray) -> np.ndarray:
    flat = out.reshape(out.shape[0], -1).astype(np.float64)
    return flat / np.clip(np.linalg.norm(flat, axis=1, keepdims=True), 1e-12, None)


def make_task(info: ModelInfo, inputs: TextInputs) -> TaskAdapter:
    if info.task == SPEECH_TASK:  # eval/calibration are audio sets here (audio.py)
        from edgecompress.speech import make_speech_task

        return make_speech_task(info, inputs)
    if info.task == export.ONNX_TASK:
        return OnnxFileTask(info, inputs.export_dir / "model.onnx")
    if info.task in export.DECODER_TASKS:
        return DecoderTask(info, inputs)
    return EncoderTask(info, inputs)


# --- decoders (causal LMs exported with their KV cache) ------------------------------------------------------
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


class DecoderTask:
    """Causal LMs: perplexity and next-token top-1 agreement on the evaluation text, judged against PyTorch FP32.

    The text's tokens (texts joined by blank lines, at most `max_tokens`) are cut into windows of `window` tokens;
    each window runs as one prefill with an empty KV cache. The export check also decodes a few tokens through the
    KV cache and compares them with the same positions of the full-window run.
    """

    max_tokens = 4096
    window = 512
    atol = 1e-3  # logits; optimum's own 1e-5 check warns spuriously on 30-layer models

    def __init__(self, info: ModelInfo, inputs: TextInputs) -> None:
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
        wl = target.workload
        prompt = min(wl.prompt_length, wl.context_length)
        return {"batch_size": 1, "sequence_length": prompt, "past_sequence_length": 0,
                "past_sequence_length + sequence_length": prompt, "prompt_length": prompt,
                "new_tokens": wl.new_tokens, "context_length": wl.context_length,
                "kv_bytes_per_token": self.shape.kv_bytes_per_token(4)}


def validate_workload(info: ModelInfo, target: Target) -> None:
    """Before any work: a decoder's context must fit the model's maximum (no-op for other tasks)."""
    from edgecompress.errors import ConfigError

    if info.task not in export.DECODER_TASKS:
        return
    wl = target.workload
    if info.max_positions and wl.context_length > info.max_positions:
        raise ConfigError(f"target {target.name}: context_length {wl.context_length} exceeds the model's maximum "
                          f"of {info.max_positions} positions",
                          hint="lower [workload] context_length in the target file")
    if wl.prompt_length + wl.new_tokens > wl.context_length:
        raise ConfigError(f"target {target.name}: prompt_length + new_tokens ({wl.prompt_length} + "
                          f"{wl.new_tokens}) exceed context_length {wl.context_length}",
                          hint="fix [workload] in the target file")
