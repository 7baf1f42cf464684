"""Every neural collapse quantity at once, from statistics or from full tensors.

:func:`neural_collapse` computes NC1-NC4 and their companions (Papyan, Han & Donoho, 2020; Galanti,
Gyorgy & Hutter, 2022; Liu et al., 2023) exactly from ``(features, target)``: class statistics
accumulated about per-class shifts in float64, NC4 against the means of the same features (a second
pass). :func:`neural_collapse_compute` does the same from
:class:`~torchcollapse.stats.ClassStatistics` (what :class:`~torchcollapse.metrics.NeuralCollapse`
calls), sharing every intermediate (centred means, ``Sigma_W``, the blocked pass over pairs).

Keys of the result (float64 0-d tensors; ``num_classes_present`` is int64):

- ``nc1``, ``nc1_trace_ratio``, ``cdnv``: within-class variability
  (:mod:`~torchcollapse.functional.variability`);
- ``nc2_equinorm``, ``nc2_equiangularity``, ``nc2_max_angle``, ``nc2_etf_distance``,
  ``nc2_min_angle``, ``nc2_spherical_energy``: geometry of the centred class means
  (:mod:`~torchcollapse.functional.geometry`), and ``nc2_min_angle_optimal``,
  ``nc2_spherical_energy_optimal`` (best possible values, present only where known, see
  :func:`~torchcollapse.functional.min_angle_optimal`);
- with a classifier ``weight``: ``nc2_weight_*`` (the same six for the rows ``w_c`` of the present
  classes), ``nc3`` and ``nc3_cosine`` (mean over present classes of ``cos(w_c, mu_c - mu_G)``);
- with a classifier and reference means: ``nc4``;
- ``num_classes_present``: classes with samples (the others are left out of every quantity).

Example:
    >>> import torch
    >>> from torchcollapse.functional import neural_collapse
    >>> _ = torch.manual_seed(0)
    >>> target = torch.arange(4).repeat(25)
    >>> features = 4 * torch.eye(4)[target] + 0.1 * torch.randn(100, 4)
    >>> out = neural_collapse(features, target, weight=torch.eye(4))
    >>> round(float(out["nc1"]), 4), round(float(out["nc4"]), 4)
    (0.0017, 0.0)
    >>> sorted(out)[:4]
    ['cdnv', 'nc1', 'nc1_trace_ratio', 'nc2_equiangularity']
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from torchcollapse._numbers import as_finite_float, as_real_float, read_number
from torchcollapse._warnings import user_stacklevel
from torchcollapse.functional.duality import _check_bias, _check_weight, _nc3, _nc3_cosine
from torchcollapse.functional.geometry import (
    _etf_distance_without_angles,
    _small_gram,
    min_angle_optimal,
    pairwise_geometry,
    spherical_energy_optimal,
)
from torchcollapse.functional.means import (
    GlobalMean,
    UndefinedCollapse,
    _check_global_mean,
    _check_statistics,
    centred_class_means,
)
from torchcollapse.functional.nearest_class_center import _nc4_counts, _prepare_reference
from torchcollapse.functional.variability import _cdnv, _nc1
from torchcollapse.stats import (
    ClassStatistics,
    _check_features,
    _check_features_target,
    _check_num_classes,
)

__all__ = [
    "MEAN_KEYS",
    "WEIGHT_KEYS",
    "neural_collapse",
    "neural_collapse_compute",
    "neural_collapse_nc2",
]

_GEOMETRY = (
    "equinorm",
    "equiangularity",
    "max_angle",
    "etf_distance",
    "min_angle",
    "spherical_energy",
)
# The geometry that needs no angles, defined with zero rows too.
_NO_ANGLES = ("equinorm", "etf_distance")
#: Keys computed from the class statistics alone.
MEAN_KEYS: tuple[str, ...] = (
    "nc1",
    "nc1_trace_ratio",
    "cdnv",
    *(f"nc2_{name}" for name in _GEOMETRY),
    "num_classes_present",
)
#: Keys that need the classifier weight.
WEIGHT_KEYS: tuple[str, ...] = (*(f"nc2_weight_{name}" for name in _GEOMETRY), "nc3", "nc3_cosine")


def neural_collapse_compute(
    statistics: ClassStatistics,
    *,
    weight: Tensor | None = None,
    global_mean: GlobalMean = "classes",
    nc4_counts: tuple[Tensor, Tensor] | None = None,
    keys: Iterable[str] | None = None,
    exponent: float = 1.0,
) -> dict[str, Tensor]:
    """Neural collapse quantities from class statistics (float64).

    Args:
        statistics: accumulated class statistics (at least two classes with samples).
        weight: optional ``(K, d)`` classifier weight for the ``nc2_weight_*``, ``nc3`` keys.
        global_mean: ``"classes"`` (mean of class means, default) or ``"samples"``.
        nc4_counts: optional ``(mismatches, samples)`` accumulated against reference means
            (real numbers or one-element tensors, ``0 <= mismatches <= samples``); gives ``nc4``
            when ``samples > 0``.
        keys: compute only these keys (default: every key the inputs allow); any iterable of
            names (a list, a set, a generator; not a plain string) from :data:`MEAN_KEYS`,
            :data:`WEIGHT_KEYS` (which need ``weight``), ``"nc2_min_angle_optimal"``,
            ``"nc2_spherical_energy_optimal"`` (which needs ``exponent >= 0``) and ``"nc4"``
            (which needs ``nc4_counts``). The ``*_optimal`` keys are left out, even when asked
            for, where no optimal value is known for the present classes and the dimension (see
            :func:`~torchcollapse.functional.min_angle_optimal`); so are, for a key asked for, the
            quantities a warning says are undefined for the data.
        exponent: ``s`` of the spherical (Riesz) energy, a finite number. For ``s < 0`` no
            smallest energy is defined (see
            :func:`~torchcollapse.functional.spherical_energy_optimal`): without ``keys``,
            ``nc2_spherical_energy_optimal`` is left out; asked for in ``keys``, it is an error.

    Returns:
        A dict of 0-d tensors; see the module docstring for the keys.

    Raises:
        ValueError: fewer than two present classes, a weight of the wrong shape, an exponent
            that is NaN or infinite, ``nc4_counts`` out of range (``mismatches < 0``,
            ``mismatches > samples`` or not finite), or ``keys`` naming an unknown key or one
            whose input (``weight``, ``nc4_counts``, ``exponent >= 0``) is missing.
        TypeError: ``keys`` is a string or not iterable, ``exponent`` not a real number, or
            ``nc4_counts`` not a pair of real numbers.
    """
    _check_statistics(statistics)
    _check_global_mean(global_mean)
    power = read_number(exponent, "exponent", "a finite number")
    counts = _read_nc4_counts(nc4_counts)
    wanted = (
        None
        if keys is None
        else _check_keys(keys, weight=weight, nc4_counts=nc4_counts, exponent=power)
    )

    def want(key: str) -> bool:
        return wanted is None or key in wanted

    stats = statistics.to(dtype=torch.float64)
    centred, present = centred_class_means(stats, global_mean)
    num_present = present.numel()
    num_features = stats.num_features
    w_rows = None
    if weight is not None:
        w_rows = _check_weight(weight, stats.num_classes, num_features, name="weight")
        w_rows = w_rows.to(centred.device).index_select(0, present)
    out: dict[str, Tensor] = {}
    total = stats.total
    # The smaller Gram matrix of the centred means, shared by NC1 and the pairwise pass.
    gram = _small_gram(centred)
    norms = torch.linalg.vector_norm(centred, dim=1)
    at_centre = present[norms == 0].tolist()  # classes whose mean is the global mean
    if len(at_centre) == num_present:
        raise UndefinedCollapse(
            f"Expected the class means to differ, but all {num_present} present classes have the"
            " same mean (constant features?): no collapse quantity is defined."
        )
    if want("nc1") or want("nc1_trace_ratio"):
        if want("nc1"):
            sigma_w = stats.within_class_scatter() / total
            if global_mean == "classes":
                null_vector = torch.ones(num_present, dtype=torch.float64, device=centred.device)
            else:
                null_vector = stats.counts.index_select(0, present)
            out["nc1"] = _nc1(centred, sigma_w, null_vector, gram)
        if want("nc1_trace_ratio"):
            trace_w = stats.within_class_sum_squares().sum() / total
            out["nc1_trace_ratio"] = trace_w / (centred.square().sum() / num_present)
    if any(want(k) for k in ("cdnv", *(f"nc2_{name}" for name in _GEOMETRY))):
        variances = None
        if want("cdnv"):
            variances = stats.within_class_sum_squares().index_select(
                0, present
            ) / stats.counts.index_select(0, present)
            # CDNV does not depend on the global mean: pairwise distances of means are invariant.
        if not at_centre:
            geometry = pairwise_geometry(centred, variances=variances, exponent=exponent, gram=gram)
        else:
            # A class mean at the global mean has no direction: the angles are undefined. CDNV
            # is taken on the means shifted off the origin (it depends on differences only).
            if any(want(f"nc2_{name}") for name in _GEOMETRY if name not in _NO_ANGLES):
                _warn_left_out(
                    f"the means of classes {at_centre} equal the global mean, so the angles of the"
                    " centred means are undefined",
                    "nc2_* keys but nc2_equinorm and nc2_etf_distance",
                )
            geometry = {
                "equinorm": norms.std() / norms.mean(),
                "etf_distance": _etf_distance_without_angles(centred, gram),
            }
            if variances is not None:
                geometry["cdnv"] = _cdnv(centred, variances)
        if want("cdnv"):
            cdnv = geometry.pop("cdnv")
            if bool(cdnv.isnan()):
                _warn_left_out(
                    "two classes have the same mean and no within-class variance (a 0/0 term)",
                    "cdnv key",
                )
            else:
                out["cdnv"] = cdnv
        for name in _GEOMETRY:
            if want(f"nc2_{name}") and name in geometry:
                out[f"nc2_{name}"] = geometry[name]
    if want("nc2_min_angle_optimal"):
        best = min_angle_optimal(num_present, num_features) if num_present >= 2 else None
        if best is not None:
            out["nc2_min_angle_optimal"] = torch.tensor(
                best, dtype=torch.float64, device=centred.device
            )
    if want("nc2_spherical_energy_optimal"):
        best = spherical_energy_optimal(num_present, num_features, exponent)
        if best is not None:
            out["nc2_spherical_energy_optimal"] = torch.tensor(
                best, dtype=torch.float64, device=centred.device
            )
    if w_rows is not None:
        zero_rows = present[(w_rows == 0).all(1)].tolist()
        all_zero = len(zero_rows) == num_present
        if zero_rows:  # e.g. a zero-initialised head: its rows have no direction
            undefined = [f"nc2_weight_{name}" for name in _GEOMETRY if name not in _NO_ANGLES]
            undefined += ["nc3_cosine"]
            if all_zero:
                undefined += ["nc3", "nc2_weight_equinorm", "nc2_weight_etf_distance"]
            if any(want(key) for key in undefined):
                _warn_left_out(
                    f"the classifier's rows of classes {zero_rows} are zero",
                    "nc2_weight_* (but nc2_weight_equinorm and nc2_weight_etf_distance),"
                    " nc3_cosine"
                    + (", nc3, nc2_weight_equinorm and nc2_weight_etf_distance" if all_zero else "")
                    + " keys",
                )
            weight_norms = torch.linalg.vector_norm(w_rows, dim=1)
            if want("nc2_weight_equinorm") and not all_zero:
                out["nc2_weight_equinorm"] = weight_norms.std() / weight_norms.mean()
            if want("nc2_weight_etf_distance") and not all_zero:
                out["nc2_weight_etf_distance"] = _etf_distance_without_angles(w_rows)
        elif any(want(f"nc2_weight_{name}") for name in _GEOMETRY):
            weight_geometry = pairwise_geometry(w_rows, exponent=exponent)
            for name in _GEOMETRY:
                if want(f"nc2_weight_{name}"):
                    out[f"nc2_weight_{name}"] = weight_geometry[name]
        if want("nc3") and not all_zero:
            out["nc3"] = _nc3(w_rows, centred)
        if want("nc3_cosine") and not zero_rows and not at_centre:
            out["nc3_cosine"] = _nc3_cosine(w_rows, centred).mean()
        elif want("nc3_cosine") and at_centre and not zero_rows:
            _warn_left_out(
                f"the means of classes {at_centre} equal the global mean", "nc3_cosine key"
            )
    if counts is not None and want("nc4"):
        mismatches, samples = counts
        if samples > 0:
            out["nc4"] = torch.tensor(
                mismatches / samples, dtype=torch.float64, device=centred.device
            )
    if want("num_classes_present"):
        out["num_classes_present"] = torch.tensor(num_present, device=centred.device)
    return out


_OPTIMAL_KEYS = ("nc2_min_angle_optimal", "nc2_spherical_energy_optimal")
_ALL_KEYS = (*MEAN_KEYS, *WEIGHT_KEYS, *_OPTIMAL_KEYS, "nc4")


def _read_nc4_counts(nc4_counts: Any) -> tuple[float, float] | None:
    """``(mismatches, samples)`` as Python floats (a pair of real numbers or one-element real
    tensors, or one tensor of two values; a host read), with ``0 <= mismatches <= samples``;
    ``None`` stays ``None``."""
    if nc4_counts is None:
        return None
    if isinstance(nc4_counts, Tensor):
        if nc4_counts.shape != (2,):
            raise ValueError(
                "Expected argument `nc4_counts` to be a pair (mismatches, samples) of counts, but"
                f" got a tensor of shape {tuple(nc4_counts.shape)}."
            )
        nc4_counts = tuple(nc4_counts)
    if not isinstance(nc4_counts, (tuple, list)):
        raise TypeError(
            "Expected argument `nc4_counts` to be a pair (mismatches, samples) of counts, but got"
            f" {type(nc4_counts).__name__}."
        )
    if len(nc4_counts) != 2:
        raise ValueError(
            "Expected argument `nc4_counts` to be a pair (mismatches, samples) of counts, but got"
            f" {len(nc4_counts)} values."
        )
    mismatches, samples = (as_real_float(count) for count in nc4_counts)
    if mismatches is None or samples is None:
        got = ", ".join(type(count).__name__ for count in nc4_counts)
        raise TypeError(
            "Expected argument `nc4_counts` to be a pair (mismatches, samples) of real numbers"
            f" or one-element real tensors, but got ({got})."
        )
    if not (math.isfinite(samples) and 0 <= mismatches <= samples):
        raise ValueError(
            "Expected argument `nc4_counts` to be finite counts with 0 <= mismatches <= samples,"
            f" but got ({mismatches}, {samples})."
        )
    return mismatches, samples


def _check_keys(
    keys: Any,
    *,
    weight: Tensor | None,
    nc4_counts: tuple[Tensor, Tensor] | None,
    exponent: float,
) -> set[str]:
    """The set of requested keys, each known and with its inputs given."""
    if isinstance(keys, (str, bytes, bytearray)) or not isinstance(keys, Iterable):
        raise TypeError(
            "Expected argument `keys` to be an iterable of key names (e.g. a list), but got"
            f" {keys!r}."
        )
    wanted = set(keys)
    unknown = sorted(str(k) for k in wanted - set(_ALL_KEYS))
    if unknown:
        known = ", ".join(_ALL_KEYS)
        raise ValueError(
            f"Expected argument `keys` to hold only known keys ({known}), but got {unknown}."
        )
    if weight is None and (needing := sorted(wanted & set(WEIGHT_KEYS))):
        raise ValueError(
            f"Expected argument `weight` to be given for the keys {needing}, but got None."
        )
    if nc4_counts is None and "nc4" in wanted:
        raise ValueError(
            "Expected argument `nc4_counts` to be given for the key 'nc4', but got None."
        )
    if "nc2_spherical_energy_optimal" in wanted and exponent < 0:
        raise ValueError(
            "Expected argument `exponent` to be >= 0 for the key 'nc2_spherical_energy_optimal'"
            f" (no smallest energy is defined for a negative exponent), but got {exponent}."
        )
    return wanted


def _warn_left_out(reason: str, keys: str) -> None:
    verb = "is" if keys.endswith(" key") else "are"
    warnings.warn(
        f"{reason}: the {keys} {verb} left out.", UserWarning, stacklevel=user_stacklevel()
    )


def neural_collapse(
    features: Tensor,
    target: Tensor,
    *,
    num_classes: int | None = None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    global_mean: GlobalMean = "classes",
    validate_args: bool = True,
) -> dict[str, Tensor]:
    """Every neural collapse quantity of full tensors, exactly, NC4 included.

    Args:
        features: ``(N, d)`` features of any float dtype.
        target: ``(N,)`` integer labels.
        num_classes: number of classes ``K`` (default: rows of ``weight``, else
            ``max(target) + 1``).
        weight: optional ``(K, d)`` classifier weight (``nc2_weight_*``, ``nc3``, ``nc4``).
        bias: optional ``(K,)`` classifier bias (used by ``nc4``).
        global_mean: ``"classes"`` (mean of class means, default) or ``"samples"``.
        validate_args: check labels and finiteness.

    Returns:
        A dict of 0-d tensors (see the module docstring); ``nc4`` (when ``weight`` is given)
        compares the classifier with the nearest class mean of these same features.

    Raises:
        ValueError / TypeError: invalid inputs, or fewer than two classes with samples.

    The quantities are measurements: inputs that require grad are read detached and the results
    carry no gradient (the differentiable collapse terms are in :mod:`torchcollapse.losses`).
    """
    _check_features(features)
    _check_global_mean(global_mean)
    features = features.detach()
    weight = weight.detach() if isinstance(weight, Tensor) else weight
    bias = bias.detach() if isinstance(bias, Tensor) else bias
    # the weight's columns checked before num_classes is read from its rows
    if isinstance(weight, Tensor) and weight.ndim == 2 and weight.shape[1] != features.shape[1]:
        hint = " (a transposed weight?)" if weight.shape[0] == features.shape[1] else ""
        raise ValueError(
            f"Expected argument `weight` to be (num_classes, {features.shape[1]}), one column"
            f" per feature, but got shape {tuple(weight.shape)}{hint}."
        )
    if num_classes is None:
        if weight is not None and isinstance(weight, Tensor) and weight.ndim == 2:
            num_classes = int(weight.shape[0])
            if (
                validate_args
                and isinstance(target, Tensor)
                and target.numel() > 0
                and not target.is_floating_point()
                and int(target.max()) >= num_classes
            ):
                raise ValueError(
                    f"Expected argument `weight` to have a row for every class in `target`"
                    f" (num_classes is taken from its {num_classes} rows), but `target` holds"
                    f" class {int(target.max())}. Pass `num_classes` or a weight of every class."
                )
        elif isinstance(target, Tensor) and target.numel() > 0 and not target.is_floating_point():
            num_classes = int(target.max()) + 1
        else:
            num_classes = 1
    else:
        num_classes = _check_num_classes(num_classes)
    _check_features_target(features, target, num_classes, validate_args=validate_args)
    stats = ClassStatistics.from_features(features, target, num_classes, validate_args=False)
    if bias is not None and weight is None:
        raise ValueError("Expected argument `weight` to be given with `bias`, but got weight=None.")
    w = None if weight is None else _check_weight(weight, num_classes, features.shape[1])
    b = _check_bias(bias, num_classes)
    counts = None
    if w is not None:
        reference = _prepare_reference(stats.class_means())
        counts = _nc4_counts(features, w, b, reference)
    return neural_collapse_compute(stats, weight=w, global_mean=global_mean, nc4_counts=counts)


def neural_collapse_nc2(
    statistics: ClassStatistics,
    *,
    weight: Tensor | None = None,
    global_mean: GlobalMean = "classes",
    exponent: float = 1.0,
) -> dict[str, Tensor]:
    """NC2: the geometry of the centred class means (and of the classifier rows, when given).

    Returns the ``nc2_*`` keys of :func:`neural_collapse_compute`: equinorm, equiangularity,
    max-angle, ETF distance, minimum angle and spherical energy of the centred means, the best
    possible minimum angle and energy where known (the energy's never for ``exponent < 0``, where
    no smallest energy is defined), and with ``weight`` the ``nc2_weight_*`` twins over the rows of
    the present classes.

    Example:
        >>> from torchcollapse.stats import ClassStatistics
        >>> stats = ClassStatistics.from_features(torch.eye(3), torch.arange(3), 3)
        >>> out = neural_collapse_nc2(stats)
        >>> float(out["nc2_etf_distance"]) < 1e-12  # centred one-hot means form a simplex ETF
        True
    """
    keys = [f"nc2_{name}" for name in _GEOMETRY]
    keys.append("nc2_min_angle_optimal")
    power = as_finite_float(exponent)
    if power is None or power >= 0:  # not a number: neural_collapse_compute names it
        keys.append("nc2_spherical_energy_optimal")
    if weight is not None:
        keys += [f"nc2_weight_{name}" for name in _GEOMETRY]
    return neural_collapse_compute(
        statistics, weight=weight, global_mean=global_mean, keys=keys, exponent=exponent
    )
