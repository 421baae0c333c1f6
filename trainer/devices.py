"""Which device to compute on, shared by the trainer and the analyzer."""

from __future__ import annotations

import torch

from store.errors import InputError


def resolve_device(device: str) -> torch.device:
    """``auto`` → CUDA when available, else CPU; ``cuda`` without a GPU is an error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        chosen = torch.device(device)
    except RuntimeError:
        raise InputError(f"--device {device!r} is not a device: use auto, cpu, cuda or cuda:N") \
            from None
    if chosen.type not in ("cpu", "cuda", "mps") or (
            chosen.type == "mps" and not torch.backends.mps.is_available()):
        raise InputError(f"--device {device}: not available here; use auto, cpu, cuda or cuda:N")
    if chosen.type == "cuda" and not torch.cuda.is_available():
        raise InputError("--device cuda was asked for, but no CUDA device is available")
    if chosen.type == "cuda" and (chosen.index or 0) >= torch.cuda.device_count():
        raise InputError(f"--device {device}: there are {torch.cuda.device_count()} CUDA devices")
    return chosen
