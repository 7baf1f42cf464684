"""Autograd context queries shared by the heads and the losses."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch

__all__ = ["no_autocast", "transforms_active"]

transforms_active: Callable[[], bool] = getattr(
    torch._C, "_are_functorch_transforms_active", lambda: False
)
"""Whether a ``torch.func`` transform (``vmap``, ``grad``, ``jacrev``, ...) is running."""


_autocast_available: Callable[[str], bool] = getattr(
    torch.amp, "is_autocast_available", lambda device_type: device_type in ("cpu", "cuda")
)


def no_autocast(device_type: str) -> AbstractContextManager[Any]:
    """A context that disables autocast on ``device_type``: a no-op where autocast is off or
    does not exist (the meta device, where even asking raises)."""
    if _autocast_available(device_type) and torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type, enabled=False)
    return nullcontext()
