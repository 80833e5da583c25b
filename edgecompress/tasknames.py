"""Task names, defined once. Layering: imports nothing (targets, passes, profiling and report all read these).

A new model family adds its task name here and its adapter as one module of edgecompress/tasks/ (tasks/base.py),
which declares everything else about the task (taskspec.TaskSpec).
"""

from __future__ import annotations

DECODER_TASK = "text-generation-with-past"  # causal LMs, exported with a KV cache
ONNX_TASK = "onnx"  # an .onnx file given as MODEL: no export
# models that read images (tasks/vision.py: classification; tasks/detection.py)
IMAGE_CLASSIFICATION = "image-classification"
OBJECT_DETECTION = "object-detection"
VISION_TASKS = (IMAGE_CLASSIFICATION, OBJECT_DETECTION)
FEATURE_EXTRACTION = "feature-extraction"
TEXT_CLASSIFICATION = "text-classification"
TEXT_ENCODER_TASKS = (FEATURE_EXTRACTION, TEXT_CLASSIFICATION)  # one forward pass, a tokenizer (tasks/text.py)
SPEECH_TASK = "automatic-speech-recognition"  # CTC models (wav2vec2) and Whisper (tasks/speech.py)
# one forward pass per batch (for Whisper, a recipe per component), judged on its outputs: the encoder recipes apply
ENCODER_TASKS = (*TEXT_ENCODER_TASKS, ONNX_TASK, *VISION_TASKS, SPEECH_TASK)
DECODER_TASKS = (DECODER_TASK,)
