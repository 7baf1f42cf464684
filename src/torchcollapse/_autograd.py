"""Autograd context queries shared by the heads and the losses."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch

__all__ = ["double_backward", "no_autocast", "transforms_active"]

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


def double_backward() -> bool:
    """Called in a backward pass: whether it records a graph (``create_graph=True``) for a
    double backward, which closed-form first-order gradients cannot serve. ``torch.func.grad``
    runs its (first-order) backward with grad mode on too, and compiled code is traced, not
    run: neither counts."""
    return torch.is_grad_enabled() and not torch.compiler.is_compiling() and not transforms_active()
