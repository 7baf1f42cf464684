"""Within-class variability collapse (NC1): ``tr(Sigma_W Sigma_B^+)/K``, trace ratio and CDNV.

- **NC1** (Papyan, Han & Donoho, 2020) = ``tr(Sigma_W Sigma_B^+) / K``, with the pseudo-inverse of
  ``Sigma_B`` taken on its top ``r = min(K-1, d)`` eigenpairs (the rank of ``K`` centred means in
  ``R^d``), in float64. As for :func:`torch.linalg.pinv`, a direction whose singular value of the
  centred means ``M`` is at or below ``max(K, d) * eps * sigma_max`` (its default cutoff, ``eps``
  of float64: about ``2e-16 max(K, d)`` relative to the largest) counts as no direction of
  ``Sigma_B``: it adds nothing, whatever the within-class variance along it. Directions above the
  cutoff count, and nothing beyond rank ``r`` does. The cutoff compares each direction with
  ``sigma_max`` only and cannot tell a real small direction from rounding: two consequences.

  - *a real direction below the cutoff is left out too*: NC1 is unchanged by an invertible
    rescaling of the features only while every singular value of ``M`` stays above the cutoff; a
    feature scaled by ``2**-60`` against the others (exactly, in float64) is left out like a dead
    unit, and NC1 changes;
  - *features that span fewer than* ``r`` *dimensions give the NC1 of their live subspace only
    where they leave it by no more than the cutoff*. Exact zeros or constants (a dead unit, a
    constant feature, whatever its value) do. A subspace reached by rounded arithmetic need not:
    rounding at a scale well above ``max(K, d) eps`` times the spread of the class means (float32
    features projected in float32, ``~1e-7`` relative; float64 features of a rotated linear
    bottleneck plus a common offset ``a``, ``~a eps``) puts real spread outside the subspace,
    along directions in which the means barely differ, and NC1 can be orders of magnitude too
    large (most draws of a float64 bottleneck with an offset of 1e3 on class means spread ~1 give
    ~1e9 or more instead of ~6e-4; a float32 one ~40). Project in float64 without an offset to
    measure a subspace.

  NC1 is computed without an eigendecomposition:

  - ``K - 1 >= d``: ``Sigma_B`` is ``d x d`` of full rank ``d``, so ``Sigma_B^+ = Sigma_B^{-1}`` and
    ``NC1 = tr(Sigma_W (M^T M)^{-1})`` by a Cholesky solve (``M``: the ``K x d`` centred means);
  - ``K - 1 < d``: ``M`` has rank ``K - 1`` and a known null vector ``u`` (``M^T u = 0``: ``u`` is
    the constant vector, or the counts for ``global_mean="samples"``). With ``A = M M^T + t u u^T``
    (positive definite, ``t`` its mean eigenvalue) one has ``NC1 = tr(Sigma_W M^T A^{-2} M)``, a
    ``K x K`` Cholesky solve.

  Both systems square the conditioning of ``M``. When the factorization fails (``Sigma_B``
  numerically rank deficient) or its pivots say the system is ill-conditioned (some class means
  nearly coincide, as in minority collapse: a solve could then lose the 1e-6 accuracy), NC1 is
  taken from the top ``r`` singular triplets of ``M`` itself (an SVD, slower but accurate to the
  precision of ``M``), with the cutoff above.
- **Trace ratio** = ``tr Sigma_W / tr Sigma_B``.
- **CDNV** (Galanti, Gyorgy & Hutter, 2022) = mean over pairs ``c < c'`` of
  ``(s_c + s_c') / (2 ||mu_c - mu_c'||^2)``, with ``s_c`` the mean squared distance of class ``c``'s
  features to ``mu_c`` (biased, divided by ``n_c``). It does not depend on the global mean.

Example:
    >>> import torch
    >>> from torchcollapse.stats import ClassStatistics, symmetric_product
    >>> from torchcollapse.functional import neural_collapse_cdnv, neural_collapse_nc1
    >>> features = torch.tensor([[-1.0, 0.1], [-1.0, -0.1], [1.0, 0.1], [1.0, -0.1]])
    >>> stats = ClassStatistics.from_features(features, torch.tensor([0, 0, 1, 1]), 2)
    >>> neural_collapse_nc1(stats)  # the spread is orthogonal to the means: Sigma_B^+ ignores it
    tensor(0., dtype=torch.float64)
    >>> neural_collapse_cdnv(stats)  # (0.01 + 0.01) / (2 * 2^2)
    tensor(0.0025, dtype=torch.float64)
"""

from __future__ import annotations

import torch
from torch import Tensor

from torchcollapse.functional.geometry import pairwise_geometry
from torchcollapse.functional.means import (
    GlobalMean,
    UndefinedCollapse,
    _check_statistics,
    _differing_centred_means,
    within_class_covariance,
)
from torchcollapse.stats import ClassStatistics, symmetric_product

__all__ = [
    "neural_collapse_cdnv",
    "neural_collapse_nc1",
    "neural_collapse_nc1_trace_ratio",
]


_CONDITION_LIMIT = 1e8
"""Largest estimated condition number of the Cholesky system for which its solve is trusted;
beyond it the solve could err by more than ~1e-8 relative in float64."""
_CONDITION_STEPS = 4


def _nc1_svd(centred: Tensor, sigma_w: Tensor) -> Tensor:
    """NC1 on the top ``min(K-1, d)`` singular triplets of ``M`` (no Gram matrix formed), those
    at float64 rounding level (``sigma_k <= max(K, d) * eps * sigma_max``) left out."""
    num, dim = centred.shape
    rank = min(num - 1, dim)
    # K > d: the triangular factor of a QR has M's singular values and right vectors, without
    # forming the K x d left vectors
    small = torch.linalg.qr(centred, mode="r").R if num > dim else centred
    _, values, vh = torch.linalg.svd(small, full_matrices=False)
    basis = vh[:rank].T  # right singular vectors: eigenvectors of Sigma_B = M^T M / K
    # Sigma_B^+ = K sum_k v_k v_k^T / sigma_k^2, and NC1 = tr(Sigma_W Sigma_B^+) / K.
    quadratic = ((sigma_w @ basis) * basis).sum(0).clamp_min(0.0)  # Sigma_W is PSD
    # A singular value at rounding level is a zero one (the direction of a dead unit comes out at
    # ~1e-16 with ~1e-32 of within-class variance, whose ratio is noise): the pseudo-inverse
    # leaves it out, with torch.linalg.pinv's default cutoff.
    values = values[:rank]
    cutoff = max(num, dim) * torch.finfo(values.dtype).eps * values[0]
    terms = torch.where(values > cutoff, quadratic / values.square(), 0.0)
    nc1: Tensor = terms.sum()
    return nc1


def _well_conditioned(system: Tensor, factor: Tensor) -> bool:
    """Whether ``system`` (positive definite, Cholesky ``factor``) has a condition number below
    ``_CONDITION_LIMIT``, estimated by a few power and inverse iterations (``O(n^2)`` each).

    The ratio of the factor's pivots can miss an ill-conditioned system by orders of magnitude;
    the largest and smallest eigenvalues' Rayleigh quotients do not.
    """
    generator = torch.Generator().manual_seed(0)
    start = torch.randn(system.shape[0], 1, generator=generator, dtype=system.dtype)
    start = start.to(system.device)
    top = bottom = start / torch.linalg.vector_norm(start)
    for _ in range(_CONDITION_STEPS):
        top = system @ top
        top = top / torch.linalg.vector_norm(top)
        bottom = torch.cholesky_solve(bottom, factor)
        bottom = bottom / torch.linalg.vector_norm(bottom)
    largest = (top * (system @ top)).sum()
    inverse_smallest = (bottom * torch.cholesky_solve(bottom, factor)).sum()
    return bool(largest * inverse_smallest <= _CONDITION_LIMIT)


def _nc1(
    centred: Tensor, sigma_w: Tensor, null_vector: Tensor, gram: Tensor | None = None
) -> Tensor:
    """NC1 by Cholesky solves; ``gram`` is the smaller Gram matrix of ``centred`` if at hand."""
    num, dim = centred.shape
    if gram is None:
        gram = symmetric_product(centred.T) if num <= dim else symmetric_product(centred)
    if num - 1 >= dim:
        system = gram  # K > d: the d x d matrix M^T M
        factor, info = torch.linalg.cholesky_ex(system)
        if int(info) == 0 and _well_conditioned(system, factor):
            return torch.cholesky_solve(sigma_w, factor).diagonal().sum()
    else:
        unit = null_vector / torch.linalg.vector_norm(null_vector)
        scale = gram.diagonal().sum() / (num - 1)
        system = gram + scale * torch.outer(unit, unit)
        factor, info = torch.linalg.cholesky_ex(system)
        if int(info) == 0 and _well_conditioned(system, factor):
            solved = torch.cholesky_solve(centred, factor)  # A^{-1} M, (K, d)
            return ((solved @ sigma_w) * solved).sum()
    return _nc1_svd(centred, sigma_w)


def neural_collapse_nc1(
    statistics: ClassStatistics, *, global_mean: GlobalMean = "classes"
) -> Tensor:
    """NC1 = ``tr(Sigma_W Sigma_B^+) / K`` over the present classes (float64, 0-d).

    The pseudo-inverse leaves out directions whose singular value of the centred means is at or
    below ``max(K, d) * eps * sigma_max`` (:func:`torch.linalg.pinv`'s cutoff; see the module
    docstring): exact dead units and constant features are left out, but so is a real direction
    below the cutoff (NC1 is not invariant to scaling a feature down until the spread of the
    means along it is ``max(K, d) eps`` of the largest or less: ``2**-60`` with a few classes),
    and features that leave a subspace by rounding above the cutoff (float32, or a large offset
    added to a float64 bottleneck) count that rounding as real spread.

    Args:
        statistics: accumulated class statistics.
        global_mean: ``"classes"`` (mean of class means, default) or ``"samples"``.

    Raises:
        UndefinedCollapse: fewer than two classes have samples, or all their means are equal.
    """
    centred, present = _differing_centred_means(statistics, global_mean)
    sigma_w = within_class_covariance(statistics)
    if global_mean == "classes":
        null_vector = torch.ones(present.numel(), dtype=torch.float64, device=centred.device)
    else:
        null_vector = statistics.counts.to(torch.float64).index_select(0, present)
    return _nc1(centred, sigma_w, null_vector)


def neural_collapse_nc1_trace_ratio(
    statistics: ClassStatistics, *, global_mean: GlobalMean = "classes"
) -> Tensor:
    """``tr Sigma_W / tr Sigma_B`` over the present classes (float64, 0-d).

    Example:
        >>> from torchcollapse.stats import ClassStatistics, symmetric_product
        >>> features = torch.tensor([[0.0], [2.0], [10.0], [12.0]])
        >>> stats = ClassStatistics.from_features(features, torch.tensor([0, 0, 1, 1]), 2)
        >>> neural_collapse_nc1_trace_ratio(stats)  # 1 / 25
        tensor(0.0400, dtype=torch.float64)

    Raises:
        UndefinedCollapse: fewer than two classes have samples, or all their means are equal.
    """
    centred, present = _differing_centred_means(statistics, global_mean)
    stats = statistics.to(dtype=torch.float64)
    trace_w = stats.within_class_sum_squares().sum() / stats.total
    trace_b = centred.square().sum() / present.numel()
    return trace_w / trace_b


def _cdnv(centred: Tensor, variances: Tensor) -> Tensor:
    """CDNV of the centred means ``M`` (not all zero) and per-class variances ``s_c``.

    CDNV depends on differences of means only, so where a mean is the global mean (a zero row,
    which has no direction for the pairwise pass) the means are shifted off the origin, by twice
    the largest norm so that no shifted mean is zero, at the means' own scale.
    """
    norms = torch.linalg.vector_norm(centred, dim=1)
    if bool((norms == 0).any()):
        shift = torch.zeros_like(centred[0])
        shift[0] = 2.0 * norms.max()
        centred = centred + shift
    return pairwise_geometry(centred, variances=variances)["cdnv"]


def neural_collapse_cdnv(statistics: ClassStatistics) -> Tensor:
    """Class-distance normalized variance, mean over pairs of present classes (float64, 0-d).

    ``(s_c + s_c') / (2 ||mu_c - mu_c'||^2)`` with ``s_c = 1/n_c sum_{y_i = c} ||h_i - mu_c||^2``;
    pairs are processed in blocks (no ``K x K`` matrix). Two classes with the same mean give
    ``inf`` (their variance is over a zero distance); if neither has any variance the pair is
    ``0/0`` and CDNV undefined.

    Example:
        >>> from torchcollapse.stats import ClassStatistics
        >>> features = torch.tensor([[-1.1], [-0.9], [-0.1], [0.1], [0.9], [1.1]])
        >>> stats = ClassStatistics.from_features(features, torch.tensor([0, 0, 1, 1, 2, 2]), 3)
        >>> neural_collapse_cdnv(stats)  # the middle mean is the global mean: no matter
        tensor(0.0075, dtype=torch.float64)

    Raises:
        UndefinedCollapse: fewer than two classes have samples, all their means are equal, or two
            classes have the same mean and no variance.
    """
    _check_statistics(statistics)
    centred, present = _differing_centred_means(statistics, "classes")
    stats = statistics.to(dtype=torch.float64)
    variances = stats.within_class_sum_squares().index_select(
        0, present
    ) / stats.counts.index_select(0, present)
    cdnv = _cdnv(centred, variances)
    if bool(cdnv.isnan()):
        raise UndefinedCollapse(_CDNV_UNDEFINED)
    return cdnv


_CDNV_UNDEFINED = (
    "Expected the classes with equal means to have some within-class variance, but two classes"
    " have the same mean and none: their CDNV term is 0/0, so CDNV is undefined."
)
