"""Device choice: CUDA, then Apple's MPS, then the CPU, unless the user names one."""

from __future__ import annotations

import torch


def pick_device(requested: str = "auto") -> torch.device:
    """Resolve 'auto' or an explicit device name, refusing one this machine does not have."""
    if requested == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(requested)
    except RuntimeError as exc:
        raise ValueError(
            f"train.device: expected auto, cpu, cuda, cuda:N or mps, found {requested!r}"
        ) from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"train.device: {requested!r} was asked for but CUDA is not available")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"train.device: {requested!r} was asked for but MPS is not available")
    return device
