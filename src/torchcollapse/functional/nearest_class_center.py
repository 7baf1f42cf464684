"""Simplification to the nearest class centre (NC4): the classifier decides like its class means.

NC4 (Papyan, Han & Donoho, 2020) = fraction of samples where ``argmax_c (W h + b)_c`` (the
classifier's decision, bias included, over all ``K`` classes) differs from
``argmin_c ||h - mu_c||`` (the nearest class centre, over the classes present in the reference).

NC4 needs the class means *before* it sees the samples, so it is exact only with **reference class
means**: the means of the training features computed by a first pass over the data (two passes), or
the means of the previous epoch. :func:`neural_collapse` uses the means of the same features (two
passes over full tensors); :class:`~torchcollapse.metrics.NeuralCollapse` takes them from
``set_class_means`` and never approximates silently.

Decisions are computed in float64 (features, weight, bias and means cast up), the distances about
the mean of the reference means so that a common offset cancels; ties go to the lowest class index,
as ``argmax``/``argmin`` do.

Example:
    >>> import torch
    >>> from torchcollapse.functional import neural_collapse_nc4
    >>> means = torch.tensor([[1.0, 0.0], [-1.0, 0.0]])
    >>> weight = torch.tensor([[1.0, 0.0], [-1.0, 0.0]])
    >>> features = torch.tensor([[0.9, 0.3], [-2.0, 1.0], [0.2, 0.0]])
    >>> neural_collapse_nc4(features, weight, torch.tensor([0.0, 1.0]), class_means=means)
    tensor(0.3333, dtype=torch.float64)
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from torchcollapse.functional.duality import _check_bias, _check_weight
from torchcollapse.stats import _check_features

__all__ = ["neural_collapse_nc4"]

_ROWS_TIMES_CLASSES = 1 << 22


def _check_class_means(class_means: Any, num_features: int | None = None) -> Tensor:
    """Validate reference means ``(K, d)``; rows holding a NaN mark classes absent from them."""
    if not isinstance(class_means, Tensor):
        raise TypeError(
            f"Expected argument `class_means` to be a torch.Tensor, but got {type(class_means)}."
        )
    if class_means.ndim != 2 or (num_features is not None and class_means.shape[1] != num_features):
        expected = "(num_classes, num_features)" + (
            "" if num_features is None else f" with num_features={num_features}"
        )
        raise ValueError(
            f"Expected argument `class_means` to have shape {expected}, but got"
            f" {tuple(class_means.shape)}."
        )
    if not class_means.is_floating_point():
        raise TypeError(
            f"Expected argument `class_means` to be a floating point tensor, but got"
            f" {class_means.dtype}."
        )
    means = class_means.detach().to(torch.float64)
    if bool(torch.isinf(means).any()):
        rows = torch.isinf(means).any(1).nonzero().squeeze(1).tolist()
        raise ValueError(
            "Expected argument `class_means` to be finite where a class is present (NaN rows mark"
            f" absent classes), but rows {rows} hold Inf."
        )
    present = torch.isfinite(means).all(1)
    if not bool(present.any()):
        raise ValueError(
            "Expected argument `class_means` to hold at least one finite row (a class present in"
            " the reference), but every row has NaN."
        )
    return means


def _prepare_reference(class_means: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(centre, centred means, scores' offsets)`` for :func:`_nc4_counts` (float64)."""
    present = torch.isfinite(class_means).all(1)
    safe = torch.where(present[:, None], class_means, 0.0)
    centre = safe.sum(0) / present.sum()
    centred = torch.where(present[:, None], safe - centre, 0.0)
    offsets = torch.where(present, 0.5 * centred.square().sum(1), torch.inf)
    return centre, centred, offsets


def _nc4_counts(
    features: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    reference: tuple[Tensor, Tensor, Tensor],
    *,
    feature_eps: float | None = None,
) -> tuple[Tensor, Tensor]:
    """``(mismatches, samples)`` of a batch as float64 0-d tensors (no host-device sync).

    ``feature_eps``: the classifier acts on L2-normalized features, ``argmax(W h / max(||h||, eps)
    + b)`` (a head with ``normalize_features``); with a bias that changes its decisions.
    """
    centre, centred, offsets = reference
    device = features.device
    w = weight.to(device=device, dtype=torch.float64)
    b = None if bias is None else bias.to(device=device, dtype=torch.float64)
    centre, centred, offsets = centre.to(device), centred.to(device), offsets.to(device)
    mismatches = torch.zeros((), dtype=torch.float64, device=device)
    rows = max(1, _ROWS_TIMES_CLASSES // max(1, w.shape[0]))
    for chunk in features.detach().split(rows):
        h = chunk.to(torch.float64)
        if b is None:  # a positive factor per sample, as the normalization, keeps the argmax
            logits = h @ w.T
        elif feature_eps is None:
            logits = torch.addmm(b, h, w.T)
        else:
            norms = torch.linalg.vector_norm(h, dim=1, keepdim=True).clamp_min(feature_eps)
            logits = torch.addmm(b, h / norms, w.T)
        # argmin ||h - mu_c||^2 = argmax (h - centre) . (mu_c - centre) - ||mu_c - centre||^2 / 2
        scores = (h - centre) @ centred.T - offsets
        differ = logits.argmax(1) != scores.argmax(1)
        mismatches = mismatches + differ.sum().to(torch.float64)
    # filled on the device: torch.tensor(value, device=...) copies from the host, a synchronising
    # copy on accelerators
    samples = torch.full((), float(features.shape[0]), dtype=torch.float64, device=device)
    return mismatches, samples


def neural_collapse_nc4(
    features: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    *,
    class_means: Tensor,
    validate_args: bool = True,
) -> Tensor:
    """Fraction of ``features`` whose classifier decision differs from the nearest class centre.

    Args:
        features: ``(N, d)`` features (any float dtype).
        weight: ``(K, d)`` classifier weight.
        bias: optional ``(K,)`` classifier bias (included in ``argmax(W h + b)``).
        class_means: ``(K, d)`` reference class means; a row with NaN marks a class absent from
            the reference, which the nearest-centre rule never picks.
        validate_args: check that ``features`` are finite (reads a value back from the device).

    Returns:
        float64 0-d tensor in ``[0, 1]``.
    """
    _check_features(features)
    if features.shape[0] == 0:
        raise ValueError("Expected argument `features` to hold at least one sample, but got 0.")
    if validate_args and not bool(torch.isfinite(features).all()):
        raise ValueError("Expected argument `features` to be finite, but got NaN or Inf.")
    means = _check_class_means(class_means, features.shape[1])
    num_classes, num_features = means.shape
    if isinstance(weight, Tensor) and weight.ndim == 2 and weight.shape[0] != num_classes:
        raise ValueError(
            "Expected arguments `weight` and `class_means` to have the same number of rows (one"
            f" per class), but got {weight.shape[0]} and {num_classes}."
        )
    w = _check_weight(weight, num_classes, num_features)
    b = _check_bias(bias, num_classes)
    mismatches, samples = _nc4_counts(features, w, b, _prepare_reference(means))
    return mismatches / samples
