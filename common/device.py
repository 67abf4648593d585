"""Mixed precision: the autocast dtype and context for a device."""
import contextlib

import torch


def amp_dtype(device, mode):
    """Autocast dtype for ``trainer.mixed_precision``: None means plain fp32 (always on CPU)."""
    if device.type != "cuda" or mode == "off":
        return None
    if mode == "bf16" or (mode == "auto" and torch.cuda.is_bf16_supported()):
        return torch.bfloat16
    return torch.float16


def autocast(device, dtype):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)
