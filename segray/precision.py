"""The compute dtype of a model's forward (and backward) pass: ``--precision`` of train and infer.

bf16 autocast halves the bytes every convolution moves and runs on the bf16 units of the
hardware: a GPU's tensor cores, and on a CPU Intel's AMX tiles or AVX512-BF16, where oneDNN's
bf16 convolutions are about twice as fast as fp32 (bench/precision_bench.py, docs/benchmarks.md).
On a CPU without them bf16 is emulated and slower than fp32, so there ``bf16`` means fp32.
Weights, optimizer state, the loss and every average stay fp32; only the passes are autocast.
"""

from __future__ import annotations

import torch

PRECISIONS: tuple[str, ...] = ("auto", "bf16", "fp32")
PRECISION_HELP = (
    "compute dtype of the model's passes (weights, loss and averages stay fp32): bf16 (autocast, channels-last) on "
    "a GPU and on a CPU with native bf16 (AMX or AVX512-BF16: about 2x faster than fp32, docs/benchmarks.md; a CPU "
    "without it runs fp32), fp32, or auto (default): bf16 on a GPU, fp32 on a CPU"
)


def native_bf16_cpu() -> bool:
    """True when this CPU computes bf16 in hardware (AMX tiles or AVX512-BF16)."""
    try:
        return bool(torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def compute_precision(precision: str, device: torch.device) -> str:
    """What ``precision`` (PRECISIONS) means on ``device``: ``"bf16"`` or ``"fp32"``.

    auto: bf16 on a GPU (the speed of fp16 without loss scaling), fp32 on a CPU. bf16: on a GPU,
    and on a CPU with native bf16; fp32 on any other CPU. fp32: everywhere."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r} is unknown; valid: {', '.join(PRECISIONS)}")
    if precision == "fp32":
        return "fp32"
    if device.type == "cuda":
        return "bf16"
    return "bf16" if precision == "bf16" and native_bf16_cpu() else "fp32"


def autocast(device: torch.device, precision: str):
    """The context of a pass in ``precision`` (compute_precision's answer) on ``device``."""
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=precision == "bf16")
