"""automatic-speech-recognition: CTC models (wav2vec2) and Whisper (encoder + decoder + decoder with past).

The adapters live in edgecompress/speech.py (CTCTask, WhisperTask); this registers the task with its facts. One
adapter per task name: the model type picks the class (Whisper is an encoder-decoder, the rest CTC).
"""

from __future__ import annotations

from typing import Any

from edgecompress.audio import audio_data
from edgecompress.passes.base import ModelInfo
from edgecompress.tasknames import SPEECH_TASK
from edgecompress.tasks.base import TaskInputs, register_task
from edgecompress.taskspec import Metric, TaskSpec

# greedy transcripts of the evaluation clips (speech.py)
WER = Metric("wer", False, "", "word error rate of the transcripts against the FP32 model's transcripts", 0.0)
CER = Metric("cer", False, "", "character error rate against the FP32 model's transcripts (finer than WER on short "
             "or odd text)", 0.0)
WER_REFERENCE = Metric("wer_reference", False, "", "word error rate against the reference transcripts given with "
                       "the clips", 0.0)
TOKEN_TOP1 = Metric("token_top1", True, "", "share of decoding steps (CTC frames; Whisper steps along FP32's "
                    "transcript) whose arg-max token matches FP32's", 0.0, 1.0)
# CTC logits are the judged output; Whisper's components are judged by its adapter (speech.py). Whisper's reference
# is speech.py's own (export.SpeechReference): torch_class stays the default, as TorchReference has always read it.
SPEECH_SPEC = TaskSpec(SPEECH_TASK, (WER, CER, WER_REFERENCE, TOKEN_TOP1),
                       architectures=("ForCTC", "WhisperForConditionalGeneration"), modality="audio",
                       preprocessor=True, tokenizer=True, seq2seq_with_past=True)


@register_task(SPEECH_SPEC, units="clips", data=audio_data)
class SpeechRecognitionTask:
    def __new__(cls, info: ModelInfo, inputs: TaskInputs) -> Any:
        from edgecompress.speech import make_speech_task

        return make_speech_task(info, inputs)
