"""Device helpers shared by the benchmark scripts (imported from their own folder)."""

from __future__ import annotations

import torch

__all__ = ["sync"]


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op on CPU), so that a timer reads finished work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
