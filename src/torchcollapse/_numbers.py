"""Reading a user's number argument: any real scalar (Python, numpy, 0-dim tensor), never a bool;
and checking a ``dtype`` argument."""

from __future__ import annotations

import math
import operator
from collections.abc import Callable
from typing import Any

import torch

__all__ = [
    "as_finite_float",
    "as_int",
    "as_real_float",
    "check_float_dtype",
    "read_int",
    "read_number",
]


def as_real_float(value: Any) -> float | None:
    """``value`` as a Python float, NaN and infinities included, or ``None`` when it is not a
    real number.

    Accepted: real scalars of Python, numpy and torch (0-dim or one-element tensors, also ones
    that require grad, such as a learnable scale), and anything else ``float()`` reads exactly
    as a number (``Decimal``, ``Fraction``). Refused: bools of any kind, complex numbers,
    strings and bytes.
    """
    if isinstance(value, (bool, str, bytes, bytearray, complex)):
        return None
    if isinstance(value, torch.Tensor):
        if value.dtype == torch.bool or value.is_complex():
            return None
        value = value.detach()  # float() of a tensor that requires grad warns
    else:
        kind = getattr(getattr(value, "dtype", None), "kind", None)  # numpy scalars
        if kind in ("b", "c"):
            return None
    try:
        return float(value)
    except (TypeError, ValueError, RuntimeError, OverflowError):
        return None


def as_finite_float(value: Any) -> float | None:
    """``value`` as a finite Python float, or ``None`` when it is not one: what
    :func:`as_real_float` accepts, less NaN and infinities."""
    number = as_real_float(value)
    return number if number is not None and math.isfinite(number) else None


def read_number(
    value: Any, name: str, expected: str, accept: Callable[[float], bool] | None = None
) -> float:
    """``value`` as a finite Python float (see :func:`as_real_float`) that ``accept`` takes.

    Not a real number at all (a string, ``None``, a bool, a complex number, a tensor of several
    numbers): a ``TypeError`` naming the type, ``Expected argument `{name}` to be a real
    number, but got {type}.``, as PyTorch does for ``nn.Linear("2", 3)``; a real number that
    is NaN, infinite or that ``accept`` refuses: a ``ValueError`` with the value, ``Expected
    argument `{name}` to be {expected}, but got {value!r}.`` (the convention of
    :func:`read_int`).
    """
    number = as_real_float(value)
    if number is None:
        got = type(value).__name__
        shape = getattr(value, "shape", None)
        if isinstance(value, torch.Tensor) or shape:  # of several numbers, bools or complex
            got += f" of shape {tuple(value.shape)} and dtype {value.dtype}"
        raise TypeError(f"Expected argument `{name}` to be a real number, but got {got}.")
    if not math.isfinite(number) or (accept is not None and not accept(number)):
        raise ValueError(f"Expected argument `{name}` to be {expected}, but got {value!r}.")
    return number


def as_int(value: Any) -> int | None:
    """``value`` as a Python int, or ``None`` when it is not an integer.

    Accepted: whatever ``operator.index`` reads (Python and numpy integers, 0-dim or one-element
    integer tensors). Refused: bools of any kind, floats (also integral ones), strings.
    """
    dtype = getattr(value, "dtype", None)
    if isinstance(value, bool) or dtype == torch.bool or getattr(dtype, "kind", None) == "b":
        return None
    try:
        return operator.index(value)
    except (TypeError, RuntimeError):  # RuntimeError: a tensor of several elements
        return None


def read_int(value: Any, name: str, minimum: int = 1, when: str = "") -> int:
    """``value`` as a Python int of at least ``minimum`` (see :func:`as_int`: numpy integers and
    0-dim integer tensors too, never a bool).

    Not an integer at all: a ``TypeError`` naming the type, ``Expected argument `{name}` to be
    an integer{when}, but got {type}.``; an integer below ``minimum``: a ``ValueError`` with the
    value, ``Expected argument `{name}` to be a positive integer{when}, but got {value}.`` (``at
    least {minimum}`` unless ``minimum`` is 1).
    """
    number = as_int(value)
    if number is None:
        raise TypeError(
            f"Expected argument `{name}` to be an integer{when}, but got {type(value).__name__}."
        )
    if number < minimum:
        expected = "a positive integer" if minimum == 1 else f"at least {minimum}"
        raise ValueError(f"Expected argument `{name}` to be {expected}{when}, but got {number}.")
    return number


def check_float_dtype(dtype: Any, name: str = "dtype") -> None:
    """Raise a ``TypeError`` unless ``dtype`` is ``None`` or a real floating ``torch.dtype`` (not
    an integer, bool or complex dtype, not a string such as ``"float32"``)."""
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise TypeError(f"Expected argument `{name}` to be a floating dtype, but got {dtype!r}.")
