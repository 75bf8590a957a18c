"""Device selection for every torch path: `"auto"` = CUDA when available, else CPU."""

from __future__ import annotations

import re

import torch

from survfuse.registry import look_up_option

_KINDS = ("auto", "cpu", "cuda", "mps")


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """Return a `torch.device`; `"auto"` picks CUDA when available, else CPU.

    Accepts `"auto"`, `"cpu"`, `"cuda"`, `"cuda:N"`, `"mps"` or a `torch.device`; a misspelt
    name raises a ValueError with a did-you-mean suggestion, and asking for CUDA on a machine
    without it says so instead of failing later inside torch.
    """
    if isinstance(device, torch.device):
        return device
    name = str(device).strip().lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    kind = re.sub(r":\d+$", "", name)
    look_up_option(kind, _KINDS, kind="device")
    if kind == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available; use 'auto'")
    return torch.device(name)
