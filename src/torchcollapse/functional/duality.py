"""Self-duality (NC3): the classifier rows align with the centred class means.

NC3 (Papyan, Han & Donoho, 2020) = ``|| W/||W||_F - M/||M||_F ||_F`` (not squared), with ``W`` the
classifier rows and ``M`` the centred class means ``mu_c - mu_G`` of the present classes (rows of
absent classes are left out of both). ``W`` is used as is (not centred), as the formula sheet says.
The per-class view is the cosine ``cos(w_c, mu_c - mu_G)``.

Example:
    >>> import torch
    >>> from torchcollapse.stats import ClassStatistics
    >>> from torchcollapse.functional import neural_collapse_nc3
    >>> features = torch.tensor([[1.0, 0.0], [-1.0, 0.0]])
    >>> stats = ClassStatistics.from_features(features, torch.tensor([0, 1]), 2)
    >>> neural_collapse_nc3(stats, torch.tensor([[2.0, 0.0], [-2.0, 0.0]]))  # W proportional to M
    tensor(0., dtype=torch.float64)
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from torchcollapse.functional.means import GlobalMean, _differing_centred_means
from torchcollapse.stats import ClassStatistics

__all__ = ["neural_collapse_nc3", "neural_collapse_nc3_cosine"]


def _check_weight(
    weight: Any, num_classes: int, num_features: int, name: str = "weight", *, finite: bool = True
) -> Tensor:
    """Validate a ``(K, d)`` classifier weight; return it detached in float64.

    With ``finite`` (a host read on accelerators) NaN or Inf entries raise."""
    if not isinstance(weight, Tensor):
        raise TypeError(f"Expected argument `{name}` to be a torch.Tensor, but got {type(weight)}.")
    if tuple(weight.shape) != (num_classes, num_features):
        raise ValueError(
            f"Expected argument `{name}` to have shape (num_classes, num_features) ="
            f" ({num_classes}, {num_features}), but got {tuple(weight.shape)}."
        )
    return _checked_values(weight, name, finite)


def _check_bias(
    bias: Any, num_classes: int, name: str = "bias", *, finite: bool = True
) -> Tensor | None:
    """Validate an optional ``(K,)`` classifier bias; return it detached in float64."""
    if bias is None:
        return None
    if not isinstance(bias, Tensor):
        raise TypeError(f"Expected argument `{name}` to be a torch.Tensor, but got {type(bias)}.")
    if tuple(bias.shape) != (num_classes,):
        raise ValueError(
            f"Expected argument `{name}` to have shape (num_classes,) = ({num_classes},), but got"
            f" {tuple(bias.shape)}."
        )
    return _checked_values(bias, name, finite)


def _checked_values(tensor: Tensor, name: str, finite: bool) -> Tensor:
    """``tensor`` detached in float64; raise unless it is floating point (and, with ``finite``,
    free of NaN and Inf: a host read on accelerators)."""
    if not tensor.is_floating_point():
        raise TypeError(
            f"Expected argument `{name}` to be a floating point tensor, but got {tensor.dtype}."
        )
    if finite and not bool(torch.isfinite(tensor).all()):
        raise ValueError(f"Expected argument `{name}` to be finite, but got NaN or Inf.")
    return tensor.detach().to(torch.float64)


def _nc3(weight_rows: Tensor, centred: Tensor) -> Tensor:
    w = weight_rows.to(device=centred.device, dtype=torch.float64)
    distance: Tensor = torch.linalg.matrix_norm(
        w / torch.linalg.matrix_norm(w) - centred / torch.linalg.matrix_norm(centred)
    )
    return distance


def _nc3_cosine(weight_rows: Tensor, centred: Tensor) -> Tensor:
    w = weight_rows.to(device=centred.device, dtype=torch.float64)
    return torch.nn.functional.cosine_similarity(w, centred, dim=1, eps=0.0)


def neural_collapse_nc3(
    statistics: ClassStatistics, weight: Tensor, *, global_mean: GlobalMean = "classes"
) -> Tensor:
    """NC3 = ``|| W/||W||_F - M/||M||_F ||_F`` over the present classes (float64, 0-d).

    Args:
        statistics: accumulated class statistics.
        weight: ``(K, d)`` classifier weight (all ``K`` classes; rows of absent classes are
            dropped).
        global_mean: ``"classes"`` (default) or ``"samples"``.

    Raises:
        UndefinedCollapse: fewer than two classes have samples, or all their means are equal.
    """
    centred, present = _differing_centred_means(statistics, global_mean)
    w = _check_weight(weight, statistics.num_classes, statistics.num_features)
    rows = w.to(centred.device).index_select(0, present)
    if not bool(rows.any()):
        raise ValueError(
            "Expected argument `weight` to have a non-zero row among the present classes (NC3"
            " normalizes it), but its rows of the present classes are all zero."
        )
    return _nc3(rows, centred)


def neural_collapse_nc3_cosine(
    statistics: ClassStatistics, weight: Tensor, *, global_mean: GlobalMean = "classes"
) -> Tensor:
    """Per-class ``cos(w_c, mu_c - mu_G)`` for the present classes, in ascending class order.

    Returns:
        ``(K_present,)`` float64 cosines; ``statistics.present`` maps them to class indices.

    Example:
        >>> from torchcollapse.stats import ClassStatistics
        >>> stats = ClassStatistics.from_features(
        ...     torch.tensor([[1.0, 0.0], [-1.0, 0.0]]), torch.tensor([0, 2]), 3
        ... )
        >>> neural_collapse_nc3_cosine(stats, torch.tensor([[1.0, 1.0], [5.0, 5.0], [-1.0, 0.0]]))
        tensor([0.7071, 1.0000], dtype=torch.float64)
    """
    centred, present = _differing_centred_means(statistics, global_mean)
    w = _check_weight(weight, statistics.num_classes, statistics.num_features)
    rows = w.to(centred.device).index_select(0, present)
    for matrix, name, what in ((rows, "weight", "rows"), (centred, "statistics", "centred means")):
        zero = present[torch.linalg.vector_norm(matrix, dim=1) == 0].tolist()
        if zero:
            raise ValueError(
                f"Expected the {what} of argument `{name}` to be non-zero for every present class"
                f" (a cosine is undefined otherwise), but those of classes {zero} are zero."
            )
    return _nc3_cosine(rows, centred)
