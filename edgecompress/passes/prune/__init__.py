"""Structured pruning: remove whole FFN intermediate neurons and whole attention heads from an exported graph.

Layers are found by graph pattern, never by node name:
- FFN: MatMul(x, W1[d, F]) (+ bias) -> per-element activation (GELU's Div/Erf/Add/Mul, Gelu, Relu, Tanh, or the
  gated SiLU(gate) * up of Llama-style MLPs, whose gate and up read the same x) -> MatMul(h, W2[F, d]) (+ bias).
- attention: Q/K/V MatMul (+ bias) -> Reshape[.., H, dh] -> QK^T MatMul -> Softmax -> MatMul with V -> Transpose
  -> Reshape[.., H*dh] -> output MatMul. The Reshape shape constants (a constant or a Concat of constants and
  Unsqueezed dims, as optimum exports them) are rewritten with the new head count.

Importance comes from calibration activations (the fp32 model run in onnxruntime with the intermediate tensors as
extra outputs). Per layer we accumulate the Gram matrix of the consuming projection's input (with a ones column
for the bias), which is all that the three recoveries need:
- none: remove by a fluctuation score, E[x_j^2] * ||W2_j||^2;
- bias: remove by variance * ||W2_j||^2 and fold the mean of the removed inputs into the next bias (FLAP);
- refit: choose what to remove by greedy Optimal-Brain-Surgeon steps on the Gram matrix (a structure's cost is
  W_S^T [H^-1]_SS^-1 W_S, the exact least-squares loss of dropping it once the rest is refit), then solve the
  least-squares refit min ||X_kept W' - X_full W|| in closed form, damped toward the original weights.
Tokens are weighted by 1/||x_t||^2 of the block's input, as the LayerNorm after the residual add will do.
Each layer's cumulative loss, relative to its residual-stream energy, is its local sensitivity curve. The adaptive
schedule rescales each curve by an end-to-end probe (that block alone pruned at the ratio, the model's output
error on a few calibration batches, per unit of local loss: late layers reach the output undamped) and spends the
global budget (the ratio times all neurons, or all heads; with both ratios, their FLOPs jointly across heads and
neurons) where the marginal loss per FLOP is lowest.

Limits: one Gram matrix of (F+1)^2 float64 per block is held in memory (fine for encoders and small decoders, not
for 7B-class MLPs); attention with grouped K/V heads or rotary embeddings is not head-pruned (reported as skipped).

The package, split by job: patterns.py (finding blocks), stats.py (calibration statistics), obs.py (removal curves,
allocation, refit), rewrite.py (graph writing); this module holds the knobs, the FLOP count and the pass.
"""


from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import onnx

from edgecompress.distill.surgery import Cut
from edgecompress.errors import PassError
from edgecompress.graph import GraphIndex
from edgecompress.passes.base import (
    Batch,
    ModelInfo,
    Pass,
    PassContext,
    PassResult,
    Skip,
    TaskTraits,
    matmul_only,
    register,
    skips,
)
from edgecompress.passes.options import BLOCK_SIZE, Option, option, validate_config
from edgecompress.passes.prune.flops import _unit_macs, matmul_flops
from edgecompress.passes.prune.obs import _augmented_weight, allocate, refit, removal_curve
from edgecompress.passes.prune.patterns import ATTN_PATTERN, FFN_PATTERN, Block, _dims, find_attention, find_ffn
from edgecompress.passes.prune.rewrite import _apply_block, _drop_dead_constants, _Writer
from edgecompress.passes.prune.stats import LayerStats, collect_stats
from edgecompress.tasknames import DECODER_TASK, ENCODER_TASKS

log = logging.getLogger(__name__)

_RATIO_HINT = "a ratio of the neurons/heads to remove, e.g. 0.3"
PRUNE_FFN = Option("prune_ffn", "Remove this share of every FFN's intermediate neurons, in [0, 1).", float, low=0.0,
                   high=1.0, high_open=True, hint=_RATIO_HINT, enables=True)
PRUNE_HEADS = Option("prune_heads", "Remove this share of attention heads, in [0, 1).", float, low=0.0, high=1.0,
                     high_open=True, hint=_RATIO_HINT, enables=True)
PRUNE_SCHEDULE = Option("prune_schedule", "Per-layer pruning ratios: uniform, or adaptive to layer sensitivity.",
                        choices=("uniform", "adaptive"))
PRUNE_RECOVERY = Option("prune_recovery", "Recovery after pruning: none, bias compensation, least-squares refit, "
                        "or refit then a short knowledge distillation from the FP32 model (PyTorch, CPU; "
                        "edgecompress/distill).", choices=("none", "bias", "refit", "distill"))
DISTILL_STEPS = Option("distill_steps", "Distillation: optimizer steps (batches of 16 calibration texts).", int,
                       low=0, high=100_000, hint="e.g. 1600; 0 gives the refit model re-exported from PyTorch",
                       only_with=("prune_recovery", "distill"))
DISTILL_MINUTES = Option("distill_minutes", "Distillation: hard wall-clock cap in minutes; training stops there "
                         "whatever --distill-steps says.", float, low=0.0, high=24 * 60.0, low_open=True,
                         hint="e.g. 8", only_with=("prune_recovery", "distill"))
DISTILL_LR = Option("distill_lr", "Distillation: peak AdamW learning rate (linear warm-up, then cosine decay).",
                    float, low=0.0, high=1.0, low_open=True, hint="e.g. 1e-4", only_with=("prune_recovery", "distill"))
DISTILL_PRECISION = Option("distill_precision", "Distillation: matmul precision while training. auto: bfloat16 "
                           "autocast where this machine's CPU has bf16 instructions (about 2.7x the steps per "
                           "minute), else float32. Weights, loss and optimizer stay float32.",
                           choices=("auto", "float32", "bfloat16"), only_with=("prune_recovery", "distill"))


@dataclass(frozen=True)
class PruneConfig:
    ffn_ratio: float = option(0.0, PRUNE_FFN)  # share of FFN intermediate neurons to remove
    head_ratio: float = option(0.0, PRUNE_HEADS)  # share of attention heads to remove
    # uniform: the ratio in every layer; adaptive: a global budget spent by sensitivity
    schedule: str = option("uniform", PRUNE_SCHEDULE)
    recovery: str = option("refit", PRUNE_RECOVERY)
    # recovery "distill" only (benchmarks/results/pruning.md: the defaults fit MiniLM in < 10 min on 2 cores)
    distill_steps: int = option(1600, DISTILL_STEPS)
    distill_minutes: float = option(8.0, DISTILL_MINUTES)
    distill_lr: float = option(1e-4, DISTILL_LR)
    distill_precision: str = option("auto", DISTILL_PRECISION)
    ridge: float = 1e-2  # refit damping, relative to the mean diagonal of the Gram matrix
    max_layer_ratio: float = 0.9  # adaptive: no layer loses more than this share
    # at most this many calibration batches (8 texts each). The statistics stream into fixed-size Gram matrices, so
    # memory does not grow with it; more in-domain texts measurably help the refit (benchmarks/results/pruning.md)
    calibration_batches: int = 512
    token_weighting: bool = True  # weight tokens by 1/||x_t||^2, as the following LayerNorm does
    probe_batches: int = 8  # adaptive: calibration batches for the end-to-end sensitivity probes (0: off)
    reference_seq: int = 128  # FLOPs are reported per sequence of this many tokens (batch 1)
    # kept features per block rounded to a multiple of this (decoders: the 4-bit kernels' block size, so that a
    # pruned down_proj's K stays quantizable); 1 = any count
    keep_multiple: int = 1

    def __post_init__(self) -> None:
        validate_config(self, "prune")

    @property
    def one_shot(self) -> str:
        """The graph-level recovery: distillation starts from the refit model (same importance, same shapes)."""
        return "refit" if self.recovery == "distill" else self.recovery


# ------------------------------------------------------------------------------------------------------------ pass


@dataclass
class Plan:
    """What to remove, per block (units in removal order), and each block's relative loss."""

    blocks: list[Block]
    remove: list[list[int]]
    loss: list[float]


def _aligned_removal(b: Block, remove: int, multiple: int, nearest: bool) -> int:
    """Units to remove so that the kept features are a multiple of `multiple` (nearest to `remove`, or at most
    `remove`); at least one aligned group is kept. Unchanged when multiple is 1 or the block is not aligned."""
    if multiple <= 1 or b.hidden % multiple:
        return remove
    step = multiple // np.gcd(multiple, b.unit_size)  # units per aligned group
    kept = b.units - remove
    groups = round(kept / step) if nearest else -(-kept // step)
    return int(max(0, min(remove if not nearest else b.units, b.units - max(groups, 1) * step)))


@register(tasks=(*ENCODER_TASKS, DECODER_TASK), order=0,
          # composed with these recipes in the search grid
          search=({"prune_ffn": 0.25},),
          compose=(("int8-dynamic", {}), ("codebook", {"codebook_bits": 4}), ("int4", {})))
class StructuredPrune(Pass[PruneConfig]):
    name = "prune"

    @classmethod
    def refuses(cls, info: ModelInfo | None) -> str | None:
        return matmul_only(info)

    @classmethod
    def configure(cls, values: Mapping[str, Any], task: TaskTraits) -> PruneConfig:
        cfg = super().configure(values, task)
        if task.aligns_to_weight_block:  # a pruned down_proj keeps K a multiple of the decoder kernels' block
            cfg = replace(cfg, keep_multiple=values.get("block_size", BLOCK_SIZE.default))
        return cfg

    def trains(self) -> bool:
        cfg: PruneConfig = self.config
        return cfg.recovery == "distill" and (cfg.ffn_ratio > 0 or cfg.head_ratio > 0)

    def find(self, model: onnx.ModelProto) -> tuple[list[Block], list[Skip]]:
        """Blocks of the kinds asked for; PassError when a kind asked for has none."""
        cfg: PruneConfig = self.config
        idx = GraphIndex(model)
        blocks: list[Block] = []
        skipped: list[Skip] = []
        missing = []
        for ratio, finder, pattern in ((cfg.ffn_ratio, find_ffn, FFN_PATTERN),
                                       (cfg.head_ratio, find_attention, ATTN_PATTERN)):
            if ratio <= 0:
                continue
            found, skip = finder(idx)
            skipped.extend(skip)
            if not found:
                missing.append(pattern + (f" [{skip[0].reason}]" if skip else ""))
            blocks.extend(found)
        if missing:
            raise PassError(f"pruning found no {' and no '.join(missing)} in this graph",
                            hint="structured pruning supports BERT/RoBERTa/DistilBERT encoders and Llama MLPs")
        return blocks, skipped

    def plan(self, model: onnx.ModelProto, blocks: list[Block], stats: dict[str, LayerStats],
             curve_cache: dict[Any, tuple[list[int], np.ndarray]] | None = None,
             sensitivity: dict[str, float] | None = None) -> Plan:
        """What to remove. uniform: the ratio in every layer. adaptive: the ratio of all neurons (heads) in the
        model, spent by sensitivity; with both ratios, their combined FLOPs are spent jointly on heads and neurons,
        wherever the loss per FLOP is lowest."""
        cfg: PruneConfig = self.config
        idx = GraphIndex(model)
        cache = curve_cache if curve_cache is not None else {}
        remove: list[list[int]] = [[] for _ in blocks]
        loss = [0.0] * len(blocks)
        pools = [(kind, ratio, [i for i, b in enumerate(blocks) if b.kind == kind])
                 for kind, ratio in (("ffn", cfg.ffn_ratio), ("heads", cfg.head_ratio))]
        pools = [p for p in pools if p[1] > 0 and p[2]]
        curves: dict[int, tuple[list[int], np.ndarray]] = {}
        for _, ratio, ids in pools:
            for i in ids:
                b = blocks[i]
                cap = (round(ratio * b.units) if cfg.schedule == "uniform" else int(cfg.max_layer_ratio * b.units))
                cap = min(cap, b.units - 1)
                if cfg.schedule == "uniform":
                    cap = _aligned_removal(b, cap, cfg.keep_multiple, nearest=True)
                key = (b.key, cfg.one_shot, cfg.ridge)
                order, curve = cache.get(key, ([], np.zeros(1)))
                if len(order) < cap:
                    order, curve = removal_curve(b, stats[b.key], _augmented_weight(idx, b), cfg.one_shot,
                                                 cfg.ridge, cap)
                    cache[key] = (order, curve)
                # end-to-end sensitivity (measured by probing) rescales the layer-local loss so layers compare
                curves[i] = (order[:cap], curve[:cap + 1] * (sensitivity or {}).get(b.key, 1.0))
        counts: dict[int, int] = {}
        if cfg.schedule == "uniform":
            counts = {i: len(o) for i, (o, _) in curves.items()}
        elif len(pools) == 2:
            ids = [i for _, _, pool in pools for i in pool]
            costs = [float(_unit_macs(idx, blocks[i], cfg.reference_seq)) for i in ids]
            budget = sum(ratio * blocks[i].units * _unit_macs(idx, blocks[i], cfg.reference_seq)
                         for _, ratio, pool in pools for i in pool)
            counts = dict(zip(ids, allocate([curves[i][1] for i in ids], budget, costs), strict=True))
        else:
            for _, ratio, ids in pools:
                got = allocate([curves[i][1] for i in ids], round(ratio * sum(blocks[i].units for i in ids)))
                counts.update(zip(ids, got, strict=True))
        for i, k in counts.items():
            k = _aligned_removal(blocks[i], k, cfg.keep_multiple, nearest=False)
            remove[i] = curves[i][0][:k]
            loss[i] = float(curves[i][1][k])
        return Plan(blocks, remove, loss)

    def apply(self, model: onnx.ModelProto, plan: Plan, stats: dict[str, LayerStats],
              check: bool = True, cuts: list[Cut] | None = None) -> PassResult:
        """The pruned model. `check=False` (sensitivity probes) skips shape inference, the checker and FLOPs.
        `cuts` collects each block's decision (kept units, refit weights) for the PyTorch student (distillation)."""
        cfg: PruneConfig = self.config
        out = onnx.ModelProto()
        out.CopyFrom(model)
        # Plan blocks point into `model`; rewrite the same blocks found again in the copy (keyed by weight name).
        oidx = GraphIndex(out)
        twins: dict[str, Block] = {}
        for kind in {b.kind for b in plan.blocks}:
            for f in (find_ffn if kind == "ffn" else find_attention)(oidx)[0]:
                twins[f.key] = f
        idx = GraphIndex(model)
        wr = _Writer(out)
        layers = []
        seq = cfg.reference_seq
        for b, rem, loss in zip(plan.blocks, plan.remove, plan.loss, strict=True):
            if not rem:
                continue
            keep = np.array(sorted(set(range(b.units)) - set(rem)), dtype=int)
            st = stats[b.key]
            w_aug = _augmented_weight(idx, b)
            cols = b.columns(keep)
            if cfg.one_shot == "refit":
                new_w = refit(st, w_aug, cols, cfg.ridge)
            else:
                gone = b.columns(rem)
                new_w = np.concatenate([w_aug[cols], w_aug[-1:]], axis=0)
                if cfg.one_shot == "bias":
                    mean = st.gram[-1, gone] / max(st.count, 1.0)
                    new_w[-1] += mean @ w_aug[gone]
            _apply_block(wr, idx, twins[b.key], keep, new_w)
            if cuts is not None:
                cuts.append(Cut(b.kind, [idx.array(p.weight) for p in b.producers], idx.array(b.consumer.weight),
                                keep, b.unit_size, new_w[:-1].astype(np.float32), new_w[-1].astype(np.float32),
                                b.label))
            d_model = _dims(idx, b.consumer)[1]
            removed = len(rem) * b.unit_size
            params = removed * (sum(_dims(idx, p)[0] + (1 if p.bias else 0) for p in b.producers) + d_model)
            macs = len(rem) * _unit_macs(idx, b, seq)
            layers.append({"layer": b.label, "kind": b.kind, "units": b.units, "removed": len(rem),
                           "kept": len(keep), "params_removed": int(params),
                           "flops_removed": int(2 * macs * seq), "relative_loss": round(loss, 6)})
        _drop_dead_constants(out)
        del out.graph.value_info[:]  # stale intermediate shapes; inferred afresh below
        if not check:
            return PassResult(out, {"layers": layers})
        try:
            out = onnx.shape_inference.infer_shapes(out, strict_mode=True, data_prop=True)
            onnx.checker.check_model(out, full_check=True)
        except Exception as e:  # onnx raises several types here
            raise PassError(f"the pruned graph is invalid: {str(e).splitlines()[0]}",
                            hint="this graph variant is not supported by structured pruning") from e
        before, after = matmul_flops(model, seq), matmul_flops(out, seq)
        linear = matmul_flops(model, seq, attention=False)
        report: dict[str, Any] = {
            "ffn_ratio": cfg.ffn_ratio, "head_ratio": cfg.head_ratio, "schedule": cfg.schedule,
            "recovery": cfg.recovery, "importance": ("greedy OBS on calibration Gram matrix" if cfg.one_shot == "refit"
                                                     else "activation fluctuation x weight norm"),
            "layers": layers,
            "params_removed": sum(r["params_removed"] for r in layers),
            "flops_reference": f"batch 1 x {seq} tokens, MatMul FLOPs",
            "matmul_flops_before": before, "matmul_flops_after": after,
            "flops_removed_share": round(1 - after / before, 4) if before else 0.0,
            # weight MatMuls only (the linear layers), the convention of ../shared/anchors.md
            "linear_flops_removed_share": round(1 - matmul_flops(out, seq, False) / linear, 4) if linear else 0.0,
            "heads_removed": sum(r["removed"] for r in layers if r["kind"] == "heads"),
            "neurons_removed": sum(r["removed"] for r in layers if r["kind"] == "ffn"),
        }
        if not layers:
            report["skipped"] = skips(Skip("", "the ratios remove nothing (every layer keeps all its units)"))
            return PassResult(model, report, modified=False)
        return PassResult(out, report)

    def run(self, model: onnx.ModelProto, ctx: PassContext) -> PassResult:
        cfg: PruneConfig = self.config
        if cfg.ffn_ratio <= 0 and cfg.head_ratio <= 0:
            return PassResult(model, {"skipped": skips(Skip("", "both pruning ratios are 0"))}, modified=False)
        blocks, skipped = self.find(model)
        if ctx.calibration is None:
            raise PassError("structured pruning needs calibration data", hint="give --calibration texts")
        t0 = time.perf_counter()
        stats = collect_stats(model, blocks, _limit(ctx.calibration(), cfg.calibration_batches),
                              token_weighting=cfg.token_weighting)
        tokens = next(iter(stats.values())).tokens if stats else 0
        ctx.log(f"pruning statistics: {tokens} calibration tokens, {len(blocks)} blocks, "
                f"{time.perf_counter() - t0:.0f} s")
        cuts: list[Cut] = []
        result = self.prune(model, blocks, stats, ctx.calibration, cuts=cuts)
        result.report["skipped"] = [*result.report.get("skipped", []), *skips(*skipped)]
        result.report["calibration_tokens"] = tokens
        if cfg.recovery == "distill" and result.modified:
            result = self.distill(model, result, cuts, ctx)
        return result

    def distill(self, model: onnx.ModelProto, pruned: PassResult, cuts: list[Cut], ctx: PassContext) -> PassResult:
        """The graph pass's decision applied to the PyTorch source, distilled from the FP32 model on the
        calibration texts and exported again (edgecompress/distill)."""
        from edgecompress.distill import Settings, distill, training_precision

        cfg: PruneConfig = self.config
        if ctx.source is None or ctx.calibration is None:
            raise PassError("--prune-recovery distill needs the source model's trainable weights and calibration "
                            "texts", hint="give a Hugging Face model directory, or use --prune-recovery refit")
        precision, why = training_precision(cfg.distill_precision)
        ctx.log(f"distillation precision: {precision} ({why})")
        settings = Settings(steps=cfg.distill_steps, minutes=cfg.distill_minutes, lr=cfg.distill_lr, seed=ctx.seed,
                            max_texts=cfg.calibration_batches * 8, precision=precision)
        student, report = distill(ctx.source, ctx.info.task, cuts, ctx.calibration(), settings, ctx.progress,
                                  ctx.log)
        seq = cfg.reference_seq
        before, after = matmul_flops(model, seq), matmul_flops(student, seq)
        if after != pruned.report["matmul_flops_after"]:  # the same cuts must give the same shapes
            raise PassError(f"the distilled model has {after} MatMul FLOPs, the graph-pruned one "
                            f"{pruned.report['matmul_flops_after']}: PyTorch and graph pruning disagree",
                            hint="use --prune-recovery refit, and report the model architecture")
        curve = report["loss_curve"] or [[0, 0.0]]
        ctx.log(f"distillation: {report['steps']} steps in {report['seconds']:.0f} s (CPU {report['cpu_seconds']:.0f}"
                f" s), loss {curve[0][1]:.4g} -> {curve[-1][1]:.4g}")
        report["precision"] = {"used": precision, "asked": cfg.distill_precision, "why": why}
        report["data"] = {**ctx.calibration_data, "split": "calibration (the evaluation texts are never seen)"}
        return PassResult(student, {**pruned.report, "matmul_flops_before": before, "distill": report})


    def prune(self, model: onnx.ModelProto, blocks: list[Block], stats: dict[str, LayerStats],
              calibration: Callable[[], Iterator[Batch]] | None,
              cache: dict[Any, tuple[list[int], np.ndarray]] | None = None,
              cuts: list[Cut] | None = None) -> PassResult:
        """plan (with sensitivity probes when adaptive) + apply, from statistics already collected: what run()
        does after collect_stats, exposed so that several configs can share one collection (benchmarks)."""
        cfg: PruneConfig = self.config
        cache = cache if cache is not None else {}
        sensitivity = None
        if cfg.schedule == "adaptive" and cfg.probe_batches > 0 and calibration is not None:
            sensitivity = self.sensitivity(model, blocks, stats, list(_limit(calibration(), cfg.probe_batches)),
                                           cache)
        result = self.apply(model, self.plan(model, blocks, stats, cache, sensitivity), stats, cuts=cuts)
        if sensitivity is not None:
            result.report["sensitivity"] = {b.label: round(sensitivity[b.key], 4) for b in blocks}
        return result

    def sensitivity(self, model: onnx.ModelProto, blocks: list[Block], stats: dict[str, LayerStats],
                    batches: list[Batch], cache: dict[Any, tuple[list[int], np.ndarray]]) -> dict[str, float]:
        """End-to-end error per unit of layer-local loss, per block: prune each block alone at its ratio and compare
        the model's first output with the fp32 one on a few calibration batches. Layer-local losses alone rank the
        layers wrongly (an error in the last layer reaches the output undamped)."""
        cfg: PruneConfig = self.config
        ref = _run_first_output(model, batches)
        uniform = StructuredPrune(replace(cfg, schedule="uniform"))
        base = uniform.plan(model, blocks, stats, cache)
        out: dict[str, float] = {}
        for i, b in enumerate(blocks):
            if not base.remove[i] or base.loss[i] <= 0:
                out[b.key] = 1.0
                continue
            alone = Plan(blocks, [r if j == i else [] for j, r in enumerate(base.remove)], base.loss)
            probe = uniform.apply(model, alone, stats, check=False).model
            got = _run_first_output(probe, batches)
            err = float(np.mean([np.sum((g - r) ** 2) / max(float(np.sum(r * r)), 1e-30)
                                 for g, r in zip(got, ref, strict=True)]))
            out[b.key] = err / base.loss[i]
        # relative to the mean so the unprobed default (1.0) stays comparable
        mean = float(np.mean(list(out.values())))
        return {k: v / mean for k, v in out.items()} if mean > 0 else out


def _run_first_output(model: onnx.ModelProto, batches: list[Batch]) -> list[np.ndarray]:
    """The model's first output on each batch, padding tokens zeroed when there is an attention mask."""
    import onnxruntime as ort

    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    names = [i.name for i in sess.get_inputs()]
    outs = []
    for b in batches:
        y = np.asarray(sess.run(None, {n: b[n] for n in names})[0], dtype=np.float64)
        mask = b.get("attention_mask")
        if mask is not None and y.shape[:2] == mask.shape:
            y = y * mask[..., None]
        outs.append(y)
    return outs


def _limit(it: Iterator[Batch], n: int) -> Iterator[Batch]:
    for i, b in enumerate(it):
        if i >= n:
            break
        yield b


__all__ = ["ATTN_PATTERN", "FFN_PATTERN", "PRUNE_FFN", "PRUNE_HEADS", "PRUNE_RECOVERY", "PRUNE_SCHEDULE", "Block",
           "LayerStats", "Plan", "PruneConfig", "StructuredPrune", "allocate", "collect_stats", "find_attention",
           "find_ffn", "matmul_flops", "refit", "removal_curve"]
