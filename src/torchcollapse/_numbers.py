"""Reading a user's number argument: any real scalar (Python, numpy, 0-dim tensor), never a bool."""

from __future__ import annotations

import math
from typing import Any

import torch

__all__ = ["as_finite_float"]


def as_finite_float(value: Any) -> float | None:
    """``value`` as a finite Python float, or ``None`` when it is not one.

    Accepted: real scalars of Python, numpy and torch (0-dim or one-element tensors), and anything
    else ``float()`` reads exactly as a number (``Decimal``, ``Fraction``). Refused: bools of any
    kind, complex numbers, strings and bytes, NaN and infinities.
    """
    if isinstance(value, (bool, str, bytes, bytearray, complex)):
        return None
    if isinstance(value, torch.Tensor):
        if value.dtype == torch.bool or value.is_complex():
            return None
    else:
        kind = getattr(getattr(value, "dtype", None), "kind", None)  # numpy scalars
        if kind in ("b", "c"):
            return None
    try:
        number = float(value)
    except (TypeError, ValueError, RuntimeError, OverflowError):
        return None
    return number if math.isfinite(number) else None
