"""Warnings that point at the user's line, through torch's and torchmetrics' call machinery."""

from __future__ import annotations

import contextlib
import os
import sys

import torch
import torchmetrics

__all__ = ["user_stacklevel"]

_LIBRARIES = tuple(
    os.path.dirname(os.path.abspath(module.__file__ or "")) + os.sep
    for module in (torch, torchmetrics, sys.modules[__name__.rsplit(".", 1)[0]])
)


_CONTEXTLIB = os.path.abspath(contextlib.__file__)


def _internal(filename: str) -> bool:
    """Whether a frame of ``filename`` is call machinery: torch, torchmetrics, this library, or
    ``contextlib`` (the exit of a ``with`` block)."""
    return filename.startswith(_LIBRARIES) or filename == _CONTEXTLIB


def user_stacklevel() -> int:
    """The ``stacklevel`` for a ``warnings.warn`` in the function calling this: the first frame
    outside torch, torchmetrics, this library and ``contextlib`` (an ``nn.Module`` call, a
    ``MetricCollection``, a model around a head or the end of a ``with`` block add frames that
    a fixed level would point into)."""
    frame = sys._getframe(1)  # the function that warns: level 1
    level = 1
    while frame.f_back is not None and _internal(frame.f_code.co_filename):
        frame = frame.f_back
        level += 1
    return level
