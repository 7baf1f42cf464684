"""Class means, centred class means and the within/between-class covariances.

The building blocks of every neural collapse quantity (Papyan, Han & Donoho, 2020), from
:class:`~torchcollapse.stats.ClassStatistics`, in float64, with the formula sheet's conventions:

- classes without samples are left out, and ``K`` counts the present classes;
- the global mean ``mu_G`` is the mean of the class means (``global_mean="classes"``, the default)
  or the mean of the samples (``global_mean="samples"``); the two agree on balanced data;
- ``Sigma_W = 1/N sum_i (h_i - mu_{y_i})(h_i - mu_{y_i})^T`` (biased, divided by ``N``) and
  ``Sigma_B = 1/K sum_c (mu_c - mu_G)(mu_c - mu_G)^T``.

Example:
    >>> import torch
    >>> from torchcollapse.stats import ClassStatistics
    >>> from torchcollapse.functional import centred_class_means
    >>> features = torch.tensor([[0.0, 0.0], [2.0, 0.0], [0.0, 3.0]])
    >>> stats = ClassStatistics.from_features(features, torch.tensor([0, 1, 2]), num_classes=4)
    >>> centred, present = centred_class_means(stats)
    >>> present  # class 3 has no samples and is left out
    tensor([0, 1, 2])
    >>> centred.sum(0)  # centred about the mean of the class means
    tensor([0., 0.], dtype=torch.float64)
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import Tensor

from torchcollapse.stats import ClassStatistics

__all__ = [
    "GlobalMean",
    "UndefinedCollapse",
    "between_class_covariance",
    "centred_class_means",
    "class_means",
    "within_class_covariance",
]

GlobalMean = Literal["classes", "samples"]


def _check_statistics(statistics: Any) -> None:
    if not isinstance(statistics, ClassStatistics):
        raise TypeError(
            f"Expected argument `statistics` to be a ClassStatistics, but got {type(statistics)}."
        )


def _check_global_mean(global_mean: Any) -> None:
    if global_mean not in ("classes", "samples"):
        raise ValueError(
            "Expected argument `global_mean` to be one of 'classes', 'samples', but got"
            f" {global_mean!r}."
        )


class UndefinedCollapse(ValueError):
    """A collapse quantity is undefined for these statistics (e.g. fewer than two classes)."""


def _present_classes(statistics: ClassStatistics, minimum: int = 2) -> Tensor:
    """Indices of the present classes; raises when fewer than ``minimum`` are present."""
    present = torch.nonzero(statistics.present).squeeze(1)
    if present.numel() < minimum:
        raise UndefinedCollapse(
            f"Expected at least {minimum} classes with samples to measure neural collapse, but got"
            f" {present.numel()} (classes {present.tolist()}) out of num_classes="
            f"{statistics.num_classes}."
        )
    return present


def class_means(statistics: ClassStatistics) -> tuple[Tensor, Tensor]:
    """Means of the present classes.

    Args:
        statistics: accumulated class statistics.

    Returns:
        ``(means, present)``: the ``(K, d)`` float64 means of the ``K`` present classes, and their
        class indices (ascending). (:meth:`ClassStatistics.class_means
        <torchcollapse.stats.ClassStatistics.class_means>` and the metrics' ``class_means()``
        instead give all ``num_classes`` rows, NaN for absent classes: the form
        ``set_class_means`` takes.)

    Raises:
        ValueError: fewer than two classes have samples.
    """
    _check_statistics(statistics)
    stats = statistics.to(dtype=torch.float64)
    present = _present_classes(stats)
    offsets = stats.sums.index_select(0, present) / stats.counts.index_select(0, present)[:, None]
    return stats.shift.index_select(0, present) + offsets, present


def centred_class_means(
    statistics: ClassStatistics, global_mean: GlobalMean = "classes"
) -> tuple[Tensor, Tensor]:
    """Class means minus the global mean ``mu_G``, for the present classes (the matrix ``M``).

    The centring is done on the means relative to a common reference (one class's shift), so an
    offset of the features common to all classes cancels exactly.

    Args:
        statistics: accumulated class statistics.
        global_mean: ``"classes"`` (mean of the class means, default) or ``"samples"`` (mean of
            the samples, i.e. class means weighted by counts).

    Returns:
        ``(centred, present)``: ``(K, d)`` float64 rows ``mu_c - mu_G`` and the present classes.
    """
    _check_global_mean(global_mean)
    _check_statistics(statistics)
    stats = statistics.to(dtype=torch.float64)
    present = _present_classes(stats)
    shift = stats.shift.index_select(0, present)
    offsets = stats.sums.index_select(0, present) / stats.counts.index_select(0, present)[:, None]
    # Means relative to the first present class: shift differences are exact (the shifts are
    # float32-representable), so a large common offset cancels without rounding.
    relative = (shift - shift[0]) + (offsets - offsets[0])
    if global_mean == "classes":
        centre = relative.mean(0)
    else:
        counts = statistics.counts.to(torch.float64).index_select(0, present)
        centre = (counts[:, None] * relative).sum(0) / counts.sum()
    return relative - centre, present


def _differing_centred_means(
    statistics: ClassStatistics, global_mean: GlobalMean = "classes"
) -> tuple[Tensor, Tensor]:
    """:func:`centred_class_means`, raising :class:`UndefinedCollapse` when every present class
    has the same mean (no collapse quantity is defined then)."""
    centred, present = centred_class_means(statistics, global_mean)
    if not bool(centred.any()):
        raise UndefinedCollapse(
            f"Expected the class means to differ, but all {present.numel()} present classes have"
            " the same mean (constant features?): no collapse quantity is defined."
        )
    return centred, present


def within_class_covariance(statistics: ClassStatistics) -> Tensor:
    """``(d, d)`` ``Sigma_W = 1/N sum_i (h_i - mu_{y_i})(h_i - mu_{y_i})^T`` in float64 (biased).

    Example:
        >>> from torchcollapse.stats import ClassStatistics
        >>> stats = ClassStatistics.from_features(
        ...     torch.tensor([[1.0], [3.0], [5.0], [5.0]]), torch.tensor([0, 0, 1, 1]), 2
        ... )
        >>> within_class_covariance(stats)
        tensor([[0.5000]], dtype=torch.float64)
    """
    _check_statistics(statistics)
    stats = statistics.to(dtype=torch.float64)
    total = stats.total
    if float(total) == 0:
        raise ValueError("Expected the statistics to hold at least one sample, but got none.")
    return stats.within_class_scatter() / total


def between_class_covariance(
    statistics: ClassStatistics, global_mean: GlobalMean = "classes"
) -> Tensor:
    """``(d, d)`` ``Sigma_B = 1/K sum_c (mu_c - mu_G)(mu_c - mu_G)^T`` over the present classes."""
    centred, present = centred_class_means(statistics, global_mean)
    return centred.T @ centred / present.numel()
