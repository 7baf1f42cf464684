"""Self-duality of classifier and class means (NC3) as a loss term.

NC3 (Papyan, Han & Donoho, 2020) says the classifier's rows align with the centred class means up
to scale: ``W / ||W||_F = M / ||M||_F``. The term is the *squared* distance

    ``|| W / ||W||_F - M / ||M||_F ||_F^2 = 2 - 2 <W, M> / (||W||_F ||M||_F)``,

in ``[0, 4]`` (the metric reports the unsquared distance; squared is smooth at the minimum). On a
batch, only the classes present in the (global) batch take part, rows of ``W`` included.

Reference: V. Papyan, X. Y. Han, D. L. Donoho, "Prevalence of neural collapse during the terminal
phase of deep learning training", PNAS 2020.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from torchcollapse._autograd import no_autocast
from torchcollapse.losses._batch import (
    BatchClassStatistics,
    BatchCollapseTerm,
    check_classifier_shape,
    check_features_target,
    check_stats,
    resolve_weight,
    where_valid,
)
from torchcollapse.losses._fused import collapse_terms

__all__ = ["SelfDualityLoss", "self_duality_distance"]


def self_duality_distance(weight: Tensor | nn.Module, stats: BatchClassStatistics) -> Tensor:
    """Squared distance between the normalized classifier and the normalized centred means.

    Args:
        weight: ``(K_total, d)`` classifier weight, or a module read as
            :class:`SelfDualityLoss` reads its ``classifier`` (e.g. ``nn.Linear`` or a head);
            rows of classes absent from the batch are ignored.
        stats: batch statistics from :func:`~torchcollapse.losses.batch_class_statistics`.

    Returns:
        A scalar in ``[0, 4]`` in the statistics' dtype (autocast disabled); zero, connected to
        the graph, when fewer than two classes are present. An all-zero ``W`` or ``M`` gives 2
        (``M`` with a zero gradient; class means that coincide, as when every sample is alike,
        come out exactly equal: the statistics are taken about one of the samples).
    Float32 statistics of features beyond a scale of ~1e+-15 are out of range (see
    :func:`~torchcollapse.losses.batch_class_statistics`): take them in float64.

    Raises:
        TypeError: ``weight`` is neither a floating-point tensor nor a module with one, or
            ``stats`` is not a :class:`~torchcollapse.losses.BatchClassStatistics`.
        ValueError: ``weight`` is not of shape ``(K_total, d)``, the statistics' classes and
            feature width.
    """
    check_stats(stats)
    weight = resolve_weight(weight, "weight")
    means = stats.centered_means
    if weight.shape != means.shape:
        raise ValueError(
            f"Expected argument `weight` to have shape {tuple(means.shape)} (the classes and "
            f"feature width of `stats`), but got {tuple(weight.shape)}."
        )
    with no_autocast(means.device.type):
        dtype = torch.promote_types(weight.dtype, means.dtype)
        w = weight if weight.dtype == dtype else weight.to(dtype)
        m = means if means.dtype == dtype else means.to(dtype)
        w2 = (w.pow(2).sum(1) * stats.present.to(dtype)).sum()  # present rows only
        m2 = stats.trace_between * stats.num_present  # = ||M||_F^2
        # safe denominators: a zero W or M gives <W, M> = 0, hence the value 2
        scale = (torch.where(w2 > 0, w2, 1.0) * torch.where(m2 > 0, m2, 1.0)).sqrt()
        value = 2.0 - 2.0 * (w * m).sum() / scale
        # coinciding class means (exactly zero M): 2, with no gradient through M
        coincide = m2.detach() <= 0
        return where_valid(stats.valid, torch.where(coincide, 2.0, value))


class SelfDualityLoss(BatchCollapseTerm):
    """Squared distance between the normalized classifier and the normalized class means (NC3).

    ``forward(features, target, classifier)`` returns
    ``weight * || W / ||W||_F - M / ||M||_F ||_F^2`` where ``M`` holds the centred means of the
    classes present in the global batch and ``W`` the matching rows of the classifier weight;
    ``classifier`` is a ``(K, d)`` tensor or a module (e.g. ``nn.Linear`` or a head: the
    classifier it applies, its ``effective_weight`` where it has one, else its ``weight``, as the
    metrics read it). Gradients flow into both the features and the classifier. A positive
    weight aligns classifier and means, a negative one pushes them apart.

    Under ``torch.distributed`` the means are those of the concatenated batch (features gathered
    with autograd), so values and DDP-averaged gradients equal the single-process ones. With fewer
    than two classes present the result is zero and still connected to the graph. Class means
    that coincide (every sample alike, as from a dead backbone) give ``2 * weight`` with a zero
    gradient: the batch statistics are taken about one of the samples, so such means come out
    exactly equal rather than apart by rounding noise.

    Args:
        num_classes: number of classes ``K`` (at least 2).
        weight: signed multiplier of the term.
        sync_dist: compute over the global batch when ``torch.distributed`` is initialised.
        process_group: process group for ``sync_dist`` (default: the world).
        validate_args: check the label range (a ValueError on CPU; a device-side assertion,
            without host synchronisation, on accelerators; skipped under torch.compile).

    Example:
        >>> import torch
        >>> from torchcollapse.losses import SelfDualityLoss
        >>> reg = SelfDualityLoss(num_classes=3)
        >>> features, target = torch.eye(3).repeat(2, 1), torch.arange(6) % 3
        >>> head = torch.nn.Linear(3, 3, bias=False)
        >>> with torch.no_grad():
        ...     _ = head.weight.copy_(5 * (torch.eye(3) - 1 / 3))   # W = 5 M: self-dual
        >>> bool(reg(features, target, head) < 1e-6)
        True
    """

    def forward(self, features: Tensor, target: Tensor, classifier: Tensor | nn.Module) -> Tensor:
        """Weighted NC3 term of the batch class means against ``classifier``."""
        check_features_target(
            features, target, self.num_classes, self.validate_args, defer_cpu_range=True
        )
        weight = resolve_weight(classifier)
        check_classifier_shape(weight, self.num_classes, features.shape[1])
        total, _ = collapse_terms(
            features,
            target,
            self.num_classes,
            weight,
            nc3=self.weight,
            sync_dist=self.sync_dist,
            group=self.process_group,
            validate_args=self.validate_args,
        )
        return total
