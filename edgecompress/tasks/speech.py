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


@register_task(SPEECH_TASK, units="clips", data=audio_data)
class SpeechRecognitionTask:
    def __new__(cls, info: ModelInfo, inputs: TaskInputs) -> Any:
        from edgecompress.speech import make_speech_task

        return make_speech_task(info, inputs)
