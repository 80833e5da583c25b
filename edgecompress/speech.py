"""Speech recognition task adapters: CTC models (wav2vec2-class, one model.onnx) and Whisper (encoder + decoder +
decoder with past, three files).

Both turn clips (audio.py) into features with the model's own feature extractor (saved in the bundle), decode
greedily, and are judged on transcripts: the word error rate of the compressed model's transcripts against FP32's
(`wer`, the primary metric), against reference transcripts where the data gives them (`wer_reference`), and the
share of decoding steps whose arg-max token matches FP32's (`token_top1`: CTC frames, or Whisper steps teacher-
forced along FP32's transcript), which moves before a word does.

Whisper's recipe is applied per component (pipeline.py asks `components`); each component gets its own calibration
feeds (encoder: log-mel features; decoder: the prompt on FP32's encoder states; decoder with past: one cached step
per clip, captured while FP32 decodes). A clip's latency is composed from the measured components: one encoder run,
one decoder run over the prompt, and one decoder-with-past step per further token (`decode_steps`).

Layering: a task adapter like tasks.py's (export, calibration, evaluate, audio); moves to tasks/speech.py once the
adapter package lands.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from edgecompress import audio, export
from edgecompress.audio import AudioSet
from edgecompress.budget import Figure
from edgecompress.cache import digest
from edgecompress.errors import DataError
from edgecompress.evaluate import Fidelity
from edgecompress.passes.base import Batch, ModelInfo
from edgecompress.progress import Progress
from edgecompress.targets import Target

WHISPER_COMPONENTS = ("encoder_model", "decoder_model", "decoder_with_past_model")
# English speech runs at about 2.5-3 words/s, ~1.3 BPE tokens per word: ~4 tokens per second of audio. Used only to
# turn the target's audio_seconds into a number of decoder steps for a clip's latency.
TOKENS_PER_SECOND = 4.0
CALIBRATION_WINDOW_S = 2.0
MAX_NEW_TOKENS = 48  # per clip at evaluation (greedy; stops earlier at end-of-text)
EXAMPLES = 4  # transcripts shown in the report


def word_error_rate(references: list[str], hypotheses: list[str], chars: bool = False) -> float:
    """Corpus WER (CER with `chars`): (substitutions + deletions + insertions) / reference words (characters), by
    jiwer. Clips whose reference is empty count their hypothesis' words as insertions; with no reference word at all,
    0 if nothing was inserted, else 1."""
    import jiwer

    def n(t: str) -> int:
        return len(t) if chars else len(t.split())

    pairs = [(" ".join(r.split()), " ".join(h.split())) for r, h in zip(references, hypotheses, strict=True)]
    inserted = sum(n(h) for r, h in pairs if not r)
    kept = [(r, h) for r, h in pairs if r]
    total = sum(n(r) for r, _ in kept)
    if not total:
        return 0.0 if inserted == 0 else 1.0
    refs, hyps = [r for r, _ in kept], [h for _, h in kept]
    out = jiwer.process_characters(refs, hyps) if chars else jiwer.process_words(refs, hyps)
    return float(out.substitutions + out.deletions + out.insertions + inserted) / total


def _features(extractor: Any, clip: np.ndarray) -> dict[str, np.ndarray]:
    out = extractor(clip, sampling_rate=audio.SAMPLE_RATE, return_tensors="np")
    return {k: np.asarray(v) for k, v in out.items()}


def _load_preprocessor(export_dir: Path) -> Any:
    from transformers import AutoFeatureExtractor

    try:
        with export.quiet_libraries():
            return AutoFeatureExtractor.from_pretrained(str(export_dir), local_files_only=True)
    except Exception as e:
        from edgecompress.errors import ModelError

        raise ModelError(f"cannot load the feature extractor from {export_dir}: {str(e).splitlines()[0]}",
                         hint="save the processor (preprocessor_config.json) beside the model") from e


def _session(path: Path) -> Any:
    import onnxruntime as ort

    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


class _SpeechBase:
    """What CTC and Whisper share: the clips, the reference transcripts, the metrics."""

    components: tuple[str, ...] = ("model",)

    def __init__(self, info: ModelInfo, inputs: Any) -> None:
        """inputs: the pipeline's TaskInputs (model_dir, export_dir; eval_texts/calibration_texts are AudioSets)."""
        self.info = info
        self.model_dir: Path = inputs.model_dir
        self.export_dir: Path = inputs.export_dir
        self.eval_set: AudioSet = inputs.eval_texts
        self.calibration_set: AudioSet = inputs.calibration_texts
        self.warnings: list[str] = []
        self.extractor = _load_preprocessor(self.export_dir)
        self.tokenizer = export.load_tokenizer(self.export_dir)
        self._ref_texts: list[str] | None = None
        self._ref_tokens: list[np.ndarray] | None = None

    def _clips(self, s: AudioSet) -> list[np.ndarray]:
        return [audio.read_clip(f) for f in s.files]

    def _calibration_windows(self) -> list[np.ndarray]:
        """The calibration clips cut into CALIBRATION_WINDOW_S windows, one second apart: one shape for every
        sample, and enough samples (the static calibrators want at least 8) from a handful of short clips."""
        win = int(CALIBRATION_WINDOW_S * audio.SAMPLE_RATE)
        out = []
        for clip in self._clips(self.calibration_set):
            padded = np.pad(clip, (0, max(0, win - len(clip))))
            out += [padded[i:i + win] for i in range(0, len(padded) - win + 1, audio.SAMPLE_RATE)]
        return out

    # cache of the reference
    def reference_id(self) -> dict[str, Any]:
        return {"task": self.info.task, "kind": type(self).__name__, "eval": self.eval_set.digest(),
                "max_new_tokens": MAX_NEW_TOKENS}

    def save_reference(self, directory: Path) -> None:
        assert self._ref_texts is not None and self._ref_tokens is not None
        (directory / "transcripts.json").write_text(json.dumps(self._ref_texts), encoding="utf-8")
        np.savez(directory / "tokens.npz", *self._ref_tokens)

    def load_reference(self, directory: Path) -> None:
        self._ref_texts = json.loads((directory / "transcripts.json").read_text(encoding="utf-8"))
        with np.load(directory / "tokens.npz") as z:
            self._ref_tokens = [z[f"arr_{i}"] for i in range(len(z.files))]

    def calibration_id(self) -> str:
        return digest({"audio": self.calibration_set.digest(), "kind": type(self).__name__})

    def _fidelity(self, texts: list[str], agree: float, steps: int, reference: str) -> Fidelity:
        assert self._ref_texts is not None
        metrics = {"wer": word_error_rate(self._ref_texts, texts),
                   "cer": word_error_rate(self._ref_texts, texts, chars=True), "token_top1": agree}
        notes = [f"greedy decoding; {steps} decoding steps compared for token_top1"]
        labels = self.eval_set.labels
        if self.eval_set.has_references:
            idx = [i for i, label in enumerate(labels) if label is not None]
            refs = [_normalise(labels[i] or "") for i in idx]
            metrics["wer_reference"] = word_error_rate(refs, [_normalise(texts[i]) for i in idx])
            fp32 = word_error_rate(refs, [_normalise(self._ref_texts[i]) for i in idx])
            notes.append(f"FP32's WER against the {len(idx)} reference transcripts: {fp32:.4f} (lower case, "
                         "punctuation dropped)")
        examples = [{"clip": self.eval_set.files[i].name, "fp32": self._ref_texts[i][:200],
                     "compressed": texts[i][:200], **({"reference": labels[i]} if labels[i] else {})}
                    for i in range(min(EXAMPLES, len(texts)))]
        return Fidelity(task=self.info.task, metrics=metrics, texts=len(texts), text_source=self.eval_set.source,
                        reference=reference, notes=notes,
                        per_text={"metric": "transcript", "examples": examples,
                                  "identical": sum(a == b for a, b in zip(self._ref_texts, texts, strict=True))})


def _normalise(text: str) -> str:
    keep = "".join(c.lower() if c.isalnum() or c in "' " else " " for c in text)
    return " ".join(keep.split())


# --- CTC (wav2vec2, HuBERT, ...) -------------------------------------------------------------------------------
class CTCTask(_SpeechBase):
    """One model.onnx: input_values -> logits per frame; greedy CTC decode (arg-max, merge repeats, drop blank)."""

    def _feed(self, clip: np.ndarray) -> Batch:
        f = _features(self.extractor, clip)
        return {"input_values": f["input_values"].astype(np.float32)}

    def _decode(self, logits: np.ndarray) -> tuple[str, np.ndarray]:
        ids = logits.argmax(-1)
        # decode() merges repeats and drops the blank (<pad>); the other special tokens are not words
        return self.tokenizer.decode(ids.tolist(), skip_special_tokens=True), ids.astype(np.int32)

    def check_export(self, onnx_path: Path, progress: Progress) -> export.ExportCheck:
        clips = self._clips(self.eval_set)
        with progress.step("check export and compute the PyTorch reference", total=len(clips)) as step:
            torch_model = export.SpeechReference(self.model_dir)
            sess = _session(onnx_path)
            worst, texts, tokens = 0.0, [], []
            for clip in clips:
                feed = self._feed(clip)
                ref = torch_model.ctc_logits(feed["input_values"])[0]
                got = sess.run(["logits"], feed)[0][0]
                worst = max(worst, float(np.max(np.abs(got - ref))))
                text, ids = self._decode(ref)
                texts.append(text)
                tokens.append(ids)
                step.advance(1)
        self._ref_texts, self._ref_tokens = texts, tokens
        return _checked(worst, len(clips), "logits", "PyTorch FP32 (transformers)")

    def calibration_batches(self) -> Iterator[Batch]:
        for window in self._calibration_windows():
            yield self._feed(window)

    def component_calibration(self, component: str) -> Iterator[Batch]:
        return self.calibration_batches()

    def sample_feed(self) -> Batch:
        """The ORT Mobile check's feed (mobile.py): the first calibration clip (a few token ids would not do: the
        feature encoder's convolutions need hundreds of samples)."""
        return self._feed(self._calibration_windows()[0])

    def fidelity(self, model_path: Path, progress: Progress) -> Fidelity:
        assert self._ref_tokens is not None
        clips = self._clips(self.eval_set)
        with progress.step("fidelity: transcripts of the evaluation clips", total=len(clips)) as step:
            sess = _session(model_path)
            texts, same, total = [], 0, 0
            for clip, ref in zip(clips, self._ref_tokens, strict=True):
                text, ids = self._decode(sess.run(["logits"], self._feed(clip))[0][0])
                texts.append(text)
                same += int((ids == ref).sum())
                total += len(ref)
                step.advance(1)
        return self._fidelity(texts, same / max(1, total), total, "PyTorch FP32 (greedy CTC transcripts)")

    def profile_dims(self, target: Target) -> dict[str, int]:
        return {"batch_size": target.workload.batch,
                "sequence_length": round(target.workload.audio_seconds * audio.SAMPLE_RATE)}


# --- Whisper (encoder-decoder with past) -----------------------------------------------------------------------
class WhisperTask(_SpeechBase):
    """encoder_model.onnx (log-mel features, always 30 s) + decoder_model.onnx (the prompt) + decoder_with_past
    _model.onnx (one token a step through the KV cache): the layout ORTModelForSpeechSeq2Seq loads."""

    components = WHISPER_COMPONENTS

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        config = json.loads((self.export_dir / "config.json").read_text(encoding="utf-8"))
        gen_path = self.export_dir / "generation_config.json"
        gen = json.loads(gen_path.read_text(encoding="utf-8")) if gen_path.is_file() else {}
        self.prompt = _whisper_prompt(config, gen, self.tokenizer)
        eos = gen.get("eos_token_id", config.get("eos_token_id"))
        self.eos = set(eos if isinstance(eos, list) else [eos]) - {None}
        self.suppress = [int(t) for t in (gen.get("suppress_tokens") or config.get("suppress_tokens") or [])]
        self.begin_suppress = [int(t) for t in (gen.get("begin_suppress_tokens")
                                                 or config.get("begin_suppress_tokens") or [])]
        self.max_new = max(1, min(MAX_NEW_TOKENS, int(config.get("max_target_positions", 448)) - len(self.prompt)))
        self.encoder_positions = 2 * int(config.get("max_source_positions", 1500))  # mel frames (conv stride 2)
        self.source_positions = int(config.get("max_source_positions", 1500))

    # decoding ---------------------------------------------------------------------------------------------
    def _sessions(self, directory: Path) -> tuple[Any, Any, Any]:
        enc, dec, past = (_session(directory / f"{c}.onnx") for c in WHISPER_COMPONENTS)
        return enc, dec, past

    def _encode(self, enc: Any, clip: np.ndarray) -> tuple[Batch, np.ndarray]:
        feed = {"input_features": _features(self.extractor, clip)["input_features"].astype(np.float32)}
        return feed, enc.run(["last_hidden_state"], feed)[0]

    @staticmethod
    def _step_feed(sess: Any, ids: np.ndarray, cache: dict[str, np.ndarray], hidden: np.ndarray | None,
                   past_len: int) -> Batch:
        feed: Batch = {}
        for i in sess.get_inputs():
            if i.name == "input_ids":
                feed[i.name] = ids.astype(np.int64)
            elif i.name == "encoder_hidden_states":
                assert hidden is not None
                feed[i.name] = hidden
            elif i.name == "cache_position":
                feed[i.name] = np.arange(past_len, past_len + ids.shape[1], dtype=np.int64)
            elif i.name.startswith("past_key_values"):
                feed[i.name] = cache["present" + i.name[len("past_key_values"):]]
            else:
                raise DataError(f"the Whisper decoder has an input '{i.name}' edgecompress does not know how to feed",
                                hint="report the model and optimum version")
        return feed

    @staticmethod
    def _run(sess: Any, feed: Batch, cache: dict[str, np.ndarray]) -> np.ndarray:
        names = [o.name for o in sess.get_outputs()]
        out = dict(zip(names, sess.run(None, feed), strict=True))
        cache.update({k: v for k, v in out.items() if k.startswith("present")})  # encoder keys kept from step 1
        return np.asarray(out["logits"][0, -1], dtype=np.float32)

    def _mask(self, logits: np.ndarray, first: bool) -> np.ndarray:
        z = logits.copy()
        if self.suppress:
            z[[t for t in self.suppress if 0 <= t < len(z)]] = -np.inf
        if first and self.begin_suppress:
            z[[t for t in self.begin_suppress if 0 <= t < len(z)]] = -np.inf
        return z

    def _greedy(self, sessions: tuple[Any, Any, Any], clip: np.ndarray, forced: np.ndarray | None = None,
                capture: list[Batch] | None = None, max_steps: int | None = None) -> tuple[list[int], list[int]]:
        """Greedy tokens (prompt excluded) and, where `forced` is given, each step's arg-max while the tokens fed are
        `forced` (teacher forcing along FP32's path). `capture` gets the decoder-with-past feeds (calibration)."""
        enc, dec, dec_past = sessions
        _, hidden = self._encode(enc, clip)
        cache: dict[str, np.ndarray] = {}
        ids = np.asarray([self.prompt], dtype=np.int64)
        logits = self._run(dec, self._step_feed(dec, ids, cache, hidden, 0), cache)
        tokens: list[int] = []
        argmax: list[int] = []
        past = len(self.prompt)
        steps = len(forced) if forced is not None else (max_steps or self.max_new)
        for step in range(steps):
            best = int(np.argmax(self._mask(logits, step == 0)))
            argmax.append(best)
            nxt = int(forced[step]) if forced is not None else best
            tokens.append(nxt)
            if forced is None and capture is None and nxt in self.eos:
                break
            if step == steps - 1:
                break
            feed = self._step_feed(dec_past, np.asarray([[nxt]], dtype=np.int64), cache, hidden, past)
            if capture is not None and step == 0:
                capture.append({k: v.copy() for k, v in feed.items()})
            logits = self._run(dec_past, feed, cache)
            past += 1
        return tokens, argmax

    def _text(self, tokens: list[int]) -> str:
        return str(self.tokenizer.decode(tokens, skip_special_tokens=True)).strip()

    # the adapter --------------------------------------------------------------------------------------------
    def check_export(self, onnx_path: Path, progress: Progress) -> export.ExportCheck:
        """The encoder's states and the first decoder step's logits against PyTorch; FP32's greedy transcripts
        (through the exported decoder with past) are the reference."""
        directory = onnx_path.parent
        clips = self._clips(self.eval_set)
        with progress.step("check export and compute the FP32 transcripts", total=len(clips)) as step:
            torch_model = export.SpeechReference(self.model_dir)
            sessions = self._sessions(directory)
            worst, texts, tokens = 0.0, [], []
            for i, clip in enumerate(clips):
                if i < 2:
                    feed, hidden = self._encode(sessions[0], clip)
                    ref_hidden, ref_logits = torch_model.whisper_first_step(feed["input_features"], self.prompt)
                    cache: dict[str, np.ndarray] = {}
                    ids = np.asarray([self.prompt], dtype=np.int64)
                    got = self._run(sessions[1], self._step_feed(sessions[1], ids, cache, hidden, 0), cache)
                    worst = max(worst, float(np.max(np.abs(hidden - ref_hidden))),
                                float(np.max(np.abs(got - ref_logits))))
                toks, _ = self._greedy(sessions, clip)
                texts.append(self._text(toks))
                tokens.append(np.asarray(toks, dtype=np.int64))
                step.advance(1)
        self._ref_texts, self._ref_tokens = texts, tokens
        return _checked(worst, min(2, len(clips)), "last_hidden_state, logits",
                        "PyTorch FP32 (transformers): encoder states and the first decoder step")

    def calibration_batches(self) -> Iterator[Batch]:
        return self.component_calibration(WHISPER_COMPONENTS[0])

    def component_calibration(self, component: str) -> Iterator[Batch]:
        """Feeds for one component from the calibration clips, the decoders' from FP32 runs of the export."""
        sessions = self._sessions(self.export_dir)
        for clip in self._calibration_windows():
            feed, hidden = self._encode(sessions[0], clip)
            if component == "encoder_model":
                yield feed
            elif component == "decoder_model":
                yield self._step_feed(sessions[1], np.asarray([self.prompt], dtype=np.int64), {}, hidden, 0)
            else:
                captured: list[Batch] = []
                self._greedy(sessions, clip, capture=captured, max_steps=2)
                yield from captured

    def fidelity(self, model_path: Path, progress: Progress) -> Fidelity:
        assert self._ref_tokens is not None
        clips = self._clips(self.eval_set)
        with progress.step("fidelity: transcripts of the evaluation clips", total=len(clips)) as step:
            sessions = self._sessions(model_path.parent)
            texts, same, total = [], 0, 0
            for clip, ref in zip(clips, self._ref_tokens, strict=True):
                toks, _ = self._greedy(sessions, clip)
                texts.append(self._text(toks))
                if len(ref):
                    _, argmax = self._greedy(sessions, clip, forced=ref)
                    same += int((np.asarray(argmax) == ref).sum())
                    total += len(ref)
                step.advance(1)
        return self._fidelity(texts, same / max(1, total), total,
                              "the FP32 ONNX export's greedy transcripts (checked against PyTorch)")

    def decode_steps(self, target: Target) -> int:
        return max(1, math.ceil(target.workload.audio_seconds * TOKENS_PER_SECOND))

    def component_dims(self, component: str, target: Target) -> dict[str, int]:
        b = target.workload.batch
        if component == "encoder_model":
            return {"batch_size": b}
        common = {"batch_size": b, "encoder_sequence_length": self.source_positions}
        if component == "decoder_model":
            return {**common, "decoder_sequence_length": len(self.prompt)}
        # the average step of a clip: half its tokens already in the cache
        return {**common, "decoder_sequence_length": 1,
                "past_decoder_sequence_length": len(self.prompt) + self.decode_steps(target) // 2}

    def profile_dims(self, target: Target) -> dict[str, int]:
        return self.component_dims(WHISPER_COMPONENTS[0], target)


def _whisper_prompt(config: dict[str, Any], gen: dict[str, Any], tokenizer: Any) -> list[int]:
    """<|startoftranscript|> [<|en|>] <|transcribe|> <|notimestamps|>: from generation_config where it says, else
    the tokenizer's special tokens (a model without them decodes from the start token alone)."""
    start = gen.get("decoder_start_token_id", config.get("decoder_start_token_id"))
    if start is None:
        from edgecompress.errors import ModelError

        raise ModelError("the Whisper model's config has no decoder_start_token_id",
                         hint="save its generation_config.json beside the model")
    prompt = [int(start)]
    forced = gen.get("forced_decoder_ids") or config.get("forced_decoder_ids")
    if forced:
        return prompt + [int(t) for _, t in sorted(forced) if t is not None]
    if gen.get("is_multilingual") and "<|en|>" in (gen.get("lang_to_id") or {}):
        prompt.append(int(gen["lang_to_id"]["<|en|>"]))
    if "transcribe" in (gen.get("task_to_id") or {}):
        prompt.append(int(gen["task_to_id"]["transcribe"]))
    if gen.get("no_timestamps_token_id") is not None:
        return [*prompt, int(gen["no_timestamps_token_id"])]
    if len(prompt) == 1:
        unk = tokenizer.unk_token_id
        for tok in ("<|en|>", "<|transcribe|>", "<|notimestamps|>"):
            tid = tokenizer.convert_tokens_to_ids(tok)
            if tid is not None and tid != unk:
                prompt.append(int(tid))
    return prompt


def _checked(worst: float, n: int, output: str, reference: str, atol: float = 1e-3) -> export.ExportCheck:
    check = export.ExportCheck(worst, atol, worst <= atol, n, n, output, reference=reference)
    if not check.passed:
        raise export.ExportError(f"the ONNX export differs from PyTorch by {worst:.3g} (> {atol:g})",
                                 hint="try another --opset, or report the model architecture")
    return check


def make_speech_task(info: ModelInfo, inputs: Any) -> CTCTask | WhisperTask:
    cls = WhisperTask if info.model_type in export.SEQ2SEQ_SPEECH else CTCTask
    return cls(info, inputs)


def compose_clip(parts: dict[str, tuple[dict[str, Any], dict[str, Figure]]], steps: int
                 ) -> tuple[dict[str, Any], dict[str, Figure]]:
    """One clip's figures from the components' profiles: encoder + decoder (prompt) + `steps` - 1 cached steps.

    Sizes and load times add up (every file ships and loads); peak RAM adds the components' peaks, an upper bound
    (the three sessions are resident together in ORTModelForSpeechSeq2Seq). Each figure keeps its components'
    source (measured or estimated)."""
    weights = {"encoder_model": 1, "decoder_model": 1, "decoder_with_past_model": max(0, steps - 1)}
    figures: dict[str, Figure] = {}
    for name in ("size", "peak_ram", "load_time", "latency_p90"):
        got = [(c, parts[c][1][name]) for c in WHISPER_COMPONENTS if name in parts[c][1]]
        if len(got) != len(WHISPER_COMPONENTS):
            continue
        w = weights if name == "latency_p90" else dict.fromkeys(WHISPER_COMPONENTS, 1)
        value = sum(w[c] * f.value for c, f in got)
        sources = sorted({f.source for _, f in got})
        how = (f"one clip: encoder + decoder over the prompt + {steps - 1} cached decoder steps"
               if name == "latency_p90" else "sum over encoder, decoder, decoder with past")
        figures[name] = Figure(value, got[0][1].unit, " + ".join(sources), how)
    profile: dict[str, Any] = {
        "workload": {"decode_steps": steps, **{f"{c}": p[0]["workload"] for c, p in parts.items()}},
        "components": {c: p[0] for c, p in parts.items()},
    }
    est = {k: sum(weights[c] * parts[c][0]["estimate"][k] if k == "latency_ms" else parts[c][0]["estimate"][k]
                  for c in WHISPER_COMPONENTS) for k in ("latency_ms", "peak_ram_mb")}
    profile["estimate"] = {"source": "estimated", "method": "sum of the components' roofline estimates", **est}
    return profile, figures
