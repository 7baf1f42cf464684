"""The label-range check shared by the losses and the heads."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from torchcollapse._autograd import transforms_active

__all__ = ["check_label_range", "label_range_error"]

_functorch: Any = getattr(torch._C, "_functorch", None)
_VMAP: Any = getattr(getattr(_functorch, "TransformType", None), "Vmap", None)


def _vmap_active() -> bool:
    """Whether a ``torch.func.vmap`` is running: the labels may then be batched, and a batched
    tensor has no values to read on the host (``int()`` raises). Without any ``torch.func``
    transform running (the common case) one cheap flag answers, without walking the stack of
    transform interpreters."""
    if not transforms_active():
        return False
    stack: list[Any] | None = getattr(_functorch, "get_interpreter_stack", lambda: None)()
    return any(level.key() == _VMAP for level in stack or ())


def label_range_error(target: Tensor, num_classes: int) -> ValueError | None:
    """The error for CPU labels outside ``[0, num_classes)``, or ``None`` when they are inside
    (or cannot be read: under ``torch.func.vmap``)."""
    if target.numel() == 0 or _vmap_active():
        return None
    low, high = (int(v) for v in torch.aminmax(target))
    if low >= 0 and high < num_classes:
        return None
    return ValueError(
        f"Expected argument `target` to hold labels in [0, {num_classes - 1}], but got "
        f"labels in [{low}, {high}]."
    )


def check_label_range(target: Tensor, num_classes: int) -> None:
    """Raise unless ``target`` holds labels in ``[0, num_classes)``.

    On CPU a ``ValueError``; on accelerators an asynchronous device-side assertion, so that no
    call synchronises with the host; nothing under ``torch.compile`` or ``torch.func.vmap``
    (per-sample gradients), where labels out of range fail in the indexing that follows.
    """
    if torch.compiler.is_compiling() or target.numel() == 0 or _vmap_active():
        return
    if not target.is_cpu:
        torch._assert_async(
            ((target >= 0) & (target < num_classes)).all(),
            f"Expected argument `target` to hold labels in [0, {num_classes - 1}].",
        )
        return
    error = label_range_error(target, num_classes)
    if error is not None:
        raise error
