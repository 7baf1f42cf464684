"""torchcollapse.functional against the float64 two-pass reference and known closed forms.

Tolerance: every quantity is computed in float64 from statistics accumulated about per-class
shifts, on the same rounded inputs as the reference, so agreement is ~1e-12; the issue's bound
(relative error <= 1e-6) is asserted.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
import torch

import torchcollapse.functional.variability as variability
from tests._helpers.cases import collapse_case as _case
from tests._helpers.reference import (
    reference_class_means,
    reference_geometry,
    reference_nc4,
    reference_neural_collapse,
    reference_optimal,
)
from torchcollapse.functional import (
    centred_class_means,
    equiangularity,
    equinorm,
    etf_distance,
    max_angle,
    min_angle,
    min_angle_optimal,
    neural_collapse,
    neural_collapse_cdnv,
    neural_collapse_compute,
    neural_collapse_nc1,
    neural_collapse_nc1_trace_ratio,
    neural_collapse_nc2,
    neural_collapse_nc3,
    neural_collapse_nc3_cosine,
    neural_collapse_nc4,
    pairwise_geometry,
    spherical_energy,
    spherical_energy_optimal,
)
from torchcollapse.functional.means import UndefinedCollapse
from torchcollapse.metrics import NeuralCollapse, NeuralCollapseETFDistance
from torchcollapse.stats import ClassStatistics

RTOL = 1e-6


CASES: dict[str, dict[str, Any]] = {
    "balanced": {"n": 300, "d": 10, "k": 6},
    "zipf_empty": {"n": 400, "d": 9, "k": 8, "zipf": True, "empty": 5, "seed": 1},
    "more_classes_than_dims": {"n": 500, "d": 4, "k": 11, "seed": 2},
    "k_minus_1_equals_d": {"n": 300, "d": 5, "k": 6, "seed": 3},
    "nc1_1e-6_offset_1e3": {"n": 800, "d": 8, "k": 5, "spread": 1e-3, "offset": 1e3, "seed": 4},
}


def _assert_all_keys(out: dict[str, torch.Tensor], expected: dict[str, float]) -> None:
    assert set(out) == set(expected)
    for key, value in expected.items():
        np.testing.assert_allclose(float(out[key]), value, rtol=RTOL, atol=1e-14, err_msg=key)


@pytest.mark.parametrize("global_mean", ["classes", "samples"])
@pytest.mark.parametrize("name", list(CASES))
def test_neural_collapse_every_key(name: str, global_mean: str) -> None:
    features, target, weight, bias = _case(**CASES[name])
    k = CASES[name]["k"]
    out = neural_collapse(
        features, target, num_classes=k, weight=weight, bias=bias, global_mean=global_mean
    )
    expected = reference_neural_collapse(
        features, target, k, weight=weight, bias=bias, global_mean=global_mean
    )
    _assert_all_keys(out, expected)
    if name == "nc1_1e-6_offset_1e3":
        assert 1e-7 < expected["nc1"] < 1e-5


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_every_input_dtype_against_the_same_rounded_values(dtype: torch.dtype) -> None:
    features, target, weight, bias = _case(n=400, d=7, k=9, zipf=True, empty=2, seed=5)
    rounded = features.to(dtype)
    out = neural_collapse(rounded, target, num_classes=9, weight=weight.to(dtype), bias=bias)
    expected = reference_neural_collapse(
        rounded.double(), target, 9, weight=weight.to(dtype).double(), bias=bias
    )
    _assert_all_keys(out, expected)


def test_streaming_equals_one_batch_equals_functional() -> None:
    features, target, weight, bias = _case(n=350, d=6, k=7, zipf=True, seed=6)
    layer = torch.nn.Linear(6, 7).double()
    with torch.no_grad():
        layer.weight.copy_(weight)
        layer.bias.copy_(bias)
    sizes = [1, 2, 100, 3, 244]
    streamed = NeuralCollapse(7, classifier=layer)
    streamed.set_class_means(torch.from_numpy(reference_class_means(features, target, 7)))
    for f, t in zip(features.split(sizes), target.split(sizes)):
        streamed.update(f, t)
    one = NeuralCollapse(7, classifier=layer)
    one.set_class_means(streamed.class_means())
    one.update(features, target)
    functional = neural_collapse(features, target, weight=weight, bias=bias)
    a, b = streamed.compute(), one.compute()
    assert set(a) == set(b) == set(functional)
    for key in functional:
        torch.testing.assert_close(a[key], b[key], rtol=1e-12, atol=1e-14, msg=key)
        torch.testing.assert_close(a[key], functional[key], rtol=1e-12, atol=1e-14, msg=key)


@pytest.mark.parametrize("global_mean", ["classes", "samples"])
def test_one_function_per_quantity_matches_the_reference(global_mean: str) -> None:
    features, target, weight, bias = _case(n=300, d=6, k=5, zipf=True, seed=7)
    stats = ClassStatistics.from_features(features, target, 5)
    expected = reference_neural_collapse(
        features, target, 5, weight=weight, bias=bias, global_mean=global_mean
    )
    gm: Any = global_mean
    checks = {
        "nc1": neural_collapse_nc1(stats, global_mean=gm),
        "nc1_trace_ratio": neural_collapse_nc1_trace_ratio(stats, global_mean=gm),
        "cdnv": neural_collapse_cdnv(stats),
        "nc3": neural_collapse_nc3(stats, weight, global_mean=gm),
        "nc3_cosine": neural_collapse_nc3_cosine(stats, weight, global_mean=gm).mean(),
        "nc4": neural_collapse_nc4(
            features, weight, bias, class_means=torch.from_numpy(stats.class_means().numpy())
        ),
    }
    checks.update(neural_collapse_nc2(stats, weight=weight, global_mean=gm))
    centred, _ = centred_class_means(stats, gm)
    singles = {
        "nc2_equinorm": equinorm(centred),
        "nc2_equiangularity": equiangularity(centred),
        "nc2_max_angle": max_angle(centred),
        "nc2_etf_distance": etf_distance(centred),
        "nc2_min_angle": min_angle(centred),
        "nc2_spherical_energy": spherical_energy(centred),
    }
    for key, value in {**checks, **singles}.items():
        np.testing.assert_allclose(float(value), expected[key], rtol=RTOL, err_msg=key)


def test_blocked_pairwise_pass_equals_one_block_and_the_reference() -> None:
    # 70 vectors in R^5: K > d + 1, no simplex; tiny blocks exercise the merge of block statistics.
    g = torch.Generator().manual_seed(8)
    vectors = torch.randn(70, 5, generator=g, dtype=torch.float64) + 0.3
    variances = torch.rand(70, generator=g, dtype=torch.float64)
    whole = pairwise_geometry(vectors, variances=variances, block_elements=1 << 20)
    for block in (70, 150, 1000):
        blocked = pairwise_geometry(vectors, variances=variances, block_elements=block)
        for key in whole:
            torch.testing.assert_close(blocked[key], whole[key], rtol=1e-12, atol=0, msg=key)
    expected = reference_geometry(vectors, "g")
    for key, value in expected.items():
        np.testing.assert_allclose(float(whole[key[2:]]), value, rtol=RTOL, err_msg=key)


def _regular_simplex(k: int, d: int) -> torch.Tensor:
    centred = torch.eye(k, dtype=torch.float64) - 1.0 / k
    basis, _ = torch.linalg.qr(torch.randn(d, k - 1, dtype=torch.float64))
    u, _, _ = torch.linalg.svd(centred)
    return u[:, : k - 1] @ basis.T  # k points of a centred simplex, embedded in R^d


def _polygon(k: int) -> torch.Tensor:
    angles = torch.arange(k, dtype=torch.float64) * 2 * math.pi / k
    return torch.stack([angles.cos(), angles.sin()], 1)


@pytest.mark.parametrize(
    ("vectors", "k", "d"),
    [
        (_regular_simplex(5, 4), 5, 4),  # the minimal embedding, d = K - 1
        (_regular_simplex(4, 9), 4, 9),
        (torch.cat([torch.eye(4), -torch.eye(4)]).double(), 8, 4),  # cross-polytope, K = 2d
        (_polygon(7), 7, 2),
    ],
)
def test_known_optimal_configurations_reach_their_optimal_values(
    vectors: torch.Tensor, k: int, d: int
) -> None:
    out = pairwise_geometry(vectors)
    best_angle = min_angle_optimal(k, d)
    best_energy = spherical_energy_optimal(k, d)
    assert best_angle is not None
    assert best_energy is not None
    np.testing.assert_allclose(float(out["min_angle"]), best_angle, rtol=1e-12)
    np.testing.assert_allclose(float(out["spherical_energy"]), best_energy, rtol=1e-12)
    expected = reference_optimal(k, d)
    assert expected == pytest.approx(
        {"nc2_min_angle_optimal": best_angle, "nc2_spherical_energy_optimal": best_energy}
    )
    if k <= d + 1:  # a simplex ETF: every NC2 quantity is 0
        for key in ("equinorm", "equiangularity", "max_angle", "etf_distance"):
            assert float(out[key]) < 1e-12, key


@pytest.mark.parametrize(("k", "d"), [(4, 6), (6, 5), (8, 4), (9, 5), (10, 2)])
def test_random_configurations_never_beat_the_optimal_values(k: int, d: int) -> None:
    g = torch.Generator().manual_seed(9)
    angle_bound, energy_bound = min_angle_optimal(k, d), spherical_energy_optimal(k, d)
    assert angle_bound is not None
    for _ in range(20):
        out = pairwise_geometry(torch.randn(k, d, generator=g, dtype=torch.float64))
        assert float(out["min_angle"]) <= angle_bound + 1e-12
        if energy_bound is not None:
            assert float(out["spherical_energy"]) >= energy_bound - 1e-12
    assert min_angle_optimal(100, 10) is None
    assert spherical_energy_optimal(15, 10) is None


def test_nc1_svd_fallback_matches_the_reference(monkeypatch: pytest.MonkeyPatch) -> None:
    # Force the Cholesky factorization to "fail": NC1 then comes from the top min(K-1, d)
    # singular triplets of M, in both branches (K - 1 < d and K - 1 >= d).
    def failing(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return matrix, torch.ones((), dtype=torch.int32)

    monkeypatch.setattr(variability.torch.linalg, "cholesky_ex", failing)
    for k, d in [(5, 9), (12, 4)]:
        features, target, _, _ = _case(n=240, d=d, k=k, seed=k)
        stats = ClassStatistics.from_features(features, target, k)
        expected = reference_neural_collapse(features, target, k)["nc1"]
        np.testing.assert_allclose(float(neural_collapse_nc1(stats)), expected, rtol=RTOL)


def test_nc4_reference_with_absent_classes() -> None:
    features, target, weight, bias = _case(n=200, d=5, k=6, spread=1.2, seed=10)
    means = torch.from_numpy(reference_class_means(features, target, 6))
    means[[1, 4]] = float("nan")  # classes 1 and 4 absent from the reference
    mismatches, total = reference_nc4(features, weight, bias, means.numpy())
    assert 0 < mismatches < total
    nc4 = neural_collapse_nc4(features.float(), weight, bias, class_means=means)
    assert float(nc4) == mismatches / total


def test_num_classes_inference() -> None:
    features, target, weight, _ = _case(n=60, d=3, k=4, seed=11)
    target[target == 3] = 2  # the last class is absent from the data
    by_weight = neural_collapse(features, target, weight=weight)
    by_target = neural_collapse(features, target)
    assert int(by_weight["num_classes_present"]) == int(by_target["num_classes_present"]) == 3
    torch.testing.assert_close(by_weight["nc1"], by_target["nc1"])


# ------------------------------------------------------------------ errors
def test_errors() -> None:
    features, target, weight, bias = _case(n=30, d=3, k=3, seed=12)
    with pytest.raises(ValueError, match=r"`weight` to be \(num_classes, 3\), one column per"):
        neural_collapse(features, target, num_classes=3, weight=torch.randn(3, 4))
    with pytest.raises(ValueError, match=r"`bias` to have shape \(num_classes,\) = \(3,\)"):
        neural_collapse(features, target, weight=weight, bias=torch.zeros(4))
    with pytest.raises(ValueError, match="`weight` to be given with `bias`"):
        neural_collapse(features, target, bias=bias)
    with pytest.raises(TypeError, match="`target` to be an integer tensor"):
        neural_collapse(features, target.double())
    with pytest.raises(ValueError, match="`features` to be a 2-D tensor"):
        neural_collapse(features[None], target)
    with pytest.raises(ValueError, match="same number of samples"):
        neural_collapse(features, target[:-1])
    with pytest.raises(ValueError, match=r"class indices in \[0, 1\]"):
        neural_collapse(features, target, num_classes=2)
    with pytest.raises(
        ValueError,
        match=r"^Expected argument `features` to be finite, but got NaN or Inf in 30 of 30 rows\.",
    ):
        neural_collapse(features * float("inf"), target)
    with pytest.raises(ValueError, match="`global_mean` to be one of"):
        neural_collapse(features, target, global_mean="weighted")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="at least 2 classes with samples"):
        neural_collapse(features, torch.zeros_like(target), num_classes=3)
    with pytest.raises(ValueError, match=r"rows \[1\] are zero"):
        pairwise_geometry(torch.tensor([[1.0, 0.0], [0.0, 0.0], [0.0, 1.0]]))
    with pytest.raises(ValueError, match="at least 2 rows"):
        equinorm(torch.ones(1, 3))
    with pytest.raises(ValueError, match="at least one finite row"):
        neural_collapse_nc4(features, weight, class_means=torch.full((3, 3), float("nan")))
    means = torch.randn(3, 3)
    with pytest.raises(ValueError, match="`weight` and `class_means` to have the same number"):
        neural_collapse_nc4(features, weight, class_means=means[:2])
    with pytest.raises(ValueError, match="`features` to be finite"):
        neural_collapse_nc4(torch.full_like(features, float("nan")), weight, class_means=means)
    with pytest.raises(ValueError, match="`num_classes` to be at least 2"):
        min_angle_optimal(1, 3)
    with pytest.raises(ValueError, match="`num_classes` to be a positive integer"):
        neural_collapse(features, target, num_classes=0)
    with pytest.raises(ValueError, match="`exponent` to be a finite number"):
        pairwise_geometry(torch.randn(4, 3), exponent=float("nan"))
    # a classifier with NaN or Inf: an error naming it, never a silent NaN or a wrong NC4
    bad = weight.clone()
    bad[0, 0] = float("nan")
    stats = ClassStatistics.from_features(features, target, 3)
    with pytest.raises(ValueError, match="`weight` to be finite"):
        neural_collapse(features, target, weight=bad)
    with pytest.raises(ValueError, match="`weight` to be finite"):
        neural_collapse_nc4(features, bad, class_means=means)
    with pytest.raises(ValueError, match="`weight` to be finite"):
        neural_collapse_nc3(stats, bad)
    with pytest.raises(ValueError, match="`bias` to be finite"):
        neural_collapse(features, target, weight=weight, bias=torch.tensor([math.inf, 0.0, 0.0]))
    with pytest.raises(ValueError, match="rows of the present classes are all zero"):
        neural_collapse_nc3(stats, torch.zeros(3, 3))
    zero_row = weight.clone()
    zero_row[1] = 0.0
    with pytest.raises(ValueError, match=r"rows of argument `weight` .* classes \[1\] are zero"):
        neural_collapse_nc3_cosine(stats, zero_row)


def test_neural_collapse_reads_inputs_that_require_grad_detached() -> None:
    generator = torch.Generator().manual_seed(11)
    features = torch.randn(60, 5, generator=generator, dtype=torch.float64)
    target = torch.arange(60) % 4
    weight = torch.randn(4, 5, generator=generator, dtype=torch.float64)
    expected = neural_collapse(features, target, weight=weight)
    result = neural_collapse(
        features.clone().requires_grad_(True), target, weight=weight.clone().requires_grad_(True)
    )
    assert set(result) == set(expected)
    for key, value in result.items():
        assert not value.requires_grad, key
        torch.testing.assert_close(value, expected[key], rtol=0, atol=0)


@pytest.mark.parametrize("scale", [1.0, 2.0**-30])
def test_a_class_mean_at_the_global_mean_leaves_out_only_the_angles(scale: float) -> None:
    # Three classes on a line: the middle mean is the global mean, so the angles of the centred
    # means are undefined; NC1, CDNV (differences of means only), the norms and the ETF distance
    # (a Gram matrix, no angle) are not.
    seed = int(torch.randint(0, 2**31, ()))  # fresh inputs, reported on failure
    g = torch.Generator().manual_seed(seed)
    centres = torch.tensor([[-2.0, 1.0, 0.5], [0.0, 0.0, 0.0], [2.0, -1.0, -0.5]])
    # every sample comes with its mirror image about its class's centre: exact class means
    half = torch.randint(-3, 4, (30, 3), generator=g).double() / 4
    noise = torch.cat([half, -half])
    target = torch.cat([torch.arange(30) % 3, torch.arange(30) % 3])
    features = (centres.double()[target] + noise) * scale  # a power of two: exact
    with pytest.warns(UserWarning, match=r"classes \[1\] equal the global mean"):
        out = neural_collapse(features, target)
    without_angles = ("nc2_equinorm", "nc2_etf_distance")
    assert not [
        k for k in out if k.startswith("nc2_") and "optimal" not in k and k not in without_angles
    ]
    means = centres.double() * scale
    centred = means - means.mean(0)
    gram = centred @ centred.T
    simplex = (torch.eye(3, dtype=torch.float64) - 1.0 / 3) / math.sqrt(2.0)
    etf = torch.linalg.matrix_norm(gram / torch.linalg.matrix_norm(gram) - simplex)
    torch.testing.assert_close(out["nc2_etf_distance"], etf, rtol=1e-12, atol=0)
    torch.testing.assert_close(etf_distance(centred), etf, rtol=1e-12, atol=0)
    torch.testing.assert_close(equinorm(centred), out["nc2_equinorm"], rtol=1e-12, atol=0)
    metric = NeuralCollapseETFDistance(3)
    metric.update(features, target)
    torch.testing.assert_close(metric.compute(), etf, rtol=1e-12, atol=0)  # no angle: no warning
    variances = torch.stack([((noise * scale)[target == c] ** 2).sum(1).mean() for c in range(3)])
    pairs = [(a, b) for a in range(3) for b in range(a + 1, 3)]
    cdnv = (
        sum(
            (variances[a] + variances[b]) / (2 * (means[a] - means[b]).square().sum())
            for a, b in pairs
        )
        / 3
    )
    torch.testing.assert_close(out["cdnv"], cdnv, rtol=1e-10, atol=0, msg=f"seed {seed}")
    norms = (means - means.mean(0)).norm(dim=1)
    torch.testing.assert_close(out["nc2_equinorm"], norms.std() / norms.mean(), msg=f"seed {seed}")
    assert "nc1" in out, f"seed {seed}"


def test_a_zero_classifier_leaves_out_its_angles() -> None:
    # A zero-initialised head has no directions yet: the classifier's geometry (and NC3 while
    # every row is zero) is left out with a warning, everything else is computed.
    seed = int(torch.randint(0, 2**31, ()))  # fresh inputs, reported on failure
    g = torch.Generator().manual_seed(seed)
    target = torch.arange(80) % 4
    features = 3 * torch.randn(4, 6, generator=g)[target] + torch.randn(80, 6, generator=g)
    weight = torch.zeros(4, 6)
    with pytest.warns(UserWarning, match=r"rows of classes \[0, 1, 2, 3\] are zero"):
        out = neural_collapse(features, target, weight=weight)
    assert not [k for k in out if k.startswith(("nc2_weight_", "nc3"))], f"seed {seed}"
    reference = neural_collapse(features, target)
    for key, value in reference.items():
        torch.testing.assert_close(out[key], value, msg=f"seed {seed}: {key}")
    weight[2] = torch.randn(6, generator=g)
    with pytest.warns(UserWarning, match=r"rows of classes \[0, 1, 3\] are zero"):
        partial = neural_collapse(features, target, weight=weight)
    assert "nc3" in partial, f"seed {seed}"
    assert torch.isfinite(partial["nc3"]), f"seed {seed}"


def _nc1_by_svd(features: np.ndarray, target: np.ndarray, k: int) -> float:
    """NC1 from the singular value decomposition of the centred means (no Gram matrix formed):
    ``sum_k v_k^T Sigma_W v_k / sigma_k^2`` over the top ``min(K-1, d)`` triplets."""
    class_means = np.stack([features[target == c].mean(0) for c in range(k)])
    centred = class_means - class_means.mean(0)
    residual = features - class_means[target]
    sigma_w = residual.T @ residual / len(target)
    _, values, vh = np.linalg.svd(centred, full_matrices=False)
    rank = min(k - 1, features.shape[1])
    basis = vh[:rank].T
    return float((((sigma_w @ basis) * basis).sum(0) / values[:rank] ** 2).sum())


def _two_means_nearly_coincide(
    k: int, d: int, seed: int, *, gap: float, spread: float
) -> tuple[np.ndarray, np.ndarray]:
    """20 samples per class around means ~100 apart, of which the first two are only ``gap``
    apart (minority collapse), with within-class spread ``spread``; float64 numpy."""
    rng = np.random.default_rng(seed)
    means = 100.0 * rng.standard_normal((k, d))
    means[1] = means[0] + gap * rng.standard_normal(d)
    target = np.arange(20 * k) % k
    return means[target] + spread * rng.standard_normal((20 * k, d)), target


@pytest.mark.parametrize(("k", "d"), [(4, 4), (4, 9), (7, 3)])
def test_nc1_stays_accurate_when_class_means_nearly_coincide(k: int, d: int) -> None:
    # Two class means 1e-4 apart among means ~100 apart (minority collapse): the Gram matrices
    # square that conditioning, so NC1 must not come from a plain solve with them. Reference: the
    # singular value decomposition of M in numpy, which never forms a Gram matrix.
    seed = int(torch.randint(0, 2**31, ()))  # fresh inputs, reported on failure
    features, target = _two_means_nearly_coincide(k, d, seed, gap=1e-4, spread=1e-3)
    expected = _nc1_by_svd(features, target, k)
    result = neural_collapse(torch.from_numpy(features), torch.from_numpy(target))["nc1"]
    np.testing.assert_allclose(float(result), expected, rtol=1e-8, err_msg=f"seed {seed}")


@pytest.mark.parametrize(("k", "d"), [(6, 10), (12, 4)])
@pytest.mark.parametrize("condition", [1e4, 1e6])
def test_nc1_is_accurate_for_ill_conditioned_class_means(k: int, d: int, condition: float) -> None:
    # Centred means with singular values from 100 down to 100 / condition in a random
    # orientation: the Cholesky systems square that conditioning, and their pivots can hide it.
    seed = int(torch.randint(0, 2**31, ()))  # fresh inputs, reported on failure
    rng = np.random.default_rng(seed)
    rank = min(k - 1, d)
    left, _ = np.linalg.qr(rng.standard_normal((k, k)) - 1.0 / k)
    left = left[:, :rank] - left[:, :rank].mean(0)  # columns orthogonal to the ones vector
    left, _ = np.linalg.qr(left)
    right, _ = np.linalg.qr(rng.standard_normal((d, rank)))
    means = (left * np.geomspace(100.0, 100.0 / condition, rank)) @ right.T
    target = np.arange(20 * k) % k
    features = means[target] + 1e-2 * rng.standard_normal((20 * k, d))
    expected = _nc1_by_svd(features, target, k)
    result = neural_collapse(torch.from_numpy(features), torch.from_numpy(target))["nc1"]
    np.testing.assert_allclose(float(result), expected, rtol=1e-7, err_msg=f"seed {seed}")


def test_equal_class_means_are_an_error_not_nan() -> None:
    # constant features (a dead layer): every class mean is the global mean
    features, target = torch.zeros(6, 4), torch.arange(3).repeat(2)
    with pytest.raises(ValueError, match="all 3 present classes have the same mean"):
        neural_collapse(features, target)


@pytest.mark.parametrize(("k", "d"), [(5, 6), (9, 3)])
def test_cdnv_and_energy_stay_accurate_for_nearly_coincident_means(k: int, d: int) -> None:
    # Two class means 1e-5 of the others' spacing apart: their distance read from the Gram
    # matrix (|v|^2 + |v'|^2 - 2 G) would keep about 6 digits; it is recomputed.
    seed = int(torch.randint(0, 2**31, ()))  # fresh inputs, reported on failure
    features, target = _two_means_nearly_coincide(k, d, seed, gap=1e-3, spread=1e-6)
    class_means = np.stack([features[target == c].mean(0) for c in range(k)])
    variances = [((features[target == c] - class_means[c]) ** 2).sum(1).mean() for c in range(k)]
    pairs = [(a, b) for a in range(k) for b in range(a + 1, k)]
    cdnv = np.mean(
        [
            (variances[a] + variances[b]) / (2 * ((class_means[a] - class_means[b]) ** 2).sum())
            for a, b in pairs
        ]
    )
    centred = class_means - class_means.mean(0)
    units = centred / np.linalg.norm(centred, axis=1, keepdims=True)
    energy = np.mean([1.0 / np.linalg.norm(units[a] - units[b]) for a, b in pairs])
    out = neural_collapse(torch.from_numpy(features), torch.from_numpy(target))
    np.testing.assert_allclose(float(out["cdnv"]), cdnv, rtol=1e-8, err_msg=f"seed {seed}")
    np.testing.assert_allclose(
        float(out["nc2_spherical_energy"]), energy, rtol=1e-8, err_msg=f"seed {seed}"
    )


def test_nc1_of_collinear_means_counts_the_line_only() -> None:
    # Four collinear class means in 2-D (exactly centred): Sigma_B has a zero among its top
    # min(K-1, d) = 2 eigenvalues, which the pseudo-inverse leaves out. No within-class variance:
    # NC1 = 0 (not 0/0); variance across the line adds nothing; variance along it is the NC1 of
    # the features' coordinate on the line.
    means = torch.tensor([[-3.0, -6.0], [-1.0, -2.0], [1.0, 2.0], [3.0, 6.0]], dtype=torch.float64)
    target = torch.arange(4).repeat(4)
    assert float(neural_collapse(means[target], target)["nc1"]) == 0.0
    features = means[target].clone()
    features[0] += torch.tensor([0.2, -0.1], dtype=torch.float64)  # across the line, mirrored
    features[4] -= torch.tensor([0.2, -0.1], dtype=torch.float64)
    across = float(neural_collapse(features, target)["nc1"])
    assert 0.0 <= across < 1e-15
    features[1] += torch.tensor([0.3, 0.6], dtype=torch.float64)  # along the line, mirrored
    features[5] -= torch.tensor([0.3, 0.6], dtype=torch.float64)
    line = features @ torch.tensor([1.0, 2.0], dtype=torch.float64) / math.sqrt(5.0)
    class_means = torch.stack([line[target == c].mean() for c in range(4)])
    sigma_w = (line - class_means[target]).square().mean()
    sigma_b = (class_means - class_means.mean()).square().mean()
    expected = float(sigma_w / sigma_b / 4)  # 1-D: tr(Sigma_W Sigma_B^+) / K
    assert expected > 1e-4
    np.testing.assert_allclose(float(neural_collapse(features, target)["nc1"]), expected, rtol=RTOL)


def _features_in_a_subspace(
    k: int, d: int, rank: int, seed: int, *, axis_aligned: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(features, target, live)``: float64 features in ``R^d`` that span only ``rank``
    dimensions, and ``live`` their coordinates in that subspace (``(N, rank)``).

    ``axis_aligned``: the other ``d - rank`` features are constant (dead units: zero, or a
    saturated value); otherwise the subspace is a random one (a linear bottleneck), in float64.
    """
    g = torch.Generator().manual_seed(seed)
    target = torch.randperm(30 * k, generator=g) % k
    means = torch.randn(k, rank, generator=g, dtype=torch.float64)
    live = means[target] + 0.3 * torch.randn(30 * k, rank, generator=g, dtype=torch.float64)
    if axis_aligned:
        features = torch.zeros(30 * k, d, dtype=torch.float64)
        columns = torch.randperm(d, generator=g)
        features[:, columns[:rank]] = live
        features[:, columns[rank]] = 1.5  # a saturated unit; the others are dead (zero)
    else:
        basis, _ = torch.linalg.qr(torch.randn(d, rank, generator=g, dtype=torch.float64))
        features = live @ basis.T
    return features, target, live


@pytest.mark.parametrize("axis_aligned", [True, False], ids=["dead_units", "bottleneck"])
@pytest.mark.parametrize(
    ("k", "d", "rank"),
    [(60, 16, 15), (10, 5, 3), (10, 20, 5), (6, 9, 3)],
)
@pytest.mark.parametrize("global_mean", ["classes", "samples"])
def test_nc1_of_rank_deficient_features_is_that_of_their_live_subspace(
    k: int, d: int, rank: int, axis_aligned: bool, global_mean: Any
) -> None:
    # Features that span fewer than min(K-1, d) dimensions: the directions outside their span have
    # singular values of M and within-class variances at rounding level (~1e-16 and ~1e-32), whose
    # ratio is noise. NC1 must be that of the live coordinates (every path: the metric, the
    # functions on statistics and on features).
    seed = int(torch.randint(0, 2**31, ()))  # fresh inputs, reported on failure
    features, target, live = _features_in_a_subspace(k, d, rank, seed, axis_aligned=axis_aligned)
    expected = reference_neural_collapse(live, target, k, global_mean=global_mean)["nc1"]
    stats = ClassStatistics.from_features(features, target, k)
    metric = NeuralCollapse(k, global_mean=global_mean)
    for f, t in zip(features.split(64), target.split(64)):
        metric.update(f, t)
    results = {
        "neural_collapse": neural_collapse(features, target, global_mean=global_mean)["nc1"],
        "neural_collapse_nc1": neural_collapse_nc1(stats, global_mean=global_mean),
        "metric": metric.compute()["nc1"],
    }
    for name, value in results.items():
        np.testing.assert_allclose(float(value), expected, rtol=RTOL, err_msg=f"{name} seed {seed}")


def test_nc1_keeps_real_eigenvalues_far_below_the_largest() -> None:
    # Singular values of M from 100 down to 1e-8 (1e-10 relative: ~1e4 times the rounding cutoff
    # max(K, d) * eps): the smallest direction dominates NC1 and must be kept. Every sample comes
    # with its mirror image about its class mean, so the means are exact to rounding (~1e-14,
    # 1e-6 of the smallest singular value); the check is loose (1e-4) for that, while leaving the
    # direction out would change NC1 by orders of magnitude.
    seed = int(torch.randint(0, 2**31, ()))  # fresh inputs, reported on failure
    for k, d in [(6, 10), (12, 4)]:
        rng = np.random.default_rng(seed + k)
        rank = min(k - 1, d)
        left, _ = np.linalg.qr(rng.standard_normal((k, rank)))
        left, _ = np.linalg.qr(left - left.mean(0))  # columns orthogonal to the ones vector
        right, _ = np.linalg.qr(rng.standard_normal((d, rank)))
        means = (left * np.geomspace(100.0, 1e-8, rank)) @ right.T
        target = np.arange(20 * k) % k
        noise = 1e-2 * rng.standard_normal((10 * k, d))
        features = means[target] + np.concatenate([noise, -noise])
        expected = _nc1_by_svd(features, target, k)
        result = neural_collapse(torch.from_numpy(features), torch.from_numpy(target))["nc1"]
        assert expected > 1e10
        np.testing.assert_allclose(float(result), expected, rtol=1e-4, err_msg=f"seed {seed}")


def test_nc1_cutoff_limits_as_documented() -> None:
    # The documented limits of the pinv cutoff max(K, d) eps sigma_max (module docstring of
    # functional/variability.py, README). (1) It is relative, so a real direction scaled below it
    # is left out and NC1 is not invariant to that rescaling: K = 3, d = 2 with one feature scaled
    # by 2**-60 (exact) gives the NC1 of the other feature alone, not the unscaled NC1. (2) Rounding
    # above it is spread: a float64 rotated bottleneck plus an offset of 1e3 leaves its subspace by
    # ~1e-13 of rounding, above the cutoff (~1e-15 relative here); NC1 is then that of the live
    # subspace only by luck (the rounding's within-class variance may come out ~0: about a third of
    # the draws), otherwise orders of magnitude larger, so over 12 draws at least one is. Without
    # the offset it is always that of the live subspace.
    seed = int(torch.randint(0, 2**31, ()))  # fresh inputs, reported on failure
    g = torch.Generator().manual_seed(seed)
    target = torch.arange(3).repeat(20)
    features = 3 * torch.randn(3, 2, generator=g, dtype=torch.float64)[target]
    features = features + 0.5 * torch.randn(60, 2, generator=g, dtype=torch.float64)
    scaled = features * torch.tensor([1.0, 2.0**-60], dtype=torch.float64)
    invariant = _nc1_by_svd(features.numpy(), target.numpy(), 3)
    alone = _nc1_by_svd(features[:, :1].numpy(), target.numpy(), 3)
    assert abs(alone - invariant) > 1e-3 * invariant, f"seed {seed}"  # the two differ
    result = float(neural_collapse(scaled, target)["nc1"])
    np.testing.assert_allclose(result, alone, rtol=RTOL, err_msg=f"seed {seed}")
    ratios = []
    for draw in range(12):
        features, target, live = _features_in_a_subspace(10, 4, 2, seed + draw, axis_aligned=False)
        expected = reference_neural_collapse(live, target, 10)["nc1"]
        result = float(neural_collapse(features, target)["nc1"])
        np.testing.assert_allclose(result, expected, rtol=RTOL, err_msg=f"seed {seed + draw}")
        ratios.append(float(neural_collapse(features + 1e3, target)["nc1"]) / expected)
    assert max(ratios) > 1e3, f"seed {seed}: {ratios}"


def test_cdnv_of_a_class_mean_at_the_global_mean() -> None:
    # Three classes on a line, the middle mean exactly the global mean: CDNV needs no angle, so
    # neural_collapse_cdnv gives it as neural_collapse_compute does. Reference: the pairwise loop.
    seed = int(torch.randint(0, 2**31, ()))  # fresh inputs, reported on failure
    g = torch.Generator().manual_seed(seed)
    direction = torch.randn(4, generator=g, dtype=torch.float64)
    means = torch.stack([-direction, torch.zeros(4, dtype=torch.float64), direction])
    half = 0.1 * torch.randn(15, 4, generator=g, dtype=torch.float64)
    target = torch.arange(30) % 3
    features = means[target] + torch.cat([half, -half])  # mirrored: exact class means
    stats = ClassStatistics.from_features(features, target, 3)
    class_means = torch.stack([features[target == c].mean(0) for c in range(3)])
    variances = [(features[target == c] - class_means[c]).square().sum(1).mean() for c in range(3)]
    pairs = [(0, 1), (0, 2), (1, 2)]
    expected = sum(
        float(
            (variances[a] + variances[b]) / (2 * (class_means[a] - class_means[b]).square().sum())
        )
        for a, b in pairs
    ) / len(pairs)
    np.testing.assert_allclose(
        float(neural_collapse_cdnv(stats)), expected, rtol=1e-10, err_msg=f"seed {seed}"
    )
    computed = neural_collapse_compute(stats, keys=["cdnv"])
    np.testing.assert_allclose(float(computed["cdnv"]), expected, rtol=1e-10)


_ON_STATISTICS: dict[str, Any] = {
    "nc1": lambda stats, weight: neural_collapse_nc1(stats),
    "nc1_samples": lambda stats, weight: neural_collapse_nc1(stats, global_mean="samples"),
    "trace_ratio": lambda stats, weight: neural_collapse_nc1_trace_ratio(stats),
    "cdnv": lambda stats, weight: neural_collapse_cdnv(stats),
    "nc2": lambda stats, weight: neural_collapse_nc2(stats),
    "nc3": neural_collapse_nc3,
    "nc3_cosine": neural_collapse_nc3_cosine,
    "compute": lambda stats, weight: neural_collapse_compute(stats, weight=weight),
}


@pytest.mark.parametrize("name", list(_ON_STATISTICS))
@pytest.mark.parametrize(("k", "d"), [(3, 4), (5, 2)])
def test_equal_class_means_are_an_error_in_every_function(name: str, k: int, d: int) -> None:
    # Every class mean equal (constant features): no collapse quantity is defined, and every
    # function says so with the same error rather than returning 0, inf or NaN.
    seed = int(torch.randint(0, 2**31, ()))  # fresh inputs, reported on failure
    g = torch.Generator().manual_seed(seed)
    block = torch.randn(4, d, generator=g, dtype=torch.float64)
    features, target = block.repeat(k, 1), torch.arange(k).repeat_interleave(4)
    stats = ClassStatistics.from_features(features, target, k)
    weight = torch.randn(k, d, generator=g, dtype=torch.float64)
    with pytest.raises(UndefinedCollapse, match="have the same mean"):
        _ON_STATISTICS[name](stats, weight)


def test_cdnv_of_two_coinciding_classes() -> None:
    # Two classes with the same mean: with within-class variance their CDNV term, and CDNV, is
    # inf; without any it is 0/0, an error from neural_collapse_cdnv, a key left out (with a
    # warning) from neural_collapse.
    target = torch.tensor([0, 0, 1, 1, 2, 2])
    features = torch.tensor([[1.0, 0], [1, 0], [0, 1], [0, 1], [1, 0], [1, 0]], dtype=torch.float64)
    stats = ClassStatistics.from_features(features, target, 3)
    with pytest.raises(UndefinedCollapse, match="0/0"):
        neural_collapse_cdnv(stats)
    with pytest.warns(UserWarning, match="same mean and no within-class variance"):
        out = neural_collapse(features, target)
    assert "cdnv" not in out
    features[0] += torch.tensor([0.0, 0.1], dtype=torch.float64)
    features[1] -= torch.tensor([0.0, 0.1], dtype=torch.float64)
    stats = ClassStatistics.from_features(features, target, 3)
    assert math.isinf(float(neural_collapse_cdnv(stats)))
    assert math.isinf(float(neural_collapse(features, target)["cdnv"]))


def test_unknown_or_unanswerable_keys_are_errors() -> None:
    # A typo, a plain string (a set of its letters) or a key whose input is missing would
    # otherwise give an empty or partial result without a word.
    features, target, weight, _ = _case(n=30, d=4, k=3, seed=13)
    stats = ClassStatistics.from_features(features, target, 3)
    with pytest.raises(ValueError, match=r"known keys .* but got \['NC3', 'nc_1'\]"):
        neural_collapse_compute(stats, keys=["nc_1", "NC3"])
    for bad in ("nc1", b"nc1", 3):  # a string is an iterable of letters
        with pytest.raises(TypeError, match="`keys` to be an iterable of key names"):
            neural_collapse_compute(stats, keys=bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"`weight` to be given for the keys \['nc3'\]"):
        neural_collapse_compute(stats, keys=["nc1", "nc3"])
    with pytest.raises(ValueError, match="`nc4_counts` to be given"):
        neural_collapse_compute(stats, weight=weight, keys=["nc4"])
    out = neural_collapse_compute(stats, weight=weight, keys=("nc1", "nc3"))
    assert set(out) == {"nc1", "nc3"}
    # A key that cannot be answered for the arguments is an error, not a silent gap: the best
    # energy for a negative exponent does not exist. Without keys it is left out (documented).
    energy = "nc2_spherical_energy_optimal"
    with pytest.raises(ValueError, match=rf"`exponent` to be >= 0 for the key '{energy}'.*-1\.0"):
        neural_collapse_compute(stats, keys=["nc1", energy], exponent=-1.0)
    assert energy not in neural_collapse_compute(stats, exponent=-1.0)
    assert energy in neural_collapse_compute(stats, keys=[energy], exponent=0.0)
    with pytest.raises(ValueError, match="`exponent` to be a finite number, but got nan"):
        neural_collapse_compute(stats, keys=["nc1"], exponent=float("nan"))


def test_keys_may_be_any_iterable_of_names() -> None:
    # keys is read once into a set: a generator, a dict's keys or a set give the same result as
    # the list, each equal to the full computation's values for those keys.
    seed = int(torch.randint(0, 2**31, ()))  # fresh inputs, reported on failure
    features, target, weight, _ = _case(n=60, d=4, k=3, seed=seed)
    stats = ClassStatistics.from_features(features, target, 3)
    full = neural_collapse_compute(stats, weight=weight)
    names = ["nc1", "cdnv", "nc3"]
    for keys in (
        (name for name in names),
        dict.fromkeys(names).keys(),
        set(names),
        iter(names),
    ):
        out = neural_collapse_compute(stats, weight=weight, keys=keys)
        assert set(out) == set(names), f"{type(keys).__name__}, seed {seed}"
        for name in names:
            torch.testing.assert_close(out[name], full[name], rtol=0, atol=0)


@pytest.mark.parametrize(("k", "d"), [(4, 8), (4, 2), (6, 3)])
def test_no_smallest_energy_is_claimed_for_a_negative_exponent(k: int, d: int) -> None:
    # With s < 0 the energy is a mean power of the distances: nearly coincident points bring it
    # towards 0, below any configuration the "optimal" values describe, so none is reported.
    # With s > 0 the value stays a lower bound of random configurations.
    seed = int(torch.randint(0, 2**31, ()))  # fresh inputs, reported on failure
    g = torch.Generator().manual_seed(seed)
    bunched = torch.zeros(k, d, dtype=torch.float64)
    bunched[:, 0] = 1.0
    bunched[:, 1] = 1e-3 * torch.randn(k, generator=g, dtype=torch.float64)
    assert float(spherical_energy(bunched, exponent=-1.0)) < 0.01
    assert spherical_energy_optimal(k, d, -1.0) is None
    stats = ClassStatistics.from_features(bunched, torch.arange(k), k)
    assert "nc2_spherical_energy_optimal" not in neural_collapse_nc2(stats, exponent=-1.0)
    best = spherical_energy_optimal(k, d, 0.5)
    assert best is not None
    for _ in range(10):
        vectors = torch.randn(k, d, generator=g, dtype=torch.float64)
        assert float(spherical_energy(vectors, exponent=0.5)) >= best - 1e-12, f"seed {seed}"


def test_errors_name_the_argument_at_fault() -> None:
    # num_classes taken from a weight with too few rows: the weight is at fault, not the target;
    # Inf in reference means is an error, not a silently absent class (NaN marks those).
    features, target, weight, bias = _case(n=30, d=3, k=3, seed=14)
    with pytest.raises(ValueError, match=r"`weight` to have a row for every class.*class 2"):
        neural_collapse(features, target, weight=weight[:2])
    means = torch.from_numpy(reference_class_means(features, target, 3))
    means[1, 0] = float("inf")
    with pytest.raises(ValueError, match=r"`class_means` to be finite.*rows \[1\] hold Inf"):
        neural_collapse_nc4(features, weight, bias, class_means=means)
    with pytest.raises(ValueError, match="hold Inf"):
        NeuralCollapse(3, classifier=weight, class_means=means)


def test_spherical_energy_optimal_reads_the_exponent_as_spherical_energy_does() -> None:
    """The exponent of ``spherical_energy_optimal`` is checked as that of ``spherical_energy``:
    NaN, infinities, bools and strings are refused by name (they returned NaN, 0 or the value
    for 1); numpy scalars and 0-dim tensors are read. Reference: the simplex energy
    ``(2K / (K - 1))^(-s/2)`` in closed form."""
    for bad in (float("nan"), float("inf")):
        with pytest.raises(ValueError, match="`exponent` to be a finite number"):
            spherical_energy_optimal(4, 5, bad)
        with pytest.raises(ValueError, match="`exponent` to be a finite number"):
            spherical_energy(torch.randn(4, 5), bad)
    for wrong in (True, "1", None):  # not numbers: a wrong type
        with pytest.raises(TypeError, match="`exponent` to be a real number"):
            spherical_energy_optimal(4, 5, wrong)  # type: ignore[arg-type]
        with pytest.raises(TypeError, match="`exponent` to be a real number"):
            spherical_energy(torch.randn(4, 5), wrong)  # type: ignore[arg-type]
    s = float(torch.rand(()) * 3)
    expected = (2.0 * 4 / 3) ** (-s / 2)
    for exponent in (s, np.float64(s), torch.tensor(s, dtype=torch.float64)):
        value = spherical_energy_optimal(4, 5, exponent)  # type: ignore[arg-type]
        assert value == pytest.approx(expected, rel=1e-12)


def test_geometry_is_the_same_at_any_float64_scale() -> None:
    """Every geometric quantity is scale-free (CDNV with the variances scaled by the square):
    rows scaled by 1e+-100 up to 1e300 and down to subnormals (and by non-powers of two) give the
    values of the unscaled rows, also the ETF distance, whose Gram matrix's squared entries
    (fourth powers of the scale) overflowed or underflowed float64 beyond ~1e+-77, and the ETF
    distance of rows with a zero row (tiny rows' norms underflowed to zero). Reference: the same
    call at scale 1 (rtol 1e-12, float64 rounding of the rescaled cosines)."""
    seed = int(torch.randint(0, 2**31, ()))
    g = torch.Generator().manual_seed(seed)
    v = torch.randn(6, 4, generator=g, dtype=torch.float64)
    variances = torch.rand(6, generator=g, dtype=torch.float64)
    expected = pairwise_geometry(v, variances=variances)
    with_zero = torch.cat([v[:3], torch.zeros(1, 4, dtype=torch.float64)])
    expected_zero = etf_distance(with_zero)
    for scale in (1e100, 1e-100, 3.7e90, 3.7e-90, 1e-160, 1e-300, 1e-310, 1e160, 1e300):
        # (variances scaled by the square only where that square is a normal float64)
        squared = scale * scale if 1e-300 < scale * scale < 1e300 else None
        scaled_variances = None if squared is None else variances * squared
        out = pairwise_geometry(v * scale, variances=scaled_variances)
        for key, value in expected.items():
            if key == "cdnv" and squared is None:
                continue
            torch.testing.assert_close(out[key], value, rtol=1e-12, atol=0, msg=f"{key} {scale}")
        torch.testing.assert_close(
            etf_distance(with_zero * scale), expected_zero, rtol=1e-12, atol=0
        )


def test_a_transposed_weight_is_named_as_such() -> None:
    """A ``(d, K)`` weight given to ``neural_collapse`` is refused for its columns, with a hint
    that it may be transposed (its rows were taken as the number of classes, and the error spoke
    of another shape); the right weight gives the keys."""
    g = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))
    features, target = torch.randn(40, 5, generator=g), torch.arange(40) % 4
    weight = torch.randn(4, 5, generator=g)
    with pytest.raises(ValueError, match=r"\(num_classes, 5\).*\(5, 4\) \(a transposed weight\?\)"):
        neural_collapse(features, target, weight=weight.T)
    with pytest.raises(ValueError, match=r"one column per feature, but got shape \(4, 3\)\.$"):
        neural_collapse(features, target, weight=weight[:, :3])
    assert "nc3" in neural_collapse(features, target, weight=weight)
