"""Independent float64 two-pass reference of every neural collapse quantity.

Written with numpy and plain loops over classes and pairs of classes, straight from the formula
sheet in DESIGN.md, sharing no code with ``torchcollapse``: class means by a first pass, deviations
from them by a second pass, the pseudo-inverse of ``Sigma_B`` from a full eigendecomposition
restricted to its top ``min(K-1, d)`` eigenpairs, and every pairwise quantity by looping over pairs
``c < c'``.
Meant for small problems (``K`` up to a few hundred) in tests and benchmarks.

Conventions (DESIGN.md): classes without samples are left out (``K`` counts present classes); the
global mean is the mean of the class means (``global_mean="classes"``) or of the samples
(``"samples"``); ``Sigma_W`` divides by ``N`` (biased); standard deviations use ``ddof=1``, and the
standard deviation of a single pairwise cosine (``K = 2``) is 0.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

__all__ = [
    "reference_class_means",
    "reference_geometry",
    "reference_nc4",
    "reference_neural_collapse",
    "reference_optimal",
    "reference_statistics",
    "to_numpy",
]


def to_numpy(tensor: Any) -> np.ndarray:
    """A float64 numpy copy of a tensor or array (after any rounding already applied to it)."""
    if hasattr(tensor, "detach"):
        tensor = tensor.detach().cpu()
        if tensor.is_floating_point():
            tensor = tensor.double()
        return np.asarray(tensor.numpy())
    return np.asarray(tensor)


def reference_class_means(features: Any, target: Any, num_classes: int) -> np.ndarray:
    """``(K, d)`` class means by a plain loop (NaN rows for classes without samples)."""
    h = to_numpy(features).astype(np.float64)
    y = to_numpy(target).astype(np.int64)
    means = np.full((num_classes, h.shape[1]), np.nan)
    for c in range(num_classes):
        rows = h[y == c]
        if len(rows):
            means[c] = rows.sum(axis=0) / len(rows)
    return means


def reference_statistics(features: Any, target: Any, num_classes: int) -> dict[str, np.ndarray]:
    """Counts, class means, within-class scatter and per-class within sums of squares (two-pass)."""
    h = to_numpy(features).astype(np.float64)
    y = to_numpy(target).astype(np.int64)
    d = h.shape[1]
    counts = np.array([np.sum(y == c) for c in range(num_classes)], dtype=np.float64)
    means = reference_class_means(h, y, num_classes)
    scatter = np.zeros((d, d))
    within_ssq = np.zeros(num_classes)
    for c in range(num_classes):
        rows = h[y == c]
        if len(rows):
            dev = rows - means[c]
            scatter += dev.T @ dev
            within_ssq[c] = float(np.sum(dev * dev))
    return {
        "counts": counts,
        "means": means,
        "within_scatter": scatter,
        "within_sum_squares": within_ssq,
    }


def _pairs(k: int) -> list[tuple[int, int]]:
    return [(a, b) for a in range(k) for b in range(a + 1, k)]


def _std(values: list[float]) -> float:
    if len(values) < 2:
        return 0.0
    arr = np.asarray(values)
    return float(np.std(arr, ddof=1))


def reference_geometry(vectors: Any, prefix: str, exponent: float = 1.0) -> dict[str, float]:
    """NC2 quantities of the rows of ``vectors`` (already centred if they should be)."""
    v = to_numpy(vectors).astype(np.float64)
    k = v.shape[0]
    norms = np.array([math.sqrt(float(np.dot(row, row))) for row in v])
    units = v / norms[:, None]
    cosines: list[float] = []
    energies: list[float] = []
    for a, b in _pairs(k):
        cosines.append(float(np.dot(v[a], v[b])) / (norms[a] * norms[b]))
        energies.append(float(np.linalg.norm(units[a] - units[b])) ** (-exponent))
    gram = v @ v.T
    etf = (np.eye(k) - np.ones((k, k)) / k) / math.sqrt(k - 1)
    return {
        f"{prefix}_equinorm": float(np.std(norms, ddof=1) / np.mean(norms)),
        f"{prefix}_equiangularity": _std(cosines),
        f"{prefix}_max_angle": float(np.mean([abs(c + 1.0 / (k - 1)) for c in cosines])),
        f"{prefix}_etf_distance": float(np.linalg.norm(gram / np.linalg.norm(gram) - etf)),
        f"{prefix}_min_angle": float(np.min(np.arccos(np.clip(cosines, -1.0, 1.0)))),
        f"{prefix}_spherical_energy": float(np.mean(energies)),
    }


def reference_optimal(k: int, d: int, exponent: float = 1.0) -> dict[str, float]:
    """Best possible minimum angle and Riesz energy of ``k`` unit vectors in ``R^d``, where known.

    Closed forms: the regular simplex (``k <= d + 1``), Rankin's ``pi/2`` (``d + 1 < k <= 2d``),
    the regular polygon (``d = 2``), the cross-polytope (``k = 2d``) and ``d = 1``.
    """
    out: dict[str, float] = {}
    if k <= d + 1:
        out["nc2_min_angle_optimal"] = math.acos(-1.0 / (k - 1))
        out["nc2_spherical_energy_optimal"] = math.sqrt(2.0 * k / (k - 1)) ** (-exponent)
        return out
    if d == 1:
        out["nc2_min_angle_optimal"] = 0.0
        return out
    if d == 2:
        out["nc2_min_angle_optimal"] = 2.0 * math.pi / k
        polygon = [(2.0 * math.sin(math.pi * m / k)) ** (-exponent) for m in range(1, k)]
        out["nc2_spherical_energy_optimal"] = sum(polygon) / (k - 1)
        return out
    if k <= 2 * d:
        out["nc2_min_angle_optimal"] = math.pi / 2.0
    if k == 2 * d:
        one_point = [2.0 ** (-exponent)] + [math.sqrt(2.0) ** (-exponent)] * (2 * d - 2)
        out["nc2_spherical_energy_optimal"] = sum(one_point) / (2 * d - 1)
    return out


def reference_nc4(
    features: Any, weight: Any, bias: Any, class_means: np.ndarray
) -> tuple[int, int]:
    """(mismatches, samples): argmax of ``W h + b`` vs the nearest present reference class mean."""
    h = to_numpy(features).astype(np.float64)
    w = to_numpy(weight).astype(np.float64)
    b = np.zeros(w.shape[0]) if bias is None else to_numpy(bias).astype(np.float64)
    means = np.asarray(class_means, dtype=np.float64)
    present = [c for c in range(means.shape[0]) if np.all(np.isfinite(means[c]))]
    mismatches = 0
    for row in h:
        logits = w @ row + b
        predicted = int(np.argmax(logits))
        distances = [float(np.sum((row - means[c]) ** 2)) for c in present]
        nearest = present[int(np.argmin(distances))]
        mismatches += int(predicted != nearest)
    return mismatches, h.shape[0]


def reference_neural_collapse(
    features: Any,
    target: Any,
    num_classes: int,
    *,
    weight: Any = None,
    bias: Any = None,
    global_mean: str = "classes",
    class_means: np.ndarray | None = None,
    exponent: float = 1.0,
) -> dict[str, float]:
    """Every key of ``NeuralCollapse.compute()`` by the two-pass float64 definition.

    ``class_means`` are the NC4 reference means (default: the means of these features); ``nc4`` is
    returned when ``weight`` is given.
    """
    h = to_numpy(features).astype(np.float64)
    y = to_numpy(target).astype(np.int64)
    stats = reference_statistics(h, y, num_classes)
    counts = stats["counts"]
    present = [c for c in range(num_classes) if counts[c] > 0]
    k = len(present)
    n = float(counts.sum())
    d = h.shape[1]
    means = stats["means"][present]
    mu_g = means.mean(axis=0) if global_mean == "classes" else h.mean(axis=0)
    centred = means - mu_g
    sigma_w = stats["within_scatter"] / n
    sigma_b = centred.T @ centred / k
    eigenvalues, eigenvectors = np.linalg.eigh(sigma_b)
    r = min(k - 1, d)
    top_values = eigenvalues[::-1][:r]
    top_vectors = eigenvectors[:, ::-1][:, :r]
    pinv = (top_vectors / top_values) @ top_vectors.T
    out: dict[str, float] = {
        "nc1": float(np.trace(sigma_w @ pinv) / k),
        "nc1_trace_ratio": float(np.trace(sigma_w) / np.trace(sigma_b)),
        "num_classes_present": float(k),
    }
    variances = [stats["within_sum_squares"][c] / counts[c] for c in present]
    cdnv = []
    for a, b in _pairs(k):
        gap = means[a] - means[b]
        cdnv.append((variances[a] + variances[b]) / (2.0 * float(np.dot(gap, gap))))
    out["cdnv"] = float(np.mean(cdnv))
    out.update(reference_geometry(centred, "nc2", exponent))
    out.update(reference_optimal(k, d, exponent))
    if weight is not None:
        w = to_numpy(weight).astype(np.float64)[present]
        out.update(reference_geometry(w, "nc2_weight", exponent))
        w_unit = w / np.linalg.norm(w)
        m_unit = centred / np.linalg.norm(centred)
        out["nc3"] = float(np.linalg.norm(w_unit - m_unit))
        cosines = [
            float(np.dot(w[i], centred[i]) / (np.linalg.norm(w[i]) * np.linalg.norm(centred[i])))
            for i in range(k)
        ]
        out["nc3_cosine"] = float(np.mean(cosines))
        reference = stats["means"] if class_means is None else class_means
        mismatches, total = reference_nc4(h, weight, bias, reference)
        out["nc4"] = mismatches / total
    return out
