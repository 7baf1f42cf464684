"""The label-range check shared by the losses and the heads."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["check_label_range", "label_range_error"]


def label_range_error(target: Tensor, num_classes: int) -> ValueError | None:
    """The error for CPU labels outside ``[0, num_classes)``, or ``None`` when they are inside."""
    if target.numel() == 0:
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
    call synchronises with the host; nothing under ``torch.compile``.
    """
    if torch.compiler.is_compiling() or target.numel() == 0:
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
