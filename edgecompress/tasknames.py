"""Task names, defined once. Layering: imports nothing (targets, passes, profiling and report all read these).

A new model family adds its task name here and its adapter as one module of edgecompress/tasks/ (tasks/base.py).
"""

from __future__ import annotations

DECODER_TASK = "text-generation-with-past"  # causal LMs, exported with a KV cache
ONNX_TASK = "onnx"  # an .onnx file given as MODEL: no export
TEXT_ENCODER_TASKS = ("feature-extraction", "text-classification")  # one forward pass, a tokenizer
ENCODER_TASKS = (*TEXT_ENCODER_TASKS, ONNX_TASK)
DECODER_TASKS = (DECODER_TASK,)
