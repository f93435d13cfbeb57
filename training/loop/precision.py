"""Mixed precision is the trainer's own, not accelerate's: the base UNet in bf16 or fp16 under autocast, the LoRA
adapters in fp32, and for fp16 the loops' per-optimizer GradScalers (accelerate's scaler needs
``accelerator.backward``, which cannot do the loops' staged backward)."""

from __future__ import annotations

import torch

WEIGHT_DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}  # --mixed-precision → base UNet


def auto_mixed_precision() -> str:
    """bf16 (autocast over a bf16 base, fp32 adapters) on a GPU that supports it; full precision elsewhere."""
    return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"


def autocast(device: torch.device, mixed_precision: str) -> torch.autocast:
    """The autocast region of the method's forward passes (a no-op in full precision)."""
    return torch.autocast(device.type, dtype=WEIGHT_DTYPES[mixed_precision], enabled=mixed_precision != "no")
