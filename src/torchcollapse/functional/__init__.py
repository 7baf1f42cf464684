"""Pure functions for neural collapse: from class statistics or from full tensors.

Papyan, Han & Donoho (2020), "Prevalence of neural collapse during the terminal phase of deep
learning training"; Galanti, Gyorgy & Hutter (2022), "On the role of neural collapse in transfer
learning"; Liu et al. (2023), "Generalizing and decoupling neural collapse via hyperspherical
uniformity gap". The formula sheet and its conventions are in each function's docstring.

- :func:`neural_collapse`: everything from ``(features, target)``, NC4 included;
  :func:`neural_collapse_compute`: everything from :class:`~torchcollapse.stats.ClassStatistics`.
- One function per quantity: :func:`neural_collapse_nc1`, :func:`neural_collapse_nc1_trace_ratio`,
  :func:`neural_collapse_cdnv`, :func:`neural_collapse_nc2`, :func:`neural_collapse_nc3`,
  :func:`neural_collapse_nc3_cosine`, :func:`neural_collapse_nc4`.
- Geometry of any set of vectors (class means or classifier rows): :func:`equinorm`,
  :func:`equiangularity`, :func:`max_angle`, :func:`etf_distance`, :func:`min_angle`,
  :func:`spherical_energy`, :func:`pairwise_geometry`, and the best possible values
  :func:`min_angle_optimal`, :func:`spherical_energy_optimal`.
- Building blocks: :func:`class_means`, :func:`centred_class_means`,
  :func:`within_class_covariance`, :func:`between_class_covariance`.
- :class:`UndefinedCollapse` (a ``ValueError``): a quantity that the data leave undefined (fewer
  than two classes, coinciding class means, ...); :data:`MEAN_KEYS` and :data:`WEIGHT_KEYS`: the
  keys :func:`neural_collapse_compute` gives from the means and from a classifier (beside them it
  gives the best-possible values of the generalized geometry, ``*_optimal``, and ``nc4`` when
  counted).
"""

from __future__ import annotations

from torchcollapse.functional.duality import neural_collapse_nc3, neural_collapse_nc3_cosine
from torchcollapse.functional.geometry import (
    equiangularity,
    equinorm,
    etf_distance,
    max_angle,
    min_angle,
    min_angle_optimal,
    pairwise_geometry,
    spherical_energy,
    spherical_energy_optimal,
)
from torchcollapse.functional.means import (
    UndefinedCollapse,
    between_class_covariance,
    centred_class_means,
    class_means,
    within_class_covariance,
)
from torchcollapse.functional.nearest_class_center import neural_collapse_nc4
from torchcollapse.functional.neural_collapse import (
    MEAN_KEYS,
    WEIGHT_KEYS,
    neural_collapse,
    neural_collapse_compute,
    neural_collapse_nc2,
)
from torchcollapse.functional.variability import (
    neural_collapse_cdnv,
    neural_collapse_nc1,
    neural_collapse_nc1_trace_ratio,
)

__all__ = [
    "MEAN_KEYS",
    "WEIGHT_KEYS",
    "UndefinedCollapse",
    "between_class_covariance",
    "centred_class_means",
    "class_means",
    "equiangularity",
    "equinorm",
    "etf_distance",
    "max_angle",
    "min_angle",
    "min_angle_optimal",
    "neural_collapse",
    "neural_collapse_cdnv",
    "neural_collapse_compute",
    "neural_collapse_nc1",
    "neural_collapse_nc1_trace_ratio",
    "neural_collapse_nc2",
    "neural_collapse_nc3",
    "neural_collapse_nc3_cosine",
    "neural_collapse_nc4",
    "pairwise_geometry",
    "spherical_energy",
    "spherical_energy_optimal",
    "within_class_covariance",
]
