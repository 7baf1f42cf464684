"""Geometry of a set of class vectors: equinorm, equiangularity, simplex-ETF distance, spreads.

NC2 (Papyan, Han & Donoho, 2020) says that the centred class means ``mu_c - mu_G`` and the
classifier rows ``w_c`` tend to a simplex equiangular tight frame (ETF): equal norms, pairwise
cosines ``-1/(K-1)``. The functions here measure that for any ``(K, d)`` set of vectors (rows),
following the formula sheet (DESIGN.md):

- ``equinorm``: std / mean of the row norms (std with ``ddof=1``);
- ``equiangularity``: std (``ddof=1``) of the pairwise cosines over pairs ``c < c'`` (0 for a single
  pair, ``K = 2``);
- ``max_angle``: mean over pairs of ``|cos + 1/(K-1)|`` (Papyan et al.'s "maximal-angle"
  equiangularity);
- ``etf_distance``: ``|| G/||G||_F - (I - 11^T/K)/sqrt(K-1) ||_F`` with ``G`` the Gram matrix of
  the rows (Frobenius norms; both terms have unit norm, so the value lies in ``[0, 2]``).

When ``K > d + 1`` no simplex exists in ``R^d``, so the simplex quantities cannot reach 0. The
generalized geometry of the normalized rows ``u_c = v_c / ||v_c||`` is then what is meaningful
(Liu et al., 2023, "Generalizing and decoupling neural collapse via hyperspherical uniformity gap";
Jiang et al., 2023, "Generalized neural collapse for a large number of classes"):

- ``min_angle``: the smallest angle between two rows (radians), computed for the closest pair as
  ``2 atan2(||u - u'||, ||u + u'||)``, accurate for tiny and for near-``pi`` angles;
- ``spherical_energy``: the Riesz ``s``-energy, mean over pairs of ``||u_c - u_c'||^(-s)``
  (``s = 1``: the Thomson problem; Liu et al., 2018, "Learning towards minimum hyperspherical
  energy").

Their best possible values are known in some cases (:func:`min_angle_optimal`,
:func:`spherical_energy_optimal`): the simplex for ``K <= d + 1`` and the cross-polytope for
``K = 2d`` are universally optimal (Cohn & Kumar, 2007), ``pi/2`` is the largest minimum angle for
``d + 1 < K <= 2d`` (Rankin, 1955), and on the circle (``d = 2``) the regular polygon is optimal.

Pairwise quantities are computed in float64 over blocks of rows (:func:`pairwise_geometry`), so no
``K x K`` matrix is materialized: ``K = 50,000`` works. Standard deviations over pairs merge the
blocks' means and sums of squared deviations exactly (Chan, Golub & LeVeque, 1979).

Example:
    >>> import torch
    >>> from torchcollapse.functional import etf_distance, equiangularity, min_angle
    >>> simplex = torch.eye(4) - 0.25  # 4 centred one-hot vectors: a simplex ETF in R^4
    >>> etf_distance(simplex).abs() < 1e-12
    tensor(True)
    >>> equiangularity(simplex).abs() < 1e-12
    tensor(True)
    >>> torch.rad2deg(min_angle(simplex))  # arccos(-1/3)
    tensor(109.4712, dtype=torch.float64)
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "equiangularity",
    "equinorm",
    "etf_distance",
    "max_angle",
    "min_angle",
    "min_angle_optimal",
    "pairwise_geometry",
    "spherical_energy",
    "spherical_energy_optimal",
]

# Elements of one block of the pairwise matrix (rows x columns), per device type.
_BLOCK_ELEMENTS = {"cpu": 1 << 21}
_BLOCK_ELEMENTS_ACCELERATOR = 1 << 26


def _check_vectors(vectors: Any, name: str = "vectors") -> Tensor:
    if not isinstance(vectors, Tensor):
        raise TypeError(
            f"Expected argument `{name}` to be a torch.Tensor, but got {type(vectors)}."
        )
    if vectors.ndim != 2 or vectors.shape[0] < 2:
        raise ValueError(
            f"Expected argument `{name}` to be a 2-D tensor of shape (num_classes, dim) with at"
            f" least 2 rows, but got shape {tuple(vectors.shape)}."
        )
    if not vectors.is_floating_point():
        raise TypeError(
            f"Expected argument `{name}` to be a floating point tensor, but got {vectors.dtype}."
        )
    v = vectors.detach().to(torch.float64)
    if not bool(torch.isfinite(v).all()):
        raise ValueError(f"Expected argument `{name}` to be finite, but got NaN or Inf.")
    return v


def _row_norms(v: Tensor, name: str) -> Tensor:
    norms: Tensor = torch.linalg.vector_norm(v, dim=1)
    zero = torch.nonzero(norms == 0).squeeze(1)
    if zero.numel() > 0:
        raise ValueError(
            f"Expected every row of `{name}` to be non-zero (angles are undefined otherwise), but"
            f" rows {zero.tolist()} are zero."
        )
    return norms


def _block_rows(num_rows: int, device: torch.device, block_elements: int | None) -> int:
    budget = block_elements or _BLOCK_ELEMENTS.get(device.type, _BLOCK_ELEMENTS_ACCELERATOR)
    return max(1, min(num_rows, budget // max(num_rows, 1)))


def _gram_frobenius(v: Tensor) -> Tensor:
    """``||V V^T||_F`` through the smaller of the two Gram matrices."""
    small = v @ v.T if v.shape[0] <= v.shape[1] else v.T @ v
    norm: Tensor = torch.linalg.matrix_norm(small)
    return norm


def pairwise_geometry(
    vectors: Tensor,
    *,
    variances: Tensor | None = None,
    exponent: float = 1.0,
    block_elements: int | None = None,
) -> dict[str, Tensor]:
    """All geometric quantities of the rows of ``vectors`` in one blocked pass over the pairs.

    Args:
        vectors: ``(K, d)`` rows (e.g. centred class means or classifier rows), ``K >= 2``.
        variances: optional ``(K,)`` per-row variances ``s_c``; when given, the class-distance
            normalized variance ``mean_{c<c'} (s_c + s_c') / (2 ||v_c - v_c'||^2)`` is returned
            as ``"cdnv"`` (Galanti et al., 2022).
        exponent: ``s`` of the Riesz energy.
        block_elements: elements per block of the pairwise matrix (default: ``2**21`` on CPU,
            ``2**26`` on accelerators).

    Returns:
        float64 0-d tensors ``equinorm``, ``equiangularity``, ``max_angle``, ``etf_distance``,
        ``min_angle``, ``spherical_energy`` (and ``cdnv``).

    Example:
        >>> square = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]])
        >>> out = pairwise_geometry(square)
        >>> torch.rad2deg(out["min_angle"])
        tensor(90., dtype=torch.float64)
        >>> out["equinorm"]
        tensor(0., dtype=torch.float64)
    """
    v = _check_vectors(vectors)
    num, _ = v.shape
    norms = _row_norms(v, "vectors")
    units = v / norms[:, None]
    device = v.device
    var: Tensor | None = None
    if variances is not None:
        if not isinstance(variances, Tensor) or tuple(variances.shape) != (num,):
            shape = tuple(variances.shape) if isinstance(variances, Tensor) else type(variances)
            raise ValueError(
                f"Expected argument `variances` to have shape ({num},), but got {shape}."
            )
        var = variances.detach().to(device=device, dtype=torch.float64)
    squared = norms.square()
    gram_norm = _gram_frobenius(v)
    etf_diag = (1.0 - 1.0 / num) / math.sqrt(num - 1)
    etf_off = -1.0 / (num * math.sqrt(num - 1))
    simplex_cos = -1.0 / (num - 1)

    zero = torch.zeros((), dtype=torch.float64, device=device)
    pairs_seen = 0
    cos_mean, cos_m2 = zero, zero
    abs_sum, energy_sum, cdnv_sum = zero, zero, zero
    etf_sum = zero
    best_cos = torch.full((), -math.inf, dtype=torch.float64, device=device)
    best_index = torch.zeros((), dtype=torch.long, device=device)
    rows_per_block = _block_rows(num, device, block_elements)
    for start in range(0, num, rows_per_block):
        stop = min(num, start + rows_per_block)
        cos = units[start:stop] @ units[start:].T  # (b, num - start)
        rows = torch.arange(start, stop, device=device)[:, None]
        cols = torch.arange(start, num, device=device)[None, :]
        upper = cols > rows
        diagonal = cols == rows
        count = sum(num - 1 - i for i in range(start, stop))
        # ETF distance: every entry of the K x K matrix (upper entries count twice).
        gram = cos * norms[start:stop, None] * norms[None, start:]
        normalized = gram / gram_norm
        etf_sum = etf_sum + torch.where(diagonal, (normalized - etf_diag).square(), 0.0).sum()
        etf_sum = etf_sum + 2 * torch.where(upper, (normalized - etf_off).square(), 0.0).sum()
        if count == 0:
            continue
        # Std of the cosines: exact two-pass inside the block, Chan merge across blocks.
        block_mean = torch.where(upper, cos, 0.0).sum() / count
        block_m2 = torch.where(upper, (cos - block_mean).square(), 0.0).sum()
        total = pairs_seen + count
        delta = block_mean - cos_mean
        cos_m2 = cos_m2 + block_m2 + delta.square() * (pairs_seen * count / total)
        cos_mean = cos_mean + delta * (count / total)
        pairs_seen = total
        abs_sum = abs_sum + torch.where(upper, (cos - simplex_cos).abs(), 0.0).sum()
        distance_sq = (2.0 - 2.0 * cos).clamp_min(0.0)
        energy = torch.where(upper, distance_sq.pow(-0.5 * exponent), 0.0)
        energy_sum = energy_sum + energy.sum()
        masked = torch.where(upper, cos, -math.inf)
        block_best, flat = masked.reshape(-1).max(0)
        row = flat // (num - start) + start
        col = flat % (num - start) + start
        better = block_best > best_cos
        best_cos = torch.where(better, block_best, best_cos)
        best_index = torch.where(better, row * num + col, best_index)
        if var is not None:
            gap = (squared[start:stop, None] + squared[None, start:] - 2.0 * gram).clamp_min(0.0)
            ratio = (var[start:stop, None] + var[None, start:]) / (2.0 * gap)
            cdnv_sum = cdnv_sum + torch.where(upper, ratio, 0.0).sum()

    pairs = num * (num - 1) // 2
    i, j = divmod(int(best_index), num)
    angle = 2.0 * torch.atan2(
        torch.linalg.vector_norm(units[i] - units[j]), torch.linalg.vector_norm(units[i] + units[j])
    )
    out = {
        "equinorm": norms.std() / norms.mean(),
        "equiangularity": (cos_m2 / (pairs - 1)).sqrt() if pairs > 1 else zero.clone(),
        "max_angle": abs_sum / pairs,
        "etf_distance": etf_sum.clamp_min(0.0).sqrt(),
        "min_angle": angle,
        "spherical_energy": energy_sum / pairs,
    }
    if var is not None:
        out["cdnv"] = cdnv_sum / pairs
    return out


def equinorm(vectors: Tensor) -> Tensor:
    """Std / mean of the row norms (std with ``ddof=1``); 0 for rows of equal norm.

    Example:
        >>> equinorm(torch.tensor([[3.0, 4.0], [0.0, 5.0]]))
        tensor(0., dtype=torch.float64)
    """
    v = _check_vectors(vectors)
    norms = _row_norms(v, "vectors")
    return norms.std() / norms.mean()


def equiangularity(vectors: Tensor) -> Tensor:
    """Std (``ddof=1``) of the pairwise cosines over pairs ``c < c'`` (0 when ``K = 2``).

    Example:
        >>> equiangularity(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]))
        tensor(0.4082, dtype=torch.float64)
    """
    return pairwise_geometry(vectors)["equiangularity"]


def max_angle(vectors: Tensor) -> Tensor:
    """Mean over pairs of ``|cos + 1/(K-1)|``: 0 exactly when every pair is at the simplex angle.

    Example:
        >>> max_angle(torch.tensor([[1.0, 0.0], [-1.0, 0.0]]))
        tensor(0., dtype=torch.float64)
    """
    return pairwise_geometry(vectors)["max_angle"]


def etf_distance(vectors: Tensor) -> Tensor:
    """``|| G/||G||_F - (I - 11^T/K)/sqrt(K-1) ||_F`` with ``G`` the Gram matrix of the rows.

    Example:
        >>> etf_distance(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))  # orthogonal, not antipodal
        tensor(0.7654, dtype=torch.float64)
    """
    return pairwise_geometry(vectors)["etf_distance"]


def min_angle(vectors: Tensor) -> Tensor:
    """Smallest angle (radians) between two rows.

    Example:
        >>> torch.rad2deg(min_angle(torch.tensor([[1.0, 0.0], [1.0, 1.0], [-1.0, 0.0]])))
        tensor(45., dtype=torch.float64)
    """
    return pairwise_geometry(vectors)["min_angle"]


def spherical_energy(vectors: Tensor, exponent: float = 1.0) -> Tensor:
    """Riesz ``s``-energy of the normalized rows: mean over pairs of ``||u_c - u_c'||^(-s)``.

    Example:
        >>> spherical_energy(torch.tensor([[1.0, 0.0], [-1.0, 0.0]]))  # antipodal: distance 2
        tensor(0.5000, dtype=torch.float64)
    """
    return pairwise_geometry(vectors, exponent=exponent)["spherical_energy"]


def _check_sizes(num_classes: int, num_features: int) -> None:
    for name, value in (("num_classes", num_classes), ("num_features", num_features)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(
                f"Expected argument `{name}` to be a positive integer, but got {value!r}."
            )
    if num_classes < 2:
        raise ValueError(
            f"Expected argument `num_classes` to be at least 2, but got {num_classes}."
        )


def min_angle_optimal(num_classes: int, num_features: int) -> float | None:
    """Largest possible minimum angle of ``num_classes`` unit vectors in ``R^num_features``.

    Known cases: ``K <= d + 1`` (simplex, ``arccos(-1/(K-1))``); ``d + 1 < K <= 2d`` (``pi/2``,
    Rankin 1955); ``d = 2`` (regular polygon, ``2 pi / K``); ``d = 1`` (0 for ``K > 2``).
    ``None`` where the optimum is not known in closed form (the Tammes problem).

    Example:
        >>> round(math.degrees(min_angle_optimal(3, 2)), 6)
        120.0
        >>> min_angle_optimal(100, 10) is None
        True
    """
    _check_sizes(num_classes, num_features)
    k, d = num_classes, num_features
    if k <= d + 1:
        return math.acos(-1.0 / (k - 1))
    if d == 1:
        return 0.0
    if d == 2:
        return 2.0 * math.pi / k
    if k <= 2 * d:
        return math.pi / 2.0
    return None


def spherical_energy_optimal(
    num_classes: int, num_features: int, exponent: float = 1.0
) -> float | None:
    """Smallest possible Riesz ``s``-energy (mean over pairs) of ``K`` unit vectors in ``R^d``.

    Known cases (universally optimal codes, Cohn & Kumar 2007): the simplex for ``K <= d + 1``,
    ``(2K/(K-1))^(-s/2)``; the cross-polytope for ``K = 2d``; the regular polygon for ``d = 2``.
    ``None`` otherwise.

    Example:
        >>> spherical_energy_optimal(2, 1)  # two antipodal points: 1/2
        0.5
    """
    _check_sizes(num_classes, num_features)
    k, d, s = num_classes, num_features, float(exponent)
    if k <= d + 1:
        return float((2.0 * k / (k - 1)) ** (-s / 2.0))
    if d == 2:
        terms = [(2.0 * math.sin(math.pi * m / k)) ** (-s) for m in range(1, k)]
        return float(sum(terms) / (k - 1))
    if k == 2 * d:
        return float((2.0 ** (-s) + (2 * d - 2) * 2.0 ** (-s / 2.0)) / (2 * d - 1))
    return None
