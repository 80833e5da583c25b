"""The distillation loop: a pruned student trained to match its FP32 teacher on the calibration texts.

Losses (Hinton et al. 2015; MiniLM/TinyBERT-style intermediate matching):
- encoders (feature-extraction): 1 - cosine of the mean-pooled embeddings (what fidelity measures), plus the MSE of
  every layer's hidden states on real tokens, relative to the teacher's energy in that layer;
- classifiers and decoders: KL(teacher || student) of the logits softened by a temperature (scaled by T^2), plus
  the same hidden-state term.

CPU only, deterministic for a seed (data order from numpy's seeded generator, no dropout: both models stay in eval
mode, so the student learns the teacher's deterministic function). Memory is bounded: at most `max_texts` token rows
are held, the teacher runs under no_grad on the same batch, and nothing is cached between steps. A hard wall-clock
cap stops training whatever the step count; the schedule is by steps (so a capped run is the same run cut short).

Layering: torch and numpy; no edgecompress module but errors and progress.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from edgecompress.progress import NullProgress, Progress

# what the torch models take; calibration batches of decoders also carry an empty KV cache, which is not needed here
MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


@dataclass(frozen=True)
class Settings:
    steps: int
    minutes: float
    lr: float
    seed: int = 0
    batch_size: int = 16
    temperature: float = 2.0  # KL on logits (classifiers, decoders)
    hidden_weight: float = 1.0  # the hidden-state term next to the output term
    warmup: float = 0.1  # share of the steps with a linear warm-up; then cosine decay to 0
    # token replacement (TinyBERT-style augmentation): half the rows of a batch get this share of their tokens
    # replaced by tokens drawn from the calibration texts; the teacher labels whatever the student sees, so a few
    # hundred sentences give many distinct inputs. 0: off
    augment: float = 0.15
    max_texts: int = 4096  # token rows held in memory (the calibration texts beyond are not used)
    curve_points: int = 50
    # "bfloat16": autocast the forward/backward matmuls to bfloat16 (float32 master weights, loss and optimizer in
    # float32): 2.7x the steps per CPU-second on a host with bf16 instructions at the same cosine per step
    # (benchmarks/results/pruning_distill.md); distill/__init__.py chooses it from the host's ISA
    precision: str = "float32"


@dataclass
class Outcome:
    steps: int
    stopped: str  # "steps" | "time cap"
    seconds: float
    cpu_seconds: float
    loss_curve: list[tuple[int, float]] = field(default_factory=list)  # (step, mean loss since the last point)
    texts: int = 0
    tokens: int = 0
    threads: int = 0
    batch_size: int = 0


class Data:
    """Calibration rows (fixed-length, padded) in memory; seeded epochs of batches cut to their longest text."""

    def __init__(self, batches: Iterable[dict[str, np.ndarray]], max_texts: int) -> None:
        rows: dict[str, list[np.ndarray]] = {}
        n = 0
        for b in batches:
            take = min(len(b["input_ids"]), max_texts - n)
            if take <= 0:
                break
            for k in MODEL_INPUTS:
                if k in b:
                    rows.setdefault(k, []).append(np.asarray(b[k])[:take])
            n += take
        self.arrays = {k: np.concatenate(v) for k, v in rows.items()}
        self.count = n
        mask = self.arrays.get("attention_mask")
        self.tokens = int(mask.sum()) if mask is not None else int(self.arrays["input_ids"].size)

    def batch(self, idx: np.ndarray) -> dict[str, np.ndarray]:
        out = {k: v[idx] for k, v in self.arrays.items()}
        mask = out.get("attention_mask")
        if mask is not None and mask.ndim == 2:
            cols = np.flatnonzero(mask.any(axis=0))
            length = int(cols[-1]) + 1 if cols.size else 1
            out = {k: v[:, :length] for k, v in out.items()}
        return out

    def augment(self, batch: dict[str, np.ndarray], share: float, rng: np.random.Generator) -> dict[str, np.ndarray]:
        """Half the rows get `share` of their inner tokens (not the first or last real one: [CLS]/[SEP]) replaced
        by tokens drawn from the calibration texts' own token distribution."""
        if share <= 0:
            return batch
        ids = batch["input_ids"].copy()
        mask = batch.get("attention_mask", np.ones_like(ids))
        pool = self.arrays["input_ids"][self.arrays.get("attention_mask", np.ones_like(self.arrays["input_ids"])) > 0]
        for r in np.flatnonzero(rng.random(len(ids)) < 0.5):
            real = int(mask[r].sum())
            inner = np.arange(1, real - 1)
            if len(inner) == 0:
                continue
            pick = inner[rng.random(len(inner)) < share]
            ids[r, pick] = rng.choice(pool, size=len(pick))
        return {**batch, "input_ids": ids}

    def order(self, steps: int, batch_size: int, seed: int) -> list[np.ndarray]:
        """The row indices of each step: seeded epochs; within an epoch, rows are grouped by length (pools of 8
        batches sorted by length, then cut), so a batch pads little, and the batches are shuffled again."""
        rng = np.random.default_rng(seed)
        size = min(batch_size, self.count)
        mask = self.arrays.get("attention_mask")
        lengths = mask.sum(axis=1) if mask is not None else np.zeros(self.count)
        out: list[np.ndarray] = []
        while len(out) < steps:
            perm = rng.permutation(self.count)
            epoch = []
            for start in range(0, self.count - size + 1, 8 * size):
                pool = perm[start:start + 8 * size]
                pool = pool[np.argsort(lengths[pool], kind="stable")]
                epoch += [np.sort(pool[i:i + size]) for i in range(0, len(pool) - size + 1, size)]
            out += [epoch[i] for i in rng.permutation(len(epoch))]
        return out[:steps]


def _hidden_term(s_hidden: Any, t_hidden: Any, mask: Any) -> Any:
    """Mean over layers (embeddings excluded: never pruned) of the masked MSE relative to the teacher's energy."""
    m = mask[..., None]
    terms = [((s - t) ** 2 * m).sum() / ((t ** 2) * m).sum().clamp_min(1e-12)
             for s, t in zip(s_hidden[1:], t_hidden[1:], strict=True)]
    return sum(terms) / max(len(terms), 1)


def loss_fn(task: str, s_out: Any, t_out: Any, mask: Any, settings: Settings) -> Any:
    import torch.nn.functional as F

    hidden = _hidden_term(s_out.hidden_states, t_out.hidden_states, mask)
    if task == "feature-extraction":
        m = mask[..., None]
        ps = (s_out.last_hidden_state * m).sum(1) / m.sum(1).clamp_min(1e-9)
        pt = (t_out.last_hidden_state * m).sum(1) / m.sum(1).clamp_min(1e-9)
        out = 1.0 - F.cosine_similarity(ps, pt, dim=-1).mean()
    else:
        temp = settings.temperature
        s_log = F.log_softmax(s_out.logits / temp, dim=-1)
        t_log = F.log_softmax(t_out.logits / temp, dim=-1)
        kl = (t_log.exp() * (t_log - s_log)).sum(-1)  # per text (classifier) or per position (decoder)
        if kl.ndim == 2:  # decoder: real positions only
            kl = (kl * mask).sum() / mask.sum().clamp_min(1.0)
        out = kl.mean() * temp ** 2
    return out + settings.hidden_weight * hidden


def _float(out: Any) -> Any:
    """The model output with its tensors in float32 (autocast leaves them in bfloat16): the loss is float32."""
    import torch

    for key, value in out.items():
        if isinstance(value, torch.Tensor):
            out[key] = value.float()
        elif isinstance(value, tuple):
            out[key] = tuple(v.float() for v in value)
    return out


def train(student: Any, teacher: Any, task: str, data: Data, settings: Settings,
          progress: Progress | None = None, log: Callable[[str], None] = lambda msg: None) -> Outcome:
    """Train `student` in place. Stops after `settings.steps` or at the wall-clock cap, whichever comes first."""
    import torch

    progress = progress or NullProgress()
    torch.manual_seed(settings.seed)
    t0, c0 = time.monotonic(), time.process_time()
    deadline = t0 + settings.minutes * 60.0
    student.eval()  # no dropout: the student learns the teacher's deterministic function
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    # the embeddings are not pruned: training the transformer layers only halves the optimizer's work (MiniLM's
    # word embeddings are half its weights) and keeps 320 sentences from moving the vocabulary
    for name, p in student.named_parameters():
        if "embeddings" in name or "embed_tokens" in name:
            p.requires_grad_(False)
    params = [p for p in student.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=settings.lr, weight_decay=0.0)
    warm = max(1, int(settings.warmup * settings.steps))

    def lr_at(step: int) -> float:
        if step < warm:
            return settings.lr * (step + 1) / warm
        p = (step - warm) / max(1, settings.steps - warm)
        return settings.lr * 0.5 * (1.0 + math.cos(math.pi * p))

    every = max(1, settings.steps // settings.curve_points)
    curve: list[tuple[int, float]] = []
    window: list[float] = []
    done, stopped = 0, "steps"
    order = data.order(settings.steps, settings.batch_size, settings.seed)
    aug = np.random.default_rng(settings.seed + 1)
    log(f"distillation: training on {data.count} calibration texts ({data.tokens} tokens), {settings.steps} steps "
        f"of {min(settings.batch_size, data.count)}, at most {settings.minutes:g} min, {torch.get_num_threads()} "
        f"threads, {settings.precision}")
    with progress.step(f"distillation ({settings.steps} steps, at most {settings.minutes:g} min)",
                       total=settings.steps) as bar:
        for step, idx in enumerate(order):
            if time.monotonic() >= deadline:
                stopped = "time cap"
                log(f"distillation stopped at the {settings.minutes:g}-minute cap after {step} steps")
                break
            feed = {k: torch.from_numpy(v) for k, v in data.augment(data.batch(idx), settings.augment, aug).items()}
            mask = (feed["attention_mask"] if "attention_mask" in feed
                    else torch.ones_like(feed["input_ids"])).to(torch.float32)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=settings.precision == "bfloat16"):
                with torch.no_grad():
                    t_out = teacher(**feed, output_hidden_states=True)
                s_out = student(**feed, output_hidden_states=True)
            loss = loss_fn(task, _float(s_out), _float(t_out), mask, settings)
            for g in opt.param_groups:
                g["lr"] = lr_at(step)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            window.append(float(loss.detach()))
            done = step + 1
            if done % every == 0 or done == settings.steps:
                curve.append((done, round(float(np.mean(window)), 6)))
                window = []
            bar.advance(1)
    if window:
        curve.append((done, round(float(np.mean(window)), 6)))
    return Outcome(steps=done, stopped=stopped, seconds=round(time.monotonic() - t0, 2),
                   cpu_seconds=round(time.process_time() - c0, 2), loss_curve=curve, texts=data.count,
                   tokens=data.tokens, threads=torch.get_num_threads(), batch_size=min(settings.batch_size,
                                                                                     data.count))
