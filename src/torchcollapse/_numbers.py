"""Reading a user's number argument: any real scalar (Python, numpy, 0-dim tensor), never a bool."""

from __future__ import annotations

import math
from typing import Any

__all__ = ["as_finite_float"]


def as_finite_float(value: Any) -> float | None:
    """``value`` as a finite Python float, or ``None`` when it is not one (a bool or a string is
    not a number here; NaN and infinities are not finite)."""
    if isinstance(value, (bool, str, bytes)):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError, RuntimeError):
        return None
    return number if math.isfinite(number) else None
