"""Distance of the class-mean (or classifier) geometry to a simplex ETF (NC2) as a loss term.

NC2 (Papyan, Han & Donoho, 2020) says the centred class means become equinorm and maximally
equiangular: their Gram matrix ``G = M M^T`` is proportional to the simplex equiangular tight frame
Gram ``E = (I - 11^T / K) / sqrt(K - 1)`` (unit Frobenius norm). The term is the *squared*
Frobenius distance between the normalized Grams,

    ``|| G / ||G||_F - E ||_F^2 = 2 - 2 <G, E> / ||G||_F``,

in ``[0, 4]``, zero exactly at a simplex ETF (any scale, any rotation). It is squared (the metric
reports the unsquared distance) so that it is smooth at its minimum. It is computed in closed
form, ``<G, E> = (tr G - ||sum_c m_c||^2 / K) / sqrt(K - 1)`` and ``||G||_F = ||M^T M||_F``, so no
``K x K`` matrix is formed when ``K > d``.

On a batch, ``M`` holds the centred means of the classes present in the (global) batch and ``K``
counts them; given a classifier, ``M`` is its weight (``K x d``, uncentred, all classes), as in
the NC2 of the classifier.

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
    check_features_target,
    check_stats,
    resolve_weight,
    where_valid,
)
from torchcollapse.losses._fused import collapse_terms, gram_distance

__all__ = ["SimplexGeometryLoss", "simplex_geometry_of_means", "simplex_gram_distance"]


def simplex_gram_distance(vectors: Tensor, present: Tensor | None = None) -> Tensor:
    """Squared distance of the normalized Gram of ``vectors``' rows to the simplex ETF Gram.

    Args:
        vectors: ``(K_total, d)`` rows (centred class means, or classifier weights).
        present: ``(K_total,)`` boolean mask of the rows that take part (default: all). Rows
            outside the mask are ignored and ``K`` counts the rows inside.

    Returns:
        A scalar in ``[0, 4]`` (up to rounding), computed in at least float32 with autocast
        disabled; zero, connected to the graph, when fewer than two rows take part. All-zero rows
        give 2 (a zero Gram is as far from the ETF as an orthogonal one).

    Raises:
        TypeError: ``vectors`` is not a floating-point tensor, or ``present`` not a boolean one.
        ValueError: ``vectors`` is not 2-D, or ``present`` not of shape ``(K_total,)``.
    """
    if not isinstance(vectors, Tensor) or not vectors.is_floating_point():
        received = (
            f"dtype {vectors.dtype}" if isinstance(vectors, Tensor) else type(vectors).__name__
        )
        raise TypeError(
            f"Expected argument `vectors` to be a floating-point tensor, but got {received}."
        )
    if vectors.ndim != 2:
        raise ValueError(
            f"Expected argument `vectors` to be a 2-D tensor (K_total, d), but got shape "
            f"{tuple(vectors.shape)}."
        )
    if present is not None:
        if not isinstance(present, Tensor) or present.dtype != torch.bool:
            received = (
                f"dtype {present.dtype}" if isinstance(present, Tensor) else type(present).__name__
            )
            raise TypeError(
                f"Expected argument `present` to be a boolean tensor or None, but got {received}."
            )
        if tuple(present.shape) != (vectors.shape[0],):
            raise ValueError(
                f"Expected argument `present` to have shape ({vectors.shape[0]},) (one entry per "
                f"row of `vectors`), but got {tuple(present.shape)}."
            )
    return gram_distance(vectors, present)


def simplex_geometry_of_means(stats: BatchClassStatistics) -> Tensor:
    """:func:`simplex_gram_distance` of a batch's centred class means (rows sum to zero).

    Class means that coincide (every sample alike; the statistics are taken about one of the
    samples, so such means come out exactly equal) give all-zero rows: 2, with a zero gradient.
    Float32 statistics of features beyond a scale of ~1e+-15 are out of range (see
    :func:`~torchcollapse.losses.batch_class_statistics`): take them in float64. A ``stats``
    that is not a :class:`~torchcollapse.losses.BatchClassStatistics` raises a ``TypeError``.
    """
    check_stats(stats)
    means = stats.centered_means
    with no_autocast(means.device.type):
        value = _gram_distance(means, stats.num_present, None)
        coincide = _coinciding(stats, means.dtype)
        return where_valid(stats.valid, torch.where(coincide, 2.0, value))


def _coinciding(stats: BatchClassStatistics, dtype: torch.dtype) -> Tensor:
    """Whether the class means of ``stats`` coincide (all-zero centred means)."""
    return stats.trace_between.detach().to(dtype) <= 0


def _gram_distance(v: Tensor, k: Tensor, total: Tensor | None) -> Tensor:
    """``2 - 2 (tr G - total / k) / (||G||_F sqrt(k - 1))`` for masked rows ``v``; ``total`` is
    ``||sum of rows||^2`` (``None``: the rows sum to zero)."""
    trace = v.pow(2).sum()
    # the Gram matrix over ||v||_F^2: entries of order 1, so that ||G||_F^2 (the fourth power of
    # the rows' scale) neither overflows nor underflows in float32
    norm = trace.detach().clamp_min(torch.finfo(v.dtype).tiny)
    gram = (v @ v.T if v.shape[0] <= v.shape[1] else v.T @ v) / norm
    frob2 = gram.pow(2).sum()
    valid = k >= 2
    # safe denominators: 1 where the value is replaced anyway or the Gram is zero
    scale = (torch.where(frob2 > 0, frob2, 1.0) * torch.where(valid, k - 1, 1.0)).sqrt()
    if total is not None:
        trace = trace - total / k.clamp_min(1.0)
    return where_valid(valid, 2.0 - 2.0 * (trace / norm) / scale)


class SimplexGeometryLoss(BatchCollapseTerm):
    """Squared distance of the normalized Gram of the class means (or of a classifier) to the ETF.

    ``forward(features, target)`` uses the centred class means of the global batch (classes absent
    from the batch are left out; ``K`` counts the present ones); ``forward(classifier=head)`` (or
    ``forward(features, target, classifier=head)``) uses the classifier's weight instead, a
    ``(K, d)`` tensor or a module (its ``effective_weight`` where it has one, else its
    ``weight``), all of its classes, uncentred. The value is
    ``weight * (2 - 2 <G, E> / ||G||_F)`` with ``E`` the simplex ETF Gram of unit Frobenius norm,
    in ``weight * [0, 4]``; see the module docstring. A positive weight pushes towards a simplex
    ETF, a negative one away from it.

    Under ``torch.distributed`` the batch means are those of the concatenated batch (features
    gathered with autograd), so values and DDP-averaged gradients equal the single-process ones.
    With fewer than two classes present the result is zero and still connected to the graph.
    Class means that coincide (every sample alike, as from a dead backbone) give ``2 * weight``
    with a zero gradient: the batch statistics are taken about one of the samples, so such means
    come out exactly equal rather than apart by rounding noise.

    Args:
        num_classes: number of classes ``K`` (at least 2).
        weight: signed multiplier of the term.
        sync_dist: compute over the global batch when ``torch.distributed`` is initialised.
        process_group: process group for ``sync_dist`` (default: the world).
        validate_args: check the label range (a ValueError on CPU; a device-side assertion,
            without host synchronisation, on accelerators; skipped under torch.compile).

    Example:
        >>> import torch
        >>> from torchcollapse.losses import SimplexGeometryLoss
        >>> reg = SimplexGeometryLoss(num_classes=3)
        >>> etf = torch.eye(3) - 1 / 3                      # a simplex ETF of 3 classes
        >>> float(reg(classifier=etf)) < 1e-6              # on the classifier weight: at the ETF
        True
        >>> features, target = torch.eye(3).repeat(4, 1), torch.arange(12) % 3
        >>> float(reg(features, target)) < 1e-6            # orthogonal means, centred: an ETF
        True
    """

    def forward(
        self,
        features: Tensor | None = None,
        target: Tensor | None = None,
        classifier: Tensor | nn.Module | None = None,
    ) -> Tensor:
        """Weighted NC2 term of the batch class means, or of ``classifier`` when given."""
        if classifier is not None:
            weight = resolve_weight(classifier)
            if weight.shape[0] != self.num_classes:
                raise ValueError(
                    f"Expected argument `classifier` to have {self.num_classes} rows "
                    f"(`num_classes`), but got shape {tuple(weight.shape)}."
                )
            return gram_distance(weight, scale=self.weight)
        if features is None and target is None:
            raise ValueError(
                "Expected arguments `features` and `target`, or `classifier`, but got none of them."
            )
        if features is None or target is None:
            given, missing = ("features", "target") if target is None else ("target", "features")
            raise ValueError(
                f"Expected argument `{missing}` with `{given}` (or a `classifier` alone), but got "
                "None."
            )
        check_features_target(
            features, target, self.num_classes, self.validate_args, defer_cpu_range=True
        )
        total, _ = collapse_terms(
            features,
            target,
            self.num_classes,
            nc2=self.weight,
            sync_dist=self.sync_dist,
            group=self.process_group,
            validate_args=self.validate_args,
        )
        return total
