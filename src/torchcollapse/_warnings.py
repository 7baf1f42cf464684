"""Warnings that point at the user's line, through torch's and torchmetrics' call machinery."""

from __future__ import annotations

import os
import sys

import torch
import torchmetrics

__all__ = ["user_stacklevel"]

_LIBRARIES = tuple(
    os.path.dirname(os.path.abspath(module.__file__ or "")) + os.sep
    for module in (torch, torchmetrics, sys.modules[__name__.rsplit(".", 1)[0]])
)


def user_stacklevel() -> int:
    """The ``stacklevel`` for a ``warnings.warn`` in the function calling this: the first frame
    outside torch, torchmetrics and this library (an ``nn.Module`` call, a ``MetricCollection``
    or a model around a head add frames that a fixed level would point into)."""
    frame = sys._getframe(1)  # the function that warns: level 1
    level = 1
    while frame.f_back is not None and frame.f_code.co_filename.startswith(_LIBRARIES):
        frame = frame.f_back
        level += 1
    return level
