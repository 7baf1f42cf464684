"""Long-tailed subsets of a balanced dataset: class-count profiles and deterministic subsampling.

Two profiles from the imbalanced-learning literature, both parametrized by the imbalance ratio
``rho = n_max / n_min``:

* **exponential** (Cui et al., 2019, "Class-Balanced Loss Based on Effective Number of Samples";
  Cao et al., 2019, "Learning Imbalanced Datasets with Label-Distribution-Aware Margin Loss"):
  ``n_c = floor(n_max * rho ** (-c / (K - 1)))`` for ``c = 0, ..., K - 1``. With ``n_max = 5000``
  and ``rho = 100`` this gives the CIFAR-10-LT counts ``5000, 2997, ..., 83, 50`` (12,406 images).
* **step** (Buda et al., 2018; Cao et al., 2019): the first ``K - floor(mu * K)`` classes keep
  ``n_max`` samples, the remaining ``floor(mu * K)`` *minority* classes keep
  ``floor(n_max / rho)``, with ``mu`` the minority fraction (``0.5``: the last half of the classes).
  This is also the setting in which Fang et al. (2021) describe minority collapse.

The subsampler keeps, for each class, a uniformly random subset of the requested size, drawn from a
``torch.Generator`` so that a seed fixes the subset; the test set stays balanced.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor

__all__ = [
    "PROFILES",
    "head_tail_split",
    "long_tail_counts",
    "long_tail_indices",
]

PROFILES: tuple[str, ...] = ("exponential", "step")

# Relative slack added before flooring, so that products which are integers in exact arithmetic
# (e.g. 5000 * 100 ** -1 = 50) are not floored to one less by a rounding error of ~1e-16.
_FLOOR_SLACK = 1e-9


def _floor(value: float) -> int:
    return math.floor(value * (1.0 + _FLOOR_SLACK))


def long_tail_counts(
    num_classes: int,
    max_count: int,
    imbalance_ratio: float,
    profile: Literal["exponential", "step"] = "exponential",
    *,
    minority_fraction: float = 0.5,
) -> list[int]:
    """Per-class sample counts of a long-tailed profile; class 0 is the most frequent.

    Args:
        num_classes: number of classes ``K`` (at least 2).
        max_count: ``n_max``, the count of the most frequent class (at least 1).
        imbalance_ratio: ``rho = n_max / n_min`` (at least 1; 1 gives a balanced profile).
        profile: ``"exponential"`` (``n_c = floor(n_max * rho ** (-c / (K - 1)))``) or
            ``"step"`` (``n_max`` for the first ``K - floor(mu K)`` classes, ``floor(n_max / rho)``
            for the rest).
        minority_fraction: ``mu``, the fraction of minority classes of the step profile.

    Returns:
        ``K`` counts, non-increasing, each at least 1.

    Raises:
        ValueError: if an argument is out of range or the smallest class would be empty.

    Example:
        >>> long_tail_counts(10, 5000, 100)  # the CIFAR-10-LT counts of Cao et al. (2019)
        [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50]
        >>> long_tail_counts(4, 100, 10, "step")  # two majority, two minority classes
        [100, 100, 10, 10]
    """
    if not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(
            f"Expected argument `num_classes` to be an integer >= 2, but got {num_classes!r}."
        )
    if not isinstance(max_count, int) or max_count < 1:
        raise ValueError(
            f"Expected argument `max_count` to be an integer >= 1, but got {max_count!r}."
        )
    if not math.isfinite(imbalance_ratio) or imbalance_ratio < 1:
        raise ValueError(
            f"Expected argument `imbalance_ratio` to be a finite number >= 1, "
            f"but got {imbalance_ratio!r}."
        )
    if profile not in PROFILES:
        raise ValueError(
            f"Expected argument `profile` to be one of {PROFILES}, but got {profile!r}."
        )
    if profile == "exponential":
        counts = [
            _floor(max_count * imbalance_ratio ** (-c / (num_classes - 1)))
            for c in range(num_classes)
        ]
    else:
        if not 0 < minority_fraction < 1:
            raise ValueError(
                "Expected argument `minority_fraction` to be in (0, 1), "
                f"but got {minority_fraction!r}."
            )
        num_minority = math.floor(minority_fraction * num_classes)
        if num_minority < 1:
            raise ValueError(
                f"Expected `minority_fraction * num_classes` to be at least 1, but got "
                f"{minority_fraction} * {num_classes}."
            )
        minority = _floor(max_count / imbalance_ratio)
        counts = [max_count] * (num_classes - num_minority) + [minority] * num_minority
    if counts[-1] < 1:
        raise ValueError(
            f"Expected `max_count / imbalance_ratio` to be at least 1, so that every class keeps "
            f"a sample, but got {max_count} / {imbalance_ratio}."
        )
    return counts


def long_tail_indices(
    target: Tensor,
    counts: Sequence[int],
    *,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Indices of a subset with exactly ``counts[c]`` samples of each class ``c``.

    For each class a uniformly random subset (without replacement) of its samples is kept; the
    random draws come from ``generator``, so a seeded generator gives the same subset every time.

    Args:
        target: 1-D integer labels in ``[0, len(counts))``.
        counts: the number of samples to keep per class, e.g. from :func:`long_tail_counts`.
        generator: source of randomness (a fresh default-seeded one when ``None``).

    Returns:
        Sorted 1-D ``int64`` indices into ``target``.

    Raises:
        ValueError: if ``target`` is not 1-D integer, has labels outside the classes, or a class
            has fewer samples than requested.

    Example:
        >>> target = torch.tensor([0, 1, 0, 1, 0, 1, 0])
        >>> idx = long_tail_indices(target, [3, 1], generator=torch.Generator().manual_seed(0))
        >>> torch.bincount(target[idx], minlength=2).tolist()
        [3, 1]
    """
    if target.ndim != 1 or target.dtype.is_floating_point or target.dtype == torch.bool:
        raise ValueError(
            "Expected argument `target` to be a 1-D integer tensor, "
            f"but got shape {tuple(target.shape)} and dtype {target.dtype}."
        )
    num_classes = len(counts)
    if target.numel() and (int(target.min()) < 0 or int(target.max()) >= num_classes):
        raise ValueError(
            f"Expected argument `target` to hold labels in [0, {num_classes}), but got labels in "
            f"[{int(target.min())}, {int(target.max())}]."
        )
    if generator is None:
        generator = torch.Generator().manual_seed(0)
    target = target.cpu()
    available = torch.bincount(target, minlength=num_classes)
    keep = []
    for c, n in enumerate(counts):
        if n < 0 or n > int(available[c]):
            raise ValueError(
                f"Expected `counts[{c}]` to be in [0, {int(available[c])}] (the samples of class "
                f"{c}), but got {n}."
            )
        members = torch.nonzero(target == c).flatten()
        keep.append(members[torch.randperm(len(members), generator=generator)[:n]])
    return torch.sort(torch.cat(keep)).values


def head_tail_split(counts: Sequence[int], tail_fraction: float = 0.5) -> tuple[Tensor, Tensor]:
    """Boolean masks of the head (majority) and tail (minority) classes of a count profile.

    The ``floor(tail_fraction * K)`` classes with the fewest samples (ties broken towards the higher
    class index) form the tail; on a step profile with the same fraction they are exactly its
    minority classes, and on an exponential one they are the last classes.

    Args:
        counts: per-class training counts.
        tail_fraction: fraction of classes in the tail, in ``(0, 1)``.

    Returns:
        ``(head, tail)``: two complementary boolean tensors of length ``K``.

    Example:
        >>> head, tail = head_tail_split([50, 40, 5, 4])
        >>> head.tolist(), tail.tolist()
        ([True, True, False, False], [False, False, True, True])
    """
    if not 0 < tail_fraction < 1:
        raise ValueError(
            f"Expected argument `tail_fraction` to be in (0, 1), but got {tail_fraction!r}."
        )
    num_classes = len(counts)
    num_tail = math.floor(tail_fraction * num_classes)
    if num_tail < 1 or num_tail >= num_classes:
        raise ValueError(
            f"Expected `tail_fraction * len(counts)` to leave a non-empty head and tail, but got "
            f"{tail_fraction} * {num_classes}."
        )
    # Sort by (count ascending, class index descending): the first `num_tail` are the tail.
    order = sorted(range(num_classes), key=lambda c: (counts[c], -c))
    tail = torch.zeros(num_classes, dtype=torch.bool)
    tail[order[:num_tail]] = True
    return ~tail, tail
