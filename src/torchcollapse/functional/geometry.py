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
  ``2 atan2(||u - u'||, ||u + u'||)``, accurate for tiny and for near-``pi`` angles. The closest
  pair is the one of the largest float64 cosine: of several pairs closer than ~1.5e-8 rad (whose
  cosines all round to 1) it may report another than the closest;
  :func:`~torchcollapse.frames.frame_min_angle` (CPU) is exact there;
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

import functools
import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from torchcollapse._numbers import read_int, read_number
from torchcollapse.stats import _scratch, symmetric_product

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


def _check_real_tensor(value: Any, name: str, shape: tuple[int, ...]) -> None:
    """Raise unless ``value`` is ``None`` or a real (not bool, not complex) tensor of ``shape``:
    a ``TypeError`` for a wrong type or dtype, a ``ValueError`` for a wrong shape."""
    if value is None:
        return
    if not isinstance(value, Tensor) or value.dtype == torch.bool or value.is_complex():
        got = value.dtype if isinstance(value, Tensor) else type(value).__name__
        raise TypeError(
            f"Expected argument `{name}` to be a real tensor of shape {shape}, but got {got}."
        )
    if tuple(value.shape) != shape:
        raise ValueError(
            f"Expected argument `{name}` to have shape {shape}, but got {tuple(value.shape)}."
        )


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


def _small_gram(v: Tensor) -> Tensor:
    """The smaller Gram matrix of ``V`` (``K x d``): ``V V^T`` if ``K <= d``, else ``V^T V``."""
    return symmetric_product(v.T) if v.shape[0] <= v.shape[1] else symmetric_product(v)


class _PairSums:
    """Running sums over pairs ``c < c'`` of one blocked pass (0-d float64 tensors)."""

    def __init__(self, device: torch.device) -> None:
        zero = torch.zeros((), dtype=torch.float64, device=device)
        self.cos = zero.clone()
        self.deviation = zero.clone()
        self.abs = zero.clone()
        self.etf = zero.clone()
        self.energy = zero.clone()
        self.cdnv = zero.clone()
        self.best = torch.full((), -math.inf, dtype=torch.float64, device=device)
        self.best_pair = torch.zeros(2, dtype=torch.long, device=device)


_CLOSE = 1e-6
"""Pairs whose squared distance is below this fraction of twice the largest squared norm (of
unit vectors: of 2) could lose more than ~1e-10 of it to cancellation when it is read from the
Gram matrix (``|v|^2 + |v'|^2 - 2 G``); their distances are recomputed from differences."""


def _accumulate(
    sums: _PairSums,
    cos: Tensor,
    row: dict[str, Tensor],
    col: dict[str, Tensor],
    pair_index: Callable[[Tensor], Tensor],
    constants: dict[str, float],
    exponent: float,
    vectors: tuple[Tensor, Tensor],
) -> None:
    """Add the pairs whose cosines are ``cos`` (any shape; factors broadcast against it).

    ``pair_index(flat) -> (2, n)`` maps positions in ``cos`` to their two rows; ``vectors`` are
    the rows and their unit vectors. All work is a few in-place passes over ``cos``-sized
    buffers; only the check for nearly coincident pairs reads a value back, and those few pairs'
    distances (whose Gram form cancels) are recomputed from their differences.
    """
    sums.cos += cos.sum()
    work = _scratch("pairwise work", tuple(cos.shape), cos.dtype, cos.device)
    torch.sub(cos, constants["centre"], out=work)  # deviations from the (exact) mean cosine
    sums.deviation += torch.linalg.vecdot(work.reshape(-1), work.reshape(-1))
    work.sub_(constants["simplex"] - constants["centre"]).abs_()
    sums.abs += work.sum()
    # ETF distance: (G_ij / ||G||_F - etf_ij)^2, G_ij = cos_ij ||v_i|| ||v_j||
    torch.mul(cos, row["scaled_norm"], out=work)
    work.mul_(col["norm"]).sub_(constants["etf_off"])
    sums.etf += torch.linalg.vecdot(work.reshape(-1), work.reshape(-1))
    # Riesz energy of the unit vectors: ||u_i - u_j||^2 = 2 - 2 cos
    torch.mul(cos, -2.0, out=work)
    work.add_(2.0).clamp_min_(0.0)
    _recompute_close(work, 2.0 * _CLOSE, vectors[1], pair_index)
    if exponent == 1.0:
        work.rsqrt_()
    else:
        work.pow_(-0.5 * exponent)
    sums.energy += work.sum()
    if "variance" in row:
        # CDNV: (s_i + s_j) / (2 ||v_i - v_j||^2), ||v_i - v_j||^2 = |v_i|^2 + |v_j|^2 - 2 G_ij
        torch.mul(cos, row["minus_twice_norm"], out=work)
        work.mul_(col["norm"]).add_(row["squared"]).add_(col["squared"]).clamp_min_(0.0)
        _recompute_close(work, constants["close_squared"], vectors[0], pair_index)
        ratio = _scratch("pairwise ratio", tuple(cos.shape), cos.dtype, cos.device)
        torch.add(row["variance"], col["variance"], out=ratio).div_(work)
        sums.cdnv += 0.5 * ratio.sum()
    value, flat = cos.reshape(-1).max(0)
    better = value > sums.best
    sums.best = torch.where(better, value, sums.best)
    sums.best_pair = torch.where(better, pair_index(flat), sums.best_pair)


def _recompute_close(
    squared: Tensor, below: float, rows: Tensor, pair_index: Callable[[Tensor], Tensor]
) -> None:
    """Replace, in place, the squared distances under ``below`` (read from a Gram identity, where
    they cancel) by those of the differences of the pairs' ``rows``."""
    close = squared < below
    if bool(close.any()):
        i, j = pair_index(close.reshape(-1).nonzero().squeeze(1))
        squared[close] = (rows[i] - rows[j]).square().sum(1)


def _square_pair(flat: Tensor, rows: Tensor, cols: Tensor) -> Tensor:
    return torch.stack([rows[flat], cols[flat]])


def _rectangle_pair(flat: Tensor, start: int, stop: int, width: int) -> Tensor:
    return torch.stack([flat // width + start, flat % width + stop])


def pairwise_geometry(
    vectors: Tensor,
    *,
    variances: Tensor | None = None,
    exponent: float = 1.0,
    block_elements: int | None = None,
    gram: Tensor | None = None,
) -> dict[str, Tensor]:
    """All geometric quantities of the rows of ``vectors`` in one blocked pass over the pairs.

    Args:
        vectors: ``(K, d)`` rows (e.g. centred class means or classifier rows), ``K >= 2``.
        variances: optional ``(K,)`` per-row variances ``s_c``; when given, the class-distance
            normalized variance ``mean_{c<c'} (s_c + s_c') / (2 ||v_c - v_c'||^2)`` is returned
            as ``"cdnv"`` (Galanti et al., 2022).
        exponent: ``s`` of the Riesz energy.
        block_elements: elements per block of the pairwise matrix, a positive integer (default:
            ``2**21`` on CPU, ``2**26`` on accelerators).
        gram: optional precomputed smaller Gram matrix of ``vectors`` in float64 (``V V^T`` when
            ``K <= d``, else ``V^T V``), to save its computation.

    Returns:
        float64 0-d tensors ``equinorm``, ``equiangularity``, ``max_angle``, ``etf_distance``,
        ``min_angle``, ``spherical_energy`` (and ``cdnv``).

    Raises:
        TypeError: an argument of a wrong type: ``vectors`` not a floating-point tensor,
            ``variances`` or ``gram`` not a real tensor, ``exponent`` not a real number,
            ``block_elements`` not an integer.
        ValueError: a wrong shape or value: ``vectors`` not 2-D with at least 2 rows, or with
            NaN, infinite or zero rows; ``variances`` not of shape ``(K,)``; ``gram`` not of
            shape ``(min(K, d), min(K, d))``; ``exponent`` NaN or infinite; ``block_elements``
            below 1.

    The standard deviation of the cosines is accumulated about their exact mean
    ``(||sum_c u_c||^2 - K) / (K (K-1))``, so no cancellation occurs; every other sum is of
    non-negative terms or exact. Rows are processed in blocks against the rows after them; only the
    small diagonal squares of the blocks are indexed, the rectangles right of them are dense.

    Example:
        >>> square = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]])
        >>> out = pairwise_geometry(square)
        >>> torch.rad2deg(out["min_angle"])
        tensor(90., dtype=torch.float64)
        >>> out["equinorm"]
        tensor(0., dtype=torch.float64)
    """
    read_number(exponent, "exponent", "a finite number")
    v = _check_vectors(vectors)
    num, dim = v.shape
    _check_real_tensor(variances, "variances", (num,))
    _check_real_tensor(gram, "gram", (min(num, dim),) * 2)
    if block_elements is not None:
        block_elements = read_int(block_elements, "block_elements")
    device = v.device
    power = _power_of_two_scale(v)  # every quantity is scale-free (cdnv: with the variances)
    v = v * power
    norms = _row_norms(v, "vectors")
    units = v / norms[:, None]
    squared = norms.square()
    var: Tensor | None = None
    if variances is not None:
        var = variances.detach().to(device=device, dtype=torch.float64) * power * power
    small = _small_gram(v) if gram is None else gram.to(device=device, dtype=torch.float64)
    if gram is not None:
        small = _rescaled_gram(small, v, power)
    gram_norm = torch.linalg.matrix_norm(small)
    # With K <= d the K x K Gram matrix is at hand: cosines are read from it, not recomputed.
    full = small if num <= v.shape[1] else None
    inverse_norms = 1.0 / norms
    pairs = num * (num - 1) // 2
    constants = {
        # squared distances below this are recomputed from differences (see _CLOSE)
        "close_squared": float(2.0 * _CLOSE * squared.max()),
        "centre": float((units.sum(0).square().sum() - num) / (num * (num - 1))),
        "simplex": -1.0 / (num - 1),
        "etf_off": -1.0 / (num * math.sqrt(num - 1)),
    }
    etf_diag = (1.0 - 1.0 / num) / math.sqrt(num - 1)
    factors = {
        "norm": norms,
        "scaled_norm": norms / gram_norm,
        "squared": squared,
        "minus_twice_norm": -2.0 * norms,
    }
    if var is not None:
        factors["variance"] = var
    sums = _PairSums(device)
    rows_per_block = _block_rows(num, device, block_elements)
    for start in range(0, num - 1, rows_per_block):
        stop = min(num, start + rows_per_block)
        block = units[start:stop]
        # Diagonal square: pairs start <= i < j < stop, gathered as a vector.
        upper = torch.triu_indices(stop - start, stop - start, offset=1, device=device)
        if upper.shape[1] > 0:
            rows, cols = upper[0] + start, upper[1] + start
            if full is None:
                cos = (block @ block.T)[upper[0], upper[1]]
            else:
                cos = full[rows, cols] * inverse_norms[rows] * inverse_norms[cols]
            sums_row = {name: f.index_select(0, rows) for name, f in factors.items()}
            sums_col = {name: f.index_select(0, cols) for name, f in factors.items()}
            _accumulate(
                sums,
                cos,
                sums_row,
                sums_col,
                functools.partial(_square_pair, rows=rows, cols=cols),
                constants,
                exponent,
                (v, units),
            )
        # Rectangle right of it: rows [start, stop) against every row after stop.
        if stop < num:
            shape = (stop - start, num - stop)
            cos = _scratch("pairwise cosines", shape, torch.float64, device)
            if full is None:
                torch.mm(block, units[stop:].T, out=cos)
            else:
                torch.mul(full[start:stop, stop:], inverse_norms[start:stop, None], out=cos)
                cos.mul_(inverse_norms[None, stop:])
            width = num - stop
            _accumulate(
                sums,
                cos,
                {name: f[start:stop, None] for name, f in factors.items()},
                {name: f[None, stop:] for name, f in factors.items()},
                functools.partial(_rectangle_pair, start=start, stop=stop, width=width),
                constants,
                exponent,
                (v, units),
            )

    mean_cos = sums.cos / pairs
    # Sum of squared deviations about the mean, from deviations about `centre` (~ the mean).
    offset = mean_cos - constants["centre"]
    deviation = (sums.deviation - pairs * offset.square()).clamp_min(0.0)
    etf = sums.etf * 2 + ((squared / gram_norm) - etf_diag).square().sum()
    i, j = (int(x) for x in sums.best_pair.tolist())
    angle = 2.0 * torch.atan2(
        torch.linalg.vector_norm(units[i] - units[j]), torch.linalg.vector_norm(units[i] + units[j])
    )
    zero = torch.zeros((), dtype=torch.float64, device=device)
    out = {
        "equinorm": norms.std() / norms.mean(),
        "equiangularity": (deviation / (pairs - 1)).sqrt() if pairs > 1 else zero,
        "max_angle": sums.abs / pairs,
        "etf_distance": etf.clamp_min(0.0).sqrt(),
        "min_angle": angle,
        "spherical_energy": sums.energy / pairs,
    }
    if var is not None:
        out["cdnv"] = sums.cdnv / pairs
    return out


def _rescaled_gram(gram: Tensor, v: Tensor, power: float) -> Tensor:
    """A caller's Gram matrix of the rows before their rescaling by ``power``, rescaled (twice
    by ``power``: its square may leave the float range); recomputed from the rescaled rows ``v``
    when its largest entry is not a normal float64 number far from the range's ends (it
    overflowed, or underflowed into subnormals, before the rescaling)."""
    top = float(gram.abs().max()) if gram.numel() else 0.0
    if not 2.0**-1000 <= top <= 2.0**1000:
        return _small_gram(v)
    return gram * power * power


def _power_of_two_scale(v: Tensor) -> float:
    """A power of two that brings the largest entry of ``v`` to ``[0.5, 1)``: multiplying by it
    is exact, and keeps the squared entries of Gram matrices (fourth powers of the scale) inside
    the float64 range whatever the rows' scale (beyond ~1e+-77 they would overflow or underflow).
    1 for rows that are all zero or not finite (left to the callers' checks); at most ``2**1000``
    (a Python float), which brings even subnormal rows to ~``2**-30``."""
    top = float(v.abs().max()) if v.numel() else 0.0
    if top == 0.0 or not math.isfinite(top):
        return 1.0
    return math.ldexp(1.0, min(1000, -math.frexp(top)[1]))


def _etf_distance_without_angles(v: Tensor, gram: Tensor | None = None) -> Tensor:
    """ETF distance of rows ``v`` (float64, not all zero; zero rows allowed) from norms alone:
    ``||G/||G|| - E||^2 = 2 - 2 <G, E> / ||G||`` with ``<G, E> = (||V||_F^2 - ||V^T 1||^2 / K) /
    sqrt(K-1)`` and ``||G||_F`` that of the smaller Gram matrix ``gram``. Cancels near 0, so only
    for rows with a zero one, which are far from a simplex."""
    k = v.shape[0]
    power = _power_of_two_scale(v)  # (scale-free)
    v = v * power
    small = _small_gram(v) if gram is None else _rescaled_gram(gram, v, power)
    inner = (v.square().sum() - v.sum(0).square().sum() / k) / math.sqrt(k - 1)
    distance: Tensor = (2.0 - 2.0 * inner / torch.linalg.matrix_norm(small)).clamp_min(0.0).sqrt()
    return distance


def _check_not_all_zero(v: Tensor, norms: Tensor) -> None:
    if not bool(norms.any()):
        raise ValueError(
            f"Expected argument `vectors` to have a non-zero row, but all {v.shape[0]} rows are"
            " zero."
        )


def equinorm(vectors: Tensor) -> Tensor:
    """Std / mean of the row norms (std with ``ddof=1``); 0 for rows of equal norm. Zero rows
    count (with norm 0); not every row may be zero.

    Example:
        >>> equinorm(torch.tensor([[3.0, 4.0], [0.0, 5.0]]))
        tensor(0., dtype=torch.float64)
    """
    v = _check_vectors(vectors)
    norms: Tensor = torch.linalg.vector_norm(v, dim=1)
    _check_not_all_zero(v, norms)
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

    It needs no angles: zero rows are allowed (not all of them).

    Example:
        >>> etf_distance(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))  # orthogonal, not antipodal
        tensor(0.7654, dtype=torch.float64)
        >>> etf_distance(torch.tensor([[-1.0, 0.0], [0.0, 0.0], [1.0, 0.0]]))  # a zero row
        tensor(0.7654, dtype=torch.float64)
    """
    v = _check_vectors(vectors)
    v = v * _power_of_two_scale(v)  # (scale-free) norms of tiny rows do not underflow to 0
    norms = torch.linalg.vector_norm(v, dim=1)
    if bool((norms == 0).any()):
        _check_not_all_zero(v, norms)
        return _etf_distance_without_angles(v)
    return pairwise_geometry(v)["etf_distance"]


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


def _check_sizes(num_classes: Any, num_features: Any) -> tuple[int, int]:
    """The sizes as Python ints (any integer type, not a bool): ``num_classes >= 2``,
    ``num_features >= 1`` (see :func:`~torchcollapse._numbers.read_int`)."""
    return read_int(num_classes, "num_classes", 2), read_int(num_features, "num_features")


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
    k, d = _check_sizes(num_classes, num_features)
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
    ``None`` otherwise, and for ``s < 0``: the energy is then a mean power of the distances, which
    spread points *raise*; its smallest value, 0, belongs to coincident points and says nothing
    (the simplex value for ``-2 <= s < 0`` is its largest, not its smallest).

    Example:
        >>> spherical_energy_optimal(2, 1)  # two antipodal points: 1/2
        0.5
    """
    k, d = _check_sizes(num_classes, num_features)
    s = read_number(exponent, "exponent", "a finite number")
    if s < 0:
        return None
    if k <= d + 1:
        return float((2.0 * k / (k - 1)) ** (-s / 2.0))
    if d == 2:
        terms = [(2.0 * math.sin(math.pi * m / k)) ** (-s) for m in range(1, k)]
        return float(sum(terms) / (k - 1))
    if k == 2 * d:
        return float((2.0 ** (-s) + (2 * d - 2) * 2.0 ** (-s / 2.0)) / (2 * d - 1))
    return None
