"""Task adapters: what differs between model families, behind one interface the pipeline drives.

One module per family, each declaring its tasks' TaskSpecs (taskspec.py) and registering its adapter class with
`@register_task(spec, ...)` (tasks/base.py says what an adapter is): text.py (feature extraction, classification),
decoder.py (causal LMs with a KV cache), onnx_file.py (an .onnx file given as is), vision.py and detection.py
(images), speech.py (speech recognition). `make_task` finds the adapter for a task name among every module of this
package.
"""

from edgecompress.tasks.base import (
    DataSet,
    TaskAdapter,
    TaskFacts,
    TaskInputs,
    TextInputs,
    make_task,
    register_task,
    registered_tasks,
    task_facts,
    text_data,
    validate_workload,
    workload_for,
)
from edgecompress.tasks.decoder import (
    DecoderSession,
    DecoderTask,
    _log_softmax_nll,
    decoder_calibration_texts,
    decoder_eval_texts,
)
from edgecompress.tasks.onnx_file import OnnxFileTask, _flat_unit
from edgecompress.tasks.text import EncoderTask, _counting

__all__ = ["DataSet", "DecoderSession", "DecoderTask", "EncoderTask", "OnnxFileTask", "TaskAdapter", "TaskFacts",
           "TaskInputs", "TextInputs", "_counting", "_flat_unit", "_log_softmax_nll", "decoder_calibration_texts",
           "decoder_eval_texts", "make_task", "register_task", "registered_tasks", "task_facts", "text_data",
           "validate_workload", "workload_for"]
