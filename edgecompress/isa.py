"""What a target's CPU features mean for kernel choice: the one home of these facts; every pass and the search ask
here, so two passes can never disagree (they used to: int4 and the decoder passes had different int8-dot lists).

ISA names are targets.py's normalised flags (targets.KNOWN_ISA). Layering: imports nothing internal.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

# A true int8 dot product with 32-bit accumulation: Arm sdot/smmla, x86 VNNI. MatMulNBits at accuracy_level 4
# quantizes activations to int8 per block and multiplies in int8 only where this exists. Plain AVX2 is left out on
# purpose: its u8 x s8 pair sums accumulate in int16 and can saturate (the reason static int8 uses reduce_range
# there, see passes/quantize_int8.isa_choice).
INT8_DOT = ("dotprod", "i8mm", "avx512_vnni", "avx_vnni")
# x86 VNNI: ORT's x86 int8 GEMMs accumulate u8 x s8 in int32 without saturation
X86_VNNI = frozenset({"avx512_vnni", "avx_vnni"})
# Any integer GEMM path ORT's CPU kernels use for int8 activations (MatMulInteger, QLinear*): without one, int8
# recipes only save bytes
INT8_GEMM = frozenset({"avx2", "avx512_vnni", "avx_vnni", "neon", "dotprod", "i8mm"})
# fp16 arithmetic on the CPU (Armv8.2 FP16); without it fp16 runs as fp32 with casts
FP16_ARITHMETIC = frozenset({"fp16"})
# bfloat16 dot products (Arm FEAT_BF16, x86 AVX512-BF16/AMX-BF16): oneDNN runs torch's bf16 matmuls natively;
# without them bf16 is emulated and slower than float32
BF16_ARITHMETIC = frozenset({"bf16"})


def int8_dot(isa: Iterable[str]) -> list[str]:
    """The target's int8 dot-product features, sorted (empty: none)."""
    return sorted(set(INT8_DOT) & set(isa))


def has_int8_gemm(isa: Iterable[str]) -> bool:
    return bool(INT8_GEMM & set(isa))


def has_fp16_arithmetic(isa: Iterable[str]) -> bool:
    return bool(FP16_ARITHMETIC & set(isa))


def has_bf16_arithmetic(isa: Iterable[str]) -> bool:
    return bool(BF16_ARITHMETIC & set(isa))


def accuracy_level_for(isa: Iterable[str], target_name: str = "the target") -> tuple[int, str]:
    """MatMulNBits accuracy_level for a target's ISA, and why: 4 (int8 activations per block, int8 multiply) with an
    int8 dot product, else 0 (left unset: the kernel dequantizes blocks and computes in fp32)."""
    found = int8_dot(isa)
    if found:
        return 4, (f"{target_name} has an int8 dot product ({', '.join(found)}): activations are quantized to int8 "
                   "per block and multiplied in int8")
    return 0, (f"{target_name} has no int8 dot product (none of {', '.join(INT8_DOT)} in its ISA): left "
               "unset, the kernel dequantizes 4-bit blocks and computes in fp32")


# --- what a target's runtime can do with a recipe (search's exclusions, passes' `requires`) ---------------------
GPU_PROVIDERS = ("CUDAExecutionProvider", "TensorrtExecutionProvider")


def on_gpu(target: Any) -> bool:
    return any(p in GPU_PROVIDERS for p in target.runtime.providers)


def no_dynamic_int8_on_gpu(target: Any) -> str | None:
    if on_gpu(target):
        return "dynamic int8 (MatMulInteger/DynamicQuantizeLinear) has no GPU kernels: it falls back to the CPU"
    return None


def no_int8_gemm(target: Any) -> str | None:
    if not on_gpu(target) and not has_int8_gemm(target.hardware.isa):
        return "the CPU has no int8 dot-product path"
    return None


def no_fp16_arithmetic(target: Any) -> str | None:
    if not on_gpu(target) and not has_fp16_arithmetic(target.hardware.isa):
        return "the CPU has no fp16 arithmetic (fp16 would run as fp32 with casts)"
    return None
