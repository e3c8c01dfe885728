"""Which torch device a ``--device`` word names (every stage that runs a network)."""

from __future__ import annotations

import torch

from core.errors import CladError


def resolve_device(name: str) -> torch.device:
    """``auto`` (CUDA when visible, else the CPU), ``cpu`` or ``cuda``; anything else is one line."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise CladError("--device cuda: no CUDA device is visible; use --device cpu or auto")
    if name not in ("cpu", "cuda"):
        raise CladError(f"--device {name!r}: choose auto, cpu or cuda")
    return torch.device(name)
