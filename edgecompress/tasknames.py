"""Task names, defined once. Layering: imports nothing (targets, passes, profiling and report all read these).

A new model family adds its task name here and its adapter in tasks.py.
"""

from __future__ import annotations

DECODER_TASK = "text-generation-with-past"  # causal LMs, exported with a KV cache
ONNX_TASK = "onnx"  # an .onnx file given as MODEL: no export
SPEECH_TASK = "automatic-speech-recognition"  # CTC models (wav2vec2) and Whisper (speech.py)
# one forward pass (or, for Whisper, a recipe per component): the encoder recipes apply
ENCODER_TASKS = ("feature-extraction", "text-classification", ONNX_TASK, SPEECH_TASK)
# what a task's --calibration/--eval data is; absent: text
MODALITY = {SPEECH_TASK: "audio"}
DECODER_TASKS = (DECODER_TASK,)
