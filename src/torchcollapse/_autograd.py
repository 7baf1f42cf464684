"""Autograd context queries shared by the heads and the losses."""

from __future__ import annotations

from collections.abc import Callable

import torch

__all__ = ["transforms_active"]

transforms_active: Callable[[], bool] = getattr(
    torch._C, "_are_functorch_transforms_active", lambda: False
)
"""Whether a ``torch.func`` transform (``vmap``, ``grad``, ``jacrev``, ...) is running."""
