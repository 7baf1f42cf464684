"""Choosing the logit scale (inverse temperature) of a normalized head.

With unit-norm features and unit-norm class vectors, logits are ``s cos(w_c, h)`` and lie in
``[-s, s]``, so the scale ``s`` bounds how small the cross-entropy can get. For a simplex ETF
(pairwise cosines ``-1/(K-1)``) the loss of a sample is smallest when its feature points exactly at
its class vector; then the target logit is ``s`` and the others are ``-s/(K-1)``, and the loss is

    ``L_min(s) = log(1 + (K - 1) exp(-s K / (K - 1)))``,

which inverts in closed form to

    ``s = (K - 1) / K * log((K - 1) / (exp(L_min) - 1))``.

A scale too small keeps the loss high even at perfect collapse (gradients never vanish); a scale
too large makes the logits, and their gradients, large. :func:`scale_for_loss_floor` picks the
scale for a chosen floor; heads use :data:`DEFAULT_LOSS_FLOOR` when no scale is given. For frames
other than the simplex (orthogonal, spherical codes) the floor at a given scale is higher, since
some class vectors are closer than ``-1/(K-1)``; the formula is then a guide, not a bound.

References:
    Wang et al. (2017), *NormFace: L2 hypersphere embedding for face verification*, ACM MM
    (the loss lower bound of normalized softmax, Proposition 2).
"""

from __future__ import annotations

import math

from torchcollapse._numbers import as_real_float, read_int

__all__ = ["DEFAULT_LOSS_FLOOR", "cross_entropy_floor", "scale_for_loss_floor"]

DEFAULT_LOSS_FLOOR = 0.01
"""Cross-entropy floor of the default scale of the normalized heads (``exp(-0.01)`` = 0.99 on the
target at perfect collapse)."""


def _check_num_classes(num_classes: object) -> int:
    """Any integer type (numpy's, 0-dim tensors), not a bool; at least 2."""
    return read_int(num_classes, "num_classes", 2)


def _real_number(value: object, name: str) -> float:
    """``value`` as a Python float (NaN and infinities included: the caller checks the range):
    any real scalar (Python, numpy, 0-dim tensor, also a head's learnable ``scale``), not a
    bool."""
    number = as_real_float(value)
    if number is None:
        raise TypeError(
            f"Expected argument `{name}` to be a real number, but got {type(value).__name__}."
        )
    return number


def cross_entropy_floor(scale: float, num_classes: int) -> float:
    """Smallest cross-entropy a simplex-ETF head with logit scale ``scale`` can reach.

    ``log(1 + (K - 1) exp(-scale K / (K - 1)))``: the loss of a unit feature equal to its class
    vector, the best any unit feature can do.

    Args:
        scale: logit scale ``s >= 0``: any real scalar (Python, numpy, a 0-dim tensor such as
            the ``scale`` of a head with a learnable scale).
        num_classes: number of classes ``K >= 2``: any integer (Python, numpy, 0-dim tensor).

    Returns:
        The loss floor in nats (``log K`` at ``s = 0``), a Python float.

    Raises:
        TypeError: when ``scale`` is not a real number or ``num_classes`` not an integer.
        ValueError: when ``scale`` is negative or NaN, or ``num_classes < 2``.

    Example:
        >>> round(cross_entropy_floor(0.0, 10), 4) == round(math.log(10), 4)
        True
        >>> round(cross_entropy_floor(16.0, 10), 8)  # NormFace's s = 16 at 10 classes
        1.6e-07
    """
    k = _check_num_classes(num_classes)
    value = _real_number(scale, "scale")
    if not value >= 0:
        raise ValueError(f"Expected argument `scale` to be a number >= 0, but got {scale!r}.")
    return math.log1p((k - 1) * math.exp(-value * k / (k - 1)))


def scale_for_loss_floor(loss_floor: float, num_classes: int) -> float:
    """Logit scale at which a simplex-ETF head's cross-entropy floor is ``loss_floor``.

    The inverse of :func:`cross_entropy_floor`: ``(K - 1) / K * log((K - 1) / (exp(L) - 1))``.

    Args:
        loss_floor: target floor ``L`` in nats, ``0 < L < log K``: any real scalar (Python,
            numpy, 0-dim tensor).
        num_classes: number of classes ``K >= 2``: any integer (Python, numpy, 0-dim tensor).

    Returns:
        The scale ``s > 0``, a Python float.

    Raises:
        TypeError: when ``loss_floor`` is not a real number or ``num_classes`` not an integer.
        ValueError: when ``loss_floor`` is outside ``(0, log K)`` or ``num_classes < 2``.

    Example:
        >>> s = scale_for_loss_floor(0.01, 100)
        >>> round(s, 3)
        9.103
        >>> round(cross_entropy_floor(s, 100), 12)
        0.01
    """
    k = _check_num_classes(num_classes)
    value = _real_number(loss_floor, "loss_floor")
    if not 0 < value < math.log(k):
        raise ValueError(
            "Expected argument `loss_floor` to be in (0, log(num_classes)) = "
            f"(0, {math.log(k):.4f}), but got {loss_floor!r}."
        )
    return (k - 1) / k * (math.log(k - 1) - math.log(math.expm1(value)))
