"""The fidelity metrics every task can report, as data: name -> direction, unit and meaning.

Budgets name these metrics; whether a limit is a floor or a ceiling comes from here, so encoders, classifiers and
(later) decoders share one budget mechanism. Layering: imports nothing internal.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from edgecompress.tasknames import DECODER_TASK, IMAGE_CLASSIFICATION, OBJECT_DETECTION, SPEECH_TASK


@dataclass(frozen=True)
class Metric:
    name: str
    higher_is_better: bool
    unit: str
    tasks: tuple[str, ...]
    meaning: str


TaskKind = Literal["feature-extraction", "text-classification"]

METRICS: dict[str, Metric] = {
    m.name: m
    for m in (
        Metric("cosine_mean", True, "", ("feature-extraction", "onnx"),
               "mean cosine between pooled embeddings and the reference's"),
        Metric("cosine_p1", True, "", ("feature-extraction", "onnx"), "1st percentile of that cosine"),
        Metric("cosine_min", True, "", ("feature-extraction", "onnx"), "worst text's cosine"),
        Metric("top1_agreement", True, "", ("text-classification", IMAGE_CLASSIFICATION),
               "share of texts (images) whose arg-max class matches the reference's"),
        Metric("kl_mean", False, "nats", ("text-classification", IMAGE_CLASSIFICATION),
               "mean KL(reference || candidate) of the class distributions"),
        Metric("top5_agreement", True, "", (IMAGE_CLASSIFICATION,),
               "share of images whose reference arg-max class is among the candidate's top 5"),
        Metric("top1_accuracy", True, "", (IMAGE_CLASSIFICATION,),
               "share of labelled images whose arg-max class is the label"),
        Metric("top1_accuracy_reference", True, "", (IMAGE_CLASSIFICATION,),
               "the reference's top-1 accuracy on the same labelled images"),
        Metric("map50", True, "", (OBJECT_DETECTION,),
               "mAP at IoU 0.5 of the candidate's detections, taking the reference's detections as ground truth"),
        Metric("box_iou_mean", True, "", (OBJECT_DETECTION,),
               "mean IoU of each reference detection with the candidate's box for the same query"),
        # decoders (causal LMs): judged on the evaluation text's tokens, next-token prediction
        Metric("perplexity_ratio", False, "", (DECODER_TASK,),
               "perplexity on the evaluation text / the reference's perplexity on the same tokens"),
        Metric("perplexity", False, "", (DECODER_TASK,),
               "perplexity (exp of mean next-token NLL) on the evaluation text"),
        Metric("next_token_top1", True, "", (DECODER_TASK,),
               "share of positions whose arg-max next token matches the reference's"),
        # speech recognition: greedy transcripts of the evaluation clips (speech.py)
        Metric("wer", False, "", (SPEECH_TASK,),
               "word error rate of the transcripts against the FP32 model's transcripts"),
        Metric("cer", False, "", (SPEECH_TASK,),
               "character error rate against the FP32 model's transcripts (finer than WER on short or odd text)"),
        Metric("wer_reference", False, "", (SPEECH_TASK,),
               "word error rate against the reference transcripts given with the clips"),
        Metric("token_top1", True, "", (SPEECH_TASK,),
               "share of decoding steps (CTC frames; Whisper steps along FP32's transcript) whose arg-max token "
               "matches FP32's"),
    )
}

# The metric a task is judged on first: --min-fidelity sets its floor, --recipe auto ranks by it.
PRIMARY_METRIC: dict[str, str] = {
    "feature-extraction": "cosine_mean",
    "text-classification": "top1_agreement",
    IMAGE_CLASSIFICATION: "top1_agreement",
    OBJECT_DETECTION: "map50",
    "onnx": "cosine_mean",
    DECODER_TASK: "perplexity_ratio",
    SPEECH_TASK: "wer",
}

# The values a metric can take (inclusive), so a floor or ceiling outside them is refused as a typo: a cosine floor
# of 1.5 or a top-1 floor of 99 (a percentage) can never be met, a KL ceiling below 0 never either.
RANGE: dict[str, tuple[float, float]] = {
    "cosine_mean": (-1.0, 1.0), "cosine_p1": (-1.0, 1.0), "cosine_min": (-1.0, 1.0),
    "top1_agreement": (0.0, 1.0), "next_token_top1": (0.0, 1.0), "top5_agreement": (0.0, 1.0),
    "top1_accuracy": (0.0, 1.0), "top1_accuracy_reference": (0.0, 1.0), "map50": (0.0, 1.0),
    "box_iou_mean": (0.0, 1.0), "token_top1": (0.0, 1.0),
    "wer": (0.0, float("inf")), "cer": (0.0, float("inf")), "wer_reference": (0.0, float("inf")),
    "kl_mean": (0.0, float("inf")), "perplexity_ratio": (0.0, float("inf")), "perplexity": (1.0, float("inf")),
}
