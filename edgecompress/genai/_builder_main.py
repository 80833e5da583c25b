"""Run ONNX Runtime GenAI's model builder (`python -m onnxruntime_genai.models.builder`) in this process.

edgecompress runs this module in a child process (export.py's fast path), for two reasons: the builder prints a
progress line per tensor, and its 0.18 release is written against transformers 5, while optimum-onnx 0.1 pins
transformers < 4.58. Two gaps matter for the architectures edgecompress sends it (Llama), both bridged here and
only here, in the child:
- it imports two Qwen 3.5 classes from transformers at module load (never used for Llama): stand-ins are defined
  when transformers lacks them;
- it reads RoPE settings from `config.rope_parameters` (transformers 5); a 4.x config has `rope_theta` and
  `rope_scaling` instead, so the same values are put where the builder looks.
Arguments are the builder's own command line.
"""

from __future__ import annotations

import os
import runpy
import sys


def _bridge_transformers_4() -> None:
    import transformers

    for name in ("Qwen3_5ForConditionalGeneration", "Qwen3_5MoeForConditionalGeneration"):
        if not hasattr(transformers, name):
            setattr(transformers, name, type(name, (), {}))
    import onnxruntime_genai.models as models

    sys.path.insert(0, os.path.dirname(models.__file__))  # the builder imports its siblings as top-level modules
    from builders import base

    original = base.Model.make_config_init

    def make_config_init(self: object, config: object) -> None:
        if not hasattr(config, "rope_parameters"):
            scaling = dict(getattr(config, "rope_scaling", None) or {})
            config.rope_parameters = {  # type: ignore[attr-defined]
                "rope_type": scaling.get("rope_type", scaling.get("type", "default")),
                "rope_theta": getattr(config, "rope_theta", 10000.0), **scaling}
            config.rope_scaling = {}  # type: ignore[attr-defined]
        original(self, config)

    base.Model.make_config_init = make_config_init


if __name__ == "__main__":
    _bridge_transformers_4()
    sys.argv = ["onnxruntime_genai.models.builder", *sys.argv[1:]]
    runpy.run_module("onnxruntime_genai.models.builder", run_name="__main__")
