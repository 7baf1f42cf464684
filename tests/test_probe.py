"""Frozen-feature evaluators against brute force: logistic regression, NCM few-shot, Spearman."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from harness.probe import (
    average_ranks,
    few_shot_ncm_accuracy,
    fit_linear_probe,
    linear_probe_accuracy,
    nearest_class_mean_predict,
    spearman_correlation,
    spearman_permutation_test,
)


def _blobs(
    seed: int, num_classes: int, per_class: int, dim: int, spread: float
) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    centres = 2 * torch.randn(num_classes, dim, generator=g, dtype=torch.float64)
    target = torch.arange(num_classes).repeat_interleave(per_class)
    features = centres[target] + spread * torch.randn(
        len(target), dim, generator=g, dtype=torch.float64
    )
    # Per-feature offsets and scales, so that standardization has something to undo.
    features = 3.0 + features * torch.linspace(0.5, 4.0, dim, dtype=torch.float64)
    return features, target


def _brute_force_objective_and_gradient(
    weight: list[list[float]],
    bias: list[float],
    z: list[list[float]],
    target: list[int],
    weight_decay: float,
) -> tuple[float, list[list[float]], list[float]]:
    # Per-sample loop in plain Python floats: softmax cross-entropy, its gradient, plus the L2 term.
    num_classes, dim, n = len(weight), len(z[0]), len(z)
    loss = 0.0
    grad_w = [[0.0] * dim for _ in range(num_classes)]
    grad_b = [0.0] * num_classes
    for zi, yi in zip(z, target):
        logits = [
            sum(weight[c][j] * zi[j] for j in range(dim)) + bias[c] for c in range(num_classes)
        ]
        top = max(logits)
        log_norm = top + math.log(sum(math.exp(v - top) for v in logits))
        loss += (log_norm - logits[yi]) / n
        for c in range(num_classes):
            residual = math.exp(logits[c] - log_norm) - (1.0 if c == yi else 0.0)
            grad_b[c] += residual / n
            for j in range(dim):
                grad_w[c][j] += residual * zi[j] / n
    for c in range(num_classes):
        for j in range(dim):
            loss += 0.5 * weight_decay * weight[c][j] ** 2
            grad_w[c][j] += weight_decay * weight[c][j]
    return loss, grad_w, grad_b


@pytest.mark.parametrize("seed", [0, 1])
def test_linear_probe_reaches_the_optimum(seed: int) -> None:
    # Overlapping classes: the optimum is interior, not at infinity.
    features, target = _blobs(seed, num_classes=3, per_class=30, dim=4, spread=2.0)
    weight_decay = 1e-2
    probe = fit_linear_probe(features, target, 3, weight_decay=weight_decay)
    z = ((features - features.mean(0)) / features.std(0, unbiased=False)).tolist()
    loss, grad_w, grad_b = _brute_force_objective_and_gradient(
        probe.weight.tolist(), probe.bias.tolist(), z, target.tolist(), weight_decay
    )
    # float64 throughout: the loss of ~90 terms agrees to ~1e-15 relative; 1e-10 leaves room.
    assert probe.loss == pytest.approx(loss, rel=1e-10)
    grad_norm = math.sqrt(sum(v * v for row in grad_w for v in row) + sum(v * v for v in grad_b))
    # The stopping rule asks max |grad| < 1e-9, so the norm over 15 entries is below ~4e-9.
    assert grad_norm < 1e-7
    assert probe.grad_norm < 1e-7
    # Convexity + zero gradient = global optimum: random perturbations never lower the loss.
    g = torch.Generator().manual_seed(100 + seed)
    for _ in range(5):
        dw = 1e-3 * torch.randn(probe.weight.shape, generator=g, dtype=torch.float64)
        db = 1e-3 * torch.randn(probe.bias.shape, generator=g, dtype=torch.float64)
        perturbed, _, _ = _brute_force_objective_and_gradient(
            (probe.weight + dw).tolist(),
            (probe.bias + db).tolist(),
            z,
            target.tolist(),
            weight_decay,
        )
        assert perturbed >= loss - 1e-12


def test_linear_probe_separable_problem_is_solved() -> None:
    features, target = _blobs(2, num_classes=4, per_class=25, dim=6, spread=0.1)
    probe = fit_linear_probe(features.float(), target, 4, weight_decay=1e-4)
    assert torch.equal(probe.predict(features.float()), target)
    assert probe.grad_norm < 1e-6


def test_linear_probe_is_invariant_to_feature_scaling() -> None:
    # Standardization makes the fitted predictor independent of per-feature affine maps.
    features, target = _blobs(3, num_classes=3, per_class=20, dim=5, spread=1.5)
    scale = torch.tensor([1e-3, 1.0, 10.0, 1e2, 7.0], dtype=torch.float64)
    a = fit_linear_probe(features, target, 3)
    b = fit_linear_probe(features * scale - 5.0, target, 3)
    torch.testing.assert_close(
        a.logits(features), b.logits(features * scale - 5.0), rtol=0, atol=1e-6
    )


def test_linear_probe_accuracy_matches_predictions() -> None:
    features, target = _blobs(4, num_classes=3, per_class=40, dim=4, spread=1.5)
    train, test = torch.arange(0, 120, 2), torch.arange(1, 120, 2)
    acc = linear_probe_accuracy(features[train], target[train], features[test], target[test], 3)
    probe = fit_linear_probe(features[train], target[train], 3)
    hits = sum(
        int(p == t) for p, t in zip(probe.predict(features[test]).tolist(), target[test].tolist())
    )
    assert acc == hits / len(test)


def _brute_force_ncm(
    support: torch.Tensor, support_target: torch.Tensor, query: torch.Tensor
) -> list[int]:
    # Explicit double loop over queries and classes with the squared Euclidean distance.
    num_classes = int(support_target.max()) + 1
    means = []
    for c in range(num_classes):
        rows = [support[i].tolist() for i in range(len(support)) if int(support_target[i]) == c]
        means.append([sum(col) / len(rows) for col in zip(*rows)])
    predictions = []
    for q in query.tolist():
        distances = [sum((a - b) ** 2 for a, b in zip(q, m)) for m in means]
        predictions.append(min(range(num_classes), key=lambda c: (distances[c], c)))
    return predictions


def test_nearest_class_mean_predict_matches_double_loop() -> None:
    features, target = _blobs(5, num_classes=5, per_class=12, dim=3, spread=2.5)
    g = torch.Generator().manual_seed(0)
    query = 3 + 4 * torch.randn(50, 3, generator=g, dtype=torch.float64)
    means = torch.stack([features[target == c].mean(0) for c in range(5)])
    assert nearest_class_mean_predict(query, means).tolist() == _brute_force_ncm(
        features, target, query
    )


def test_few_shot_all_data_matches_double_loop() -> None:
    features, target = _blobs(6, num_classes=4, per_class=15, dim=3, spread=3.0)
    query, query_target = _blobs(7, num_classes=4, per_class=10, dim=3, spread=3.0)
    acc = few_shot_ncm_accuracy(
        features, target, None, query_features=query, query_target=query_target
    )
    brute = _brute_force_ncm(features, target, query)
    assert acc.tolist() == [
        sum(int(p == t) for p, t in zip(brute, query_target.tolist())) / len(query)
    ]


def test_few_shot_with_fixed_queries_and_all_shots_equals_all_data() -> None:
    features, target = _blobs(8, num_classes=3, per_class=6, dim=2, spread=3.0)
    query, query_target = _blobs(9, num_classes=3, per_class=7, dim=2, spread=3.0)
    full = few_shot_ncm_accuracy(
        features, target, None, query_features=query, query_target=query_target
    )
    draws = few_shot_ncm_accuracy(
        features, target, 6, num_draws=3, query_features=query, query_target=query_target
    )
    torch.testing.assert_close(draws, full.expand(3), rtol=0, atol=1e-12)


def test_few_shot_draws_average_to_the_exact_expectation() -> None:
    # 2 classes x 3 samples, 1 shot, queries = the other samples: 9 equally likely supports.
    # Enumerating them gives the exact expected accuracy and the set of possible values.
    g = torch.Generator().manual_seed(0)
    features = torch.randn(6, 2, generator=g, dtype=torch.float64) + torch.tensor(
        [[0.0, 0.0]] * 3 + [[1.0, 0.5]] * 3
    )
    target = torch.tensor([0, 0, 0, 1, 1, 1])
    possible = []
    for i, j in itertools.product(range(3), range(3, 6)):
        support = torch.tensor([i, j])
        rest = [k for k in range(6) if k not in (i, j)]
        pred = _brute_force_ncm(features[support], target[support], features[rest])
        possible.append(sum(int(p == int(target[k])) for p, k in zip(pred, rest)) / len(rest))
    draws = 4000
    acc = few_shot_ncm_accuracy(
        features, target, 1, num_draws=draws, generator=torch.Generator().manual_seed(1)
    )
    assert all(any(abs(a - p) < 1e-12 for p in possible) for a in acc.tolist())
    expected = sum(possible) / len(possible)
    spread = math.sqrt(sum((p - expected) ** 2 for p in possible) / len(possible))
    # The mean of 4000 i.i.d. draws is within 5 standard errors of the expectation.
    assert abs(float(acc.mean()) - expected) <= 5 * spread / math.sqrt(draws) + 1e-12


def test_few_shot_is_reproducible_per_generator_seed() -> None:
    features, target = _blobs(10, num_classes=3, per_class=20, dim=3, spread=3.0)
    a = few_shot_ncm_accuracy(
        features, target, 2, num_draws=5, generator=torch.Generator().manual_seed(3)
    )
    b = few_shot_ncm_accuracy(
        features, target, 2, num_draws=5, generator=torch.Generator().manual_seed(3)
    )
    assert torch.equal(a, b)
    assert a.shape == (5,)


def _brute_force_average_ranks(values: list[float]) -> list[float]:
    return [
        sum(1 for w in values if w < v) + (sum(1 for w in values if w == v) + 1) / 2 for v in values
    ]


def _brute_force_pearson(x: list[float], y: list[float]) -> float:
    mx, my = sum(x) / len(x), sum(y) / len(y)
    cov = sum((a - mx) * (b - my) for a, b in zip(x, y))
    return cov / math.sqrt(sum((a - mx) ** 2 for a in x) * sum((b - my) ** 2 for b in y))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_spearman_with_ties_matches_brute_force(seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 5, (25,), generator=g).double()  # many ties
    y = x + torch.randint(-3, 4, (25,), generator=g).double()
    assert average_ranks(x).tolist() == _brute_force_average_ranks(x.tolist())
    expected = _brute_force_pearson(
        _brute_force_average_ranks(x.tolist()), _brute_force_average_ranks(y.tolist())
    )
    # Two float64 reductions over 25 values: agreement to ~1e-15; 1e-12 is generous.
    assert spearman_correlation(x, y) == pytest.approx(expected, abs=1e-12)


def test_spearman_without_ties_matches_closed_form() -> None:
    g = torch.Generator().manual_seed(4)
    x, y = torch.randn(30, generator=g), torch.randn(30, generator=g)
    n = 30
    d2 = float((average_ranks(x) - average_ranks(y)).square().sum())
    assert spearman_correlation(x, y) == pytest.approx(1 - 6 * d2 / (n * (n * n - 1)), abs=1e-12)
    assert spearman_correlation(x, x.exp()) == pytest.approx(1.0, abs=1e-12)  # monotone map
    assert spearman_correlation(x, -x) == pytest.approx(-1.0, abs=1e-12)


def test_errors() -> None:
    x, y = _blobs(0, num_classes=2, per_class=4, dim=2, spread=1.0)
    with pytest.raises(
        ValueError,
        match=r"^Expected argument `features` to be a 2-D tensor, but got shape \(2,\)\.$",
    ):
        fit_linear_probe(x[0], y, 2)
    with pytest.raises(TypeError, match="floating-point"):
        fit_linear_probe(x.long(), y, 2)
    with pytest.raises(ValueError, match="one label per row"):
        fit_linear_probe(x, y[:3], 2)
    with pytest.raises(ValueError, match="labels in"):
        fit_linear_probe(x, y, 1)
    with pytest.raises(ValueError, match="weight_decay"):
        fit_linear_probe(x, y, 2, weight_decay=0.0)
    with pytest.raises(
        ValueError, match=r"^Expected argument `features` to be finite, but it holds NaN or inf\.$"
    ):
        fit_linear_probe(x * float("nan"), y, 2)
    with pytest.raises(ValueError, match="same d"):
        nearest_class_mean_predict(x, x[:, :1])
    with pytest.raises(ValueError, match="at least 5 samples"):
        few_shot_ncm_accuracy(x, y, 4)
    with pytest.raises(ValueError, match="shots"):
        few_shot_ncm_accuracy(x, y, 0)
    with pytest.raises(ValueError, match="num_draws"):
        few_shot_ncm_accuracy(x, y, 1, num_draws=0)
    with pytest.raises(ValueError, match="query_features"):
        few_shot_ncm_accuracy(x, y, None)
    with pytest.raises(ValueError, match="together"):
        few_shot_ncm_accuracy(x, y, 1, query_features=x)
    with pytest.raises(ValueError, match="every class"):
        few_shot_ncm_accuracy(x, y * 2, 1)
    with pytest.raises(ValueError, match="1-D"):
        average_ranks(x)
    with pytest.raises(ValueError, match="same number"):
        spearman_correlation(torch.ones(3), torch.ones(2))
    with pytest.raises(ValueError, match="constant"):
        spearman_correlation(torch.ones(3), torch.arange(3.0))
    with pytest.raises(ValueError, match="num_permutations"):
        spearman_permutation_test(torch.arange(9.0), torch.arange(9.0), num_permutations=0)
    with pytest.raises(ValueError, match="NaN"):
        spearman_correlation(torch.tensor([1.0, float("nan")]), torch.arange(2.0))


def test_permutation_test_exact_matches_enumeration() -> None:
    g = torch.Generator().manual_seed(7)
    for n in (4, 6):
        x = torch.randint(0, 3, (n,), generator=g).double()  # ties included
        y = torch.randn(n, generator=g, dtype=torch.float64)
        rho, p = spearman_permutation_test(x, y)
        rx = _brute_force_average_ranks(x.tolist())
        ry = _brute_force_average_ranks(y.tolist())
        observed = abs(_brute_force_pearson(rx, ry))
        perms = list(itertools.permutations(range(n)))
        hits = sum(
            1
            for pi in perms
            if abs(_brute_force_pearson(rx, [ry[i] for i in pi])) >= observed - 1e-12
        )
        assert rho == pytest.approx(_brute_force_pearson(rx, ry), abs=1e-12)
        assert p == hits / len(perms)


def test_permutation_test_monte_carlo_is_close_to_exact() -> None:
    # n = 9 is sampled; compare with the exact p-value of all 9! = 362,880 permutations.
    g = torch.Generator().manual_seed(8)
    x = torch.randn(9, generator=g)
    y = x + 1.5 * torch.randn(9, generator=g)
    rho, p = spearman_permutation_test(x, y, num_permutations=20_000)
    rx, ry = average_ranks(x), average_ranks(y)
    perms = torch.tensor(list(itertools.permutations(range(9))))
    centred_x = rx - rx.mean()
    ys = ry[perms] - ry.mean()
    values = (ys @ centred_x) / (centred_x.norm() * ys.norm(dim=1))
    exact = float((values.abs() >= abs(rho) - 1e-12).double().mean())
    # Monte Carlo standard error sqrt(p (1 - p) / 20000) <= 0.0036; allow 5 of them.
    assert abs(p - exact) < 5 * math.sqrt(exact * (1 - exact) / 20_000) + 1e-4
